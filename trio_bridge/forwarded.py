"""The client address a trusted reverse proxy reports: ``X-Forwarded-For`` or ``Forwarded``.

Each proxy on the way appends the address it received the request from, so the list
reads client, proxy 1, proxy 2, ... and only its right end is written by proxies the
bridge trusts: anything further left may be the client's own invention. The chain is
therefore walked from the right, skipping addresses of trusted proxies, and the first
address that is not one is the client (``--trusted-proxy``, docs/security.md).

Only the one header the operator's proxy writes is read (``--forwarded-header``): a
proxy that appends to ``X-Forwarded-For`` passes a client's ``Forwarded`` header on
untouched, so reading both would let any client name its own address.

An entry that the walk reaches and cannot read (not an address, RFC 7239's ``unknown``
or an obfuscated ``_name``) raises :class:`ForwardedError`: the caller ignores the header
and logs why. Pure functions, no I/O.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator

from websockets.datastructures import Headers

from .limits import Networks
from .logs import escape

HEADERS = {"x-forwarded-for": "X-Forwarded-For", "forwarded": "Forwarded"}


class ForwardedError(ValueError):
    """The header cannot be read where it matters; the message says why (escaped)."""


def forwarded_client(headers: Headers, header: str, trusted: Networks) -> tuple[str, str] | None:
    """``(address, name for logs)`` of the client the chain in ``header`` names, or None
    when there is no such header. Entries beyond the first untrusted one are not read."""
    name = HEADERS[header]
    values = headers.get_all(name)
    if not values:
        return None
    nearest: tuple[str, str] | None = None
    for element in _elements_from_right(values):
        text = _for_value(element) if header == "forwarded" else element
        nearest = _node(text, name)
        if nearest[0] not in trusted:
            return nearest
    return nearest  # every hop is a trusted proxy: the farthest one is all there is


def _elements_from_right(values: list[str]) -> Iterator[str]:
    """The list's elements, last first; empty elements are skipped (RFC 9110 5.6.1)."""
    for element in reversed(",".join(values).split(",")):
        element = element.strip(" \t")
        if element:
            yield element


def _for_value(element: str) -> str:
    """The ``for=`` parameter of one ``Forwarded`` element (RFC 7239 4), unquoted."""
    for pair in element.split(";"):
        key, sep, value = pair.strip(" \t").partition("=")
        if sep and key.lower() == "for":
            if value.startswith('"'):
                if len(value) < 2 or not value.endswith('"'):
                    raise ForwardedError(f"Forwarded: unterminated quote in '{escape(pair)}'")
                value = value[1:-1].replace("\\", "")
            return value
    raise ForwardedError(f"Forwarded: element '{escape(element[:80])}' has no for=")


def _node(text: str, header: str) -> tuple[str, str]:
    """``(address, name)`` of ``1.2.3.4``, ``1.2.3.4:5``, ``2001:db8::1``, ``[2001:db8::1]``
    or ``[2001:db8::1]:5``; a port that is not a number (RFC 7239's obfuscated ports)
    is left out of the name."""
    host, port = text, ""
    if text.startswith("["):
        host, bracket, port = text[1:].partition("]")
        if not bracket or (port and not port.startswith(":")):
            raise ForwardedError(f"{header}: '{escape(text[:80])}' is not an address")
        port = port[1:]
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ForwardedError(f"{header}: '{escape(text[:80])}' is not an address") from None
    if "%" in host:  # a scope id names an interface of the proxy's host, not a client
        raise ForwardedError(f"{header}: '{escape(text[:80])}' is not an address")
    shown = f"[{address}]" if address.version == 6 else str(address)
    if port.isdigit() and len(port) <= 5 and int(port) <= 65535:
        shown = f"{shown}:{int(port)}"
    elif port and not port.startswith("_"):
        raise ForwardedError(f"{header}: '{escape(text[:80])}' has an invalid port")
    return str(address), shown
