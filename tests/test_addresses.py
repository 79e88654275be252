"""Client addresses behind trusted proxies, and the per-address limit on new connections (RELIABILITY H5, H7).

Pure parts (roomserver/core/addresses.py, ``KeyedRateLimit``) with a fake clock; the server's admission with
real upgrades on loopback, from two source addresses (127.0.0.1 and 127.0.0.2) and through a pretend proxy
that sets ``X-Forwarded-For``.
"""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted
import websockets

from roomserver import ServerOptions
from roomserver.core.addresses import AddressResolver
from roomserver.core.ratelimit import KeyedRateLimit

from .support import WSClient, eventually, url_of

# -- which address --------------------------------------------------------------------------------------------


def test_without_trusted_proxies_the_header_is_ignored() -> None:
    resolver = AddressResolver()
    assert resolver.client_address("203.0.113.9", "1.2.3.4") == "203.0.113.9"


def test_the_nearest_untrusted_hop_is_the_client() -> None:
    resolver = AddressResolver(["10.0.0.0/8", "127.0.0.1"])
    # a client (198.51.100.7) that wrote a fake hop, through two trusted proxies: 10.1.1.1 then 127.0.0.1
    assert resolver.client_address("127.0.0.1", "6.6.6.6, 198.51.100.7, 10.1.1.1") == "198.51.100.7"
    assert resolver.client_address("127.0.0.1", None) == "127.0.0.1"  # the proxy's own request
    # a peer that is no trusted proxy cannot choose its address by sending the header
    assert resolver.client_address("198.51.100.7", "10.1.1.1") == "198.51.100.7"


def test_garbage_in_the_header_stops_the_walk() -> None:
    resolver = AddressResolver(["127.0.0.1"])
    assert resolver.client_address("127.0.0.1", "198.51.100.7, not-an-ip") == "127.0.0.1"
    assert resolver.client_address("127.0.0.1", " [2001:db8::1]:4711 ") == "2001:db8::1"
    assert resolver.client_address("127.0.0.1", "198.51.100.7:5555") == "198.51.100.7"


def test_ipv6_and_mapped_ipv4_proxies() -> None:
    resolver = AddressResolver(["::1", "10.0.0.0/8"])
    assert resolver.client_address("::1", "2001:db8::5") == "2001:db8::5"
    assert resolver.client_address("::ffff:10.0.0.3", "192.0.2.1") == "192.0.2.1"


def test_malformed_trusted_proxies_are_refused() -> None:
    with pytest.raises(ValueError):
        ServerOptions(trusted_proxies=("10.0.0.0/33",))
    assert ServerOptions(trusted_proxies="10.0.0.0/8, ::1").trusted_proxies == ("10.0.0.0/8", "::1")  # type: ignore[arg-type]


# -- how often ------------------------------------------------------------------------------------------------


def test_keyed_rate_limit_buckets_per_key_refill_with_time() -> None:
    limit = KeyedRateLimit(rate=2.0, burst=3)
    assert [limit.allow("a", 0.0) for _ in range(4)] == [True, True, True, False]
    assert limit.allow("b", 0.0)  # another address has its own bucket
    assert not limit.allow("a", 0.25)
    assert limit.allow("a", 0.5)  # one token back after 1/rate seconds


def test_keyed_rate_limit_memory_is_bounded() -> None:
    limit = KeyedRateLimit(rate=1.0, burst=1, max_keys=100)
    for n in range(10_000):
        limit.allow(f"10.0.{n // 256}.{n % 256}", 0.0)
    assert len(limit) == 100
    assert not limit.allow("10.0.39.15", 0.0)  # a recent key is remembered (and still empty)


# -- the server -----------------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_upgrades_beyond_the_connect_rate_get_429_and_other_addresses_are_unaffected(
        make_server: Any) -> None:
    server = await make_server(connect_rate=0.5, connect_burst=3)
    url = url_of(server)
    clients = [await WSClient.connect(url) for _ in range(3)]
    for _ in range(4):
        with pytest.raises(websockets.InvalidStatus) as info:
            await WSClient.connect(url)
        assert info.value.response.status_code == 429
    # another client address is not limited by the first one's burst
    other = [await WSClient.connect(url, local_addr=("127.0.0.2", 0)) for _ in range(3)]
    assert server.get_stats().drops.get("connect_rate") == 4
    await eventually(lambda: server.get_stats().connections == 6)
    assert {client.address for client in server.clients.values()} == {"127.0.0.1", "127.0.0.2"}
    for ws in clients + other:
        await ws.close()


@pytest_twisted.ensureDeferred
async def test_behind_a_trusted_proxy_each_forwarded_client_has_its_own_limit(make_server: Any) -> None:
    server = await make_server(connect_rate=0.5, connect_burst=1, trusted_proxies=("127.0.0.1",))
    url = url_of(server)
    first = await WSClient.connect(url, additional_headers={"X-Forwarded-For": "198.51.100.1"})
    second = await WSClient.connect(url, additional_headers={"X-Forwarded-For": "198.51.100.2"})
    with pytest.raises(websockets.InvalidStatus) as info:  # the same forwarded client again, at once
        await WSClient.connect(url, additional_headers={"X-Forwarded-For": "6.6.6.6, 198.51.100.1"})
    assert info.value.response.status_code == 429
    await eventually(lambda: server.get_stats().connections == 2)
    assert {client.address for client in server.clients.values()} == {"198.51.100.1", "198.51.100.2"}
    await first.close()
    await second.close()


@pytest_twisted.ensureDeferred
async def test_an_untrusted_peer_cannot_dodge_the_limit_with_the_header(make_server: Any) -> None:
    server = await make_server(connect_rate=0.5, connect_burst=1)
    url = url_of(server)
    first = await WSClient.connect(url, additional_headers={"X-Forwarded-For": "198.51.100.1"})
    with pytest.raises(websockets.InvalidStatus):
        await WSClient.connect(url, additional_headers={"X-Forwarded-For": "198.51.100.2"})
    assert [client.address for client in server.clients.values()] == ["127.0.0.1"]
    await first.close()
