"""What hostile frames cost the server in memory (RELIABILITY.md P7, P8, P9), at the matrix's own scale.

The server runs in this process and the attacker in another, so ``tracemalloc`` sees every allocation the
server makes while it handles the attack, and nothing of the attacker's. The budgets are the matrix's: a
claimed 2^63-1 byte payload costs less than 64 KiB (beyond the one read buffer every read costs), and 4 MiB of
64-byte fragments or a million empty continuations cost less than 1 MiB.
"""

from __future__ import annotations

import asyncio
import os
import sys
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted

from .support import aio, eventually, frame

KIB = 1024
# Twisted reads a socket 64 KiB at a time (tcp.Connection.bufferSize): one such buffer is the constant floor of
# any read, freed at once, not memory held for the attack.
READ_BUFFER = 64 * KIB

# The attacker: the opening handshake, the welcome, "ready" on stdout, then (on a line of stdin) the file named
# by argv[2] in 64 KiB chunks until the server stops reading, then the code of the server's close frame.
ATTACKER = r"""
import socket, sys
sock = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
sock.sendall(b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
             b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
received = b""
while b"welcome" not in received:
    received += sock.recv(65536)
print("ready", flush=True)
sys.stdin.readline()
with open(sys.argv[2], "rb") as attack:
    data = attack.read()
sock.settimeout(30)
try:
    for start in range(0, len(data), 65536):
        sock.sendall(data[start:start + 65536])
except OSError:
    pass
received = b""
try:
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            break
        received += chunk
except OSError:
    pass
sys.stdin.readline()  # not before the test stopped measuring: reading this answer costs the test a buffer
at = received.find(b"\x88")
print(int.from_bytes(received[at + 2:at + 4], "big") if at >= 0 else "none")
"""


async def attack(server: Any, data: bytes, tmp_path: Path) -> tuple[str, int]:
    """(the close code the attacker got, the peak bytes this process allocated meanwhile)."""
    path = tmp_path / "attack.bin"
    path.write_bytes(data)
    process = await aio(asyncio.create_subprocess_exec(
        sys.executable, "-c", ATTACKER, str(server.port), str(path), stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE))
    assert process.stdin is not None and process.stdout is not None
    assert await aio(asyncio.wait_for(process.stdout.readline(), 10)) == b"ready\n"
    tracemalloc.start()  # from here until the server let go of the connection: the server's work alone
    try:
        process.stdin.write(b"go\n")
        await eventually(lambda: server.get_stats().connections == 0, timeout=30)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    out, _ = await aio(asyncio.wait_for(process.communicate(b"done\n"), 30))
    return out.decode().strip(), peak


@pytest_twisted.ensureDeferred
async def test_p7_a_claimed_2_63_byte_payload_closes_1009_and_allocates_nothing_for_it(
        make_server: Any, tmp_path: Path) -> None:
    server = await make_server(room_protocol=True, max_message_size=64 * KIB)
    header = bytes([0x82, 0x80 | 127]) + (2**63 - 1).to_bytes(8, "big") + os.urandom(4)
    code, peak = await attack(server, header + b"\0" * 1024, tmp_path)
    assert code == "1009"
    assert peak < READ_BUFFER + 64 * KIB, f"{peak} bytes allocated for a payload that never came"
    assert server.get_stats().messages_received == 0


@pytest.mark.parametrize(("max_fragments", "expected"), [(1024, "1008"), (1_000_000, "1009")])
@pytest_twisted.ensureDeferred
async def test_p8_four_mib_in_64_byte_fragments_stop_at_the_first_limit_within_1_mib(
        make_server: Any, tmp_path: Path, max_fragments: int, expected: str) -> None:
    """64 KiB is exactly 1,024 fragments of 64 bytes: with the default cap of 1,024 fragments the 1,025th closes
    with 1008 (the cap) just before the size limit would; without the cap, the size limit closes with 1009."""
    server = await make_server(room_protocol=True, max_message_size=64 * KIB, max_fragments=max_fragments)
    fragments = 4 * KIB * KIB // 64
    data = frame(0x1, b"a" * 64, fin=False) + b"".join(frame(0x0, b"a" * 64, fin=False) for _ in range(fragments))
    code, peak = await attack(server, data, tmp_path)
    assert code == expected
    assert peak < KIB * KIB, f"{peak} bytes allocated for at most 64 KiB of accepted fragments"
    assert server.get_stats().messages_received == 0


@pytest_twisted.ensureDeferred
async def test_p9_a_million_empty_continuations_close_1008_at_the_fragment_cap_within_1_mib(
        make_server: Any, tmp_path: Path) -> None:
    server = await make_server(room_protocol=True)  # the default cap: 1,024 fragments
    data = frame(0x1, b"{", fin=False) + frame(0x0, b"", fin=False) * 1_000_000
    code, peak = await attack(server, data, tmp_path)
    assert code == "1008"
    assert peak < KIB * KIB, f"{peak} bytes allocated for empty fragments"
    assert server.get_stats().drops["too_many_fragments"] == 1
