"""The two-box stack (compose.two-boxes.yaml over compose.yaml), BACKENDS in the one-box
stack, and how the Justfile chooses between them."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from proxy.config import backends_of, load_config
from tests.deploy.compose import (
    COMPOSE_FILES,
    ENV_EXAMPLE_PATH,
    GATEWAY_ENV_NAMES,
    GENERATED_KEY,
    REPO,
    compose,
    docker_compose_config,
    env_example,
    environment,
    files_just_chooses,
    raw_compose,
    stack_files,
)
from tests.deploy.conftest import require_tool

pytestmark = pytest.mark.timeout(60)

SECOND_BOX = {
    "OLLAMA_NUM_PARALLEL": "3",
    "OLLAMA_SECOND_MEMORY_LIMIT": "3g",
    "OLLAMA_SECOND_CPUS": "1.5",
    "OLLAMA_SECOND_NUM_PARALLEL": "2",
    "OLLAMA_SECOND_PRIORITY": "1",
}
PROFILES = {"defaults": {}, ".env.example": env_example(), "second box settings": SECOND_BOX}
OLLAMAS = {"main": "ollama", "second": "ollama-second"}  # backend name -> compose service


def env_file_text(env: dict[str, str]) -> str:
    return "".join(f"{name}={value}\n" for name, value in env.items())


@pytest.mark.parametrize("profile", list(PROFILES))
def test_docker_compose_accepts_the_two_box_stack(
    docker_compose: str, tmp_path: Path, profile: str
) -> None:
    """docker-compose validates compose.yaml with the override and resolves the gateway's
    environment, dependencies and volumes as the tests' own merge does."""
    env = PROFILES[profile]
    env_file = tmp_path / "env"
    env_file.write_text(env_file_text(env))
    result = docker_compose_config(docker_compose, env_file, stack_files(two_boxes=True))
    assert result.returncode == 0, result.stderr
    resolved = yaml.safe_load(result.stdout)
    ours = compose(env, two_boxes=True)
    assert set(resolved["services"]) == set(raw_compose()["services"]) | {"ollama-second"}
    assert set(resolved["services"]) == set(ours["services"])
    proxy = resolved["services"]["proxy"]
    names = set(environment(proxy))
    assert names <= GATEWAY_ENV_NAMES, f"not read by the gateway: {names - GATEWAY_ENV_NAMES}"
    assert environment(proxy) == environment(ours["services"]["proxy"])
    assert proxy["depends_on"] == ours["services"]["proxy"]["depends_on"]
    assert set(resolved["volumes"]) == set(ours["volumes"])


@pytest.mark.parametrize("profile", list(PROFILES))
def test_the_gateway_routes_across_both_ollama_services(profile: str) -> None:
    """The two-box gateway's environment loads as a config with backends main and second at
    the two Ollama services, each with its container's OLLAMA_NUM_PARALLEL as slots."""
    env = {**PROFILES[profile], **GENERATED_KEY}
    services = compose(env, two_boxes=True)["services"]
    backends = backends_of(load_config(None, environment(services["proxy"])))
    assert [backend.name for backend in backends] == list(OLLAMAS)
    for backend in backends:
        service = services[OLLAMAS[backend.name]]
        url = urlsplit(backend.url)
        assert url.hostname == OLLAMAS[backend.name]
        assert str(url.port) in [str(port) for port in service["expose"]]
        assert backend.kind == "ollama"
        assert backend.slots == int(environment(service)["OLLAMA_NUM_PARALLEL"])
        depends = services["proxy"]["depends_on"][OLLAMAS[backend.name]]
        assert depends["condition"] == "service_healthy"
    priorities = {backend.name: backend.priority for backend in backends}
    assert priorities == {"main": 0, "second": int(env.get("OLLAMA_SECOND_PRIORITY") or 0)}


def test_the_second_ollama_is_the_first_with_its_own_models_and_limits() -> None:
    """ollama-second runs the first's pinned image, settings and health check, with its own
    models volume, its limits from OLLAMA_SECOND_*, and no published port."""
    services = compose(two_boxes=True)["services"]
    first, second = services["ollama"], services["ollama-second"]
    assert second["image"] == first["image"]
    assert second["healthcheck"] == first["healthcheck"]
    assert second["restart"] == first["restart"]
    same = {k: v for k, v in environment(first).items() if k != "OLLAMA_NUM_PARALLEL"}
    assert {k: v for k, v in environment(second).items() if k != "OLLAMA_NUM_PARALLEL"} == same
    assert (second["mem_limit"], second["memswap_limit"], str(second["cpus"])) == ("6g", "6g", "2")
    assert "ports" not in second
    assert "11434" in [str(port) for port in second["expose"]]

    custom = compose(SECOND_BOX, two_boxes=True)["services"]
    assert (custom["ollama-second"]["mem_limit"], str(custom["ollama-second"]["cpus"])) == (
        "3g",
        "1.5",
    )
    assert environment(custom["ollama-second"])["OLLAMA_NUM_PARALLEL"] == "2"
    assert custom["ollama"]["mem_limit"] == "6g", "the first box keeps its own limit"

    def models_volume(service: dict[str, object]) -> str:
        (volume,) = [v for v in service["volumes"] if v.endswith(":/root/.ollama")]  # type: ignore[attr-defined]
        return str(volume).split(":")[0]

    declared = set(compose(two_boxes=True)["volumes"])
    assert {models_volume(first), models_volume(second)} <= declared
    assert models_volume(first) != models_volume(second)


def documented_backends_example() -> str:
    """The BACKENDS example .env.example gives, as written there (quotes included)."""
    match = re.search(r"^# Example: (BACKENDS=.*)$", ENV_EXAMPLE_PATH.read_text(), re.MULTILINE)
    assert match, ".env.example shows no BACKENDS example"
    return match.group(1)


def test_backends_from_the_env_file_reach_the_one_box_gateway(
    docker_compose: str, tmp_path: Path
) -> None:
    """.env.example's BACKENDS example reaches the one-box gateway intact through
    docker-compose and through bash (as the Justfile sources it), as those backends."""
    assignment = documented_backends_example()
    env_file = tmp_path / "env"
    text = ENV_EXAMPLE_PATH.read_text().replace("\nBACKENDS=\n", f"\n{assignment}\n")
    env_file.write_text(text + env_file_text(GENERATED_KEY))
    result = docker_compose_config(docker_compose, env_file)
    assert result.returncode == 0, result.stderr
    proxy_env = environment(yaml.safe_load(result.stdout)["services"]["proxy"])
    sourced = subprocess.run(
        ["bash", "-c", f'set -a; . "{env_file}"; printf %s "$BACKENDS"'],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
        env={},
    ).stdout
    assert proxy_env["BACKENDS"] == sourced
    backends = backends_of(load_config(None, proxy_env))
    assert [(b.name, b.slots, b.priority) for b in backends] == [("gpu", 2, 0), ("cpu", 1, 1)]
    assert urlsplit(backends[1].url).hostname == "ollama", "this stack's Ollama, by service name"


def test_without_backends_the_one_box_gateway_has_the_one_ollama() -> None:
    """With BACKENDS empty, as .env.example leaves it, the gateway's one backend is the
    ollama service with OLLAMA_NUM_PARALLEL slots."""
    services = compose({**env_example(), **GENERATED_KEY})["services"]
    (backend,) = backends_of(load_config(None, environment(services["proxy"])))
    assert (backend.name, backend.url) == ("default", "http://ollama:11434")
    assert backend.slots == int(environment(services["ollama"])["OLLAMA_NUM_PARALLEL"])


@pytest.mark.parametrize(
    ("setting", "files"),
    [
        (None, ["deploy/compose.yaml"]),
        ("OLLAMA_BOXES=1", ["deploy/compose.yaml"]),
        ("OLLAMA_BOXES=2", ["deploy/compose.yaml", "deploy/compose.two-boxes.yaml"]),
        ('OLLAMA_BOXES="2"', ["deploy/compose.yaml", "deploy/compose.two-boxes.yaml"]),
    ],
)
def test_the_justfile_chooses_the_compose_files_from_deploy_env(
    tmp_path: Path, setting: str | None, files: list[str]
) -> None:
    """`just` gives compose the two-box override exactly when deploy/.env says OLLAMA_BOXES=2."""
    just = require_tool("just", "just (or pip install rust-just)")
    assert files_just_chooses(just, tmp_path, setting) == files
    assert {REPO / name for name in files} <= set(COMPOSE_FILES)


def test_just_pull_names_the_two_boxes_as_the_gateway_does() -> None:
    """The backend names `just pull` loops over in the two-box stack are the override's."""
    justfile = (REPO / "Justfile").read_text()
    match = re.search(r'^two_box_backends := "(.*)"$', justfile, re.MULTILINE)
    assert match, "the Justfile names the two boxes' backends"
    services = compose(GENERATED_KEY, two_boxes=True)["services"]
    backends = backends_of(load_config(None, environment(services["proxy"])))
    assert match.group(1).split() == [backend.name for backend in backends]
