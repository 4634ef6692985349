"""The description: valid OpenAPI 3.1, the router's routes exactly, and the running config."""

from __future__ import annotations

from typing import Any

import pytest
from openapi_spec_validator import validate

from proxy.app import create_app
from proxy.config import Config, parse_config
from proxy.errors import ProxyError
from proxy.openapi.document import ADMIN, KEYS, build_document, openapi_path
from proxy.openapi.responses import codes_by_status

METHODS = {"get", "head", "post", "put", "patch", "delete", "options", "trace"}
KEYED = {"api_keys": [{"name": "alice", "key": "alice-key-123"}]}
CONFIGS = {
    "defaults": {},
    "keys, admin and allowlist": {
        "auth": {**KEYED, "admin_key": "admin-key-123"},
        "models": {"allowlist": ["llama3.2"]},
    },
    "openai upstream": {"upstream": {"kind": "openai"}, "auth": KEYED},
    "no clamp, no streaming": {"limits": {"max_context_length": 0, "enable_streaming": False}},
    "two backends": {
        "backends": [
            {"name": "gpu", "url": "http://a:11434"},
            {"name": "cpu", "url": "http://b:11434"},
        ]
    },
}


def _document(raw: dict[str, Any]) -> dict[str, Any]:
    return build_document(parse_config(raw), "http://gateway.test:8000")


def _operations(document: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {
        (method.upper(), path): operation
        for path, item in document["paths"].items()
        for method, operation in item.items()
        if method in METHODS
    }


@pytest.mark.parametrize("raw", CONFIGS.values(), ids=list(CONFIGS))
def test_the_description_is_valid_openapi_3_1(raw: dict[str, Any]) -> None:
    document = _document(raw)
    assert document["openapi"] == "3.1.0"
    validate(document)  # raises with the offending path
    assert document["servers"] == [
        {"url": "http://gateway.test:8000", "description": "this gateway"}
    ]


@pytest.mark.parametrize("raw", CONFIGS.values(), ids=list(CONFIGS))
async def test_the_router_and_the_description_list_the_same_routes(raw: dict[str, Any]) -> None:
    config = parse_config(raw)
    app = create_app(config)
    routed = {
        (route.method, openapi_path(route.resource.canonical))
        for route in app.router.routes()
        if route.resource is not None
    }
    assert routed == set(_operations(build_document(config, "http://x")))


async def test_without_docs_the_router_has_no_docs_routes() -> None:
    app = create_app(parse_config({"server": {"enable_docs": False}}))
    paths = {route.resource.canonical for route in app.router.routes() if route.resource}
    assert not paths & {"/docs", "/docs/{asset}", "/openapi.json"}


def test_model_management_is_marked_closed_without_an_admin_key() -> None:
    closed = _operations(_document({}))[("POST", "/api/pull")]
    assert closed["deprecated"] is True
    assert "Disabled on this gateway" in closed["description"]
    assert set(closed["responses"]) == {"403"}
    opened = _operations(_document(CONFIGS["keys, admin and allowlist"]))[("POST", "/api/pull")]
    assert "deprecated" not in opened
    assert opened["security"] == ADMIN
    assert {"401", "403", "413", "502", "504"} <= set(opened["responses"])


def test_keys_are_required_only_when_configured() -> None:
    keyed = _operations(_document(CONFIGS["keys, admin and allowlist"]))
    chat_open = _operations(_document({}))[("POST", "/api/chat")]
    chat_keyed = keyed[("POST", "/api/chat")]
    assert chat_open["security"] == []
    assert "401" not in chat_open["responses"]
    assert chat_keyed["security"] == KEYS
    assert "401" in chat_keyed["responses"]
    for path in ("/health", "/health/ollama", "/metrics", "/docs", "/openapi.json"):
        assert keyed[("GET", path)]["security"] == []


def test_x_backend_is_described_where_the_gateway_reads_it() -> None:
    """Inference and the chat may name a backend; management must, once there are several;
    listings merge every backend and take none."""

    def backend(operation: dict[str, Any]) -> dict[str, Any] | None:
        found = [p for p in operation["parameters"] if p.get("name") == "X-Backend"]
        return found[0] if found else None

    several = _operations(_document(CONFIGS["two backends"]))
    one = _operations(_document({}))
    for key in (("POST", "/api/chat"), ("POST", "/v1/chat/completions"), ("POST", "/chat")):
        parameter = backend(several[key])
        assert parameter is not None
        assert parameter["required"] is False
        assert parameter["schema"]["enum"] == ["gpu", "cpu"]
    pull = backend(several[("POST", "/api/pull")])
    assert pull is not None
    assert pull["required"] is True
    single_pull = backend(one[("POST", "/api/pull")])
    assert single_pull is not None
    assert single_pull["required"] is False
    assert backend(several[("GET", "/api/tags")]) is None


def test_native_routes_are_501_before_an_openai_upstream() -> None:
    operations = _operations(_document(CONFIGS["openai upstream"]))
    native = operations[("POST", "/api/chat")]
    assert native["deprecated"] is True
    assert set(native["responses"]) == {"501"}
    assert native["responses"]["501"]["content"]["application/json"]["example"]["error"]
    assert "501" not in operations[("POST", "/v1/chat/completions")]["responses"]


def test_every_status_the_gateway_produces_is_documented_in_its_dialect() -> None:
    """Each status of an error type appears with its code, in the route's error shape."""
    documented: set[int] = set()
    for raw in CONFIGS.values():
        document = _document(raw)
        for operation in _operations(document).values():
            documented |= {int(s) for s in operation["responses"] if s.isdigit()}
        documented |= {int(name[-3:]) for name in document["components"]["responses"]}
    kinds = ProxyError.__subclasses__()  # the base is the 500 that must never happen
    while kinds:
        kind = kinds.pop()
        kinds.extend(kind.__subclasses__())
        assert kind.code in codes_by_status()[kind.status]
    assert {400, 401, 403, 404, 405, 413, 429, 501, 502, 503, 504} <= documented
    operations = _operations(_document(CONFIGS["keys, admin and allowlist"]))
    ollama = operations[("POST", "/api/chat")]["responses"]["429"]
    openai = operations[("POST", "/v1/chat/completions")]["responses"]["429"]
    assert isinstance(ollama["content"]["application/json"]["example"]["error"], str)
    assert openai["content"]["application/json"]["example"]["error"]["code"] == (
        "rate_limit_exceeded"
    )
    assert ollama["headers"]["Retry-After"]["required"] is True
    assert ollama["headers"]["X-RateLimit-Remaining"]["required"] is True


def test_the_fields_the_gateway_reads_are_typed_and_the_rest_left_open() -> None:
    config: Config = parse_config({"limits": {"max_context_length": 4096}})
    operations = _operations(build_document(config, "http://x"))
    body = operations[("POST", "/api/chat")]["requestBody"]["content"]["application/json"]
    schema = body["schema"]
    assert schema["additionalProperties"] is True
    assert schema["properties"]["stream"]["type"] == ["boolean", "null"]
    num_ctx = schema["properties"]["options"]["properties"]["num_ctx"]
    assert "4096" in num_ctx["description"]
    assert body["examples"]["answer"]["value"]["model"] == config.upstream.default_model
    v1 = operations[("POST", "/v1/chat/completions")]["requestBody"]["content"]
    assert "stream_options" in v1["application/json"]["schema"]["properties"]
    answer = operations[("POST", "/api/chat")]["responses"]["200"]
    assert set(answer["content"]) == {"application/json", "application/x-ndjson"}
    assert answer["headers"]["X-Request-ID"]["required"] is True
    assert "X-Context-Length-Clamped" in answer["headers"]
    sse = operations[("POST", "/v1/chat/completions")]["responses"]["200"]["content"]
    assert "text/event-stream" in sse
