"""How the gateway process starts: what it loads, and what check-config says."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from proxy.config import parse_config
from proxy.server import describe


def _loaded_by_the_server(config: dict[str, object], package: str) -> list[str]:
    """The modules of ``package`` a fresh process has loaded once it has built the CLI and
    the app for ``config``."""
    script = textwrap.dedent(
        f"""
        import json, sys
        from proxy.__main__ import build_parser
        from proxy.app import create_app
        from proxy.config import parse_config
        from proxy import server
        build_parser()
        create_app(parse_config({config!r}))
        names = [m for m in sys.modules if m == {package!r} or m.startswith({package!r} + ".")]
        print(json.dumps(sorted(names)))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=30, check=True
    )
    return list(json.loads(out.stdout))


def test_the_server_process_does_not_load_the_docker_sdk() -> None:
    """Only ``status`` talks to Docker: building the CLI and the app must not import it."""
    assert _loaded_by_the_server({}, "docker") == []


def test_the_redis_client_is_loaded_only_with_shared_state() -> None:
    """On one box (no REDIS_URL) the gateway does not pay the Redis client's import: a
    quarter of a second of start-up and megabytes of memory here."""
    assert _loaded_by_the_server({}, "redis") == []
    shared = {"shared": {"redis_url": "redis://127.0.0.1:1/0"}}
    assert "redis.asyncio" in _loaded_by_the_server(shared, "redis")


def test_describe_says_what_serve_would_run_with() -> None:
    """Listen address, upstream, limits, keys by name (never the key), admin routes."""
    config = parse_config(
        {
            "server": {"host": "127.0.0.1", "port": 9000},
            "limits": {"parallel": 2, "max_queue": 5},
            "auth": {"api_keys": [{"name": "app", "key": "app-secret-9"}]},
        }
    )
    text = describe(config)
    assert "127.0.0.1:9000" in text
    assert "2 slot(s), queue 5" in text
    assert "api keys          app" in text
    assert "app-secret-9" not in text
    assert "admin routes      disabled" in text
