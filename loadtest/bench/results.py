"""From benchmark runs to ratios, targets and the printed table. Pure: dicts in, dicts out.

Each workload runs in rounds, every target once per round in a rotating order; a ratio or
an added latency is computed within a round (the same minute on the same noisy machine)
and the median over rounds is reported.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from typing import Any

from loadtest.bench import engine
from loadtest.report import percentile

MB = 1e6

# (name, unit) of each target the issue sets; `measured` and `passed` are filled in.
TARGETS = (
    ("streaming beats the naive aiohttp relay", "x naive"),
    ("small requests beat the naive relay", "x naive"),
    ("streaming throughput >= nginx", "x nginx"),
    ("added TTFT p50 < 1 ms", "ms"),
    ("small requests >= 0.5x nginx", "x nginx"),
    ("idle RSS < 60 MB", "MB"),
    ("RSS with 500 open streams < 150 MB", "MB"),
    ("ready < 1 s", "s"),
    ("N backends >= 0.95 x N x one backend", "x N x 1"),
)
# The scaling run's gateways, by prefix and N: one upstream of N slots, or N backends.
ONE_UPSTREAM, BACKENDS = "one:", "backends:"


def median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def stream_run(raw: dict[str, Any]) -> dict[str, Any]:
    """One streaming run as the load generator reported it, reduced to its numbers."""
    ttfts = raw["ttft_s"]
    return {
        "chunks_per_s": raw["events"] / raw["wall_s"] if raw["wall_s"] > 0 else 0.0,
        "ttft_p50_ms": _ms(percentile(ttfts, 50)),
        "ttft_p99_ms": _ms(percentile(ttfts, 99)),
        "requests": raw["requests"],
        "errors": raw["errors"],
    }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


def _paired_values(
    runs: dict[str, list[dict[str, Any]]], a: str, b: str, key: str, op: Callable[..., float]
) -> list[float]:
    """``op(run_a[key], run_b[key])`` for each round, rounds paired by index."""
    if a not in runs or b not in runs:
        return []
    return [
        op(x[key], y[key])
        for x, y in zip(runs[a], runs[b], strict=False)
        if x.get(key) is not None and y.get(key) is not None and (op is not _ratio or y[key])
    ]


def _paired(
    runs: dict[str, list[dict[str, Any]]], a: str, b: str, key: str, op: Callable[..., float]
) -> float | None:
    """The median over rounds of ``op(run_a[key], run_b[key])``."""
    return median(_paired_values(runs, a, b, key, op))


def _ratio(x: float, y: float) -> float:
    return x / y


def _minus(x: float, y: float) -> float:
    return x - y


def summarise(
    runs: dict[str, list[dict[str, Any]]],
    rate_key: str,
    latency_keys: tuple[str, ...],
    other_keys: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Per target: medians over rounds; then ratios of ``rate_key`` and added latencies."""
    keys = (rate_key, *latency_keys, *other_keys)
    out: dict[str, Any] = {
        name: {key: median([r.get(key) for r in rounds]) for key in keys}
        | {"errors": sum(r.get("errors", 0) for r in rounds), "rounds": rounds}
        for name, rounds in runs.items()
    }
    pairs = (
        ("nginx", "direct"),
        ("naive", "direct"),
        ("gateway", "direct"),
        ("gateway", "nginx"),
        ("gateway", "naive"),
    )
    out["ratios"] = {f"{a}_vs_{b}": _paired(runs, a, b, rate_key, _ratio) for a, b in pairs}
    # How far single rounds strayed from the median: this machine's noise, within the run.
    spreads = {f"{a}_vs_{b}": _paired_values(runs, a, b, rate_key, _ratio) for a, b in pairs}
    out["ratio_ranges"] = {
        name: [min(values), max(values)] if values else None for name, values in spreads.items()
    }
    out["added_ms"] = {
        name: {key: _paired(runs, name, "direct", key, _minus) for key in latency_keys}
        for name in ("nginx", "naive", "gateway")
        if name in runs
    }
    return out


def summarise_scaling(
    runs: dict[str, list[dict[str, Any]]], served: dict[str, dict[str, int]], **info: float
) -> dict[str, Any]:
    """The scaling run, per N: medians for one upstream of N slots (``"one:N"``) and N
    backends (``"backends:N"``); then, paired within a round, N backends' generations/s over
    N times one upstream of one slot's (median and range), and the CPU per request they add
    to one upstream of N slots' (the same load, no routing)."""

    def entry(name: str) -> dict[str, Any]:
        rounds = runs[name]
        return {
            "generations_per_s": median([r["generations_per_s"] for r in rounds]),
            "cpu_us_per_request": median([r["cpu_us_per_request"] for r in rounds]),
            "errors": sum(r["errors"] for r in rounds),
            "served": served.get(name, {}),
            "rounds": rounds,
        }

    ns = sorted(int(name.removeprefix(BACKENDS)) for name in runs if name.startswith(BACKENDS))
    one_slot = runs[f"{ONE_UPSTREAM}1"]
    backends: dict[str, Any] = {}
    for n in ns:
        several, one = runs[f"{BACKENDS}{n}"], runs[f"{ONE_UPSTREAM}{n}"]
        ratios = [
            r["generations_per_s"] / (n * b["generations_per_s"])
            for r, b in zip(several, one_slot, strict=False)
            if b["generations_per_s"] > 0
        ]
        added = [
            r["cpu_us_per_request"] - b["cpu_us_per_request"]
            for r, b in zip(several, one, strict=False)
        ]
        backends[str(n)] = entry(f"{BACKENDS}{n}") | {
            "ratio": median(ratios),
            "ratio_range": [min(ratios), max(ratios)] if ratios else None,
            "cpu_added_us": median(added),
            "cpu_added_range_us": [min(added), max(added)] if added else None,
        }
    ratios = [b["ratio"] for b in backends.values()]
    return dict(info) | {
        "one_upstream": {str(n): entry(f"{ONE_UPSTREAM}{n}") for n in ns},
        "backends": backends,
        "worst_ratio": None if None in ratios else min(ratios, default=None),
    }


def evaluate_targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The targets of the sections that ran, each with the measured value and PASS/MISS
    (None: not measured)."""
    overhead = _overhead_targets(result) if "streaming" in result else []
    if "scaling" not in result:
        return overhead
    (name, unit) = TARGETS[-1]
    worst = result["scaling"]["worst_ratio"]
    scaling = {
        "target": name,
        "unit": unit,
        "measured": worst,
        "passed": None if worst is None else worst >= 0.95,
        "note": "the worst N's median over rounds",
    }
    return [*overhead, scaling]


def _overhead_targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    streaming, small, memory = result["streaming"], result["small"], result["memory"]
    small_ratios = [s["ratios"]["gateway_vs_nginx"] for s in small.values()]
    small_vs_naive = [s["ratios"]["gateway_vs_naive"] for s in small.values()]
    measured: list[tuple[float | None, Callable[[float], bool]]] = [
        (streaming["ratios"]["gateway_vs_naive"], lambda v: v > 1.0),
        (None if None in small_vs_naive else min(small_vs_naive, default=None), lambda v: v > 1.0),
        (streaming["ratios"]["gateway_vs_nginx"], lambda v: v >= 1.0),
        (streaming["added_ms"]["gateway"]["ttft_p50_ms"], lambda v: v < 1.0),
        (None if None in small_ratios else min(small_ratios, default=None), lambda v: v >= 0.5),
        (memory["idle_mb"], lambda v: v < 60),
        (memory["streams_mb"] if memory["streams"] >= 500 else None, lambda v: v < 150),
        (result["startup"]["median_s"], lambda v: v < 1.0),
    ]
    notes = [""] * len(measured)
    if memory["queued"]:
        notes[6] = (
            f"{memory['streaming']} streaming + {memory['queued']} queued: the gate allows "
            f"{memory['parallel']} slots at most"
        )
    return [
        {
            "target": name,
            "unit": unit,
            "measured": value,
            "passed": None if value is None else check(value),
            "note": note,
        }
        for (name, unit), (value, check), note in zip(TARGETS[:-1], measured, notes, strict=True)
    ]


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _table(title: str, block: dict[str, Any], rows: list[tuple[str, str, int]]) -> list[str]:
    names = [n for n in ("direct", "nginx", "naive", "gateway") if n in block]
    lines = [title, f"  {'':<26}" + "".join(f"{n:>12}" for n in names)]
    for label, key, digits in rows:
        lines.append(
            f"  {label:<26}" + "".join(f"{_fmt(block[n][key], digits):>12}" for n in names)
        )
    return lines


def _ratio_lines(rate: str, block: dict[str, Any]) -> list[str]:
    """The throughput ratios, the gateway's with the range single rounds gave."""
    r, ranges = block["ratios"], block.get("ratio_ranges", {})

    def gateway_vs(name: str) -> str:
        spread = ranges.get(f"gateway_vs_{name}")
        rounds = f" (rounds {_fmt(spread[0])} to {_fmt(spread[1])})" if spread else ""
        return f"{_fmt(r[f'gateway_vs_{name}'])}x{rounds}"

    return [
        f"  {rate} vs direct: nginx {_fmt(r['nginx_vs_direct'])}x, naive "
        f"{_fmt(r['naive_vs_direct'])}x, gateway {_fmt(r['gateway_vs_direct'])}x",
        f"  gateway vs nginx {gateway_vs('nginx')}, vs naive {gateway_vs('naive')}",
    ]


def render(result: dict[str, Any], more: Sequence[str] = ()) -> str:
    """The table of the sections that ran; ``more``: lines of another section's, printed
    before the targets."""
    m, s = result["machine"], result["settings"]
    lines = [
        f"Gateway benchmark on {m['nproc']} CPU(s), {m['cpu']}; Python {m['python']}",
        f"medians of {s['rounds']} round(s); ratios and added latencies paired within a round",
    ]
    if "streaming" in result:
        lines += _overhead_lines(result)
    if "scaling" in result:
        lines += _scaling_lines(result["scaling"])
    if "engine" in result:
        lines += engine.lines(result["engine"])
    lines += more
    lines += [
        "",
        "targets (issues 6, 15, 16 and 18; a benchmark, not a test: CI does not fail on these)",
    ]
    for t in result["targets"]:
        verdict = {True: "PASS", False: "MISS", None: "n/a"}[t["passed"]]
        note = f"  ({t['note']})" if t["note"] else ""
        measured = _fmt(t["measured"], 3)
        lines.append(f"  {t['target']:<38}{measured:>10} {t['unit']:<8} {verdict}{note}")
    return "\n".join(lines)


def _scaling_lines(sc: dict[str, Any]) -> list[str]:
    ns = list(sc["backends"])
    several = [sc["backends"][n] for n in ns]
    one = [sc["one_upstream"][n] for n in ns]

    def row(label: str, values: Sequence[float | str | None], digits: int = 0) -> str:
        cells = [v if isinstance(v, str) else _fmt(v, digits) for v in values]
        return f"  {label:<34}" + "".join(f"{c:>12}" for c in cells)

    spreads = [b["ratio_range"] or [None, None] for b in several]
    largest = several[-1]["served"] if several else {}
    added = [b["cpu_added_us"] for b in several]
    return [
        "",
        "scaling: N fake Ollamas of 1 slot each behind one gateway (BACKENDS), beside one "
        "upstream of N slots",
        f"(OLLAMA_URL: the same load, no routing); {sc['generation_ms']:.0f} ms per generation, "
        f"{sc['clients_per_slot']:.0f} clients per slot, {sc['generations_per_slot']:.0f} "
        "generations per slot per run",
        row("", [f"N={n}" for n in ns]),
        row("generations/s: N backends", [b["generations_per_s"] for b in several], 1),
        row("  one upstream of N slots", [b["generations_per_s"] for b in one], 1),
        row("N backends / (N x one of 1 slot)", [b["ratio"] for b in several], 3),
        row("  lowest round", [lo for lo, _ in spreads], 3),
        row("  highest round", [hi for _, hi in spreads], 3),
        row("CPU us per request: N backends", [b["cpu_us_per_request"] for b in several]),
        row("  one upstream of N slots", [b["cpu_us_per_request"] for b in one]),
        row("  added by routing", ["-" if v is None else f"{v:+,.0f}" for v in added]),
        row("    rounds", [_span(b["cpu_added_range_us"]) for b in several]),
        f"  requests per backend at N={ns[-1] if ns else '-'} (warm-up included): "
        + (", ".join(f"{b} {count}" for b, count in sorted(largest.items())) or "-"),
    ]


def _span(values: list[float] | None) -> str:
    return "-" if values is None else f"{values[0]:+.0f}..{values[1]:+.0f}"


def _overhead_lines(result: dict[str, Any]) -> list[str]:
    s = result["settings"]
    lines = [
        f"baselines: {', '.join(result['baselines'])} (naive: an aiohttp relay that reads and "
        "writes, nothing else)"
        + ("" if "nginx" in result["baselines"] else " (no nginx: install it for the C baseline)"),
        "CPU us: what the proxy's processes used per stream or request (direct: the fake "
        "Ollama's own)",
        "",
    ]
    st = result["streaming"]
    lines += _table(
        f"streaming: {s['chunks']}-chunk SSE /v1/chat/completions, concurrency "
        f"{s['concurrency']}, {s['stream_requests']} requests per run",
        st,
        [
            ("chunks/s", "chunks_per_s", 0),
            ("TTFT p50 (ms)", "ttft_p50_ms", 2),
            ("TTFT p99 (ms)", "ttft_p99_ms", 2),
            ("CPU us per stream", "cpu_us_per_stream", 0),
        ],
    )
    lines += _ratio_lines("chunks/s", st)
    for name, values in st["added_ms"].items():
        lines.append(
            f"  added TTFT by {name}: p50 {_fmt(values['ttft_p50_ms'])} ms, p99 "
            f"{_fmt(values['ttft_p99_ms'])} ms"
        )
    light = result.get("streaming_light")
    if light is not None:
        lines += [
            "",
            *_table(
                "streaming at concurrency 1 (nothing saturated: the latency the proxy adds)",
                light,
                [("TTFT p50 (ms)", "ttft_p50_ms", 2), ("TTFT p99 (ms)", "ttft_p99_ms", 2)],
            ),
        ]
        for name, values in light["added_ms"].items():
            lines.append(f"  added TTFT p50 by {name}: {_fmt(values['ttft_p50_ms'])} ms")
    for path, block in result["small"].items():
        lines += [
            "",
            *_table(
                f"small requests: {path} ({s['small_tool']}, {s['small_concurrency']} connections, "
                f"{s['small_duration_s']} s per run)",
                block,
                [
                    ("requests/s", "requests_per_s", 0),
                    ("latency p50 (ms)", "latency_p50_ms", 3),
                    ("latency p99 (ms)", "latency_p99_ms", 3),
                    ("CPU us per request", "cpu_us_per_request", 0),
                ],
            ),
        ]
        lines += _ratio_lines("requests/s", block)
        added_p50 = block["added_ms"].get("gateway", {}).get("latency_p50_ms")
        lines.append(f"  latency p50 added by the gateway: {_fmt(added_p50, 3)} ms")
    mem, up = result["memory"], result["startup"]
    lines += [
        "",
        f"memory (VmRSS of the gateway): idle {_fmt(mem['idle_mb'], 1)} MB; with "
        f"{mem['streams']} open requests {_fmt(mem['streams_mb'], 1)} MB ({mem['streaming']} "
        f"streaming, {mem['queued']} queued at {mem['parallel']} slots); after the load runs "
        f"{_fmt(mem['after_load_mb'], 1)} MB",
        f"GET /metrics: {_fmt(mem.get('scrape_idle_ms'))} ms idle, "
        f"{_fmt(mem.get('scrape_streams_ms'))} ms with {mem['streams']} open streams (the "
        "streams wait that long while it renders)",
        f"start-up to a ready /health: median {_fmt(up['median_s'], 3)} s over "
        f"{len(up['runs_s'])} start(s)",
    ]
    return lines
