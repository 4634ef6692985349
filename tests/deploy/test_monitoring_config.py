"""Prometheus's config and alert rules, their promtool unit tests, and Alertmanager's config."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.metrics import Metrics
from tests.deploy.compose import DEPLOY, compose, ollama_services
from tests.deploy.dashboard import RULES_DIR, rule_expressions, selectors

pytestmark = pytest.mark.timeout(60)

PROMETHEUS_DIR = DEPLOY / "prometheus"
ALERTMANAGER_PATH = DEPLOY / "alertmanager" / "alertmanager.yml"
REQUIRED_ALERTS = {
    "HighMemoryUsage",
    "OOMDetected",
    "GatewayDown",
    "OllamaDown",
    "BackendDown",
    "HighErrorRatio",
    "SlowTimeToFirstToken",
    "QueueSaturated",
    "RateLimitSpike",
    "SharedStateDown",
    "GatewayReplicasMissing",
}
# Alerts whose thresholds have traffic or limit guards worth proving quiet.
REQUIRED_QUIET_CASES = {
    "HighMemoryUsage",
    "HighErrorRatio",
    "BackendDown",
    "QueueSaturated",
    "SharedStateDown",
    "GatewayReplicasMissing",
}


def run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)


def load(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def alert_rules() -> dict[str, dict[str, Any]]:
    return {
        rule["alert"]: rule
        for path in sorted(RULES_DIR.glob("*.yml"))
        for group in load(path)["groups"]
        for rule in group["rules"]
        if "alert" in rule
    }


def prometheus_mounts() -> dict[str, str]:
    """Container path -> repository path of the prometheus service's bind mounts."""
    service = compose()["services"]["prometheus"]
    mounts = {}
    for volume in service["volumes"]:
        source, target = volume.split(":")[:2]
        if source.startswith("."):
            mounts[target] = str((DEPLOY / source).resolve())
    return mounts


def test_prometheus_config_is_valid(promtool: str, tmp_path: Path) -> None:
    """promtool accepts prometheus.yml, with the rule files it loads inside the container."""
    config = load(PROMETHEUS_DIR / "prometheus.yml")
    mounts = prometheus_mounts()
    # Map the container's rule paths to the repository, so promtool checks the rules too.
    config["rule_files"] = [
        mounts[str(Path(pattern).parent)] + "/" + Path(pattern).name
        for pattern in config["rule_files"]
    ]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    result = run([promtool, "check", "config", str(tmp_path / "prometheus.yml")])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout
    assert len(re.findall(r"SUCCESS: \d+ rules found", result.stdout)) == len(
        list(RULES_DIR.glob("*.yml"))
    )


def test_prometheus_reads_the_mounted_files() -> None:
    """The config and rule paths Prometheus is given are where compose mounts those files."""
    command = compose()["services"]["prometheus"]["command"]
    mounts = prometheus_mounts()
    config_path = next(arg.split("=", 1)[1] for arg in command if arg.startswith("--config.file"))
    assert mounts[config_path] == str(PROMETHEUS_DIR / "prometheus.yml")
    for pattern in load(PROMETHEUS_DIR / "prometheus.yml")["rule_files"]:
        directory = Path(mounts[str(Path(pattern).parent)])
        assert list(directory.glob(Path(pattern).name)), f"{pattern} matches no file"


def test_scrape_targets_are_compose_services() -> None:
    """Prometheus scrapes the gateway, cAdvisor and Alertmanager by service name and port."""
    services = compose()["services"]
    config = load(PROMETHEUS_DIR / "prometheus.yml")
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert {"ollama-gateway", "cadvisor", "prometheus", "alertmanager"} <= set(jobs)
    for job in jobs.values():
        for static in job["static_configs"]:
            for target in static["targets"]:
                host = target.split(":")[0]
                assert host == "localhost" or host in services, target
    assert jobs["ollama-gateway"]["static_configs"][0]["targets"] == ["proxy:8000"]
    assert jobs["cadvisor"]["static_configs"][0]["targets"] == ["cadvisor:8080"]
    targets = [
        t
        for a in config["alerting"]["alertmanagers"]
        for s in a["static_configs"]
        for t in s["targets"]
    ]
    assert targets == ["alertmanager:9093"]


def test_alert_rules_are_valid(promtool: str) -> None:
    """promtool accepts every rule file."""
    files = sorted(str(path) for path in RULES_DIR.glob("*.yml"))
    result = run([promtool, "check", "rules", *files])
    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_rules_pass_their_unit_tests(promtool: str) -> None:
    """promtool's unit tests of the alerts pass on their synthetic series."""
    files = sorted(str(path) for path in (PROMETHEUS_DIR / "tests").glob("*.yml"))
    assert files
    result = run([promtool, "test", "rules", *files])
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_is_unit_tested() -> None:
    """Each alert has a unit test where it fires, and the guarded ones one where they stay quiet."""
    fired: set[str] = set()
    quiet: set[str] = set()
    for path in (PROMETHEUS_DIR / "tests").glob("*.yml"):
        for case in load(path)["tests"]:
            for check in case.get("alert_rule_test", []):
                (fired if check.get("exp_alerts") else quiet).add(check["alertname"])
    assert set(alert_rules()) >= REQUIRED_ALERTS
    assert set(alert_rules()) <= fired, f"never seen firing: {set(alert_rules()) - fired}"
    assert quiet >= REQUIRED_QUIET_CASES


def test_alerts_tell_on_call_what_to_do() -> None:
    """Every alert has a severity, a summary and a description naming a command to run."""
    for name, rule in alert_rules().items():
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, name
        annotations = rule["annotations"]
        assert annotations["summary"].strip(), name
        assert "`just " in annotations["description"], f"{name}: no command to diagnose"


def test_rules_use_metrics_the_gateway_exports() -> None:
    """Every ollama_* metric an alert selects is one proxy.metrics defines."""
    exported = set(Metrics().registry.collectors)
    for name, expr in rule_expressions():
        for metric, _ in selectors(expr):
            if metric.startswith("ollama_"):
                base = re.sub(r"_(bucket|sum|count)$", "", metric)
                assert metric in exported or base in exported, f"{name}: {metric}"


def test_container_alerts_select_by_compose_service() -> None:
    """Alerts on cAdvisor series select containers by compose service label, never by name."""
    for name, expr in rule_expressions():
        for metric, matchers in selectors(expr):
            if metric.startswith("container_"):
                assert "container_label_com_docker_compose_service" in matchers, name
                assert not re.search(r"\bname\s*[=!~]", matchers), name


def test_container_alerts_watch_every_ollama_container() -> None:
    """HighMemoryUsage selects exactly the stacks' Ollama services (the second box's too)."""
    found = set()
    for metric, matchers in selectors(alert_rules()["HighMemoryUsage"]["expr"]):
        match = re.search(r'container_label_com_docker_compose_service=~"([^"]*)"', matchers)
        assert match, f"{metric}{matchers}"
        found.add(frozenset(match.group(1).split("|")))
    assert found == {frozenset(ollama_services())}


def test_backend_down_says_where_to_look_for_each_box() -> None:
    """BackendDown's description names the readiness endpoint and `just logs` for each
    Ollama service of the stacks."""
    description = " ".join(alert_rules()["BackendDown"]["annotations"]["description"].split())
    assert "/health/ollama" in description
    for service in ollama_services():
        assert f"`just logs {service}`" in description, service


def test_shared_state_down_says_what_the_policy_does_and_where_to_look() -> None:
    """SharedStateDown names the replica, both failure policies and what each does, and
    `just logs` for the replicas stack's Redis and gateway services."""
    rule = alert_rules()["SharedStateDown"]
    description = " ".join(rule["annotations"]["description"].split())
    assert "{{ $labels.replica }}" in rule["annotations"]["summary"]
    assert "SHARED_STATE_ON_FAILURE" in description
    assert "open (the default)" in description
    assert "closed: it refuses every inference request with 503" in description
    assert rule["for"] == "1m"
    services = compose(replicas=True)["services"]
    for service in ("redis", "gateway"):
        assert service in services
        assert f"`just logs {service}`" in description, service


def test_alertmanager_config_is_valid(amtool: str) -> None:
    """amtool accepts alertmanager.yml."""
    result = run([amtool, "check-config", str(ALERTMANAGER_PATH)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_alertmanager_receiver_examples_are_valid(amtool: str, tmp_path: Path) -> None:
    """The commented Slack, email and webhook examples are valid once uncommented."""
    example = re.compile(r"^    # ( *)([a-z_]+_configs:|- |[a-z_]+:)(.*)$")
    lines = []
    uncommented = 0
    for line in ALERTMANAGER_PATH.read_text().splitlines():
        match = example.match(line)
        if match and not line.startswith("    # ---"):
            lines.append("    " + "".join(match.groups()))
            uncommented += 1
        else:
            lines.append(line)
    (tmp_path / "alertmanager.yml").write_text("\n".join(lines) + "\n")
    config = load(tmp_path / "alertmanager.yml")
    default = next(r for r in config["receivers"] if r["name"] == config["route"]["receiver"])
    assert {"slack_configs", "email_configs", "webhook_configs"} <= set(default)
    result = run([amtool, "check-config", str(tmp_path / "alertmanager.yml")])
    assert result.returncode == 0, result.stdout + result.stderr


def test_alertmanager_routes_and_inhibitions_name_real_alerts() -> None:
    """Alert names in inhibit rules exist, and the default receiver exists and sends nowhere."""
    config = load(ALERTMANAGER_PATH)
    names = set(alert_rules())
    for rule in config["inhibit_rules"]:
        for matcher in rule["source_matchers"] + rule["target_matchers"]:
            match = re.match(r'(\w+)\s*(=~|=)\s*"(.*)"', matcher)
            assert match is not None, matcher
            field, _, value = match.groups()
            if field == "alertname":
                assert set(value.split("|")) <= names, matcher
    receivers = {r["name"]: r for r in config["receivers"]}
    assert set(receivers[config["route"]["receiver"]]) == {"name"}, "works out of the box"
