"""From samples to a summary and the table a person reads. Pure: no I/O, no clock.

Outcomes, as the client saw them:

- ``success``: HTTP 200 and a complete answer (``done: true``, ``[DONE]`` or a whole JSON body);
- ``error``: no response (connection refused, reset, timed out), a 5xx other than 503, or a
  200 stream that ended with an error frame or without its end;
- ``429`` and ``503``: refused by the gateway's rate limit or its full queue;
- ``other``: any other status (401, 403, 404 for an unknown model, 400, ...).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

OUTCOMES = ("success", "error", "429", "503", "other")


@dataclass(frozen=True, slots=True)
class Sample:
    """One request: when it started (seconds from the run's start), how it went."""

    index: int
    start_s: float
    latency_s: float
    outcome: str
    status: int  # 0 when no response arrived
    streamed: bool = False
    ttft_s: float | None = None  # to the first content chunk; streamed answers only
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    eval_tokens_per_s: float | None = None  # the upstream's own decode speed, if reported
    retry_after_s: float | None = None
    error: str | None = None

    @property
    def end_s(self) -> float:
        return self.start_s + self.latency_s

    @property
    def tokens_per_s(self) -> float | None:
        """Completion tokens over the time they took to arrive, as the client saw it.

        Streamed: from the first content chunk to the end (the decode phase). Not
        streamed: over the whole request, the only interval the client can see.
        """
        tokens = self.completion_tokens
        if self.outcome != "success" or not tokens:
            return None
        if self.streamed and self.ttft_s is not None:
            if tokens < 2:
                return None
            span = self.latency_s - self.ttft_s
        else:
            span = self.latency_s
        return tokens / span if span > 0 else None


def classify(status: int, *, complete: bool, error: str | None) -> str:
    """The outcome of a request from its status and how its body ended."""
    if status == 200:
        return "success" if complete and error is None else "error"
    if status in (429, 503):
        return str(status)
    if status == 0 or status >= 500:
        return "error"
    return "other"


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100) with linear interpolation between ranks; None if empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass(frozen=True, slots=True)
class Spread:
    count: int = 0
    p50: float | None = None
    p95: float | None = None
    p99: float | None = None
    mean: float | None = None

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        if not values:
            return cls()
        return cls(
            count=len(values),
            p50=percentile(values, 50),
            p95=percentile(values, 95),
            p99=percentile(values, 99),
            mean=statistics.fmean(values),
        )


@dataclass(frozen=True, slots=True)
class Summary:
    requests: int
    wall_s: float
    outcomes: dict[str, int]
    latency_s: Spread  # successful requests
    answered_latency_mean_s: float | None  # every request that got an HTTP answer
    ttft_s: Spread  # successful streamed requests
    tokens_per_s: Spread  # per successful request, client-side
    eval_tokens_per_s: Spread  # per request, as the upstream reported it
    aggregate_tokens_per_s: float | None
    prompt_tokens: int
    completion_tokens: int
    retry_after_s: dict[str, Spread]  # Retry-After of the 429 and of the 503 answers
    errors: dict[str, int] = field(default_factory=dict)  # messages, most frequent first

    @property
    def requests_per_s(self) -> float | None:
        return self.requests / self.wall_s if self.wall_s > 0 else None


def summarize(samples: Sequence[Sample], wall_s: float) -> Summary:
    outcomes = dict.fromkeys(OUTCOMES, 0)
    for s in samples:
        outcomes[s.outcome] = outcomes.get(s.outcome, 0) + 1
    ok = [s for s in samples if s.outcome == "success"]
    completion = sum(s.completion_tokens or 0 for s in ok)
    errors: dict[str, int] = {}
    for s in samples:
        if s.error:
            errors[s.error] = errors.get(s.error, 0) + 1
    return Summary(
        requests=len(samples),
        wall_s=wall_s,
        outcomes=outcomes,
        latency_s=Spread.of([s.latency_s for s in ok]),
        answered_latency_mean_s=Spread.of([s.latency_s for s in samples if s.status]).mean,
        ttft_s=Spread.of([s.ttft_s for s in ok if s.streamed and s.ttft_s is not None]),
        tokens_per_s=Spread.of([t for s in ok if (t := s.tokens_per_s) is not None]),
        eval_tokens_per_s=Spread.of(
            [s.eval_tokens_per_s for s in ok if s.eval_tokens_per_s is not None]
        ),
        aggregate_tokens_per_s=completion / wall_s if wall_s > 0 and ok else None,
        prompt_tokens=sum(s.prompt_tokens or 0 for s in ok),
        completion_tokens=completion,
        retry_after_s={
            outcome: Spread.of(
                [
                    s.retry_after_s
                    for s in samples
                    if s.outcome == outcome and s.retry_after_s is not None
                ]
            )
            for outcome in ("429", "503")
        },
        errors=dict(sorted(errors.items(), key=lambda kv: -kv[1])),
    )


def _num(value: float | None, scale: float = 1.0, digits: int = 3) -> str:
    return "-" if value is None else f"{value * scale:.{digits}f}"


def _row(label: str, spread: Spread, note: str, *, scale: float = 1.0, digits: int = 3) -> str:
    cells = [_num(v, scale, digits) for v in (spread.p50, spread.p95, spread.p99, spread.mean)]
    return f"  {label:<20}" + "".join(f"{c:>10}" for c in cells) + f"   {note}"


def render_table(summary: Summary, title: str, *, streamed: bool, queue_wait_note: str) -> str:
    """The end-of-run table: outcomes, latency, TTFT, tokens/s, queue wait."""
    s = summary
    if s.ttft_s.count:
        ttft = _row("TTFT (s)", s.ttft_s, "streamed: to the first content chunk")
    elif streamed:
        ttft = "  TTFT (s)                   -  (no streamed request succeeded)"
    else:
        ttft = "  TTFT (s)                   -  (not streamed: rerun with --stream)"
    rps = s.requests_per_s
    lines = [
        title,
        f"finished in {s.wall_s:.2f} s: {s.requests} requests"
        + (f", {rps:.2f} requests/s" if rps is not None else ""),
        "",
        "  outcome          count",
    ]
    for outcome in OUTCOMES:
        count = s.outcomes.get(outcome, 0)
        share = f"{100 * count / s.requests:5.1f} %" if s.requests else ""
        extra = ""
        retry = s.retry_after_s.get(outcome)
        if retry is not None and retry.count:
            extra = f"   Retry-After p50 {_num(retry.p50, digits=0)} s"
        lines.append(f"  {outcome:<14}{count:>7}   {share}{extra}")
    lines += [
        "",
        f"  {'':<20}" + "".join(f"{h:>10}" for h in ("p50", "p95", "p99", "mean")),
        _row("latency (s)", s.latency_s, "successful requests, to the last byte"),
        ttft,
        _row(
            "tokens/s per request", s.tokens_per_s, "completion tokens / time they took", digits=1
        ),
    ]
    if s.eval_tokens_per_s.count:
        lines.append(
            _row("  upstream-reported", s.eval_tokens_per_s, "eval_count / eval_duration", digits=1)
        )
    aggregate = _num(s.aggregate_tokens_per_s, digits=1)
    lines += [
        f"  tokens/s aggregate   {aggregate:>9}   {s.completion_tokens} completion tokens "
        f"in {s.wall_s:.2f} s ({s.prompt_tokens} prompt tokens)",
        f"  queue wait           {queue_wait_note}",
    ]
    if s.errors:
        lines.append("")
        lines.append("  most frequent errors:")
        lines += [
            f"  {count:>6} x {message[:100]}" for message, count in list(s.errors.items())[:5]
        ]
    return "\n".join(lines)
