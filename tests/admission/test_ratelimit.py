"""The token bucket's pure core and the keyed limiter, driven by a fake clock."""

from __future__ import annotations

import pytest

from proxy.admission.ratelimit import Bucket, Limit, RateLimiter, full, settle, take
from tests.conftest import FakeClock


def test_take_spends_the_burst_then_reports_the_real_wait() -> None:
    """At 1 token/s with a burst of 3, three requests pass at once and the fourth waits 1 s."""
    bucket = full(0.0, 3)
    waits = []
    for _ in range(4):
        bucket, wait = take(bucket, 0.0, rate=1.0, burst=3)
        waits.append(wait)
    assert waits == [0.0, 0.0, 0.0, 1.0]


def test_take_refills_with_elapsed_time_up_to_the_burst() -> None:
    """Elapsed time adds rate x seconds, never more than the burst."""
    bucket, _ = take(Bucket(0.0, 0.0), 0.5, rate=2.0, burst=5)
    assert bucket.tokens == pytest.approx(0.0)  # refilled to 1, then 1 taken
    bucket, wait = take(Bucket(0.0, 0.0), 100.0, rate=2.0, burst=5)
    assert wait == 0.0
    assert bucket.tokens == pytest.approx(4.0)


def test_take_with_a_fractional_balance_waits_only_for_the_missing_part() -> None:
    """0.25 tokens at 0.5 tokens/s: 1.5 s until one whole token."""
    _, wait = take(Bucket(0.25, 10.0), 10.0, rate=0.5, burst=1)
    assert wait == pytest.approx(1.5)


def test_settle_can_go_into_debt_and_is_capped_at_the_burst() -> None:
    """Underestimates become debt paid back by refill; overestimates refund up to the burst."""
    assert settle(Bucket(10.0, 0.0), 25.0, burst=100).tokens == -15.0
    assert settle(Bucket(90.0, 0.0), -50.0, burst=100).tokens == 100.0


def test_limiter_admits_exactly_burst_then_refuses_with_retry_after() -> None:
    """A client limit of 60/min with burst 5 admits 5 of 8 simultaneous requests; wait 1 s."""
    clock = FakeClock()
    limiter = RateLimiter(Limit(10_000, 10_000), max_clients=10, clock=clock)
    limit = Limit(60, 5)
    decisions = [limiter.admit("a", limit) for _ in range(8)]
    assert [d.admitted for d in decisions] == [True] * 5 + [False] * 3
    assert decisions[-1].retry_after_s == 1
    assert decisions[-1].scope == "client"
    assert decisions[4].remaining == 0
    clock.advance(1.0)
    assert limiter.admit("a", limit).admitted


def test_global_limit_binds_across_clients() -> None:
    """The global bucket refuses the third client even though each client is under its limit."""
    clock = FakeClock()
    limiter = RateLimiter(Limit(6, 2), max_clients=10, clock=clock)
    limit = Limit(60, 5)
    assert limiter.admit("a", limit).admitted
    assert limiter.admit("b", limit).admitted
    refused = limiter.admit("c", limit)
    assert not refused.admitted
    assert refused.scope == "global"
    assert refused.retry_after_s == 10  # 6/min: one token every 10 s


def test_refused_request_does_not_spend_the_other_bucket() -> None:
    """When the global bucket refuses, the client's bucket keeps its token."""
    clock = FakeClock()
    limiter = RateLimiter(Limit(60, 1), max_clients=10, clock=clock)
    limit = Limit(60, 2)
    assert limiter.admit("a", limit).admitted
    assert not limiter.admit("a", limit).admitted  # global empty
    clock.advance(1.0)
    decision = limiter.admit("a", limit)
    assert decision.admitted
    assert decision.remaining == 1  # the client's second token was never spent


def test_client_table_is_bounded() -> None:
    """A flood of new addresses cannot grow the table past max_clients."""
    clock = FakeClock()
    limiter = RateLimiter(Limit(1e9, 10**9), max_clients=100, clock=clock)
    for i in range(10_000):
        limiter.admit(f"10.0.{i // 256}.{i % 256}", Limit(60, 1))
        clock.advance(0.001)
    assert len(limiter) == 100


def test_a_flood_of_new_clients_cannot_refill_a_busy_clients_bucket() -> None:
    """Pushing an empty bucket out of the table would hand its client a full one."""
    clock = FakeClock()
    limiter = RateLimiter(Limit(1e9, 10**9), max_clients=100, clock=clock)
    limit = Limit(60, 2)
    assert limiter.admit("busy", limit).admitted
    assert limiter.admit("busy", limit).admitted
    assert not limiter.admit("busy", limit).admitted
    for i in range(500):
        limiter.admit(f"10.0.{i // 256}.{i % 256}", limit)
    refused = limiter.admit("busy", limit)
    assert not refused.admitted
    assert refused.scope == "client"


def test_only_full_buckets_make_room_and_new_clients_share_the_overflow() -> None:
    """Least recently seen first, when it has refilled; else one bucket for the newcomers."""
    clock = FakeClock()
    limiter = RateLimiter(Limit(1e9, 10**9), max_clients=2, clock=clock)
    limit = Limit(60, 1)  # one token, back in a second
    assert limiter.admit("a", limit).admitted
    assert limiter.admit("b", limit).admitted
    clock.advance(1.0)  # a and b are full again: nothing lost by forgetting them
    assert limiter.admit("c", limit).admitted  # takes a's place
    assert limiter.admit("d", limit).admitted  # takes b's place
    assert len(limiter) == 2
    assert limiter.admit("e", limit).admitted  # c and d are empty: e gets the overflow...
    shared = limiter.admit("f", limit)  # ...which f shares
    assert not shared.admitted
    assert shared.scope == "overflow"
    assert shared.why == (
        "60 requests per minute shared by new clients while 2 others are remembered"
    )
    assert not limiter.admit("c", limit).admitted  # c kept its own (empty) bucket
    clock.advance(1.0)
    assert limiter.admit("f", limit).admitted  # c, d full again: f gets c's place
    assert limiter.admit("e", limit).admitted  # and e d's
    assert not limiter.admit("e", limit).admitted


def test_token_debt_survives_a_flood_of_new_clients() -> None:
    """A client that spent more LLM tokens than reserved stays in debt."""
    clock = FakeClock()
    limiter = RateLimiter(Limit(1e9, 10**9), max_clients=10, clock=clock)
    limit = Limit(1e9, 10**9, tokens_per_minute=600)  # 10 tokens/s
    assert limiter.reserve_tokens("a", limit, 100).admitted
    limiter.settle_tokens("a", limit, reserved=100, actual=1200)  # 600 in debt
    for i in range(50):
        limiter.reserve_tokens(f"client-{i}", limit, 600)
    clock.advance(30.0)  # refilled 300 of the 600 owed
    refused = limiter.reserve_tokens("a", limit, 10)
    assert not refused.admitted
    assert refused.scope == "tokens"


def test_rate_limit_headers_describe_the_client_bucket() -> None:
    """Limit is per minute, Remaining whole tokens left, Reset seconds until the bucket is full."""
    clock = FakeClock()
    limiter = RateLimiter(Limit(1e9, 10**9), max_clients=10, clock=clock)
    decision = limiter.admit("a", Limit(30, 4))
    assert decision.headers() == {
        "X-RateLimit-Limit": "30",
        "X-RateLimit-Remaining": "3",
        "X-RateLimit-Reset": "2",
    }


def test_token_reservation_is_settled_with_real_counts() -> None:
    """Reserve an estimate, then charge what the upstream really counted."""
    clock = FakeClock()
    limiter = RateLimiter(Limit(1e9, 10**9), max_clients=10, clock=clock)
    limit = Limit(60, 10, tokens_per_minute=1000)
    assert limiter.reserve_tokens("a", limit, 400).admitted
    limiter.settle_tokens("a", limit, reserved=400, actual=900)
    refused = limiter.reserve_tokens("a", limit, 200)
    assert not refused.admitted  # 1000 - 900 = 100 left, 200 asked
    assert refused.retry_after_s == 6  # 100 missing at 1000/min
    clock.advance(6.0)
    assert limiter.reserve_tokens("a", limit, 200).admitted


def test_oversized_token_request_waits_for_a_full_bucket_instead_of_forever() -> None:
    """A request estimated above the whole bucket costs the whole bucket."""
    clock = FakeClock()
    limiter = RateLimiter(Limit(1e9, 10**9), max_clients=10, clock=clock)
    limit = Limit(60, 10, tokens_per_minute=100)
    assert limiter.reserve_tokens("a", limit, 5000).admitted
    assert not limiter.reserve_tokens("a", limit, 5000).admitted
