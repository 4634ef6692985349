"""The Grafana dashboard as tests see it: its panels, their PromQL, and the metrics they select.

Queries are made evaluable by substituting Grafana's variables: the built-in intervals get
fixed values and each dashboard variable its "All" value (or its current value).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
DASHBOARD_PATH = DEPLOY / "grafana" / "dashboards" / "ollama-monitoring.json"
DATASOURCES_PATH = DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
RULES_DIR = DEPLOY / "prometheus" / "rules"

COMPOSE_SERVICE_LABEL = "container_label_com_docker_compose_service"

# Grafana's built-in variables; 1m is four scrapes at the stack's 15 s scrape interval.
BUILTIN_VALUES = {
    "__rate_interval": "1m",
    "__interval": "15s",
    "__range": "5m",
}

_VARIABLE = re.compile(r"\$(?:\{(\w+)(?::\w+)?\}|(\w+))")
# One pass over a PromQL string: label matchers in braces and grouping clauses are consumed
# whole (their label names are not metrics); any other identifier is a metric name, a
# function or a keyword, told apart by what follows it.
_TOKEN = re.compile(
    r"(?P<braces>\{[^}]*\})"
    r"|(?P<grouping>\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\))"
    r"|(?P<string>\"(?:[^\"\\]|\\.)*\")"
    r"|(?P<range>\[[^\]]*\])"
    r"|(?P<name>\b[a-zA-Z_:][\w:]*)(?P<selector>\s*\{[^}]*\})?(?P<call>\s*\()?"
)
# Aggregations may put their grouping before the parenthesis (`sum by (le) (...)`).
_KEYWORDS = frozenset(
    {"and", "or", "unless", "bool", "offset", "inf", "nan"}
    | {"sum", "avg", "min", "max", "count", "group", "stddev", "stdvar", "topk", "bottomk"}
    | {"quantile", "count_values", "limitk", "limit_ratio"}
)


@dataclass(frozen=True)
class Query:
    panel: str
    ref_id: str
    expr: str  # as written in the dashboard
    promql: str  # with Grafana's variables substituted
    legend: str = ""  # its legendFormat: {{label}} names the labels its series differ by

    @property
    def legend_labels(self) -> set[str]:
        return set(re.findall(r"\{\{\s*(\w+)\s*\}\}", self.legend))

    @property
    def selectors(self) -> list[tuple[str, str]]:
        return selectors(self.promql)

    @property
    def is_container(self) -> bool:
        """Selects cAdvisor series (container_*, machine_*), which tests cannot produce."""
        return any(is_container_metric(name) for name, _ in self.selectors)


def load_dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD_PATH.read_text(encoding="utf-8"))
    return data


def provisioned_prometheus_uid() -> str:
    provisioning = yaml.safe_load(DATASOURCES_PATH.read_text(encoding="utf-8"))
    uids = [ds["uid"] for ds in provisioning["datasources"] if ds["type"] == "prometheus"]
    assert len(uids) == 1, f"expected one provisioned Prometheus datasource, found {uids}"
    return str(uids[0])


def iter_panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, including those inside (collapsed) rows, rows themselves excluded."""
    for panel in dashboard.get("panels", []):
        if panel.get("type") == "row":
            yield from panel.get("panels", [])
        else:
            yield panel


def variable_values(dashboard: dict[str, Any]) -> dict[str, str]:
    """Values for substitution: Grafana's built-ins, and each dashboard variable's All value."""
    values = dict(BUILTIN_VALUES)
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("includeAll"):
            values[variable["name"]] = variable.get("allValue") or ".*"
        else:
            current = variable.get("current", {}).get("value")
            values[variable["name"]] = current[0] if isinstance(current, list) else str(current)
    return values


def substitute(expr: str, values: dict[str, str]) -> str:
    """``expr`` with ``$name`` and ``${name}`` replaced; an unknown variable is an error."""

    def replace(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name not in values:
            raise KeyError(f"unknown Grafana variable ${name} in {expr!r}")
        return values[name]

    return _VARIABLE.sub(replace, expr)


def queries(dashboard: dict[str, Any]) -> list[Query]:
    values = variable_values(dashboard)
    return [
        Query(
            panel["title"],
            target["refId"],
            target["expr"],
            substitute(target["expr"], values),
            target.get("legendFormat", ""),
        )
        for panel in iter_panels(dashboard)
        for target in panel.get("targets", [])
    ]


def selectors(promql: str) -> list[tuple[str, str]]:
    """``(metric name, "{matchers}" or "")`` for every series selector in ``promql``."""
    found = []
    for match in _TOKEN.finditer(promql):
        name = match.group("name")
        if name is None or match.group("call") or name in _KEYWORDS:
            continue
        found.append((name, (match.group("selector") or "").strip()))
    return found


def is_container_metric(name: str) -> bool:
    return name.startswith(("container_", "machine_"))


def rule_expressions() -> list[tuple[str, str]]:
    """``(alert or record name, expr)`` for every rule in deploy/prometheus/rules."""
    found = []
    for path in sorted(RULES_DIR.glob("*.yml")):
        for group in yaml.safe_load(path.read_text(encoding="utf-8"))["groups"]:
            for rule in group["rules"]:
                found.append((rule.get("alert") or rule["record"], rule["expr"]))
    return found
