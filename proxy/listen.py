"""The gateway's listening sockets, with the send timeout that every accepted connection
inherits.

A client that vanishes without closing (a laptop lid, a dropped mobile link) or stops reading
keeps its TCP connection open, and a write to it waits forever once the buffers are full:
with one slot, that is every other client waiting behind a dead one. Linux's
``TCP_USER_TIMEOUT`` makes the kernel drop a connection whose sent data has gone unread (or
unacknowledged) that long: the handler is then cancelled as on any disconnect, the upstream
request closed and the slot freed. nginx's ``send_timeout`` does the same job. A connection
that is only waiting (queued, or for a slow first token) has nothing in flight and is not
affected.
"""

from __future__ import annotations

import socket

# Linux since 2.6.37; elsewhere the gateway runs without the send timeout.
_USER_TIMEOUT: int | None = getattr(socket, "TCP_USER_TIMEOUT", None)


def send_timeout_supported() -> bool:
    return _USER_TIMEOUT is not None


def listening_sockets(host: str, port: int, *, send_timeout_s: float) -> list[socket.socket]:
    """Bound, listening sockets for every address ``host`` resolves to (as asyncio's
    ``create_server`` would bind them), each carrying the send timeout (0: none)."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                # One socket per family, as asyncio does: "::" must not also claim IPv4.
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if send_timeout_s > 0 and _USER_TIMEOUT is not None:
                sock.setsockopt(socket.IPPROTO_TCP, _USER_TIMEOUT, round(send_timeout_s * 1000))
            sock.bind((address[0], port, *address[2:]))
            sock.listen(socket.SOMAXCONN)
            port = sock.getsockname()[1]  # port 0: the other families take the same one
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets
