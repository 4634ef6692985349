"""``status``: the stack's containers as the Docker Engine sees them, for when Ollama dies.

Uses the Docker SDK synchronously: it is a sync library, and this is a one-shot CLI.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TextIO

DEFAULT_PROJECT = "ollama-gateway"
PROJECT_LABEL = "com.docker.compose.project"
SERVICE_LABEL = "com.docker.compose.service"
NUMBER_LABEL = "com.docker.compose.container-number"
ONEOFF_LABEL = "com.docker.compose.oneoff"
# The threshold of the HighMemoryUsage alert: past it, one longer prompt can end in an OOM kill.
HIGH_MEMORY_FRACTION = 0.9
DOCKER_TIMEOUT_S = 15
MIB = 1024 * 1024
_RED, _RESET = "\x1b[31m", "\x1b[0m"

OLLAMA_MEMORY_ADVICE = (
    "use a smaller model (OLLAMA_MODEL=qwen2.5:0.5b), the 4 GB profile, "
    "or raise OLLAMA_MEMORY_LIMIT in .env, then restart the stack"
)


@dataclass(frozen=True)
class ServiceState:
    """One container of the stack, reduced to what tells whether it is well."""

    service: str
    state: str
    exit_code: int = 0
    health: str | None = None
    restarts: int = 0
    oom_killed: bool = False
    usage_bytes: int | None = None
    limit_bytes: int | None = None  # None: no limit (or not running, when usage is None too)
    is_ollama: bool = False

    @property
    def memory_fraction(self) -> float | None:
        if self.usage_bytes is None or not self.limit_bytes:
            return None
        return self.usage_bytes / self.limit_bytes

    @property
    def is_up(self) -> bool:
        return self.state == "running" and self.health in (None, "healthy")

    @property
    def is_memory_high(self) -> bool:
        fraction = self.memory_fraction
        return fraction is not None and fraction > HIGH_MEMORY_FRACTION

    @property
    def needs_attention(self) -> bool:
        return not self.is_up or self.oom_killed or self.is_memory_high


def memory_in_use(memory_stats: Mapping[str, Any]) -> int | None:
    """Usage without the inactive page cache, as ``docker stats`` counts it (cgroup v1 and v2)."""
    usage = memory_stats.get("usage")
    if not isinstance(usage, int):
        return None
    stats = memory_stats.get("stats") or {}
    inactive = stats.get("total_inactive_file", stats.get("inactive_file", 0))
    return usage - inactive if isinstance(inactive, int) and inactive < usage else usage


def memory_limit(memory_stats: Mapping[str, Any], host_total_bytes: int) -> int | None:
    """The container's limit, or None when there is none: the engine then reports host memory."""
    limit = memory_stats.get("limit")
    if not isinstance(limit, int) or limit <= 0:
        return None
    if host_total_bytes and limit >= host_total_bytes:
        return None
    return limit


def format_mib(n: int) -> str:
    return f"{n / MIB:.1f} MiB"


def format_memory(usage_bytes: int | None, limit_bytes: int | None) -> str:
    if usage_bytes is None:
        return "-"
    if not limit_bytes:
        return f"{format_mib(usage_bytes)} (no limit)"
    pct = usage_bytes * 100 / limit_bytes
    return f"{format_mib(usage_bytes)} / {format_mib(limit_bytes)} ({pct:.0f}%)"


def describe_state(row: ServiceState) -> str:
    return f"{row.state} ({row.exit_code})" if row.state in ("exited", "dead") else row.state


def render_table(rows: list[ServiceState], *, color: bool = False) -> list[str]:
    """A ``!`` in the first column marks a row that needs attention (red on a terminal)."""
    header = ("SERVICE", "STATE", "HEALTH", "MEMORY", "RESTARTS", "OOM-KILLED")
    cells = [header] + [
        (
            r.service,
            describe_state(r),
            r.health or "-",
            format_memory(r.usage_bytes, r.limit_bytes),
            str(r.restarts),
            "YES" if r.oom_killed else "no",
        )
        for r in rows
    ]
    widths = [max(len(c[i]) for c in cells) for i in range(len(header))]
    lines = []
    for i, cell in enumerate(cells):
        flagged = i > 0 and rows[i - 1].needs_attention
        text = "  ".join(v.ljust(w) for v, w in zip(cell, widths, strict=True)).rstrip()
        text = ("! " if flagged else "  ") + text
        lines.append(f"{_RED}{text}{_RESET}" if flagged and color else text)
    return lines


def hints(rows: list[ServiceState], project: str) -> list[str]:
    """What to do about each row that needs it, most urgent cause first."""
    out = []
    for r in rows:
        logs = f"see `docker compose -p {project} logs {r.service}`"
        advice = OLLAMA_MEMORY_ADVICE if r.is_ollama else "raise its memory limit"
        if r.oom_killed:
            out.append(f"{r.service} was killed for running out of memory: {advice}")
        elif r.is_memory_high:
            pct = (r.memory_fraction or 0) * 100
            out.append(f"{r.service} uses {pct:.0f}% of its memory limit: {advice}")
        elif not r.is_up:
            out.append(f"{r.service} is {describe_state(r)}, health {r.health or '-'}: {logs}")
        elif r.restarts and r.is_ollama:
            # The engine clears OOMKilled when it restarts a container, so a restart is the trace.
            out.append(f"{r.service} restarted {r.restarts} times, often an OOM kill: {logs}")
    return ["hint: " + line for line in out]


def read_stack(client: Any, project: str) -> list[ServiceState]:
    """Every container of the compose project (one-off ``run`` containers aside), by service."""
    from docker.errors import NotFound
    from docker.utils import version_gte

    containers = client.containers.list(
        all=True, filters={"label": f"{PROJECT_LABEL}={project}"}, ignore_removed=True
    )
    containers = [c for c in containers if c.labels.get(ONEOFF_LABEL) != "True"]
    if not containers:
        return []
    host_total = int(client.info().get("MemTotal") or 0)
    # Without one-shot the engine waits two collection cycles (about 2 s) per container.
    one_shot = {"one_shot": True} if version_gte(client.api.api_version, "1.41") else {}
    per_service = Counter(str(c.labels.get(SERVICE_LABEL, c.name)) for c in containers)
    rows = []
    for c in containers:
        attrs: dict[str, Any] = c.attrs
        state = attrs.get("State") or {}
        service = str(c.labels.get(SERVICE_LABEL, c.name))
        name = service
        if per_service[service] > 1:
            name = f"{service}-{c.labels.get(NUMBER_LABEL, c.short_id)}"
        usage = limit = None
        if state.get("Status") == "running":
            try:
                memory = c.stats(stream=False, **one_shot).get("memory_stats") or {}
            except NotFound:  # removed since the listing
                memory = {}
            usage, limit = memory_in_use(memory), memory_limit(memory, host_total)
        image = str((attrs.get("Config") or {}).get("Image", ""))
        rows.append(
            ServiceState(
                service=name,
                state=str(state.get("Status", "unknown")),
                exit_code=int(state.get("ExitCode") or 0),
                health=(state.get("Health") or {}).get("Status"),
                restarts=int(attrs.get("RestartCount") or 0),
                oom_killed=bool(state.get("OOMKilled")),
                usage_bytes=usage,
                limit_bytes=limit,
                is_ollama=service == "ollama" or image.startswith("ollama/"),
            )
        )
    return sorted(rows, key=lambda r: r.service)


def show_status(client: Any, project: str, out: TextIO, *, color: bool = False) -> int:
    """Print the table and hints; 0 when every service runs and is healthy where checked."""
    rows = read_stack(client, project)
    if not rows:
        out.write(
            f"no containers of compose project {project!r}: is the stack up (just deploy)? "
            "Otherwise pass --project or set COMPOSE_PROJECT_NAME.\n"
        )
        return 1
    out.write("\n".join(render_table(rows, color=color)) + "\n")
    advice = hints(rows, project)
    if advice:
        out.write("\n" + "\n".join(advice) + "\n")
    down = sum(not r.is_up for r in rows)
    summary = f"{down} of {len(rows)} services not running" if down else "all services running"
    out.write(f"\n{summary}\n")
    return 1 if down else 0


def run_status(args: argparse.Namespace) -> int:
    import docker

    project = args.project or os.environ.get("COMPOSE_PROJECT_NAME") or DEFAULT_PROJECT
    where = args.docker_host or os.environ.get("DOCKER_HOST") or "the local Docker socket"
    try:
        if args.docker_host:
            client = docker.DockerClient(base_url=args.docker_host, timeout=DOCKER_TIMEOUT_S)
        else:
            client = docker.from_env(timeout=DOCKER_TIMEOUT_S)
        try:
            return show_status(client, project, sys.stdout, color=sys.stdout.isatty())
        finally:
            client.close()
    # requests' errors (connection refused mid-way, timeouts) derive from OSError.
    except (docker.errors.DockerException, OSError) as exc:
        print(
            f"cannot reach the Docker Engine at {where}: {exc}\n"
            "Is the Docker engine running, and is DOCKER_HOST (or --docker-host) right?",
            file=sys.stderr,
        )
        return 2
