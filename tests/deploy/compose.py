"""The deploy files as tests read them: compose.yaml (alone, or with the two-box and replicas
overrides) interpolated as Compose would, .env.example as a mapping, and the Dockerfile as a
list of instructions."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from proxy.config import ENV_OVERRIDES

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
REPO = DEPLOY.parent
COMPOSE_PATH = DEPLOY / "compose.yaml"
TWO_BOXES_PATH = DEPLOY / "compose.two-boxes.yaml"  # an override of compose.yaml
REPLICAS_PATH = DEPLOY / "compose.replicas.yaml"  # another
TWO_BOXES_REPLICAS_PATH = DEPLOY / "compose.two-boxes.replicas.yaml"  # after both
COMPOSE_FILES = (COMPOSE_PATH, TWO_BOXES_PATH, REPLICAS_PATH, TWO_BOXES_REPLICAS_PATH)
ENV_EXAMPLE_PATH = DEPLOY / ".env.example"
DOCKERFILE_PATH = DEPLOY / "Dockerfile"
GATEWAY_ENV_NAMES = set(ENV_OVERRIDES) | {"PROXY_CONFIG"}  # what the gateway reads
# What `just deploy` (its _env recipe) adds to deploy/.env: a generated client key.
GENERATED_KEY = {"PROXY_API_KEYS": "app:generated-key-0123456789"}

# ${NAME} or ${NAME:-default}: the only forms the stack uses (a test checks the default).
INTERPOLATION = re.compile(r"\$\{(\w+)(:-([^}]*))?\}")


def raw_compose(path: Path = COMPOSE_PATH) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(path.read_text(encoding="utf-8"))
    return data


def merge_override(base: Any, override: Any, where: str = "") -> Any:
    """``override`` applied to ``base`` as Compose merges files, for what the stack's
    overrides use: mappings (services, environment, depends_on, volumes) merge key by key, a
    scalar replaces a scalar, and a service's bind mounts merge by their container path (a
    mount there replaces the base's). Compose merges other sequences by rules that differ
    from key to key (ports add up, commands are replaced), so an override of one is refused."""
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for key, value in override.items():
            inner = f"{where}.{key}"
            merged[key] = merge_override(base[key], value, inner) if key in base else value
        return merged
    if isinstance(base, list) and where.endswith(".volumes"):
        by_target = {mount_target(volume): volume for volume in base}
        by_target.update({mount_target(volume): volume for volume in override})
        return list(by_target.values())
    assert not isinstance(base, list | dict), f"{where}: the override replaces a {type(base)}"
    return override


def mount_target(volume: str) -> str:
    """The container path of a short-syntax volume (``source:target[:mode]``)."""
    return volume.split(":")[1]


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


def stack_files(*, two_boxes: bool = False, replicas: bool = False) -> list[Path]:
    """The compose files of a stack, in the order the Justfile gives them."""
    files = [COMPOSE_PATH]
    if two_boxes:
        files.append(TWO_BOXES_PATH)
    if replicas:
        files.append(REPLICAS_PATH)
    if two_boxes and replicas:
        files.append(TWO_BOXES_REPLICAS_PATH)
    return files


def files_just_chooses(just: str, workdir: Path, settings: str | None) -> list[str]:
    """The compose files (``deploy/...``) that `just` passes for a deploy/.env holding
    ``settings`` (None: no deploy/.env). It runs a copy of the Justfile in ``workdir``, beside
    its own deploy/.env: the developer's is never touched."""
    shutil.copy(REPO / "Justfile", workdir / "Justfile")
    (workdir / "deploy").mkdir()
    if settings is not None:
        (workdir / "deploy" / ".env").write_text(f"PROXY_PORT=8000\n{settings}\n")
    result = subprocess.run(
        [just, "--justfile", str(workdir / "Justfile"), "--evaluate", "compose"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
        cwd=workdir,
    )
    return re.findall(r"-f (\S+)", result.stdout)


def compose(
    env: Mapping[str, str] | None = None, *, two_boxes: bool = False, replicas: bool = False
) -> dict[str, Any]:
    """compose.yaml, with the two-box and replicas overrides if asked, interpolated with
    ``env``."""
    files = stack_files(two_boxes=two_boxes, replicas=replicas)
    raw = raw_compose(files[0])
    for path in files[1:]:
        raw = merge_override(raw, raw_compose(path))
    result: dict[str, Any] = interpolate(raw, env or {})
    return result


def docker_compose_config(
    binary: str, env_file: Path, files: Sequence[Path] = (COMPOSE_PATH,)
) -> subprocess.CompletedProcess[str]:
    """``docker-compose -f ... --env-file env_file config``: the files validated, merged and
    interpolated by Compose itself."""
    # A minimal environment, so that variables in the developer's shell cannot stand in for
    # missing defaults.
    argv = [binary, *(arg for path in files for arg in ("-f", str(path)))]
    return subprocess.run(
        [*argv, "--env-file", str(env_file), "config"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(env_file.parent)},
    )


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


def ollama_services() -> set[str]:
    """The compose services that run Ollama, in either stack (one box or two)."""
    return {
        name
        for name, service in compose(two_boxes=True)["services"].items()
        if str(service.get("image", "")).startswith("ollama/ollama:")
    }
