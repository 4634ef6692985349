"""The deploy files as tests read them: compose.yaml interpolated as Compose would, .env.example
as a mapping, and the Dockerfile as a list of instructions."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
REPO = DEPLOY.parent
COMPOSE_PATH = DEPLOY / "compose.yaml"
ENV_EXAMPLE_PATH = DEPLOY / ".env.example"
DOCKERFILE_PATH = DEPLOY / "Dockerfile"

# ${NAME} or ${NAME:-default}: the only forms the stack uses (a test checks the default).
INTERPOLATION = re.compile(r"\$\{(\w+)(:-([^}]*))?\}")


def raw_compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE_PATH.read_text(encoding="utf-8"))
    return data


def interpolate(node: Any, env: Mapping[str, str]) -> Any:
    """``node`` with ``${NAME:-default}`` resolved as Compose does (unset or empty: default)."""
    if isinstance(node, dict):
        return {key: interpolate(value, env) for key, value in node.items()}
    if isinstance(node, list):
        return [interpolate(item, env) for item in node]
    if isinstance(node, str):
        resolved = INTERPOLATION.sub(lambda m: env.get(m.group(1)) or m.group(3) or "", node)
        assert "$" not in resolved, f"unsupported interpolation in {node!r}"
        return resolved
    return node


def compose(env: Mapping[str, str] | None = None) -> dict[str, Any]:
    result: dict[str, Any] = interpolate(raw_compose(), env or {})
    return result


def env_example() -> dict[str, str]:
    """The assignments in .env.example, in order."""
    values = {}
    for line in ENV_EXAMPLE_PATH.read_text(encoding="utf-8").splitlines():
        if line and not line.startswith("#"):
            name, sep, value = line.partition("=")
            assert sep, f".env.example: not an assignment: {line!r}"
            values[name] = value
    return values


def environment(service: dict[str, Any]) -> dict[str, str]:
    """A service's ``environment``, whichever of the two Compose forms it uses."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict(item.partition("=")[::2] for item in env)
    return {str(key): "" if value is None else str(value) for key, value in env.items()}


def dockerfile_instructions() -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` with continuation lines joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in DOCKERFILE_PATH.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = pending + stripped
        pending = ""
        keyword, _, args = full.partition(" ")
        instructions.append((keyword.upper(), args.strip()))
    return instructions


def exec_form(args: str) -> list[str]:
    """The JSON array of an exec-form CMD/HEALTHCHECK (after any ``--option``s and ``CMD``)."""
    start = args.index("[")
    command: list[str] = json.loads(args[start:])
    return command
