"""Opening a request upstream: the retry backoff."""

from __future__ import annotations

from proxy.config import BackendConfig, UpstreamConfig
from proxy.upstream.forward import Upstream


def test_backoff_doubles_with_jitter_and_is_capped() -> None:
    """Each retry waits between half and all of min(cap, base x 2^n)."""
    upstream = Upstream(
        UpstreamConfig(retry_delay_s=1.0, retry_max_delay_s=5.0),
        BackendConfig(name="box", url="http://box:11434"),
        on_retry=lambda: None,
    )
    for attempt, full in enumerate([1.0, 2.0, 4.0, 5.0, 5.0]):
        for _ in range(50):
            assert full / 2 <= upstream.backoff_s(attempt) <= full
