"""Every collector the gateway exports, on an aioprometheus ``Registry`` made per app.

Names are fixed by the dashboard, the alert rules and the README. Labels come from bounded
sets only: route templates, models the upstream lists (else ``other``), configured key
names (else ``anonymous``), outcomes, reasons and error types.
"""

from __future__ import annotations

import bisect
import itertools
from typing import Any, cast

from aioprometheus.collectors import Collector, Counter, Gauge, Histogram, Registry

from proxy import __version__
from proxy.errors import ERROR_TYPES, REJECT_REASONS

# vLLM's request-latency family with a sub-0.3 s head (percentiles below the first bucket
# are interpolated); CPU inference needs the long tail past 10 minutes.
DURATION_BUCKETS = (
    0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0,
    30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0,
)  # fmt: skip
# vLLM's time-to-first-token family: a cold model load on CPU takes minutes.
TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
    10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
QUEUE_WAIT_BUCKETS = (
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0,
    120.0, 300.0,
)  # fmt: skip
TOKENS_PER_SECOND_BUCKETS = (
    0.5, 1.0, 2.0, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 75.0, 100.0, 150.0, 200.0, 300.0,
    500.0, 1000.0, 2000.0, 5000.0,
)  # fmt: skip
LOAD_BUCKETS = (
    0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0,
    640.0,
)  # fmt: skip


class HistogramSeries:
    """One histogram series, as aioprometheus renders it (``buckets``, ``observations``,
    ``sum``), observed with one bisect. aioprometheus's own value increments every bucket
    at or above the value on each observation; here a bucket count is kept per bucket and
    made cumulative when read, at a scrape."""

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self._bounds = [float(b) for b in bounds]
        if self._bounds[-1] != float("inf"):
            self._bounds.append(float("inf"))
        self._counts = [0] * len(self._bounds)
        self.observations = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self._counts[bisect.bisect_left(self._bounds, value)] += 1
        self.observations += 1
        self.sum += value

    @property
    def buckets(self) -> dict[float, int]:
        return dict(zip(self._bounds, itertools.accumulate(self._counts), strict=True))


def _ensure_histogram(histogram: Histogram, labels: dict[str, str]) -> HistogramSeries:
    """The series for ``labels``, created empty if absent (aioprometheus creates one only
    on a first observation, which rate() then cannot see)."""
    try:
        series = cast(HistogramSeries, histogram.get_value(labels))
    except KeyError:
        series = HistogramSeries(tuple(histogram.upper_bounds))
        histogram.set_value(labels, series)
    return series


def _has(collector: Collector, labels: dict[str, str]) -> bool:
    try:
        collector.get_value(labels)
    except KeyError:
        return False
    return True


STATUSES = ("success", "error", "rate_limited", "rejected", "cancelled")
NO_BACKEND = "none"  # the backend label of a request refused before one was chosen
DISCONNECT_PHASES = ("queued", "streaming")


class Metrics:
    """The collectors, plus the few methods that keep label sets bounded."""

    def __init__(self, registry: Registry | None = None) -> None:
        self.registry = registry if registry is not None else Registry()
        r = self.registry
        self.requests = Counter(
            "ollama_requests_total",
            "Requests by method, route template, model, backend (none: refused before one "
            "was chosen) and outcome (success, error, rate_limited, rejected, cancelled).",
            registry=r,
        )
        self.duration = Histogram(
            "ollama_request_duration_seconds",
            "End-to-end request duration at the gateway, every outcome included.",
            registry=r,
            buckets=DURATION_BUCKETS,
        )
        self.active = Gauge(
            "ollama_active_requests",
            "Requests holding a concurrency-gate slot, by backend.",
            registry=r,
        )
        self.queued = Gauge(
            "ollama_queued_requests", "Requests waiting for a concurrency-gate slot.", registry=r
        )
        self.slots = Gauge(
            "ollama_concurrency_slots",
            "Configured gate slots by backend (its OLLAMA_NUM_PARALLEL).",
            registry=r,
        )
        self.queue_capacity = Gauge(
            "ollama_queue_capacity", "Configured wait-queue bound (max_queue).", registry=r
        )
        self.errors = Counter("ollama_errors_total", "Failed requests by error type.", registry=r)
        self.ttft = Histogram(
            "ollama_time_to_first_token_seconds",
            "Streamed requests: from arrival at the gateway to the first body chunk the "
            "upstream streamed (queue wait and model load included).",
            registry=r,
            buckets=TTFT_BUCKETS,
        )
        self.queue_wait = Histogram(
            "ollama_queue_wait_seconds",
            "Time inference requests waited for a gate slot (0 when one was free).",
            registry=r,
            buckets=QUEUE_WAIT_BUCKETS,
        )
        self.prompt_tokens = Counter(
            "ollama_prompt_tokens_total",
            "Prompt tokens: prompt_eval_count on /api/*, usage.prompt_tokens on /v1/*.",
            registry=r,
        )
        self.completion_tokens = Counter(
            "ollama_completion_tokens_total",
            "Completion tokens: eval_count on /api/*, usage.completion_tokens on /v1/*; for "
            "OpenAI-kind backends that send no usage in streams (llama-cpp-python), the "
            "number of content chunks.",
            registry=r,
        )
        self.tokens_per_second = Histogram(
            "ollama_tokens_per_second",
            "Decode speed per request: eval_count / eval_duration (native statistics).",
            registry=r,
            buckets=TOKENS_PER_SECOND_BUCKETS,
        )
        self.load_duration = Histogram(
            "ollama_model_load_duration_seconds",
            "Ollama's load_duration per request: scheduler wait plus model load.",
            registry=r,
            buckets=LOAD_BUCKETS,
        )
        self.rate_limited = Counter(
            "ollama_rate_limited_total", "Requests refused with 429, by client.", registry=r
        )
        self.rejected = Counter(
            "ollama_rejected_total", "Requests refused before the upstream, by reason.", registry=r
        )
        self.disconnects = Counter(
            "ollama_client_disconnects_total",
            "Clients that went away, by phase (queued: waiting for a slot; streaming: after).",
            registry=r,
        )
        self.retries = Counter(
            "ollama_upstream_retries_total",
            "Upstream attempts retried on the same backend (connect failed or 503 busy "
            "before any byte), by backend.",
            registry=r,
        )
        self.failovers = Counter(
            "ollama_backend_failovers_total",
            "Requests moved to another backend before reaching an upstream (the first could "
            "not be reached, or answered 503 busy), by the backend left and the one taken.",
            registry=r,
        )
        self.upstream_up = Gauge(
            "ollama_upstream_up", "1 if the backend answered the last probe.", registry=r
        )
        self.loaded_models = Gauge(
            "ollama_loaded_models", "Models loaded in each backend (/api/ps).", registry=r
        )
        self.model_memory = Gauge(
            "ollama_model_memory_bytes",
            "Memory of each loaded model by kind (ram, vram) and backend, from /api/ps.",
            registry=r,
        )
        self.shared_up = Gauge(
            "ollama_shared_state_up",
            "1 while the shared state (Redis) answers; 0 while this replica is alone (open "
            "policy) or refusing (closed). Absent without shared state.",
            registry=r,
        )
        self.replicas = Gauge(
            "ollama_gateway_replicas",
            "Gateway replicas configured to share the state (GATEWAY_REPLICAS), as this "
            "replica was told. Absent without shared state.",
            registry=r,
        )
        self.info = Gauge(
            "ollama_proxy_info", "Gateway build information and replica name.", registry=r
        )
        self._keys: dict[tuple[Any, ...], tuple[Any, Any]] = {}
        self._initialise()

    # -- the per-request path ------------------------------------------------------------
    # aioprometheus checks the label names and serialises the label set to a key on every
    # operation, about 5 us each, several per request. The key of each label set is worked
    # out once, through the public API, and the series is then updated in place.

    def _series(self, collector: Collector, labels: dict[str, str]) -> tuple[Any, Any]:
        cache_key = (id(collector), *labels.values())
        found = self._keys.get(cache_key)
        if found is None:
            if isinstance(collector, Histogram):
                _ensure_histogram(collector, labels)
            elif not _has(collector, labels):
                collector.set_value(labels, 0)
            values = cast(Any, collector.values)  # aioprometheus's MetricDict, untyped
            found = self._keys[cache_key] = (values.store, values.__keytransform__(labels))
        return found

    def count(self, counter: Counter, labels: dict[str, str], value: float = 1) -> None:
        store, key = self._series(counter, labels)
        store[key] += value

    def observe(self, histogram: Histogram, labels: dict[str, str], value: float) -> None:
        store, key = self._series(histogram, labels)
        store[key].observe(value)

    def set(self, gauge: Gauge, labels: dict[str, str], value: float) -> None:
        store, key = self._series(gauge, labels)
        store[key] = value

    def initialise_requests(
        self, models: list[str], endpoints: tuple[str, ...], backends: list[str]
    ) -> None:
        """Create the inference series at zero; existing ones keep their values.

        Prometheus's rate() and increase() cannot see the first event of a series that is
        born with it, and a small box may serve a handful of requests an hour.
        """
        for model in models:
            for endpoint in endpoints:
                labels = {"endpoint": endpoint, "model": model}
                _ensure_histogram(self.duration, labels)
                for backend in [*backends, NO_BACKEND]:
                    per_backend = {**labels, "backend": backend}
                    for status in STATUSES:
                        self.requests.add({"method": "POST", **per_backend, "status": status}, 0)
                    _ensure_histogram(self.ttft, per_backend)
            for counter in (self.prompt_tokens, self.completion_tokens):
                counter.add({"model": model}, 0)

    def identify(self, replica: str) -> None:
        """``ollama_proxy_info``: the version, and which replica this is."""
        self.info.set({"version": __version__, "replica": replica}, 1)

    def initialise_backends(self, slots: dict[str, int]) -> None:
        """The per-backend series, from the start: slots, up (0 until probed), retries."""
        for name, count in slots.items():
            self.slots.set({"backend": name}, count)
            self.active.set({"backend": name}, 0)
            self.upstream_up.set({"backend": name}, 0)
            self.loaded_models.set({"backend": name}, 0)
            self.retries.set({"backend": name}, 0)

    def _initialise(self) -> None:
        # Series that exist from the start, so increase() sees the first event.
        for error_type in ERROR_TYPES:
            self.errors.set({"error_type": error_type}, 0)
        for reason in REJECT_REASONS:
            self.rejected.set({"reason": reason}, 0)
        for phase in DISCONNECT_PHASES:
            self.disconnects.set({"phase": phase}, 0)
        self.queued.set({}, 0)
