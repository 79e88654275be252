"""Several processes on one port: ``reuse_port`` listening and ``twistd roomserver --workers N``.

A CPython process uses one core. ``--workers N`` starts N-1 more processes of the same server, each listening
on the same TCP port with ``SO_REUSEPORT``: the kernel spreads new connections over them evenly. They act as
one server through the Redis broker and store (``--workers`` needs them), like nodes on different machines.

- ``reuse_port``: each process listens with ``SO_REUSEPORT`` (roomserver/listening.py's ``PacedPort``), since
  Twisted's TCP endpoints do not set that option.
- ``WorkersService``: run by the first process; starts the others (``twistd --nodaemon --pidfile= roomserver
  ...`` with the same options, ``--workers`` removed and the port the first process bound), restarts one that
  dies (after a second, so a crashing worker cannot spin), and on stop sends them SIGTERM and waits for them
  (each drains its clients with 1001 as usual). ``twistd``, as the first process runs, so a worker logs as it
  does (``worker_twistd_options``): ``python -m twisted`` (``twist``) ignores the log observer the plugin sets
  for ``--log-format`` and writes Twisted's own JSON events whenever its output is not a terminal.
- ``SupervisorWatch``: run by each worker (``--supervised``); stops it, draining its clients as on SIGTERM, when
  the first process is gone, even killed with SIGKILL (it cannot stop its workers then): the worker's standard
  input is a pipe from the first process, and its end of file says so. Without it the workers of a killed
  first process served the port on their own, unsupervised, for ever. A pipe rather than Linux's
  ``PR_SET_PDEATHSIG``: portable, and the stop is the graceful one rather than a signal's.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from twisted.application import service
from twisted.internet import abstract, defer, fdesc, protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.reflect import fullyQualifiedName

RESTART_DELAY = 1.0
TWISTD_MAIN = "import sys; from twisted.scripts.twistd import run; sys.exit(run())"
"""What ``twistd`` runs, for ``python -c``: the interpreter of this process, whatever the script is called."""


def with_port(spec: str, port: int) -> str:
    """``spec`` (a number or ``tcp:PORT...``) with its port replaced by ``port``."""
    if spec.isdigit():
        return str(port)
    kind, _, rest = spec.partition(":")
    _, _, params = rest.partition(":")
    return f"{kind}:{port}" + (f":{params}" if params else "")


def worker_twistd_options(twistd: Mapping[str, Any] | None, index: int) -> list[str]:
    """``twistd``'s own options for worker ``index``, from the first process's (``twistd``: its parsed options;
    None outside twistd). In the foreground and with no pid file: the first process supervises it and its pid
    file is its own. Logging as the first process does: its ``--logger``, its syslog (``--syslog``,
    ``--prefix``), or its log file (``--logfile``; a daemon's default ``twistd.log``) with ``.worker<N>`` added,
    since twistd's log files rotate and two processes cannot share one; else stdout, which the worker shares."""
    options = ["--nodaemon", "--pidfile="]
    if twistd is None:
        return options
    logger = twistd.get("logger")
    if logger:
        # twistd's parsed options hold the observer factory it imported, not the name given: name it again.
        options += ["--logger", logger if isinstance(logger, str) else fullyQualifiedName(logger)]
    if twistd.get("syslog"):
        options += ["--syslog", "--prefix", str(twistd.get("prefix") or "twisted")]
    logfile = twistd.get("logfile")
    if not logfile and "nodaemon" in twistd and not twistd["nodaemon"]:
        logfile = "twistd.log"  # twistd's own default for a daemon
    if logfile and logfile != "-":
        options += ["--logfile", f"{os.path.abspath(logfile)}.worker{index}"]
    return options


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
        if arg.startswith(("--workers=", "--port=")) or arg in ("--reuse-port", "--supervised"):
            continue
        kept.append(arg)
    return ["roomserver", *kept, "--port", with_port(spec, port), "--reuse-port", "--supervised"]


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

    def __init__(self, reactor: Any, count: int, argv_of: Any, twistd: Mapping[str, Any] | None = None) -> None:
        self.reactor = reactor
        self.count = count
        self.argv_of = argv_of  # () -> list of plugin options, called once the first process is listening
        self.twistd = twistd  # the first process's twistd options (``worker_twistd_options``)
        self.workers: dict[int, tuple[_Worker, Any]] = {}
        self._stopping = False

    def start_workers(self) -> None:
        for index in range(1, self.count + 1):
            self._spawn(index)

    def _spawn(self, index: int) -> None:
        if self._stopping:
            return
        args = [sys.executable, "-c", TWISTD_MAIN, *worker_twistd_options(self.twistd, index), *self.argv_of()]
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


class _EndOfInput(abstract.FileDescriptor):
    """Reads (and drops) whatever comes on a file descriptor, and calls ``gone`` at its end of file."""

    def __init__(self, reactor: Any, fd: int, gone: Any) -> None:
        super().__init__(reactor)
        self.fd = fd
        self.gone = gone
        fdesc.setNonBlocking(fd)

    def fileno(self) -> int:
        return self.fd

    def doRead(self) -> Any:
        return fdesc.readFromFD(self.fd, lambda data: None)  # CONNECTION_DONE at the end of file

    def connectionLost(self, reason: Failure) -> None:
        super().connectionLost(reason)
        self.gone()

    def logPrefix(self) -> str:
        return "supervisor"


class SupervisorWatch(service.Service):
    """A worker's watch on the process that started it (see the module docstring): once its standard input
    (``fd``) ends, the worker stops as on SIGTERM, draining its clients."""

    name = "roomserver-supervisor-watch"
    log = Logger()

    def __init__(self, reactor: Any, fd: int = 0) -> None:
        self.reactor = reactor
        self.fd = fd
        self._reader: _EndOfInput | None = None

    def startService(self) -> None:
        super().startService()
        self._reader = _EndOfInput(self.reactor, self.fd, self._supervisor_gone)
        self._reader.startReading()

    def stopService(self) -> None:
        super().stopService()
        if self._reader is not None:
            self._reader.stopReading()
            self._reader = None

    def _supervisor_gone(self) -> None:
        if self._reader is None:
            return  # this service stopped first
        self._reader = None
        self.log.warn("the process that started this worker is gone (its pipe closed): stopping")
        if self.reactor.running:
            self.reactor.stop()
