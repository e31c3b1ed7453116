"""Who a client is, when there are no keys: the socket peer, or, from a trusted reverse
proxy, the address that proxy says it forwarded for.

Only the rightmost addresses of ``X-Forwarded-For`` / ``Forwarded`` can be believed: each
proxy appends the peer it saw, and everything to the left came from the client itself. So
lmgate walks the list from the right, skipping addresses of trusted proxies, and takes the
first one that is not trusted. From an untrusted peer both headers are ignored.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
MAX_HOPS = 32
LOOPBACK = ("127.0.0.1", "::1")


def parse_networks(values: Iterable[str]) -> tuple[Network, ...]:
    """The networks of ``--trusted-proxies``; ValueError naming the first bad entry."""
    out: list[Network] = []
    for value in values:
        try:
            out.append(ipaddress.ip_network(value.strip(), strict=False))
        except ValueError:
            raise ValueError(f"{value!r} is not an IP address or CIDR network like "
                             "10.0.0.0/8") from None
    return tuple(out)


class Identities:
    """Maps (peer address, headers) to the identity used for fairness and ownership."""

    def __init__(self, trusted: Iterable[str]) -> None:
        self.trusted = parse_networks(trusted)

    def direct_local(self, peer: str, headers: Mapping[bytes, bytes]) -> bool:
        """Is the caller a program on this machine talking to lmgate directly? Not when the
        peer is a trusted proxy, nor when the request carries forwarded-for headers (a
        reverse proxy on this machine, declared or not, forwards other people's requests)."""
        if peer not in LOOPBACK or self._is_trusted(peer):
            return False
        return not (headers.get(b"x-forwarded-for") or headers.get(b"forwarded")
                    or headers.get(b"x-real-ip"))

    def _is_trusted(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in net for net in self.trusted)

    def client(self, peer: str, headers: Mapping[bytes, bytes]) -> str:
        if not self.trusted or not self._is_trusted(peer):
            return peer
        hops = forwarded_for(headers)
        for address in reversed(hops[-MAX_HOPS:]):
            if not self._is_trusted(address):
                return address
        return hops[0] if hops else peer


def forwarded_for(headers: Mapping[bytes, bytes]) -> list[str]:
    """The forwarded-for chain, client first. ``X-Forwarded-For`` wins when both are sent
    (nginx and Caddy append to it); ``Forwarded: for=`` (RFC 7239) otherwise."""
    xff = headers.get(b"x-forwarded-for")
    if xff:
        return [_clean(part) for part in xff.decode("latin-1").split(",") if part.strip()]
    fwd = headers.get(b"forwarded")
    if not fwd:
        return []
    out = []
    for element in fwd.decode("latin-1").split(","):
        for pair in element.split(";"):
            name, _, value = pair.strip().partition("=")
            if name.strip().lower() == "for" and value:
                out.append(_clean(value))
    return out


def _clean(value: str) -> str:
    """An address as written in a header: quotes, [brackets] and a :port removed."""
    v = value.strip().strip('"')[:64]
    if v.startswith("["):
        return v[1:].split("]", 1)[0]
    if v.count(":") == 1:  # IPv4 with a port; a bare IPv6 address has several colons
        return v.split(":", 1)[0]
    return v
