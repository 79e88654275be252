"""TLS through a Twisted endpoint description: ``port="ssl:0:privateKey=...:certKey=..."`` serves wss://."""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from pathlib import Path
from typing import Any

import pytest_twisted
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from .support import WSClient


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A throwaway certificate for 127.0.0.1 and its key, as PEM files."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)

    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                       critical=False)
        .sign(key, hashes.SHA256())
    )
    key_file, cert_file = directory / "key.pem", directory / "cert.pem"
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return key_file, cert_file


@pytest_twisted.ensureDeferred
async def test_wss_through_an_ssl_endpoint(make_server: Any, tmp_path: Path) -> None:
    key_file, cert_file = self_signed(tmp_path)
    server = await make_server(
        port=f"ssl:0:interface=127.0.0.1:privateKey={key_file}:certKey={cert_file}", room_protocol=True)
    assert isinstance(server.port, int) and server.port > 0
    context = ssl.create_default_context(cafile=str(cert_file))
    ws = await WSClient.connect(f"wss://127.0.0.1:{server.port}/ws", ssl=context)
    assert (await ws.recv())["type"] == "welcome"
    assert (await ws.request({"type": "join", "room": "secure"}))["type"] == "joined"
    await ws.send({"type": "chat", "room": "secure", "text": "over TLS"})
    chat = await ws.recv()
    assert chat["text"] == "over TLS" and chat["seq"] == 1
    await server.stop()
    assert (await ws.closed())[0] == 1001
