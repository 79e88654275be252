"""Several processes on one port: ``reuse_port`` listening and ``twistd roomserver --workers N``.

A CPython process uses one core. ``--workers N`` starts N-1 more processes of the same server, each listening
on the same TCP port with ``SO_REUSEPORT``: the kernel spreads new connections over them evenly. They act as
one server through the Redis broker and store (``--workers`` needs them), like nodes on different machines.

- ``reuse_port``: each process listens with ``SO_REUSEPORT`` (roomserver/listening.py's ``PacedPort``), since
  Twisted's TCP endpoints do not set that option.
- ``WorkersService``: run by the first process; starts the others (``python -m twisted roomserver ...`` with
  the same options, ``--workers`` removed and the port the first process bound), restarts one that dies
  (after a second, so a crashing worker cannot spin), and on stop sends them SIGTERM and waits for them (each
  drains its clients with 1001 as usual).
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

from twisted.application import service
from twisted.internet import defer, protocol
from twisted.logger import Logger

RESTART_DELAY = 1.0


def with_port(spec: str, port: int) -> str:
    """``spec`` (a number or ``tcp:PORT...``) with its port replaced by ``port``."""
    if spec.isdigit():
        return str(port)
    kind, _, rest = spec.partition(":")
    _, _, params = rest.partition(":")
    return f"{kind}:{port}" + (f":{params}" if params else "")


def worker_argv(argv: Sequence[str], spec: str, port: int) -> list[str]:
    """The ``roomserver`` plugin options of this process for a worker: ``--workers`` dropped, ``--port`` set
    to ``spec`` with the port the first process bound (so ``--port 0`` works too), ``--reuse-port`` added."""
    rest = list(argv[list(argv).index("roomserver") + 1:])
    kept: list[str] = []
    skip = False
    for arg in rest:
        if skip:
            skip = False
            continue
        if arg in ("--workers", "--port", "-p"):
            skip = True
            continue
        if arg.startswith(("--workers=", "--port=")) or arg == "--reuse-port":
            continue
        kept.append(arg)
    return ["roomserver", *kept, "--port", with_port(spec, port), "--reuse-port"]


class _Worker(protocol.ProcessProtocol):
    def __init__(self, owner: WorkersService, index: int) -> None:
        self.owner = owner
        self.index = index
        self.ended: defer.Deferred[None] = defer.Deferred()

    def processEnded(self, reason: Any) -> None:
        self.ended.callback(None)
        self.owner._ended(self)


class WorkersService(service.Service):
    """Starts and supervises ``count`` extra worker processes once the first process listens."""

    name = "roomserver-workers"
    log = Logger()

    def __init__(self, reactor: Any, count: int, argv_of: Any) -> None:
        self.reactor = reactor
        self.count = count
        self.argv_of = argv_of  # () -> list of plugin options, called once the first process is listening
        self.workers: dict[int, tuple[_Worker, Any]] = {}
        self._stopping = False

    def start_workers(self) -> None:
        for index in range(1, self.count + 1):
            self._spawn(index)

    def _spawn(self, index: int) -> None:
        if self._stopping:
            return
        args = [sys.executable, "-m", "twisted", *self.argv_of()]
        worker = _Worker(self, index)
        transport = self.reactor.spawnProcess(worker, sys.executable, args, env=dict(os.environ),
                                              childFDs={0: "w", 1: 1, 2: 2})
        self.workers[index] = (worker, transport)
        self.log.info("started worker {index} (pid {pid})", index=index, pid=transport.pid)

    def _ended(self, worker: _Worker) -> None:
        current = self.workers.get(worker.index)
        if current is None or current[0] is not worker or self._stopping:
            return
        self.log.warn("worker {index} exited; restarting it in {delay} s", index=worker.index, delay=RESTART_DELAY)
        self.reactor.callLater(RESTART_DELAY, self._spawn, worker.index)

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        self._stopping = True
        waits = []
        for worker, transport in self.workers.values():
            if not worker.ended.called:
                try:
                    transport.signalProcess(signal.SIGTERM)
                except Exception:  # already gone
                    continue
                waits.append(worker.ended)
        return defer.DeferredList(waits).addCallback(lambda _: None)
