"""twistd dropin: ``twistd roomserver`` (the code lives in ``roomserver.tap``, imported only when used)."""

from twisted.application.service import ServiceMaker

roomserver = ServiceMaker(
    "roomserver", "roomserver.tap", "A WebSocket room server (rooms, broadcasts, heartbeats).", "roomserver"
)
