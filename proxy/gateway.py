"""The gateway's long-lived parts, built once per app from the config."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from aiohttp import web

from proxy.admission.admit import Affinity
from proxy.admission.body import Policy
from proxy.admission.gate import Gate
from proxy.admission.keys import Access
from proxy.admission.ratelimit import Limit, RateLimiter
from proxy.config import Config, backends_of
from proxy.metrics import Metrics
from proxy.shared import replica_name
from proxy.shared.buckets import Limiter
from proxy.shutdown import Drain
from proxy.upstream.backends import Backends
from proxy.upstream.probe import Probe

if TYPE_CHECKING:
    from proxy.shared.slots import SharedSlots
    from proxy.shared.state import SharedState


@dataclass(slots=True)
class Gateway:
    config: Config
    clock: Callable[[], float]
    metrics: Metrics
    backends: Backends
    probe: Probe
    access: Access
    policy: Policy
    limiter: Limiter
    gate: Gate
    affinity: Affinity
    drain: Drain
    shared: SharedState | None = None
    shared_slots: SharedSlots | None = None

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
        local = RateLimiter(
            Limit(limits.requests_per_minute, limits.burst),
            max_clients=limits.max_clients,
            clock=clock,
        )
        shared = slots = None
        if config.shared.redis_url:
            # Imported here: a gateway without Redis never loads its client.
            from proxy.shared.slots import SharedSlots
            from proxy.shared.state import SharedState

            shared = SharedState(config.shared, metrics)
            slots = SharedSlots(shared, kick=gate.dispatch)
            gate.share_with(slots, config.shared.replicas)
            shared.on_change.append(lambda _up: gate.dispatch())
        metrics.identify(replica_name(config.shared.replica))
        # The scripts read Redis's clock, the same for every replica; a test's fake clock
        # is passed to them instead.
        script_clock = None if clock is time.monotonic else clock
        return cls(
            config=config,
            clock=clock,
            metrics=metrics,
            backends=backends,
            probe=Probe(backends, config.upstream, metrics, inference_endpoints),
            access=Access(config),
            policy=Policy(config),
            limiter=Limiter(local, shared, script_clock),
            gate=gate,
            affinity=Affinity(),
            drain=Drain(),
            shared=shared,
            shared_slots=slots,
        )


GATEWAY = web.AppKey("gateway", Gateway)
