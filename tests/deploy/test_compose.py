"""The compose file, the gateway's Dockerfile and .env.example."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from proxy.config import ConfigError, load_config
from tests.conftest import RunningGateway
from tests.deploy.compose import (
    COMPOSE_FILES,
    DEPLOY,
    ENV_EXAMPLE_PATH,
    GATEWAY_ENV_NAMES,
    GENERATED_KEY,
    INTERPOLATION,
    REPO,
    compose,
    docker_compose_config,
    dockerfile_instructions,
    env_example,
    environment,
    exec_form,
    raw_compose,
)

pytestmark = pytest.mark.timeout(60)

FOUR_GB_PROFILE = {"OLLAMA_MODEL": "qwen2.5:0.5b", "OLLAMA_MEMORY_LIMIT": "4g"}
# .env.example entries no compose file reads: the project name is Compose's own, and the
# Justfile reads OLLAMA_BOXES to choose the compose files.
NOT_INTERPOLATED = {"COMPOSE_PROJECT_NAME", "OLLAMA_BOXES"}


@pytest.mark.parametrize("source", ["no .env", ".env.example"])
def test_docker_compose_accepts_the_file(docker_compose: str, tmp_path: Path, source: str) -> None:
    """docker-compose validates compose.yaml against the Compose schema, with and without a .env."""
    env_file = tmp_path / "env"
    env_file.write_text("" if source == "no .env" else ENV_EXAMPLE_PATH.read_text())
    result = docker_compose_config(docker_compose, env_file)
    assert result.returncode == 0, result.stderr
    resolved = yaml.safe_load(result.stdout)
    assert set(resolved["services"]) == {
        "ollama",
        "proxy",
        "cadvisor",
        "prometheus",
        "alertmanager",
        "grafana",
    }
    names = set(environment(resolved["services"]["proxy"]))
    assert names <= GATEWAY_ENV_NAMES, f"not read by the gateway: {names - GATEWAY_ENV_NAMES}"


def test_compose_file_has_no_version_key() -> None:
    """compose.yaml follows the Compose Specification, which dropped the `version` key."""
    assert "version" not in raw_compose()


def test_gateway_reads_every_variable_the_proxy_service_sets() -> None:
    """Every environment name given to the proxy service is one proxy.config reads."""
    names = set(environment(raw_compose()["services"]["proxy"]))
    assert names <= GATEWAY_ENV_NAMES, f"not read by the gateway: {names - GATEWAY_ENV_NAMES}"


@pytest.mark.parametrize("profile", ["defaults", ".env.example", "4 GB"])
def test_proxy_environment_is_a_valid_gateway_config(profile: str) -> None:
    """The proxy service's environment, with the client key `just deploy` generates, loads as
    a valid config that points at the ollama service."""
    env = {"defaults": {}, ".env.example": env_example(), "4 GB": FOUR_GB_PROFILE}[profile]
    services = compose({**env, **GENERATED_KEY})["services"]
    config = load_config(None, environment(services["proxy"]))
    assert config.upstream.url == "http://ollama:11434"
    assert config.server.port == 8000
    assert config.upstream.default_model == (env.get("OLLAMA_MODEL") or "qwen2.5:7b-instruct-q4_0")
    assert config.limits.parallel == int(environment(services["ollama"])["OLLAMA_NUM_PARALLEL"])


def test_the_published_gateway_needs_client_keys_or_anonymous_access_allowed() -> None:
    """Without a client key the stack's gateway (0.0.0.0 in its container) refuses to start,
    naming both ways out; ALLOW_ANONYMOUS=true starts it knowingly."""
    env = environment(compose(env_example())["services"]["proxy"])
    with pytest.raises(ConfigError, match="ALLOW_ANONYMOUS=true"):
        load_config(None, env)
    allowed = environment(
        compose({**env_example(), "ALLOW_ANONYMOUS": "true"})["services"]["proxy"]
    )
    assert load_config(None, allowed).auth.allow_anonymous


@pytest.mark.parametrize("value", [None, "3"])
def test_gateway_and_ollama_share_num_parallel(value: str | None) -> None:
    """OLLAMA_NUM_PARALLEL reaches Ollama and the gateway's gate as the same value."""
    env = {} if value is None else {"OLLAMA_NUM_PARALLEL": value}
    services = compose(env)["services"]
    ollama = environment(services["ollama"])["OLLAMA_NUM_PARALLEL"]
    gateway = environment(services["proxy"])["OLLAMA_NUM_PARALLEL"]
    assert ollama == gateway == (value or "1")


def test_ollama_settings_follow_the_profile() -> None:
    """Ollama gets its limits from .env (6 GB / 2 CPUs by default) and the one-model settings."""
    ollama = compose()["services"]["ollama"]
    env = environment(ollama)
    assert env["OLLAMA_HOST"] == "0.0.0.0:11434"
    assert env["OLLAMA_MAX_LOADED_MODELS"] == "1"
    assert env["OLLAMA_FLASH_ATTENTION"] == "1"
    assert env["OLLAMA_KEEP_ALIVE"]
    assert (ollama["mem_limit"], str(ollama["cpus"])) == ("6g", "2")
    assert compose(FOUR_GB_PROFILE)["services"]["ollama"]["mem_limit"] == "4g"
    assert any(volume.endswith(":/root/.ollama") for volume in ollama["volumes"])
    named = {volume.split(":")[0] for volume in ollama["volumes"]}
    assert named <= set(raw_compose()["volumes"]), "models belong in a named volume"
    assert ollama["healthcheck"]["test"]


def test_ollama_is_reached_only_through_the_gateway() -> None:
    """Ollama publishes no port; the gateway waits for it to be healthy and reaches it by name."""
    services = compose()["services"]
    assert "ports" not in services["ollama"]
    assert "11434" in [str(port) for port in services["ollama"]["expose"]]
    assert services["proxy"]["depends_on"]["ollama"]["condition"] == "service_healthy"


def published(service: dict[str, object]) -> list[tuple[str, str, str]]:
    """(host address, host port, container port) of each short-syntax port mapping."""
    out = []
    for entry in service.get("ports", []):  # type: ignore[attr-defined]
        host_ip, host_port, container_port = str(entry).rsplit(":", 2)
        out.append((host_ip, host_port, container_port))
    return out


@pytest.mark.parametrize("two_boxes", [False, True], ids=["one box", "two boxes"])
def test_only_the_gateway_listens_beyond_loopback(two_boxes: bool) -> None:
    """By default every published port but the gateway's is bound to 127.0.0.1."""
    services = compose(two_boxes=two_boxes)["services"]
    assert published(services["proxy"]) == [("0.0.0.0", "8000", "8000")]
    expected = {"cadvisor": "8080", "prometheus": "9090", "alertmanager": "9093", "grafana": "3000"}
    for name, port in expected.items():
        assert published(services[name]) == [("127.0.0.1", port, port)], name
    for name, service in services.items():
        if name != "proxy":
            assert all(ip == "127.0.0.1" for ip, _, _ in published(service)), name


def test_images_are_pinned() -> None:
    """Every image, in the compose files and the Dockerfile, names a version tag, never latest."""
    images = [
        service["image"]
        for service in compose(two_boxes=True, replicas=True)["services"].values()
        if "build" not in service
    ]
    images += [args.split()[0] for keyword, args in dockerfile_instructions() if keyword == "FROM"]
    assert images
    for image in images:
        name, _, tag = image.rpartition(":")
        assert name, f"{image}: no tag"
        assert "/" not in tag, f"{image}: no tag"
        assert tag != "latest", f"{image}: not a version tag"
        assert re.search(r"\d", tag), f"{image}: not a version tag"


def strings(node: object) -> Iterator[str]:
    """Every string in a parsed YAML document, keys included (comments are gone)."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from strings(key)
            yield from strings(value)
    elif isinstance(node, list):
        for item in node:
            yield from strings(item)
    elif isinstance(node, str):
        yield node


def test_every_variable_has_a_default_and_is_documented() -> None:
    """Each ${VAR} in the compose files has a default and a commented entry in .env.example,
    and back."""
    used = {}
    for path in COMPOSE_FILES:
        for text in strings(raw_compose(path)):
            for match in INTERPOLATION.finditer(text):
                assert match.group(2), f"{path.name}: ${{{match.group(1)}}} has no default"
                used[match.group(1)] = match.group(3)
    documented = env_example()
    assert set(used) == set(documented) - NOT_INTERPOLATED
    # Every assignment sits under a comment (directly, or in a block under one).
    commented = False
    for line in ENV_EXAMPLE_PATH.read_text().splitlines():
        if not line:
            commented = False
        elif line.startswith("#"):
            commented = True
        else:
            assert commented, f".env.example: {line.split('=')[0]} has no comment"


def test_env_example_reads_the_same_in_bash() -> None:
    """Sourcing .env.example in bash (as the Justfile does) gives the values Compose reads."""
    script = f'set -a; . "{ENV_EXAMPLE_PATH}"; env -0'
    result = subprocess.run(
        ["bash", "-c", script], capture_output=True, text=True, timeout=30, check=True, env={}
    )
    sourced = dict(item.partition("=")[::2] for item in result.stdout.split("\0") if item)
    assert {name: sourced.get(name) for name in env_example()} == env_example()


def test_cadvisor_can_count_oom_kills() -> None:
    """cAdvisor runs privileged with /dev/kmsg and the oom_event metrics, keeping compose labels."""
    cadvisor = compose()["services"]["cadvisor"]
    assert cadvisor["privileged"] is True
    assert "/dev/kmsg:/dev/kmsg" in cadvisor["devices"]
    flags = dict(arg.removeprefix("--").split("=", 1) for arg in cadvisor["command"])
    assert "oom_event" in flags["enable_metrics"].split(",")
    assert "memory" in flags["enable_metrics"].split(",")
    # A space in the whitelist silently breaks it (google/cadvisor#3235).
    labels = flags["whitelisted_container_labels"]
    assert " " not in labels
    assert "com.docker.compose.service" in labels.split(",")


def test_bind_mounted_files_exist() -> None:
    """Every file or directory the compose files bind-mount from the repository exists."""
    for name, service in compose(two_boxes=True, replicas=True)["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name}: {source} is missing"


def test_monitoring_services_start_with_their_configs() -> None:
    """Prometheus has a retention period; Grafana takes its password from .env and has a home."""
    services = compose({"GRAFANA_ADMIN_PASSWORD": "s3cret-pass"})["services"]
    assert "--storage.tsdb.retention.time=15d" in services["prometheus"]["command"]
    assert environment(services["grafana"])["GF_SECURITY_ADMIN_PASSWORD"] == "s3cret-pass"
    home = environment(services["grafana"])["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    mounts = dict(v.split(":")[1::-1] for v in services["grafana"]["volumes"] if v[0] == ".")
    assert (DEPLOY / mounts[str(Path(home).parent)] / Path(home).name).is_file()


def test_dockerfile_builds_from_the_repository_root() -> None:
    """The build context is the repository root, which holds everything the Dockerfile copies."""
    build = compose()["services"]["proxy"]["build"]
    context = (DEPLOY / build["context"]).resolve()
    assert context == REPO
    assert (context / build["dockerfile"]).resolve() == DEPLOY / "Dockerfile"
    for keyword, args in dockerfile_instructions():
        if keyword == "COPY" and "--from" not in args:
            for source in args.split()[:-1]:
                assert (context / source).exists(), f"COPY {source}: not in the build context"


def test_dockerfile_runtime_stage() -> None:
    """The runtime stage is slim Python, runs as a non-root user, exposes 8000 and serves."""
    instructions = dockerfile_instructions()
    stages = [i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM"]
    assert len(stages) >= 2, "multi-stage: a builder and a runtime stage"
    runtime = instructions[stages[-1] :]
    assert runtime[0][1].split()[0] == "python:3.11-slim"
    keywords = dict(runtime)
    assert keywords["USER"] not in {"root", "0"}
    assert keywords["EXPOSE"] == "8000"
    assert exec_form(keywords["CMD"]) == ["python", "-m", "proxy", "serve"]
    assert "/health" in keywords["HEALTHCHECK"]
    assert "pip wheel" in dict(instructions[: stages[-1]])["RUN"]


def healthchecks() -> dict[str, list[str]]:
    """The Dockerfile's and compose's gateway health checks, as argument vectors."""
    dockerfile = exec_form(dict(dockerfile_instructions())["HEALTHCHECK"].split(" CMD ", 1)[1])
    test = raw_compose()["services"]["proxy"]["healthcheck"]["test"]
    assert dockerfile[0] == test[1] == "python"
    return {"Dockerfile": [sys.executable, *dockerfile[1:]], "compose": [sys.executable, *test[2:]]}


async def run_healthcheck(argv: list[str], port: int) -> int:
    # The checks probe port 8000 (compose) or $PROXY_PORT (Dockerfile): point both at `port`.
    argv = [arg.replace("127.0.0.1:8000", f"127.0.0.1:{port}") for arg in argv]
    env = {**os.environ, "PROXY_PORT": str(port)}
    proc = await asyncio.create_subprocess_exec(
        *argv, env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
    )
    return await asyncio.wait_for(proc.wait(), 20)


@pytest.mark.parametrize("source", ["Dockerfile", "compose"])
async def test_healthcheck_passes_on_a_live_gateway(gateway: RunningGateway, source: str) -> None:
    """The container health check's command exits 0 against a running gateway's /health."""
    assert gateway.server.port is not None
    assert await run_healthcheck(healthchecks()[source], gateway.server.port) == 0


@pytest.mark.parametrize("source", ["Dockerfile", "compose"])
async def test_healthcheck_fails_without_a_gateway(source: str) -> None:
    """The container health check's command exits non-zero when nothing answers."""
    # A bound socket that does not listen: connections are refused, and no other process
    # can take the port while the check runs.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        assert await run_healthcheck(healthchecks()[source], sock.getsockname()[1]) != 0
