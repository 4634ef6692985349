"""Which header fields cross the gateway, each way.

Hop-by-hop fields (RFC 9110 section 7.6.1) and those a ``Connection`` field lists stay on
their hop; the client's credentials, cookies and browser ``Origin`` never reach the
upstream; ``Host`` becomes the upstream's own (Ollama refuses unknown hosts); lengths and
encodings are the sender's to set. The gateway adds ``X-Request-ID``, ``X-Forwarded-For``
and ``Accept-Encoding: identity`` on the way up.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

# RFC 9110 section 7.6.1 hop-by-hop fields, plus what the gateway sets itself.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
# Request fields never forwarded: the gateway's own credentials, the client's Host (Ollama's
# DNS-rebinding check wants its own), a browser Origin the gateway cannot vouch for, and
# lengths and encodings the gateway recomputes.
_DROP_REQUEST = HOP_BY_HOP | {
    "host",
    "authorization",
    "x-api-key",
    "origin",
    "content-length",
    "accept-encoding",
    "cookie",
    "expect",  # the gateway read the body already; a 100 Continue would confuse the relay
    "x-backend",  # the gateway's own: which backend a model-management request is for
}
_DROP_RESPONSE = HOP_BY_HOP | {"content-length", "date", "server"}


# Set by the gateway itself on the way up: the client's copies never go along.
_SET_UP = frozenset({"accept-encoding", "x-request-id", "x-forwarded-for"})
Pairs = list[tuple[str, str]]


def _connection_listed(headers: Iterable[tuple[str, str]]) -> set[str]:
    """The names a ``Connection`` field lists: hop-by-hop for this message (RFC 9110 7.6.1)."""
    listed = ",".join(value for name, value in headers if name.lower() == "connection")
    return {name.strip().lower() for name in listed.split(",") if name.strip()}


def forward_request_headers(
    headers: Mapping[str, str],
    *,
    peer: str | None,
    request_id: str,
    api_key: str,
    content_type: str | None = None,
) -> Pairs:
    """The client's fields minus hop-by-hop and gateway-only ones, plus forwarding facts.

    Pairs, not a mapping: a field the client repeated goes along repeated. ``content_type``
    replaces the client's.
    """
    items = list(headers.items())
    dropped = _DROP_REQUEST | _SET_UP
    if "Connection" in headers:
        dropped = dropped | _connection_listed(items)
    if content_type is not None:
        dropped = dropped | {"content-type"}
    out = [(name, value) for name, value in items if name.lower() not in dropped]
    if content_type is not None:
        out.append(("Content-Type", content_type))
    # Identity: the gateway never decompresses, and it must read statistics in the body.
    out.append(("Accept-Encoding", "identity"))
    out.append(("X-Request-ID", request_id))
    if peer:
        prior = ", ".join(value for name, value in items if name.lower() == "x-forwarded-for")
        out.append(("X-Forwarded-For", f"{prior}, {peer}" if prior else peer))
    if api_key:
        out.append(("Authorization", f"Bearer {api_key}"))
    return out


def forward_response_headers(headers: Pairs, own: Mapping[str, str]) -> Pairs:
    """The upstream's fields minus hop-by-hop and framing ones, then the gateway's ``own``
    (which replace any the upstream sent under the same names)."""
    dropped = _DROP_RESPONSE
    if own:
        dropped = dropped | {name.lower() for name in own}
    if any(name.lower() == "connection" for name, _ in headers):
        dropped = dropped | _connection_listed(headers)
    out = [(name, value) for name, value in headers if name.lower() not in dropped]
    out.extend(own.items())
    return out
