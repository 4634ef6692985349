"""The Grafana dashboard and its provisioning, checked without Grafana."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

from proxy.metrics import Metrics
from tests.deploy.compose import DEPLOY, compose, environment, ollama_services
from tests.deploy.dashboard import (
    COMPOSE_SERVICE_LABEL,
    DASHBOARD_PATH,
    is_container_metric,
    iter_panels,
    load_dashboard,
    provisioned_prometheus_uid,
    queries,
)

pytestmark = pytest.mark.timeout(60)

# The original design's nine panels, then the LLM panels.
REQUIRED_PANELS = {
    "Memory Usage vs Limit",
    "CPU Usage %",
    "OOM Events",
    "Memory Usage %",
    "Total Requests",
    "API Latency p95",
    "API Response Time p50/p95/p99",
    "Request Rate: Success vs Errors",
    "Network I/O",
    "Time to First Token p50/p95/p99",
    "Tokens per Second",
    "Prompt / Completion Tokens Rate",
    "Queue Depth",
    "Queue Wait",
    "Active Requests vs Slots",
    "Rate-Limited Requests by Client",
    "Rejected Requests by Reason",
    "Model Load Time",
    "Ollama Up",
    "Loaded Models",
    "Loaded Model Memory",
    # Several backends (issue 15).
    "Backend Up",
    "Active Requests vs Slots by Backend",
    "Requests by Backend",
    "Backend Failovers",
    "Time to First Token p95 by Backend",
    # Gateway replicas (issue 16).
    "Shared State Up by Replica",
    "Slots Held by Replica",
    "Queue by Replica",
    "Requests by Replica",
    "Gateway Replicas Up",
}
# Panels that show each backend: their queries keep the backend labels in their legends.
BACKEND_PANELS = {
    "Backend Up": {"backend"},
    "Active Requests vs Slots by Backend": {"backend"},
    "Requests by Backend": {"backend"},
    "Backend Failovers": {"from_backend", "to_backend"},
    "Time to First Token p95 by Backend": {"backend"},
}
# Panels that show each gateway replica, by its name (ollama_proxy_info's replica label).
REPLICA_PANELS = {
    "Shared State Up by Replica": {"replica"},
    "Slots Held by Replica": {"replica", "backend"},
    "Queue by Replica": {"replica"},
    "Requests by Replica": {"replica"},
}
# Gauges every replica reports alike (a backend's configured slots, what it has loaded):
# summing them over replicas would count each backend once per replica.
PER_BACKEND_FACTS = (
    "ollama_concurrency_slots",
    "ollama_loaded_models",
    "ollama_model_memory_bytes",
)
CONTAINER_PANELS = {
    "Memory Usage vs Limit",
    "CPU Usage %",
    "OOM Events",
    "Memory Usage %",
    "Network I/O",
}


def test_dashboard_identity() -> None:
    """The dashboard is bare JSON with its title, tags, refresh, range and a fixed uid."""
    dashboard = load_dashboard()
    assert "dashboard" not in dashboard, "provisioned files hold the bare dashboard"
    assert dashboard["title"] == "Ollama Monitoring - MLOps Dashboard"
    assert set(dashboard["tags"]) == {"ollama", "monitoring", "mlops"}
    assert dashboard["refresh"] == "10s"
    assert dashboard["time"] == {"from": "now-1h", "to": "now"}
    assert dashboard["id"] is None
    assert re.fullmatch(r"[\w-]{1,40}", dashboard["uid"])


def test_datasource_uid_matches_provisioning() -> None:
    """Every panel, query and variable uses the provisioned Prometheus datasource's uid."""
    uid = provisioned_prometheus_uid()
    dashboard = load_dashboard()
    refs = [variable["datasource"] for variable in dashboard["templating"]["list"]]
    for panel in iter_panels(dashboard):
        refs.append(panel["datasource"])
        refs.extend(target["datasource"] for target in panel["targets"])
    assert refs
    assert all(ref == {"type": "prometheus", "uid": uid} for ref in refs), refs


def test_required_panels_are_present() -> None:
    """The original nine panels and the LLM panels are all on the dashboard."""
    titles = [panel["title"] for panel in iter_panels(load_dashboard())]
    assert len(titles) == len(set(titles)), "panel titles are unique"
    assert set(titles) >= REQUIRED_PANELS, REQUIRED_PANELS - set(titles)


def test_panels_have_queries_ids_and_room() -> None:
    """Every panel has a query, a unique id and a place on the grid that no other panel takes."""
    dashboard = load_dashboard()
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    taken: dict[tuple[int, int], str] = {}
    for panel in dashboard["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in taken, f"{panel['title']} overlaps {taken.get((x, y))}"
                taken[x, y] = panel["title"]
        if panel["type"] != "row":
            assert panel["targets"], panel["title"]


def test_container_panels_select_ollama_by_compose_service() -> None:
    """cAdvisor queries select the Ollama containers (the second box's too) by compose service
    label, never by name, and show each container apart."""
    services = "|".join(sorted(ollama_services()))
    container_titles = set()
    for query in queries(load_dashboard()):
        for metric, matchers in query.selectors:
            if is_container_metric(metric):
                container_titles.add(query.panel)
                assert f'{COMPOSE_SERVICE_LABEL}=~"{services}"' in matchers, query.expr
                assert not re.search(r"\bname\s*[=!~]", matchers), query.expr
        if query.is_container and query.panel not in {"Memory Usage %", "OOM Events"}:
            assert COMPOSE_SERVICE_LABEL in query.legend_labels, query.expr
    assert container_titles == CONTAINER_PANELS


def test_backend_panels_show_each_backend() -> None:
    """The per-backend panels group by the backend labels and name them in their legends."""
    found = set()
    for query in queries(load_dashboard()):
        if query.panel in BACKEND_PANELS:
            found.add(query.panel)
            labels = BACKEND_PANELS[query.panel]
            assert query.legend_labels == labels, query.expr
            assert re.search(rf"\bby \({', '.join(sorted(labels))}\b", query.expr), query.expr
    assert found == set(BACKEND_PANELS)


def test_replica_panels_name_each_replica() -> None:
    """The per-replica panels take the replica's name from ollama_proxy_info by job and
    instance, group by it, and show it in their legends."""
    found = set()
    for query in queries(load_dashboard()):
        if query.panel in REPLICA_PANELS and "replica" in query.legend_labels:
            found.add(query.panel)
            labels = REPLICA_PANELS[query.panel]
            assert query.legend_labels == labels, query.expr
            assert re.search(rf"\bby \({', '.join(sorted(labels, reverse=True))}\)", query.expr)
            assert "* on (job, instance) group_left (replica) ollama_proxy_info" in query.expr
    assert found == set(REPLICA_PANELS)


def test_per_backend_facts_are_not_summed_over_replicas() -> None:
    """Each backend's slots, loaded models and model memory are taken once per backend
    (max by backend) before any sum: every gateway replica reports the same values."""
    for query in queries(load_dashboard()):
        for metric in PER_BACKEND_FACTS:
            for match in re.finditer(rf"(\w+)(?:\s+by\s*\(([^)]*)\))?\s*\({metric}\b", query.expr):
                aggregation, grouping = match.group(1), match.group(2) or ""
                assert aggregation == "max", f"{query.panel}: {query.expr}"
                assert "backend" in grouping.split(", "), f"{query.panel}: {query.expr}"


def test_rates_use_grafana_intervals() -> None:
    """Range vectors use $__rate_interval (or $__range for totals), never a fixed window."""
    for query in queries(load_dashboard()):
        for window in re.findall(r"\[([^\]]*)\]", query.expr):
            assert window in {"$__rate_interval", "$__range"}, query.expr


def test_dashboard_uses_metrics_the_gateway_exports() -> None:
    """Every ollama_* metric a panel selects is one proxy.metrics defines."""
    exported = set(Metrics().registry.collectors)
    for query in queries(load_dashboard()):
        for metric, _ in query.selectors:
            if metric.startswith("ollama_"):
                base = re.sub(r"_(bucket|sum|count)$", "", metric)
                assert metric in exported or base in exported, f"{query.panel}: {metric}"


def test_every_query_parses(promtool: str, tmp_path: Path) -> None:
    """promtool parses every panel query (as a recording rule) once Grafana's variables are set."""
    rules = [
        {"record": f"dashboard:query_{i}", "expr": query.promql}
        for i, query in enumerate(queries(load_dashboard()))
    ]
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run(
        [promtool, "check", "rules", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout


def test_grafana_provisioning_matches_the_mounts() -> None:
    """The datasource points at the prometheus service; the dashboards provider at the mount."""
    services = compose()["services"]
    datasources = yaml.safe_load(
        (DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text()
    )
    prometheus = next(ds for ds in datasources["datasources"] if ds["type"] == "prometheus")
    assert prometheus["url"] == "http://prometheus:9090"
    assert "prometheus" in services
    assert prometheus["isDefault"] is True
    providers = yaml.safe_load(
        (DEPLOY / "grafana/provisioning/dashboards/dashboards.yml").read_text()
    )["providers"]
    mounts = {
        target: (DEPLOY / source).resolve()
        for source, target, *_ in (v.split(":") for v in services["grafana"]["volumes"])
        if source.startswith(".")
    }
    assert mounts["/etc/grafana/provisioning"] == DEPLOY / "grafana" / "provisioning"
    for provider in providers:
        assert provider["type"] == "file"
        assert mounts[provider["options"]["path"]] == DASHBOARD_PATH.parent
    home = environment(services["grafana"])["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{providers[0]['options']['path']}/{DASHBOARD_PATH.name}"
