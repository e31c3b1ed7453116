"""The listening sockets, bound before anything else happens.

uvicorn binds only after the application has started, so a busy port used to show up after
"listening on ..." and "Application startup complete", as an ``[Errno 98]`` line and exit 3.
lmgate binds first, turns every failure into one sentence that says what to do, and hands
the bound sockets to uvicorn (``Server.run(sockets=...)``).
"""

from __future__ import annotations

import errno
import os
import socket

BACKLOG = 2048  # uvicorn's default
# Windows reports a port held by another socket as WSAEADDRINUSE, or WSAEACCES when that
# socket holds it exclusively (or the port is in a reserved range).
_IN_USE = {errno.EADDRINUSE, getattr(errno, "WSAEADDRINUSE", 10048)}
_DENIED = {errno.EACCES, getattr(errno, "WSAEACCES", 10013)}
_NOT_LOCAL = {errno.EADDRNOTAVAIL, getattr(errno, "WSAEADDRNOTAVAIL", 10049)}


class ListenError(Exception):
    """The address cannot be listened on; the message is one line for the user."""


def bind_listeners(host: str, port: int) -> list[socket.socket]:
    """Bound, listening sockets for every address ``host`` resolves to (``localhost`` may be
    both 127.0.0.1 and ::1), as asyncio's own ``create_server`` would make them."""
    infos = _resolve(host, port)
    sockets: list[socket.socket] = []
    try:
        for family, address in infos:
            if port == 0 and sockets:  # an ephemeral port: the same one on every address
                address = (address[0], sockets[0].getsockname()[1], *address[2:])
            sockets.append(_bind_one(family, address, host, port))
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def _resolve(host: str, port: int) -> list[tuple[int, tuple]]:
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ListenError(f"cannot listen on host {host!r}: {exc.strerror}; check --host") from None
    seen: list[tuple[int, tuple]] = []
    for family, _, _, _, address in infos:
        if (family, address) not in seen:
            seen.append((family, address))
    return seen


def _bind_one(family: int, address: tuple, host: str, port: int) -> socket.socket:
    # IPPROTO_TCP, not 0: asyncio turns on TCP_NODELAY only for sockets that say TCP, and
    # without it a keep-alive response waits ~40 ms (Windows: ~200 ms) for a delayed ACK
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        _set_options(sock, family)
        sock.bind(address)
        sock.listen(BACKLOG)  # on Linux a second SO_REUSEADDR socket fails here, not at bind
    except OSError as exc:
        sock.close()
        raise ListenError(_explain(exc, host, port)) from None
    sock.set_inheritable(False)
    return sock


def _set_options(sock: socket.socket, family: int) -> None:
    """SO_REUSEADDR on POSIX only: there it just allows a quick restart past TIME_WAIT, while
    on Windows it would let two programs share the port. No SO_REUSEPORT, for the same
    reason. IPv6 sockets are v6-only, like asyncio's, so ``::`` and ``0.0.0.0`` can coexist."""
    if os.name == "posix":
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    elif hasattr(socket, "SO_EXCLUSIVEADDRUSE"):  # Windows: nobody may bind over us
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_EXCLUSIVEADDRUSE, 1)
    if family == socket.AF_INET6 and hasattr(socket, "IPPROTO_IPV6"):
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)


def _explain(exc: OSError, host: str, port: int) -> str:
    code = exc.errno if exc.errno is not None else getattr(exc, "winerror", None)
    where = f"port {port} on {host}"
    if code in _IN_USE:
        return f"{where} is already in use; stop the other program or choose another with --port"
    if code in _DENIED:
        return (f"{where} cannot be used (permission denied: a port below 1024 needs privileges, "
                "or another program holds it exclusively); choose another with --port")
    if code in _NOT_LOCAL:
        return f"cannot listen on {host}: it is not an address of this machine; check --host"
    return f"cannot listen on {where}: {exc.strerror or exc}"
