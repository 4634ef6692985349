"""The shared-state section's numbers (issue 16): from Redis's counters and the runs to what
Redis costs per admitted request, its targets and its table. Pure: dicts in, dicts out.

What is counted, all from Redis's own statistics, each divided by the requests the gateway
admitted (its ``ollama_requests_total`` with a backend: those that took a slot):

- round trips: the read events Redis processed (``INFO stats`` ``total_reads_processed``),
  less the bench's ``INFO`` calls: a request and its answer are one, and so is a pipeline
  (the slot release's ZREM and PUBLISH);
- commands: the calls of every command (``INFO commandstats``) but the bench's ``INFO``.
  Redis counts there the calls a script makes too (a rate decision's TIME, HMGET, HSET,
  PEXPIRE), so this is what Redis ran, not what the gateway sent;
- EVALSHA: one per script the gateway ran (a rate or token decision, a slot claim, a
  settlement, a renewal);
- connections: the connections Redis accepted (a pool growing, or a reconnection after a
  call was cancelled);
- Redis CPU: its process's CPU clock, less the time its commandstats give the bench's
  ``INFO``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from loadtest.bench.results import _fmt, _span, median

# The gateways of the section: (key, column title, shares state through Redis, token limit).
CONFIGS = (
    ("local", "in-process", False, False),
    ("redis", "Redis", True, False),
    ("local_tokens", "in-proc+tok", False, True),
    ("redis_tokens", "Redis+tok", True, True),
)
PAIRS = (("redis", "local"), ("redis_tokens", "local_tokens"))  # Redis against in-process
WORKLOADS = ("light", "small", "streams")
OWN = "info"  # the bench's reading, never the gateway's
# One round trip per shared decision a request makes: its rate limit, its slot's claim and
# release (the release's ZREM and PUBLISH go in one pipeline); with a token limit, the
# reservation at admission and the settlement at the end.
BUDGET = {"redis": 3, "redis_tokens": 5}
TARGETS = (
    ("Redis round trips per request <= 3", "per req"),
    ("  with CLIENT_TOKENS_PER_MINUTE <= 5", "per req"),
    ("lease renewals <= 3 / SLOT_LEASE per s", "/s"),
)

_REQUESTS = re.compile(r"^ollama_requests_total\{([^}]*)\}\s+(\S+)", re.M)


def requests_counted(metrics_text: str) -> tuple[int, int]:
    """(admitted, not admitted) from a gateway's ``/metrics``: a request with a backend was
    admitted (it took a slot); one without (``backend="none"``) was refused or given up by
    its client before it had one."""
    admitted = not_admitted = 0
    for labels, value in _REQUESTS.findall(metrics_text):
        if 'backend="none"' in labels:
            not_admitted += int(float(value))
        else:
            admitted += int(float(value))
    return admitted, not_admitted


def redis_delta(before: Mapping[str, Any], after: Mapping[str, Any]) -> dict[str, Any]:
    """What the gateway made Redis do between two readings (``calls``: command -> calls;
    ``reads``; ``connections``; ``cpu_s``; ``info_usec``: the time commandstats give
    ``INFO``), the bench's own ``INFO`` calls taken out of the calls, the read events and
    the CPU."""
    calls = {name: after["calls"][name] - before["calls"].get(name, 0) for name in after["calls"]}
    own = calls.pop(OWN, 0)
    own_cpu_s = (after["info_usec"] - before["info_usec"]) / 1e6
    return {
        "calls": {name: n for name, n in sorted(calls.items()) if n},
        "reads": after["reads"] - before["reads"] - own,
        "connections": after["connections"] - before["connections"],
        "cpu_s": max(0.0, after["cpu_s"] - before["cpu_s"] - own_cpu_s),
    }


def per_request(delta: Mapping[str, Any] | None, admitted: int) -> dict[str, Any]:
    """A run's Redis figures per admitted request (None without Redis or requests)."""
    if delta is None or admitted <= 0:
        return {
            "round_trips_per_request": None,
            "commands_per_request": None,
            "evalsha_per_request": None,
            "redis_cpu_us_per_request": None,
        }
    return {
        "round_trips_per_request": delta["reads"] / admitted,
        "commands_per_request": sum(delta["calls"].values()) / admitted,
        "evalsha_per_request": delta["calls"].get("evalsha", 0) / admitted,
        "redis_cpu_us_per_request": delta["cpu_s"] / admitted * 1e6,
    }


def _range(values: Sequence[float]) -> list[float] | None:
    return [min(values), max(values)] if values else None


def _entry(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One gateway on one workload: medians over rounds for times, totals for counts (the
    per-request counts over every round: one long run's)."""
    medians = ("requests_per_s", "latency_p50_ms", "latency_p99_ms", "cpu_us_per_request")
    out: dict[str, Any] = {key: median([r.get(key) for r in rounds]) for key in medians}
    admitted = sum(r["admitted"] for r in rounds)
    out |= {
        "admitted": admitted,
        "not_admitted": sum(r["not_admitted"] for r in rounds),
        "errors": sum(r["errors"] for r in rounds),
    }
    deltas = [r["redis"] for r in rounds if r.get("redis") is not None]
    total = None
    if deltas:
        calls: dict[str, int] = {}
        for d in deltas:
            for name, n in d["calls"].items():
                calls[name] = calls.get(name, 0) + n
        total = {
            "calls": calls,
            "reads": sum(d["reads"] for d in deltas),
            "connections": sum(d["connections"] for d in deltas),
            "cpu_s": sum(d["cpu_s"] for d in deltas),
        }
    out |= per_request(total, admitted)
    out["redis_connections"] = None if total is None else total["connections"]
    out["calls_per_request"] = (
        {name: n / admitted for name, n in total["calls"].items()} if total and admitted else None
    )
    # Redis CPU per request: a median over rounds, as the gateway's.
    out["redis_cpu_us_per_request"] = median(
        [per_request(r.get("redis"), r["admitted"])["redis_cpu_us_per_request"] for r in rounds]
    )
    out["rounds"] = rounds
    return out


def _added(with_redis: list[dict[str, Any]], alone: list[dict[str, Any]]) -> dict[str, Any]:
    """What Redis adds, paired within each round: latency p50 and p99, gateway CPU."""

    def diffs(key: str) -> list[float]:
        return [
            a[key] - b[key]
            for a, b in zip(with_redis, alone, strict=False)
            if a.get(key) is not None and b.get(key) is not None
        ]

    p50, p99, cpu = diffs("latency_p50_ms"), diffs("latency_p99_ms"), diffs("cpu_us_per_request")
    return {
        "latency_p50_ms": median(p50),
        "latency_p50_range_ms": _range(p50),
        "latency_p99_ms": median(p99),
        "cpu_us": median(cpu),
        "cpu_range_us": _range(cpu),
    }


def summarise_shared(
    runs: Mapping[str, Mapping[str, list[dict[str, Any]]]], **info: Any
) -> dict[str, Any]:
    """``runs[workload][gateway]``: the rounds of each; per workload, each gateway's entry
    and what Redis adds against in-process (with and without the token limit)."""
    workloads: dict[str, Any] = {}
    for workload, by_gateway in runs.items():
        block: dict[str, Any] = {name: _entry(rounds) for name, rounds in by_gateway.items()}
        block["added"] = {
            a: _added(by_gateway[a], by_gateway[b])
            for a, b in PAIRS
            if a in by_gateway and b in by_gateway
        }
        workloads[workload] = block
    return dict(info) | {"workloads": workloads}


def long_streams(
    delta: Mapping[str, Any], *, streams: int, window_s: float, lease_s: float
) -> dict[str, Any]:
    """The long streams' window, where every stream holds its slot and the only calls are
    lease renewals: how many, against the most one renewal every ``lease_s / 3`` can make in
    the window (one more for where the window starts)."""
    renewals = delta["calls"].get("evalsha", 0)
    return {
        "streams": streams,
        "lease_s": lease_s,
        "window_s": window_s,
        "renewals": renewals,
        "renewals_per_s": renewals / window_s if window_s > 0 else None,
        "renewals_per_stream_per_s": renewals / window_s / streams
        if window_s > 0 and streams
        else None,
        "most_renewals": math.floor(window_s / (lease_s / 3)) + 1,
        "commands": sum(delta["calls"].values()),
        "calls": delta["calls"],
        "round_trips": delta["reads"],
        "bound_per_s": 3 / lease_s,
    }


def evaluate_targets(result: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The section's targets when it ran (None: not measured)."""
    shared = result.get("shared")
    if shared is None or "skipped" in shared:
        return []
    workloads = shared["workloads"]
    out = []
    for (name, unit), key in zip(TARGETS[:2], BUDGET, strict=True):
        values = [w[key]["round_trips_per_request"] for w in workloads.values() if key in w]
        present = [v for v in values if v is not None]
        worst = max(present) if present and len(present) == len(values) else None
        evalsha = [w[key]["evalsha_per_request"] for w in workloads.values() if key in w]
        note = (
            "one per decision: rate, slot claim, slot release (ZREM+PUBLISH, one pipeline)"
            if key == "redis"
            else "and the token reservation and its settlement"
        )
        if evalsha and None not in evalsha:
            note += "; EVALSHA " + "/".join(f"{v:.2f}" for v in evalsha)
        out.append(
            {
                "target": name,
                "unit": unit,
                "measured": worst,
                # Per request to 2 decimals: calls no request makes (a new pooled
                # connection's HELLO, the channel's health check) do not count against it.
                "passed": None if worst is None else round(worst, 2) <= BUDGET[key],
                "note": note + "; the worse workload, to 2 decimals",
            }
        )
    long = shared.get("long_streams")
    name, unit = TARGETS[2]
    out.append(
        {
            "target": name,
            "unit": unit,
            "measured": None if long is None else long["renewals_per_s"],
            "passed": None if long is None else long["renewals"] <= long["most_renewals"],
            "note": ""
            if long is None
            else f"{long['streams']} streams held {long['window_s']:.1f} s: "
            f"{long['renewals']} calls, at most {long['most_renewals']}; one call renews "
            "every lease a replica holds",
        }
    )
    return out


def _row(label: str, cells: Sequence[float | str | None], digits: int) -> str:
    shown = [c if isinstance(c, str) else _fmt(c, digits) for c in cells]
    return f"  {label:<32}" + "".join(f"{c:>12}" for c in shown)


def _signed(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:+,.{digits}f}"


def render_lines(result: Mapping[str, Any]) -> list[str]:
    """The section's table, or why it did not run."""
    shared = result.get("shared")
    if shared is None:
        return []
    if "skipped" in shared:
        return ["", f"shared state (issue 16): skipped: {shared['skipped']}"]
    d = shared["duration_s"]
    lines = [
        "",
        "shared state (issue 16): one gateway with in-process state, one with REDIS_URL "
        f"(redis-server {shared['redis_version']} on a",
        "Unix socket, one server per Redis gateway), and both again with "
        f"CLIENT_TOKENS_PER_MINUTE; {shared['slots']} slots, limits too high to refuse",
        "per admitted request, from Redis's own statistics (the bench's INFO taken out): round "
        "trips = read events (a pipeline",
        "is one); commands = commandstats calls, the scripts' own calls included; EVALSHA = "
        "scripts run",
    ]
    titles = {
        "light": f"small requests at concurrency 1 (nothing saturated: the latency Redis adds), "
        f"non-streamed /v1/chat/completions, {d:g} s per run",
        "small": f"small requests at concurrency {shared['connections']} (aiohttp load "
        f"generator: every request it starts completes), {d:g} s per run",
        "streams": f"streams: {shared['chunks']}-chunk SSE /v1/chat/completions, concurrency "
        f"{shared['concurrency']}, {shared['streams']} per run; latency: to the first chunk",
    }
    names = [key for key, *_ in CONFIGS]
    for workload, block in shared["workloads"].items():
        present = [n for n in names if n in block]
        cols = [block[n] for n in present]
        lines += [
            "",
            titles.get(workload, workload),
            _row("", [title for key, title, *_ in CONFIGS if key in block], 0),
        ]
        if workload != "streams":
            lines.append(_row("requests/s", [c["requests_per_s"] for c in cols], 0))
        lines += [
            _row("latency p50 (ms)", [c["latency_p50_ms"] for c in cols], 3),
            _row("latency p99 (ms)", [c["latency_p99_ms"] for c in cols], 3),
            _row("CPU us per request: gateway", [c["cpu_us_per_request"] for c in cols], 0),
            _row("  Redis", [c["redis_cpu_us_per_request"] for c in cols], 0),
            _row("Redis round trips per request", [c["round_trips_per_request"] for c in cols], 3),
            _row("  EVALSHA per request", [c["evalsha_per_request"] for c in cols], 3),
            _row("  commands per request", [c["commands_per_request"] for c in cols], 3),
            _row("  connections opened", [c["redis_connections"] for c in cols], 0),
            _row("requests admitted", [c["admitted"] for c in cols], 0),
        ]
        for key, added in block["added"].items():
            label = "Redis adds" if key == "redis" else "with tokens, Redis adds"
            lines.append(
                f"  {label}: latency p50 {_signed(added['latency_p50_ms'], 3)} ms (rounds "
                f"{_span_ms(added['latency_p50_range_ms'])}), p99 "
                f"{_signed(added['latency_p99_ms'], 3)} ms; gateway CPU "
                f"{_signed(added['cpu_us'], 0)} us per request (rounds "
                f"{_span(added['cpu_range_us'])})"
            )
        if workload == "small":
            lines += _calls_lines(block)
    long = shared.get("long_streams")
    if long is not None:
        lines += [
            "",
            f"long streams: {long['streams']} held open through a Redis gateway with "
            f"SLOT_LEASE={long['lease_s']:g} s, counted over {long['window_s']:.1f} s in which "
            "all held their slots",
            f"  lease renewals (EVALSHA): {long['renewals']} = {_fmt(long['renewals_per_s'])} "
            f"per s ({_fmt(long['renewals_per_stream_per_s'], 3)} per stream per s); at most "
            f"{long['most_renewals']} by renewing every SLOT_LEASE/3 ({long['bound_per_s']:.1f} "
            "per s)",
            f"  round trips: {long['round_trips']}; commands (the scripts' own included): "
            f"{long['commands']}",
        ]
    if shared.get("down_events"):
        lines.append(
            f"  Redis was marked down {shared['down_events']} time(s) during the section: "
            "those requests ran on in-process state"
        )
    return lines


def _calls_lines(block: Mapping[str, Any]) -> list[str]:
    """What Redis ran per request, command by command (the scripts' own calls included)."""
    lines = []
    for key in ("redis", "redis_tokens"):
        calls = block.get(key, {}).get("calls_per_request")
        if calls:
            listed = ", ".join(f"{name} {n:.2f}" for name, n in sorted(calls.items()))
            lines.append(f"  commands per request, {key}: {listed}")
    return lines


def _span_ms(values: list[float] | None) -> str:
    return "-" if values is None else f"{values[0]:+.3f}..{values[1]:+.3f}"
