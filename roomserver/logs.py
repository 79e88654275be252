"""Structured logs: ``twistd roomserver --log-format json`` writes one JSON object per line.

twistd picks its log observer before it starts the application: a command-line ``--logger``, else an
``ILogObserver`` component set on the application, else its own text log. ``JsonLoggingService`` is the root
service ``makeService`` returns with ``--log-format json``; when twistd parents it to the application it sets
a ``json_lines_observer`` as that component, so every event (the connection log of ``observe.ConnectionLog``
included, with its fields) becomes one JSON line in twistd's log file, or on stdout for ``--nodaemon`` without
``--logfile``. Tokens never reach the log: no code of ours logs headers, query strings or tokens.
"""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from typing import IO, Any

import orjson
from twisted.application import service
from twisted.logger import FileLogObserver, ILogObserver, formatEvent

LOG_FORMATS = ("text", "json")


def event_as_json_line(event: dict[str, Any]) -> str:
    """One log event as a flat JSON line: time (ISO 8601, UTC), level, namespace, message, then the event's
    own fields (those that JSON can carry; Twisted's internal ``log_*`` keys are left out), and the traceback
    of a failure."""
    line: dict[str, Any] = {
        "time": datetime.fromtimestamp(event.get("log_time", 0.0), UTC).isoformat(timespec="milliseconds"),
        "level": getattr(event.get("log_level"), "name", "info"),
        "namespace": event.get("log_namespace", ""),
        "message": formatEvent(event),
    }
    for key, value in event.items():
        if key.startswith("log_") or key in line or key in ("format", "message", "isError", "system", "time"):
            continue
        if value is None or isinstance(value, (str, int, float, bool)):
            line[key] = value
    failure = event.get("log_failure")
    if failure is not None:
        line["traceback"] = failure.getTraceback()
    return orjson.dumps(line, default=str).decode("utf-8") + "\n"


def json_lines_observer(target: IO[str]) -> FileLogObserver:
    return FileLogObserver(target, event_as_json_line)


def json_log_target(config: Any) -> IO[str]:
    """Where twistd would log: its ``--logfile`` (appended), else stdout (``-`` or ``--nodaemon``), else
    (a daemon) ``twistd.log``. Outside twistd (``twist``, or no parent options), stdout: no file is created
    that nothing would write to."""
    parent = getattr(config, "parent", None)
    logfile = parent.get("logfile") if parent is not None else None
    if logfile and logfile != "-":
        return open(logfile, "a", encoding="utf-8")
    if not logfile and parent is not None and "nodaemon" in parent and not parent["nodaemon"]:
        return open("twistd.log", "a", encoding="utf-8")  # twistd's own default when daemonized
    return sys.stdout


class JsonLoggingService(service.MultiService):
    """A root service that makes twistd log JSON lines to ``target``."""

    def __init__(self, target: IO[str]) -> None:
        super().__init__()
        self.observer = json_lines_observer(target)

    def setServiceParent(self, parent: Any) -> Any:
        setComponent = getattr(parent, "setComponent", None)
        if setComponent is not None:
            setComponent(ILogObserver, self.observer)
        return super().setServiceParent(parent)
