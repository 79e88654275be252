"""``twistd roomserver`` as a real subprocess, for the tests that run the server the way users do."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parents[1]
TWISTD = str(Path(sys.executable).parent / "twistd")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def twistd(cwd: Path, *args: str, env: dict[str, str] | None = None,
           stdout: int | IO[Any] = subprocess.PIPE) -> subprocess.Popen[bytes]:
    """``twistd --nodaemon roomserver ARGS`` in ``cwd``, with this checkout first on the path."""
    return subprocess.Popen(
        [TWISTD, "--nodaemon", "--pidfile=", "roomserver", *args],
        cwd=cwd, env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}, stdout=stdout,
        stderr=subprocess.STDOUT,
    )


def wait_for_port(port: int, process: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"twistd exited early: {process.stdout.read() if process.stdout else ''!r}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise AssertionError("twistd did not start listening")


def stop(process: subprocess.Popen[bytes]) -> str:
    """SIGTERM (then kill if it hangs); returns what the process wrote to its pipe."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        process.wait(15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(5)
    return process.stdout.read().decode() if process.stdout else ""


def reap(process: subprocess.Popen[bytes]) -> str:
    """Kill the process if a failed test left it running; returns what it wrote to its pipe."""
    if process.poll() is None:
        process.kill()
        process.wait(5)
    return process.stdout.read().decode() if process.stdout else ""
