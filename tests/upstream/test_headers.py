"""Which header fields cross the gateway toward the upstream, and which come back."""

from __future__ import annotations

from multidict import CIMultiDict

from proxy.upstream.headers import forward_request_headers, forward_response_headers


def test_request_headers_drop_hop_by_hop_credentials_and_host() -> None:
    """Hop-by-hop fields, fields named in Connection, the client's key and Host never go up."""
    incoming = CIMultiDict(
        {
            "Host": "gateway.example",
            "Connection": "keep-alive, X-Secret",
            "X-Secret": "1",
            "Keep-Alive": "timeout=5",
            "TE": "trailers",
            "Transfer-Encoding": "chunked",
            "Proxy-Authorization": "Basic abc",
            "Authorization": "Bearer client-key",
            "X-API-Key": "client-key",
            "Origin": "https://evil.example",
            "Accept-Encoding": "gzip",
            "Content-Type": "application/json",
            "User-Agent": "ollama-python/0.6",
        }
    )
    pairs = forward_request_headers(incoming, peer="10.1.2.3", request_id="rid-1", api_key="")
    out = dict(pairs)
    assert len(out) == len(pairs)
    assert set(map(str.lower, out)) == {
        "content-type",
        "user-agent",
        "accept-encoding",
        "x-request-id",
        "x-forwarded-for",
    }
    assert out["Accept-Encoding"] == "identity"
    assert out["X-Forwarded-For"] == "10.1.2.3"
    assert out["X-Request-ID"] == "rid-1"


def test_request_headers_carry_the_upstream_key_and_extend_forwarded_for() -> None:
    """An upstream key replaces the client's; X-Forwarded-For is appended to."""
    incoming = CIMultiDict({"Authorization": "Bearer mine", "X-Forwarded-For": "1.1.1.1"})
    out = dict(forward_request_headers(incoming, peer="10.0.0.1", request_id="r", api_key="up-key"))
    assert out["Authorization"] == "Bearer up-key"
    assert out["X-Forwarded-For"] == "1.1.1.1, 10.0.0.1"


def test_response_headers_keep_content_type_and_drop_framing() -> None:
    """The client gets the upstream's Content-Type; framing and Date are the gateway's own."""
    upstream = CIMultiDict(
        {
            "Content-Type": "application/x-ndjson",
            "Transfer-Encoding": "chunked",
            "Content-Length": "10",
            "Date": "x",
            "Connection": "close",
        }
    )
    own = {"X-Request-ID": "gw"}
    assert forward_response_headers(list(upstream.items()), own) == [
        ("Content-Type", "application/x-ndjson"),
        ("X-Request-ID", "gw"),
    ]


def test_repeated_fields_go_along_and_gateway_fields_are_not_doubled() -> None:
    """A field sent twice goes up twice; the gateway's own fields appear once, whatever the
    case the client wrote them in; a requested Content-Type replaces the client's."""
    incoming = CIMultiDict(
        [
            ("Accept", "text/event-stream"),
            ("Accept", "application/json"),
            ("x-forwarded-for", "1.1.1.1"),
            ("x-request-id", "client-chosen"),
            ("content-type", "application/x-www-form-urlencoded"),
            ("Connection", "X-Hop"),
            ("X-Hop", "dropped"),
        ]
    )
    out = forward_request_headers(
        incoming, peer="10.0.0.1", request_id="rid", api_key="", content_type="application/json"
    )
    assert out == [
        ("Accept", "text/event-stream"),
        ("Accept", "application/json"),
        ("Content-Type", "application/json"),
        ("Accept-Encoding", "identity"),
        ("X-Request-ID", "rid"),
        ("X-Forwarded-For", "1.1.1.1, 10.0.0.1"),
    ]
