"""The listening sockets carry the send timeout to every connection they accept."""

from __future__ import annotations

import socket

import pytest

from proxy.listen import listening_sockets, send_timeout_supported

pytestmark = [
    pytest.mark.timeout(5),
    pytest.mark.skipif(not send_timeout_supported(), reason="TCP_USER_TIMEOUT is Linux-only"),
]


def _accepted_timeout_ms(send_timeout_s: float) -> int:
    (server,) = listening_sockets("127.0.0.1", 0, send_timeout_s=send_timeout_s)
    with server, socket.create_connection(server.getsockname()[:2]):
        accepted, _ = server.accept()
        with accepted:
            return accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT)


def test_accepted_connections_inherit_the_send_timeout_in_milliseconds() -> None:
    assert _accepted_timeout_ms(1.5) == 1500
    assert _accepted_timeout_ms(0) == 0  # off: the kernel's own retries decide


def test_a_port_in_use_raises_and_leaves_no_socket_open() -> None:
    (taken,) = listening_sockets("127.0.0.1", 0, send_timeout_s=60)
    with taken, pytest.raises(OSError, match="in use"):
        listening_sockets("127.0.0.1", taken.getsockname()[1], send_timeout_s=60)
