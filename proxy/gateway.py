"""The gateway's long-lived parts, built once per app from the config."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web

from proxy.admission.body import Policy
from proxy.admission.gate import Gate
from proxy.admission.keys import Access
from proxy.admission.ratelimit import Limit, RateLimiter
from proxy.config import Config
from proxy.metrics import Metrics
from proxy.shutdown import Drain
from proxy.upstream.forward import Upstream
from proxy.upstream.probe import UpstreamWatch


@dataclass(slots=True)
class Gateway:
    config: Config
    clock: Callable[[], float]
    metrics: Metrics
    upstream: Upstream
    watch: UpstreamWatch
    access: Access
    policy: Policy
    limiter: RateLimiter
    gate: Gate
    drain: Drain

    @classmethod
    def build(
        cls,
        config: Config,
        clock: Callable[[], float],
        metrics: Metrics,
        inference_endpoints: tuple[str, ...] = (),
    ) -> Gateway:
        limits = config.limits
        upstream = Upstream(
            config.upstream,
            on_retry=lambda: metrics.count(metrics.retries, {}),
            slots=limits.parallel,
        )
        gate = Gate(
            slots=limits.parallel,
            max_queue=limits.max_queue,
            max_queue_per_client=limits.max_queue_per_client,
            queue_timeout_s=limits.queue_timeout_s,
            clock=clock,
        )
        metrics.slots.set({}, limits.parallel)
        metrics.queue_capacity.set({}, limits.max_queue)
        return cls(
            config=config,
            clock=clock,
            metrics=metrics,
            upstream=upstream,
            watch=UpstreamWatch(config, upstream, metrics, inference_endpoints),
            access=Access(config),
            policy=Policy(config),
            limiter=RateLimiter(
                Limit(limits.requests_per_minute, limits.burst),
                max_clients=limits.max_clients,
                clock=clock,
            ),
            gate=gate,
            drain=Drain(),
        )


GATEWAY = web.AppKey("gateway", Gateway)
