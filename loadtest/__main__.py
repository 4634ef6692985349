"""``python -m loadtest``: load the gateway (or Ollama itself) and report how it held up.

By default 50 requests at concurrency 5 against http://localhost:8000, the original design's
scenario. The progress line goes to stderr, the table to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, TextIO

import aiohttp

from loadtest import plot
from loadtest.dialects import PATHS
from loadtest.progress import LiveProgress
from loadtest.prompts import BUILT_IN, load_prompts
from loadtest.report import Summary, render_table, summarize
from loadtest.runner import RunConfig, RunResult, run_load
from loadtest.scrape import ServerView, parse_text, render_comparison, server_view
from loadtest.scrape import queue_wait_summary as queue_wait_line
from proxy.config import UpstreamConfig

DEFAULT_URL = "http://localhost:8000"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m loadtest", description=(__doc__ or "").replace("``", "")
    )
    p.add_argument("--url", help=f"gateway URL (default: $GATEWAY_URL or {DEFAULT_URL})")
    p.add_argument("--api-key", help="client API key (default: $PROXY_API_KEY)")
    p.add_argument(
        "--dialect",
        choices=sorted(PATHS),
        default="chat",
        help="chat: /chat, ollama: /api/chat, openai: /v1/chat/completions",
    )
    p.add_argument(
        "--stream",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="stream the answers (default: on; TTFT is measured only when on)",
    )
    p.add_argument("--model", help="model (default: $OLLAMA_MODEL; /chat: the gateway's default)")
    p.add_argument(
        "--prompts",
        default="mixed",
        help=f"{', '.join(BUILT_IN)}, or @FILE with one prompt per line",
    )
    p.add_argument("--max-tokens", type=int, help="cap each answer (num_predict / max_tokens)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--requests", type=int, help="number of requests (default: 50)")
    size.add_argument("--duration", type=float, help="seconds to keep starting requests")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--concurrency", type=int, default=5, help="closed loop (default: 5)")
    mode.add_argument("--rate", type=float, help="open loop: requests started per second")
    p.add_argument("--timeout", type=float, default=300.0, help="per request, seconds")
    p.add_argument("--json", type=Path, help="write every sample and the summary here")
    p.add_argument("--plot", type=Path, help="draw distributions and a timeline (PNG)")
    p.add_argument(
        "--metrics",
        action="store_true",
        help="read the gateway's /metrics before and after; show its view too",
    )
    return p


def config_from(args: argparse.Namespace) -> RunConfig:
    model = args.model or os.environ.get("OLLAMA_MODEL")
    if not model and args.dialect != "chat":
        model = UpstreamConfig().default_model
    return RunConfig(
        url=(args.url or os.environ.get("GATEWAY_URL") or DEFAULT_URL).rstrip("/"),
        api_key=args.api_key or os.environ.get("PROXY_API_KEY") or None,
        dialect=args.dialect,
        stream=args.stream,
        model=model,
        prompts=load_prompts(args.prompts),
        max_tokens=args.max_tokens,
        requests=None if args.duration else (args.requests or 50),
        duration_s=args.duration,
        concurrency=args.concurrency,
        rate=args.rate,
        timeout_s=args.timeout,
    )


async def _get(url: str, api_key: str | None) -> tuple[int, str]:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session,
        session.get(url, headers=headers) as response,
    ):
        return response.status, await response.text()


async def scrape(config: RunConfig) -> str | None:
    status, text = await _get(config.url + "/metrics", config.api_key)
    return text if status == 200 else None


async def execute(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    try:
        config = config_from(args)
    except ValueError as exc:
        err.write(f"{exc}\n")
        return 2
    try:
        await _get(config.url + "/health", config.api_key)  # any answer will do
    except (aiohttp.ClientError, TimeoutError) as exc:
        err.write(f"cannot reach {config.url}: {exc or type(exc).__name__}\n")
        return 2
    before = await scrape(config) if args.metrics else None
    if args.metrics and before is None:
        err.write(f"{config.url}/metrics did not answer 200: showing the client's view only\n")
    progress = LiveProgress(
        err, is_tty=err.isatty(), total=config.requests, duration_s=config.duration_s
    )
    err.write(f"load test: {config.describe()}\n")
    result = await run_load(config, progress)
    view: ServerView | None = None
    if before is not None:
        after = await scrape(config)
        if after is not None:
            view = server_view(parse_text(before), parse_text(after), PATHS[config.dialect])
    summary = summarize(result.samples, result.wall_s)
    title = f"Load test: {config.describe()}"
    table = render_table(
        summary, title, streamed=config.stream, queue_wait_note=queue_wait_line(view)
    )
    out.write(table + "\n")
    if view is not None:
        out.write("\n" + render_comparison(summary, view) + "\n")
    if args.json:
        args.json.write_text(json.dumps(_document(config, result, summary, view), indent=1))
        out.write(f"\nsamples and summary written to {args.json}\n")
    if args.plot:
        plot.write_plot(result.samples, summary, args.plot, title)
        out.write(f"plot written to {args.plot}\n")
    return 0


def _document(
    config: RunConfig, result: RunResult, summary: Summary, view: ServerView | None
) -> dict[str, Any]:
    settings = asdict(config)
    settings.pop("api_key")
    return {
        "config": settings,
        "started_at": result.started_at,
        "summary": asdict(summary),
        "server": asdict(view) if view is not None else None,
        "samples": [asdict(s) for s in result.samples],
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.plot and not plot.is_available():
        print(plot.MISSING, file=sys.stderr)  # before the run, not after minutes of it
        return 2
    try:
        import uvloop

        loop_factory = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - a dependency except on Windows
        loop_factory = None
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            return runner.run(execute(args, sys.stdout, sys.stderr))
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
