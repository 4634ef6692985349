"""Who is calling: API keys, the admin key, and the client address behind trusted proxies."""

from __future__ import annotations

from typing import Any
from unittest import mock

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from proxy.admission.keys import ANONYMOUS, Access, presented_key
from proxy.admission.ratelimit import Limit
from proxy.config import parse_config
from proxy.errors import ForbiddenError, UnauthorizedError

KEYS = [
    {"name": "alice", "key": "alice-secret-1", "requests_per_minute": 120, "burst": 5},
    {"name": "bob", "key": "bob-secret-22"},
]


def access(**sections: Any) -> Access:
    return Access(parse_config(sections))


def request(headers: dict[str, str] | None = None, peer: str = "10.0.0.5") -> web.Request:
    transport = mock.Mock()
    transport.get_extra_info.return_value = (peer, 40000)
    return make_mocked_request("POST", "/api/chat", headers=headers or {}, transport=transport)


def test_the_key_comes_from_a_bearer_token_or_x_api_key() -> None:
    """Both official SDKs send a bearer token; curl users often send X-API-Key."""
    assert presented_key(request({"Authorization": "Bearer k1"})) == "k1"
    assert presented_key(request({"Authorization": "bearer  k1 "})) == "k1"
    assert presented_key(request({"X-API-Key": "k2"})) == "k2"
    assert presented_key(request({"Authorization": "Basic abc", "X-API-Key": "k2"})) == "k2"
    assert presented_key(request({"Authorization": "Bearer "})) is None
    assert presented_key(request()) is None


def test_without_keys_everyone_is_anonymous_and_counted_by_address() -> None:
    """No keys configured: open, the client's bucket is its address, default limits."""
    principal = access().identify(request(peer="192.0.2.7"))
    assert (principal.name, principal.bucket, principal.is_admin) == (
        ANONYMOUS,
        "192.0.2.7",
        False,
    )
    assert principal.limit == Limit(60.0, 10, 0.0)


def test_a_known_key_names_the_client_and_carries_its_limits() -> None:
    """A key's name identifies the client; its own limits apply, defaults fill the rest."""
    keys = access(auth={"api_keys": KEYS}, limits={"client_tokens_per_minute": 1000})
    alice = keys.identify(request({"Authorization": "Bearer alice-secret-1"}))
    assert (alice.name, alice.bucket) == ("alice", "alice")
    assert alice.limit == Limit(120.0, 5, 1000.0)
    bob = keys.identify(request({"X-API-Key": "bob-secret-22"}))
    assert bob.limit == Limit(60.0, 10, 1000.0)


@pytest.mark.parametrize(
    ("headers", "reason"),
    [({}, "missing API key"), ({"Authorization": "Bearer alice-secret-X"}, "invalid API key")],
)
def test_with_keys_a_missing_or_wrong_key_is_refused(headers: dict[str, str], reason: str) -> None:
    """401 saying whether the key was missing or wrong, and how to send one."""
    with pytest.raises(UnauthorizedError, match=reason) as caught:
        access(auth={"api_keys": KEYS}).identify(request(headers))
    assert "Authorization: Bearer <key>" in caught.value.message


def test_the_admin_key_is_an_admin_and_opens_model_management() -> None:
    """The admin key passes everywhere; model management needs it, and is closed without."""
    keys = access(auth={"api_keys": KEYS, "admin_key": "the-admin-key"})
    admin = keys.identify(request({"Authorization": "Bearer the-admin-key"}))
    assert admin.is_admin
    keys.require_admin(admin)
    alice = keys.identify(request({"Authorization": "Bearer alice-secret-1"}))
    with pytest.raises(ForbiddenError, match="requires the gateway's admin key"):
        keys.require_admin(alice)
    closed = access(auth={"api_keys": KEYS})
    with pytest.raises(ForbiddenError, match="disabled on this gateway"):
        closed.require_admin(closed.identify(request({"X-API-Key": "bob-secret-22"})))


def test_forwarded_for_counts_only_from_a_trusted_proxy() -> None:
    """Behind a trusted proxy the client is the first untrusted hop from the right; from
    anyone else, X-Forwarded-For is ignored."""
    keys = access(server={"trusted_proxies": ["10.0.0.0/8"]})
    via_proxy = request({"X-Forwarded-For": "203.0.113.9, 10.1.1.1"}, peer="10.0.0.5")
    assert keys.client_address(via_proxy) == "203.0.113.9"
    spoofed = request({"X-Forwarded-For": "203.0.113.9"}, peer="198.51.100.1")
    assert keys.client_address(spoofed) == "198.51.100.1"
    only_trusted = request({"X-Forwarded-For": "10.2.2.2, 10.1.1.1"}, peer="10.0.0.5")
    assert keys.client_address(only_trusted) == "10.2.2.2"
    garbage = request({"X-Forwarded-For": "not-an-ip"}, peer="10.0.0.5")
    assert keys.client_address(garbage) == "not-an-ip"
