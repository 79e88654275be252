"""roomserver: a WebSocket room server on Twisted and Autobahn.

Public API::

    from roomserver import WebSocketServer, ServerOptions, Room, ServerStats, ClusterStats, NodeStats, Client
"""

from .client import Client
from .core.errors import CloseCode, ErrorCode
from .core.rooms import Room
from .core.stats import ClusterStats, NodeStats, ServerStats
from .options import ServerOptions
from .server import WebSocketServer

__all__ = ["Client", "CloseCode", "ClusterStats", "ErrorCode", "NodeStats", "Room", "ServerOptions", "ServerStats",
           "WebSocketServer"]
__version__ = "0.1.0"
