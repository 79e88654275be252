"""permessage-deflate (RFC 7692): which client offers roomserver accepts, and with which parameters.

Autobahn parses the client's ``Sec-WebSocket-Extensions`` offers and asks the factory's
``perMessageCompressionAccept`` hook (called with the list of offers, in the client's order of preference) which
one to accept; returning None answers the upgrade without the extension. ``configure_compression`` installs the
right hook on a factory: ``refuse_compression`` when ``ServerOptions.compression`` is off (so an offer gets a 101
with no ``Sec-WebSocket-Extensions`` and any frame with RSV1 set is then a protocol error, close 1002), or a
``DeflateAcceptor`` when it is on.

What the acceptor does with an offer, and why:

- The client's requests are honoured as RFC 7692 requires: ``server_no_context_takeover`` (the server then resets
  its compressor after each message) and ``server_max_window_bits`` (the server never uses a larger window).
  ``client_no_context_takeover`` and ``client_max_window_bits`` are the client's own business: the server never
  asks the client to shrink its window or drop its context, so the client compresses as well as it can; the
  server's inflater simply follows whatever window the client announces.
- The server's own compressor uses at most ``SERVER_WINDOW_BITS`` (2**12 = 4 KiB window) and ``MEM_LEVEL``: a
  compressor lives as long as its connection when context takeover is on, and at zlib's defaults (15 bits,
  memLevel 8) it costs about 256 KiB per connection; at 12 bits and memLevel 6 about 48 KiB. Using a smaller
  window than announced is always safe for the peer's inflater (RFC 7692, section 7.1.2.1).
- The inflated size of a message is bounded by ``max_message_size``: Autobahn (26.7.1 and later, see setup.cfg)
  stops inflating once the remaining budget is used and fails the connection with 1009, so a small
  "compression bomb" never expands in memory and is never delivered truncated. The acceptor passes the same limit
  to the extension (``max_message_size``) as a second, independent bound.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from autobahn.websocket.compress import PerMessageDeflateOffer, PerMessageDeflateOfferAccept

SERVER_WINDOW_BITS = 12
"""Largest LZ77 window (log2) the server compresses with; the client may request smaller (down to 9)."""

MEM_LEVEL = 6
"""zlib memLevel of the server's compressor (1-9): memory per connection versus speed and ratio."""


def refuse_compression(offers: Sequence[Any]) -> None:
    """The hook used while compression is off: every offer is declined, so the 101 carries no extension."""
    return None


class DeflateAcceptor:
    """Accepts the first permessage-deflate offer of a client, honouring its parameters (see the module doc)."""

    def __init__(self, max_message_size: int) -> None:
        if max_message_size <= 0:
            raise ValueError("max_message_size must be > 0")
        self.max_message_size = max_message_size

    def __call__(self, offers: Sequence[Any]) -> PerMessageDeflateOfferAccept | None:
        """Called from Autobahn during the opening handshake with the client's parsed offers."""
        for offer in offers:
            if isinstance(offer, PerMessageDeflateOffer):
                return self.accept(offer)
        return None

    def accept(self, offer: PerMessageDeflateOffer) -> PerMessageDeflateOfferAccept:
        requested_bits: int = offer.request_max_window_bits  # 0: the client asked for no limit
        window_bits = min(requested_bits or SERVER_WINDOW_BITS, SERVER_WINDOW_BITS)
        return PerMessageDeflateOfferAccept(
            offer,
            # no_context_takeover=None: Autobahn then follows the client's server_no_context_takeover request.
            window_bits=window_bits,
            mem_level=MEM_LEVEL,
            max_message_size=self.max_message_size,
        )


def compression_hook(enabled: bool, max_message_size: int) -> Any:
    """The ``perMessageCompressionAccept`` hook for these options."""
    return DeflateAcceptor(max_message_size) if enabled else refuse_compression
