"""The command line: ``serve`` and ``check-config`` run or check the gateway (``proxy.server``);
the other subcommands are client tools (``proxy.cli``). Dispatch only."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from proxy import __version__
from proxy.config import Config, ConfigError, default_config_path, load_config

# Client subcommands: each module's add_parser(subparsers) registers its commands with
# set_defaults(run=<callable(args) -> int>); they run without loading the gateway's config.
CLIENT_MODULES = ("proxy.cli.ops", "proxy.cli.terminal", "proxy.cli.demo")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m proxy",
        description="A gateway in front of Ollama: API keys, rate limits, a fair queue and "
        "metrics. serve runs it; the other commands check it or talk to it.",
    )
    parser.add_argument("--version", action="version", version=__version__)
    parser.add_argument(
        "--config", help="YAML config file (default: $PROXY_CONFIG or ./config.yaml)"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", help="run the gateway")
    sub.add_parser("check-config", help="validate the configuration and exit")
    for name in CLIENT_MODULES:
        importlib.import_module(name).add_parser(sub)
    return parser


def _load(path: str | None) -> Config:
    chosen = path if path is not None else default_config_path(os.environ)
    return load_config(chosen, os.environ)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run = getattr(args, "run", None)
    if run is not None:
        return int(run(args))
    try:
        config = _load(args.config)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    from proxy import server

    if args.command == "check-config":
        print(server.describe(config))
        print("config ok")
        return 0
    return server.serve(config)


if __name__ == "__main__":
    sys.exit(main())
