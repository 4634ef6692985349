"""``python -m loadtest.bench``: what the gateway adds, measured against the fake Ollama
direct and through nginx (when installed), in the same run; then how its throughput scales
with N backends of one slot each; then what sharing its limits and slots through Redis
costs, against in-process state (when redis-server is installed). Prints a table;
``--json`` writes every number. A benchmark, not a test: it exits 0 whatever the numbers
are.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import resource
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from loadtest.bench import engine, results, shared_results
from loadtest.bench.measure import Settings, machine, run_bench
from loadtest.bench.scaling import measure_scaling
from loadtest.bench.shared_state import measure_shared

SECTIONS = ("overhead", "scaling", "shared", "engine")

SMOKE = Settings(
    chunks=10,
    concurrency=4,
    stream_requests=16,
    small_duration_s=1,
    small_concurrency=4,
    rounds=1,
    streams=20,
    hold_interval_s=0.2,
    startup_runs=1,
    scaling_backends=2,
    scaling_generations=3,
    shared_duration_s=0.3,
    shared_streams=16,
    long_streams=2,
    long_window_s=1.0,
    engine_rounds=1,
    engine_streams=2,
    engine_tokens=8,
)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    d = Settings()
    p = argparse.ArgumentParser(
        prog="python -m loadtest.bench", description=(__doc__ or "").replace("``", "")
    )
    p.add_argument("--chunks", type=int, default=d.chunks, help="SSE chunks per stream")
    p.add_argument("--concurrency", type=int, default=d.concurrency, help="streams at once")
    p.add_argument("--stream-requests", type=int, default=d.stream_requests,
                   help="streamed requests per run")  # fmt: skip
    p.add_argument("--small-duration", type=int, default=d.small_duration_s,
                   help="seconds per small-request run (whole seconds: wrk's unit)")  # fmt: skip
    p.add_argument("--small-concurrency", type=int, default=d.small_concurrency)
    p.add_argument("--rounds", type=int, default=d.rounds,
                   help="each target once per round; medians over rounds")  # fmt: skip
    p.add_argument("--streams", type=int, default=d.streams,
                   help="open streams for the memory reading")  # fmt: skip
    p.add_argument("--startup-runs", type=int, default=d.startup_runs)
    p.add_argument("--scaling-backends", type=int, default=d.scaling_backends,
                   help="the scaling run: N = 1 to this many one-slot backends")  # fmt: skip
    p.add_argument("--scaling-generations", type=int, default=d.scaling_generations,
                   help="generations per backend per scaling run")  # fmt: skip
    p.add_argument("--shared-duration", type=float, default=d.shared_duration_s,
                   help="the shared-state section: seconds per small-request run")  # fmt: skip
    p.add_argument("--shared-streams", type=int, default=d.shared_streams,
                   help="the shared-state section: streams per run")  # fmt: skip
    p.add_argument("--only", choices=SECTIONS,
                   help="run one section: overhead (against direct, nginx, naive), "
                   "scaling (N backends), shared (Redis against in-process state) or engine "
                   "(the real engine, direct against through the gateway: needs just "
                   "engine); default: all (engine when built)")  # fmt: skip
    p.add_argument("--engine", action="store_const", const="engine", dest="only",
                   help="the same as --only engine")  # fmt: skip
    p.add_argument("--engine-rounds", type=int, default=d.engine_rounds)
    p.add_argument("--engine-streams", type=int, default=d.engine_streams,
                   help="streams per side per round")  # fmt: skip
    p.add_argument("--engine-tokens", type=int, default=d.engine_tokens,
                   help="tokens per stream")  # fmt: skip
    p.add_argument("--engine-threads", type=int, default=d.engine_threads,
                   help="the engine's threads (default: the CPUs, at most 4)")  # fmt: skip
    p.add_argument("--no-engine", action="store_true",
                   help="skip the real engine, even when it is built")  # fmt: skip
    p.add_argument("--no-nginx", action="store_true", help="skip the nginx baseline")
    p.add_argument("--no-wrk", action="store_true", help="small requests with aiohttp, not wrk")
    p.add_argument("--smoke", action="store_true", help="tiny sizes: checks it runs, in seconds")
    p.add_argument("--json", type=Path, help="write every number here")
    return p.parse_args(argv)


def settings_from(args: argparse.Namespace) -> Settings:
    base = (
        SMOKE
        if args.smoke
        else Settings(
            chunks=args.chunks,
            concurrency=args.concurrency,
            stream_requests=args.stream_requests,
            small_duration_s=args.small_duration,
            small_concurrency=args.small_concurrency,
            rounds=args.rounds,
            streams=args.streams,
            startup_runs=args.startup_runs,
            scaling_backends=args.scaling_backends,
            scaling_generations=args.scaling_generations,
            shared_duration_s=args.shared_duration,
            shared_streams=args.shared_streams,
            engine_rounds=args.engine_rounds,
            engine_streams=args.engine_streams,
            engine_tokens=args.engine_tokens,
            engine_threads=args.engine_threads,
        )
    )
    return dataclasses.replace(base, use_nginx=not args.no_nginx, use_wrk=not args.no_wrk)


def raise_open_files_limit() -> None:
    """500 streams through the gateway hold 1000+ sockets: lift the soft limit to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def run(s: Settings, sections: Sequence[str], workdir: Path, log: TextIO) -> dict[str, Any]:
    """The sections asked for, one after the other, and the targets they measure."""

    def say(message: str) -> None:
        log.write(message + "\n")
        log.flush()

    result: dict[str, Any] = {"machine": machine(), "sections": list(sections)}
    result["settings"] = dataclasses.asdict(s)
    if "overhead" in sections:
        result |= await run_bench(s, workdir, say)
    if "scaling" in sections:
        result["scaling"] = await measure_scaling(s, workdir, say)
    if "shared" in sections:
        result["shared"] = await measure_shared(s, workdir, say)
    result["targets"] = results.evaluate_targets(result) + shared_results.evaluate_targets(result)
    if "engine" in sections:
        result["engine"] = await engine.measure_engine(
            rounds=s.engine_rounds,
            streams_per_round=s.engine_streams,
            tokens=s.engine_tokens,
            threads=s.engine_threads,
            workdir=workdir,
            say=say,
            use_nginx=s.use_nginx,
        )
        result["targets"].append(engine.target(result["engine"]))
    return result


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    raise_open_files_limit()
    sections = [args.only] if args.only else list(SECTIONS)
    if args.no_engine and "engine" in sections:
        sections.remove("engine")
    with tempfile.TemporaryDirectory(prefix="gateway-bench-") as workdir:
        result = asyncio.run(run(settings_from(args), sections, Path(workdir), sys.stderr))
    print(results.render(result, shared_results.render_lines(result)))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
        print(f"\nwritten to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
