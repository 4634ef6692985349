"""The replicas stack (compose.replicas.yaml over compose.yaml, and with the two-box stack
compose.two-boxes.replicas.yaml too): gateway replicas sharing Redis behind nginx, the
Prometheus configuration that finds them, nginx's file under Debian's nginx -t, and how the
Justfile chooses the files."""

from __future__ import annotations

import ipaddress
import re
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from proxy.config import backends_of, load_config
from tests.deploy.compose import (
    DEPLOY,
    GATEWAY_ENV_NAMES,
    GENERATED_KEY,
    REPO,
    compose,
    docker_compose_config,
    env_example,
    environment,
    files_just_chooses,
    mount_target,
    raw_compose,
    stack_files,
)
from tests.deploy.conftest import require_tool
from tests.deploy.nginx import (
    NGINX_CONF_PATH,
    check_config,
    listen_port,
    upstream_server,
    write_config,
)

pytestmark = pytest.mark.timeout(60)

PROFILES = {
    "defaults": {},
    ".env.example, 3 replicas": {**env_example(), "GATEWAY_REPLICAS": "3"},
    "5 replicas, closed": {
        "GATEWAY_REPLICAS": "5",
        "SHARED_STATE_ON_FAILURE": "closed",
        "REDIS_TIMEOUT": "0.5",
        "SLOT_LEASE": "8",
        "TRUSTED_PROXIES": "10.20.0.0/16",
    },
}
# What the replicas stack adds to compose.yaml, and what the gateway replicas add to the
# one gateway's environment (the shared state, and the proxies they trust).
ADDED_SERVICES = {"gateway", "redis", "nginx"}
SHARED_ENV = {"REDIS_URL", "GATEWAY_REPLICAS", "SHARED_STATE_ON_FAILURE", "REDIS_TIMEOUT"}
SHARED_ENV |= {"SLOT_LEASE"}
PROMETHEUS_DIR = DEPLOY / "prometheus"
CONTAINER_CONFIG = "/etc/prometheus/prometheus.yml"


def env_file_text(env: dict[str, str]) -> str:
    return "".join(f"{name}={value}\n" for name, value in env.items())


def replicas_of(services: dict[str, Any]) -> int:
    return int(services["gateway"]["deploy"]["replicas"])


@pytest.mark.parametrize("two_boxes", [False, True], ids=["one box", "two boxes"])
@pytest.mark.parametrize("profile", list(PROFILES))
def test_docker_compose_accepts_the_replicas_stack(
    docker_compose: str, tmp_path: Path, profile: str, two_boxes: bool
) -> None:
    """docker-compose validates compose.yaml with the replicas override (and the two-box
    files) and resolves the replicas' environment, count, dependencies and mounts as the
    tests' own merge does."""
    env = PROFILES[profile]
    env_file = tmp_path / "env"
    env_file.write_text(env_file_text(env))
    files = stack_files(two_boxes=two_boxes, replicas=True)
    result = docker_compose_config(docker_compose, env_file, files)
    assert result.returncode == 0, result.stderr
    resolved = yaml.safe_load(result.stdout)["services"]
    ours = compose(env, two_boxes=two_boxes, replicas=True)["services"]
    base = set(compose(two_boxes=two_boxes)["services"])
    assert set(resolved) == set(ours) == base | ADDED_SERVICES
    gateway = resolved["gateway"]
    names = set(environment(gateway))
    assert names <= GATEWAY_ENV_NAMES, f"not read by the gateway: {names - GATEWAY_ENV_NAMES}"
    assert environment(gateway) == environment(ours["gateway"])
    assert gateway["depends_on"] == ours["gateway"]["depends_on"]
    assert replicas_of(resolved) == replicas_of(ours) == int(env.get("GATEWAY_REPLICAS") or 3)
    assert resolved["proxy"]["profiles"] == ["one-gateway"], "the one gateway stays out"
    mounts = {mount_target(v): v.split(":")[0] for v in resolved["prometheus"]["volumes"]}
    assert Path(mounts[CONTAINER_CONFIG]) == PROMETHEUS_DIR / "prometheus.replicas.yml"


@pytest.mark.parametrize("count", ["2", "3", "7"])
def test_each_replica_loads_a_config_that_shares_state(count: str) -> None:
    """Every replica's environment loads as a gateway config that shares its limits and
    slots through the redis service, with GATEWAY_REPLICAS equal to the replica count, and
    names each replica by its own host name."""
    services = compose({**GENERATED_KEY, "GATEWAY_REPLICAS": count}, replicas=True)["services"]
    gateway = services["gateway"]
    config = load_config(None, environment(gateway))
    shared = config.shared
    assert shared.redis_url
    url = urlsplit(shared.redis_url)
    assert url.scheme == "redis"
    assert url.hostname == "redis"
    assert str(url.port) in [str(port) for port in services["redis"]["expose"]]
    assert shared.replicas == replicas_of(services) == int(count)
    assert shared.on_failure == "open"
    # REPLICA_ID unset, and no fixed host name: each replica is its container's host name.
    assert shared.replica == ""
    assert "REPLICA_ID" not in environment(gateway)
    assert "hostname" not in gateway
    assert "container_name" not in gateway
    assert gateway["depends_on"]["redis"]["condition"] == "service_healthy"
    assert config.server.port == 8000
    assert config.upstream.url == "http://ollama:11434"


def test_shared_state_settings_reach_the_replicas() -> None:
    """The failure policy, Redis timeout and slot lease from .env reach each replica's config."""
    env = {**GENERATED_KEY, **PROFILES["5 replicas, closed"]}
    gateway = compose(env, replicas=True)["services"]["gateway"]
    shared = load_config(None, environment(gateway)).shared
    assert (shared.on_failure, shared.timeout_s, shared.lease_s, shared.replicas) == (
        "closed",
        0.5,
        8.0,
        5,
    )


def test_the_replicas_are_the_one_gateway_but_for_port_and_shared_state() -> None:
    """The gateway replicas repeat compose.yaml's proxy service (build, limits, health check,
    every setting) except that they publish nothing, share state and trust nginx."""
    services = compose(env_example(), replicas=True)["services"]
    one, replica = services["proxy"], services["gateway"]
    for key in set(one) | set(replica):
        if key in {"ports", "profiles", "expose", "deploy", "depends_on", "environment"}:
            continue
        assert replica.get(key) == one.get(key), key
    assert "ports" not in replica
    assert [str(port) for port in replica["expose"]] == ["8000"]
    assert one["depends_on"].items() <= replica["depends_on"].items()
    one_env, replica_env = environment(one), environment(replica)
    assert set(replica_env) == set(one_env) | SHARED_ENV
    different = {name for name in one_env if one_env[name] != replica_env[name]}
    assert different == {"TRUSTED_PROXIES"}
    # The raw files agree too, so that every ${VAR} and default is the same on both.
    raw_one = raw_compose()["services"]["proxy"]["environment"]
    raw_replica = raw_compose(DEPLOY / "compose.replicas.yaml")["services"]["gateway"]
    assert {k: v for k, v in raw_replica["environment"].items() if k in raw_one} == {
        **raw_one,
        "TRUSTED_PROXIES": raw_replica["environment"]["TRUSTED_PROXIES"],
    }


def docker_default_pools() -> list[ipaddress.IPv4Network]:
    """The networks Docker hands to compose projects by default: 172.17-31.0.0/16, then
    192.168.0.0/16 in /20s (the daemon's default-address-pools)."""
    pools = [ipaddress.IPv4Network(f"172.{n}.0.0/16") for n in range(17, 32)]
    pools += list(ipaddress.IPv4Network("192.168.0.0/16").subnets(new_prefix=20))
    return pools


def test_the_replicas_trust_the_stack_network_and_nothing_beyond() -> None:
    """The replicas' TRUSTED_PROXIES covers every network Docker gives a compose project by
    default (where nginx's address is) and no public address; .env can set its own."""
    env = {**env_example(), **GENERATED_KEY}  # TRUSTED_PROXIES= (empty) there
    gateway = compose(env, replicas=True)["services"]["gateway"]
    trusted = [
        ipaddress.ip_network(cidr)
        for cidr in load_config(None, environment(gateway)).server.trusted_proxies
    ]
    for pool in docker_default_pools():
        assert any(net.version == 4 and pool.subnet_of(net) for net in trusted), pool
    assert all(net.is_private for net in trusted)
    custom = compose({**env, "TRUSTED_PROXIES": "10.20.0.0/16"}, replicas=True)["services"]
    assert load_config(None, environment(custom["gateway"])).server.trusted_proxies == (
        "10.20.0.0/16",
    )


def published(service: dict[str, Any]) -> list[tuple[str, ...]]:
    """(host address, host port, container port) of each short-syntax port mapping."""
    return [tuple(str(entry).rsplit(":", 2)) for entry in service.get("ports", [])]


@pytest.mark.parametrize("two_boxes", [False, True], ids=["one box", "two boxes"])
def test_only_nginx_is_published_beyond_loopback(two_boxes: bool) -> None:
    """nginx takes the API port the one gateway had, on nginx's listen port; the replicas,
    Redis and Ollama publish nothing, the monitoring UIs stay on 127.0.0.1."""
    services = compose(two_boxes=two_boxes, replicas=True)["services"]
    one_gateway = compose()["services"]["proxy"]
    assert published(services["nginx"]) == [(*published(one_gateway)[0][:2], str(listen_port()))]
    for name in ("gateway", "redis", *[s for s in services if s.startswith("ollama")]):
        assert "ports" not in services[name], name
    for name, service in services.items():
        if name not in {"nginx", "proxy"}:
            assert all(ip == "127.0.0.1" for ip, _, _ in published(service)), name


def test_nginx_sends_requests_to_the_gateway_replicas() -> None:
    """nginx's upstream is the gateway service on the replicas' port, nginx starts once they
    are healthy, and its file is mounted where the image's nginx.conf includes it."""
    services = compose(replicas=True)["services"]
    host, port = upstream_server()
    assert host == "gateway"
    assert str(port) in [str(p) for p in services["gateway"]["expose"]]
    assert environment(services["gateway"])["PROXY_PORT"] == str(port)
    nginx = services["nginx"]
    assert nginx["depends_on"]["gateway"]["condition"] == "service_healthy"
    mounts = {mount_target(v): v.split(":")[0] for v in nginx["volumes"]}
    assert (DEPLOY / mounts["/etc/nginx/conf.d/default.conf"]).resolve() == NGINX_CONF_PATH
    health = " ".join(nginx["healthcheck"]["test"])
    assert f"127.0.0.1:{listen_port()}/health" in health


def test_redis_is_private_healthy_and_keeps_nothing() -> None:
    """Valkey runs from a pinned image with a health check, publishes no port, writes
    nothing to disk and never evicts a key."""
    redis = compose(replicas=True)["services"]["redis"]
    assert redis["image"].startswith("valkey/valkey:")
    assert "ports" not in redis
    assert "valkey-cli ping" in " ".join(redis["healthcheck"]["test"])
    command = redis["command"]
    options = dict(zip(command[1::2], command[2::2], strict=True))
    assert command[0] == "valkey-server"
    assert options["--save"] == ""
    assert options["--appendonly"] == "no"
    assert options["--maxmemory-policy"] == "noeviction"
    assert "volumes" not in redis


def directives(text: str, name: str) -> list[str]:
    """The arguments of every ``name ...;`` directive in an nginx file (comments dropped)."""
    code = re.sub(r"#[^\n]*", "", text)
    return [m.group(1).strip() for m in re.finditer(rf"(?:^|[{{;\s]){name}\s+([^;]*);", code)]


def test_nginx_balances_by_connections_and_streams_unbuffered() -> None:
    """nginx picks the replica with the fewest open requests, relays bodies both ways as they
    come, talks HTTP/1.1 with keep-alive to the replicas, waits long enough for streams and
    passes the client's address."""
    text = NGINX_CONF_PATH.read_text()
    assert re.search(r"upstream\s+gateways\s*\{[^}]*least_conn;", text)
    assert directives(text, "proxy_pass") == ["http://gateways"]
    assert directives(text, "proxy_buffering") == ["off"]
    assert directives(text, "proxy_request_buffering") == ["off"]
    assert directives(text, "proxy_http_version") == ["1.1"]
    assert int(directives(text, "keepalive")[0]) > 0
    assert 'Connection ""' in directives(text, "proxy_set_header")
    assert "X-Forwarded-For $remote_addr" in directives(text, "proxy_set_header")
    # Longer than the gateway's own silences: the queue wait and the wait for headers.
    (read_timeout,) = directives(text, "proxy_read_timeout")
    assert int(read_timeout.removesuffix("s")) > 60 + 300
    assert directives(text, "client_max_body_size") == ["0"]


def test_nginx_accepts_the_config(nginx_binary: str, tmp_path: Path) -> None:
    """Debian's nginx -t accepts the file inside a main configuration like the image's, with
    the gateway service's name resolved to three replicas' addresses."""
    replicas = ["127.0.0.1:8001", "127.0.0.1:8002", "127.0.0.1:8003"]
    main = write_config(tmp_path, replicas)
    result = check_config(nginx_binary, main)
    assert result.returncode == 0, result.stderr
    assert "syntax is ok" in result.stderr
    assert "test is successful" in result.stderr
    site = (tmp_path / "gateway.conf").read_text()
    servers = re.findall(r"^\s*server\s+([\d.:]+)\s", site, re.MULTILINE)
    assert servers == replicas


def test_nginx_rejects_a_broken_copy(nginx_binary: str, tmp_path: Path) -> None:
    """The same check fails on a copy with a misspelt directive: nginx -t really validates."""
    main = write_config(tmp_path, ["127.0.0.1:8001"])
    site = tmp_path / "gateway.conf"
    site.write_text(site.read_text().replace("proxy_buffering off;", "proxy_bufering off;"))
    result = check_config(nginx_binary, main)
    assert result.returncode != 0
    assert "proxy_bufering" in result.stderr


def replicas_prometheus() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((PROMETHEUS_DIR / "prometheus.replicas.yml").read_text())
    return data


def test_prometheus_finds_every_replica_by_dns() -> None:
    """The replicas stack's gateway job keeps its name and discovers the gateway service's
    replicas by DNS on their port; the rest of prometheus.yml is unchanged."""
    one = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    several = replicas_prometheus()
    jobs = {job["job_name"]: job for job in several["scrape_configs"]}
    gateway_job = jobs["ollama-gateway"]
    assert "static_configs" not in gateway_job
    (dns,) = gateway_job["dns_sd_configs"]
    services = compose(replicas=True)["services"]
    assert dns["type"] == "A"
    assert dns["names"] == ["gateway"]
    assert str(dns["port"]) in [str(port) for port in services["gateway"]["expose"]]
    # Everything else as in prometheus.yml (its static targets are services here too).
    for config in (one, several):
        for job in config["scrape_configs"]:
            if job["job_name"] == "ollama-gateway":
                job.pop("static_configs", None)
                job.pop("dns_sd_configs", None)
    assert several == one
    for job in several["scrape_configs"]:
        for static in job.get("static_configs", []):
            for target in static["targets"]:
                host = target.split(":")[0]
                assert host == "localhost" or host in services, target


def test_replicas_prometheus_config_is_valid(promtool: str, tmp_path: Path) -> None:
    """promtool accepts prometheus.replicas.yml, with the rule files it loads."""
    config = replicas_prometheus()
    # The container's rule paths, mapped to the repository (the same mount in both stacks).
    config["rule_files"] = [
        str(PROMETHEUS_DIR / "rules" / Path(pattern).name) for pattern in config["rule_files"]
    ]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    result = subprocess.run(
        [promtool, "check", "config", str(tmp_path / "prometheus.yml")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_two_box_replicas_route_across_both_boxes() -> None:
    """With both overrides the replicas get the two-box stack's backends, word for word, and
    wait for both Ollamas."""
    env = {**GENERATED_KEY, "OLLAMA_SECOND_NUM_PARALLEL": "2", "OLLAMA_SECOND_PRIORITY": "1"}
    two_boxes = compose(env, two_boxes=True)["services"]
    both = compose(env, two_boxes=True, replicas=True)["services"]
    replica_env = environment(both["gateway"])
    assert replica_env["BACKENDS"] == environment(two_boxes["proxy"])["BACKENDS"]
    backends = backends_of(load_config(None, replica_env))
    assert [(b.name, b.slots, b.priority) for b in backends] == [("main", 1, 0), ("second", 2, 1)]
    for service in ("ollama", "ollama-second", "redis"):
        assert both["gateway"]["depends_on"][service]["condition"] == "service_healthy"


@pytest.mark.parametrize(
    ("settings", "files"),
    [
        ("GATEWAY_REPLICAS=1", ["compose.yaml"]),
        ("GATEWAY_REPLICAS=3", ["compose.yaml", "compose.replicas.yaml"]),
        ('GATEWAY_REPLICAS="2"', ["compose.yaml", "compose.replicas.yaml"]),
        ("GATEWAY_REPLICAS=12\nOLLAMA_BOXES=1", ["compose.yaml", "compose.replicas.yaml"]),
        (
            "GATEWAY_REPLICAS=2\nOLLAMA_BOXES=2",
            [
                "compose.yaml",
                "compose.two-boxes.yaml",
                "compose.replicas.yaml",
                "compose.two-boxes.replicas.yaml",
            ],
        ),
        ("GATEWAY_REPLICAS=1\nOLLAMA_BOXES=2", ["compose.yaml", "compose.two-boxes.yaml"]),
    ],
)
def test_the_justfile_adds_the_replicas_files(
    tmp_path: Path, settings: str, files: list[str]
) -> None:
    """`just` gives compose the replicas override exactly when deploy/.env says
    GATEWAY_REPLICAS=2 or more, and the two-box replicas file when it says OLLAMA_BOXES=2 too."""
    just = require_tool("just", "just (or pip install rust-just)")
    chosen = files_just_chooses(just, tmp_path, settings)
    assert chosen == [f"deploy/{name}" for name in files]
    two_boxes = "compose.two-boxes.yaml" in files
    replicas = "compose.replicas.yaml" in files
    assert [REPO / name for name in chosen] == stack_files(two_boxes=two_boxes, replicas=replicas)
