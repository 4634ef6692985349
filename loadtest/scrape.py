"""The gateway's own view of a run: ``/metrics`` read before and after, and the difference.

Pure functions over the Prometheus text format, so the comparison with the client's view
is tested without a server. Counters are summed over the labels a run cannot pin down
(model, method); requests are matched on the route the run drove, while token totals and
the queue-wait histogram have no route label and include any other traffic of the moment.
"""

from __future__ import annotations

import math
import re
import textwrap
from dataclasses import dataclass

from loadtest.report import Summary

Labels = tuple[tuple[str, str], ...]
Series = dict[tuple[str, Labels], float]

_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_text(text: str) -> Series:
    """Every sample of a text exposition, keyed by name and sorted labels."""
    series: Series = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = _LINE.match(line)
        if match is None:
            continue
        name, raw_labels, raw_value = match.groups()
        labels = tuple(sorted(_LABEL.findall(raw_labels or "")))
        try:
            series[(name, labels)] = float(raw_value)
        except ValueError:
            continue
    return series


def delta(before: Series, after: Series) -> Series:
    """``after - before`` per series; a series that went down (a restart) counts from zero."""
    out: Series = {}
    for key, value in after.items():
        previous = before.get(key, 0.0)
        out[key] = value - previous if value >= previous else value
    return out


def total(series: Series, name: str, **match: str) -> float:
    """The sum of ``name`` over every series whose labels include ``match``."""
    return sum(
        value
        for (n, labels), value in series.items()
        if n == name and all((k, v) in labels for k, v in match.items())
    )


def by_label(series: Series, name: str, label: str, **match: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for (n, labels), value in series.items():
        as_dict = dict(labels)
        if n == name and label in as_dict and all(as_dict.get(k) == v for k, v in match.items()):
            out[as_dict[label]] = out.get(as_dict[label], 0.0) + value
    return out


def histogram_quantile(series: Series, name: str, q: float, **match: str) -> float | None:
    """Prometheus's ``histogram_quantile`` on bucket deltas: linear within the bucket."""
    buckets = by_label(series, name + "_bucket", "le", **match)
    points = sorted((math.inf if le == "+Inf" else float(le), n) for le, n in buckets.items())
    if not points or points[-1][1] <= 0:
        return None
    rank = q * points[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in points:
        if count >= rank:
            if math.isinf(bound):
                return lower_bound  # as Prometheus does: the highest finite bound
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (
                count - lower_count
            )
        lower_bound, lower_count = bound, count
    return None  # pragma: no cover - the last point always reaches the rank


def _nonzero(counts: dict[str, float]) -> dict[str, float]:
    return {key: value for key, value in counts.items() if value}


def _mean(series: Series, name: str, **match: str) -> float | None:
    count = total(series, name + "_count", **match)
    return total(series, name + "_sum", **match) / count if count else None


@dataclass(frozen=True, slots=True)
class ServerView:
    """What the gateway counted during the run, from metric deltas."""

    endpoint: str
    requests: dict[str, float]  # by status: success, error, rate_limited, rejected, cancelled
    rejected: dict[str, float]  # by reason (every route)
    prompt_tokens: float
    completion_tokens: float
    ttft_mean_s: float | None
    latency_mean_s: float | None
    queue_wait_mean_s: float | None
    queue_wait_p50_s: float | None
    queue_wait_p95_s: float | None
    queue_wait_count: float


def server_view(before: Series, after: Series, endpoint: str) -> ServerView:
    d = delta(before, after)
    return ServerView(
        endpoint=endpoint,
        requests=_nonzero(by_label(d, "ollama_requests_total", "status", endpoint=endpoint)),
        rejected=_nonzero(by_label(d, "ollama_rejected_total", "reason")),
        prompt_tokens=total(d, "ollama_prompt_tokens_total"),
        completion_tokens=total(d, "ollama_completion_tokens_total"),
        ttft_mean_s=_mean(d, "ollama_time_to_first_token_seconds", endpoint=endpoint),
        latency_mean_s=_mean(d, "ollama_request_duration_seconds", endpoint=endpoint),
        queue_wait_mean_s=_mean(d, "ollama_queue_wait_seconds"),
        queue_wait_p50_s=histogram_quantile(d, "ollama_queue_wait_seconds", 0.5),
        queue_wait_p95_s=histogram_quantile(d, "ollama_queue_wait_seconds", 0.95),
        queue_wait_count=total(d, "ollama_queue_wait_seconds_count"),
    )


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.1f} ms"


def _count_row(label: str, client: int, server: float, why: str) -> list[str]:
    """The row, and when the two disagree, the usual reason beneath it."""
    row = [f"  {label:<28}{client:>9}{server:>10.0f}"]
    if abs(client - server) >= 0.5:
        row += _wrap(f"^ differs by {server - client:+.0f}: {why}")
    return row


def render_comparison(summary: Summary, view: ServerView) -> str:
    """The client's and the gateway's numbers side by side, and why they may differ."""
    o, r = summary.outcomes, view.requests
    rejected_note = ", ".join(f"{k} {v:.0f}" for k, v in view.rejected.items()) or "none"
    rows = [
        _count_row(
            "success",
            o["success"],
            r.get("success", 0.0),
            "other clients on this route during the run, or requests cut short by the client",
        ),
        _count_row(
            "error (gateway: +cancelled)",
            o["error"],
            r.get("error", 0.0) + r.get("cancelled", 0.0),
            "a client timeout is 'cancelled' at the gateway; a connection refused never reaches it",
        ),
        _count_row(
            "429 (gateway: rate_limited)",
            o["429"],
            r.get("rate_limited", 0.0),
            "other clients were rate limited on this route",
        ),
        _count_row(
            "503 + other (gw: rejected)",
            o["503"] + o["other"],
            r.get("rejected", 0.0),
            "the gateway counts upstream 4xx (an unknown model) as error, not rejected",
        ),
    ]
    lines = [
        f"Client vs gateway (/metrics deltas on {view.endpoint}):",
        f"  {'':<28}{'client':>9}{'gateway':>10}",
        *(line for row in rows for line in row),
        f"  {'':<28}rejected by reason (all routes): {rejected_note}",
        f"  {'prompt tokens':<28}{summary.prompt_tokens:>9}{view.prompt_tokens:>10.0f}",
        f"  {'completion tokens':<28}{summary.completion_tokens:>9}{view.completion_tokens:>10.0f}",
        f"  {'TTFT mean':<28}{_ms(summary.ttft_s.mean):>9}{_ms(view.ttft_mean_s):>10}",
        f"  {'latency mean, answered':<28}{_ms(summary.answered_latency_mean_s):>9}"
        f"{_ms(view.latency_mean_s):>10}",
        f"  {'queue wait p50/p95/mean':<28}{'-':>9}   "
        f"{_ms(view.queue_wait_p50_s)} / {_ms(view.queue_wait_p95_s)} / "
        f"{_ms(view.queue_wait_mean_s)} over {view.queue_wait_count:.0f} admitted requests",
        *_timing_notes(summary, view),
    ]
    if summary.completion_tokens != round(view.completion_tokens):
        lines += _wrap(
            "tokens differ: the gateway counts every request on every route (failed ones "
            "too, if they reported usage), the client only its successful answers"
        )
    return "\n".join(lines)


def _wrap(note: str) -> list[str]:
    return textwrap.wrap(note, width=98, initial_indent="  ", subsequent_indent="    ")


def _timing_notes(summary: Summary, view: ServerView) -> list[str]:
    notes: list[str] = []
    client, server = summary.ttft_s.mean, view.ttft_mean_s
    if client is not None and server is not None:
        notes += _wrap(
            f"TTFT: the client's is {(client - server) * 1000:+.1f} ms from the gateway's: it "
            "adds connecting, the network hop and reading the first frame; the gateway's "
            "starts when the request arrives and covers every streamed request, failed "
            "ones too"
        )
    client, server = summary.answered_latency_mean_s, view.latency_mean_s
    if client is not None and server is not None:
        notes += _wrap(
            f"latency (every answered request, refusals included): the client's is "
            f"{(client - server) * 1000:+.1f} ms from the gateway's, which ends at its last "
            "write; the client's ends with the last byte read"
        )
    return notes


def queue_wait_summary(view: ServerView | None) -> str:
    """The table's queue-wait line: from /metrics when read, else how to get it."""
    if view is None:
        return "reported by the gateway in /metrics only: rerun with --metrics"
    return (
        f"p50 {_ms(view.queue_wait_p50_s)}, p95 {_ms(view.queue_wait_p95_s)}, mean "
        f"{_ms(view.queue_wait_mean_s)} (gateway's ollama_queue_wait_seconds, all routes)"
    )
