"""The gateway's long-lived parts, built once per app from the config."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web

from proxy.admission.admit import Affinity
from proxy.admission.body import Policy
from proxy.admission.gate import Gate
from proxy.admission.keys import Access
from proxy.admission.ratelimit import Limit, RateLimiter
from proxy.config import Config, backends_of
from proxy.metrics import Metrics
from proxy.shutdown import Drain
from proxy.upstream.backends import Backends
from proxy.upstream.probe import Probe


@dataclass(slots=True)
class Gateway:
    config: Config
    clock: Callable[[], float]
    metrics: Metrics
    backends: Backends
    probe: Probe
    access: Access
    policy: Policy
    limiter: RateLimiter
    gate: Gate
    affinity: Affinity
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

        def retried(backend: str) -> None:
            metrics.count(metrics.retries, {"backend": backend})

        backends = Backends.build(backends_of(config), config.upstream, retried)
        gate = Gate(
            max_queue=limits.max_queue,
            max_queue_per_client=limits.max_queue_per_client,
            queue_timeout_s=limits.queue_timeout_s,
            clock=clock,
            slots=backends.slots,
        )
        backends.on_change = gate.dispatch
        metrics.initialise_backends({b.name: b.slots for b in backends.all})
        metrics.queue_capacity.set({}, limits.max_queue)
        return cls(
            config=config,
            clock=clock,
            metrics=metrics,
            backends=backends,
            probe=Probe(backends, config.upstream, metrics, inference_endpoints),
            access=Access(config),
            policy=Policy(config),
            limiter=RateLimiter(
                Limit(limits.requests_per_minute, limits.burst),
                max_clients=limits.max_clients,
                clock=clock,
            ),
            gate=gate,
            affinity=Affinity(),
            drain=Drain(),
        )


GATEWAY = web.AppKey("gateway", Gateway)
