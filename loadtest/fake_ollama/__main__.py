"""`python -m loadtest.fake_ollama`: serve the fake until interrupted, for benchmarks by hand."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
from collections.abc import Sequence

from .config import MODES, FakeModel, FakeOllamaConfig, default_models
from .server import FakeOllama

# A separate process: nobody reads `seen`, so keep only enough for debugging.
_MAX_SEEN = 1000


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.fake_ollama",
        description="A protocol-faithful fake Ollama for tests and benchmarks.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=11434, help="0 picks a free port")
    parser.add_argument("--tokens", type=int, default=8, help="tokens per completion")
    parser.add_argument("--token-interval", type=float, default=0.0, help="seconds between tokens")
    parser.add_argument("--ttft", type=float, default=0.0, help="seconds of prompt evaluation")
    parser.add_argument("--load", type=float, default=0.0, help="seconds of cold model load")
    parser.add_argument("--num-parallel", type=int, default=1, help="like OLLAMA_NUM_PARALLEL")
    parser.add_argument("--mode", default="ok", choices=sorted(MODES))
    parser.add_argument("--fail-after-chunks", type=int, default=2)
    parser.add_argument("--models", default="", help="comma-separated names (default: 3 models)")
    parser.add_argument("--no-host-check", action="store_true", help="accept any Host header")
    parser.add_argument(
        "--no-stream-usage",
        action="store_true",
        help="ignore stream_options.include_usage, like llama-cpp-python",
    )
    return parser.parse_args(argv)


def config_from(args: argparse.Namespace) -> FakeOllamaConfig:
    known = {m.name: m for m in default_models()}
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    models = [known.get(n, FakeModel(n)) for n in names] if names else default_models()
    return FakeOllamaConfig(
        models=models,
        tokens=args.tokens,
        token_interval_s=args.token_interval,
        ttft_s=args.ttft,
        load_s=args.load,
        num_parallel=args.num_parallel,
        mode=args.mode,
        fail_after_chunks=args.fail_after_chunks,
        check_host=not args.no_host_check,
        honor_stream_usage=not args.no_stream_usage,
        max_seen=_MAX_SEEN,
    )


async def serve(args: argparse.Namespace) -> None:
    fake = FakeOllama(config_from(args))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):  # Windows has no add_signal_handler
            loop.add_signal_handler(sig, stop.set)
    url = await fake.start(args.host, args.port)
    print(url, flush=True)
    try:
        await stop.wait()
    finally:
        await fake.close()


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        import uvloop
    except ImportError:  # uvloop is optional: plain asyncio works, just slower
        asyncio.run(serve(args))
    else:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(serve(args))


if __name__ == "__main__":
    main()
