"""Which address a connection comes from, when it may have passed through proxies we trust.

Behind a load balancer every connection's TCP peer is the balancer. The balancer appends the address it saw to
``X-Forwarded-For``; a client can put anything in front of that. So the header is read from the right, and
only as far as the hops are proxies we trust (``trusted_proxies``: addresses or networks, as nginx's
``real_ip_recursive`` does): the first address that is not a trusted proxy is the client. With no trusted
proxies the header is ignored, and a client talking to us directly can never pick its own address.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

_Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(specs: Iterable[str]) -> tuple[_Network, ...]:
    """``10.0.0.0/8``, ``127.0.0.1`` or ``::1`` (a bare address is a network of one); ValueError if malformed."""
    return tuple(ipaddress.ip_network(spec.strip(), strict=False) for spec in specs if spec.strip())


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    text = text.strip()
    if text.startswith("[") and "]" in text:  # [v6]:port
        text = text[1:text.index("]")]
    elif text.count(":") == 1:  # v4:port
        text = text.split(":", 1)[0]
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


class AddressResolver:
    """The client address of a request: its TCP peer, or the nearest untrusted hop of ``X-Forwarded-For``."""

    def __init__(self, trusted_proxies: Iterable[str] = ()) -> None:
        self.trusted = parse_networks(trusted_proxies)

    def _is_trusted(self, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self.trusted)

    def client_address(self, peer: str, forwarded_for: str | None) -> str:
        """``peer`` is the TCP peer's host; ``forwarded_for`` the ``X-Forwarded-For`` header (None if absent).

        A hop that is not an address at all (a client wrote garbage there) stops the walk: everything to its
        left is the client's own say. The result is always an address, never the raw header text.
        """
        if not self.trusted or not forwarded_for:
            return peer  # the common case, and the cheap one: no address parsing per connection
        current = _ip(peer)
        if current is None:
            return peer
        for hop in reversed(forwarded_for.split(",")):
            if not self._is_trusted(current):
                break
            address = _ip(hop)
            if address is None:
                break
            current = address
        return str(current)
