"""Small requests measured with wrk: a C load generator, so it is not the bottleneck when the
servers it measures are Python. One thread, to leave the other cores to the servers."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}


@dataclass(frozen=True, slots=True)
class WrkResult:
    requests_per_s: float
    latency_p50_s: float | None
    latency_p99_s: float | None
    requests: int
    errors: int  # non-2xx answers and socket errors


def find_wrk() -> str | None:
    return shutil.which("wrk")


def lua_script(body: object) -> str:
    """A wrk script that POSTs ``body`` as JSON."""
    # The body as ASCII JSON, quoted once more: that literal has only \" and \\ escapes,
    # which Lua reads the same way.
    text = json.dumps(json.dumps(body))
    return (
        'wrk.method = "POST"\n'
        f"wrk.body = {text}\n"
        'wrk.headers["Content-Type"] = "application/json"\n'
    )


def _seconds(value: str, unit: str) -> float:
    return float(value) * _UNITS[unit]


def parse_wrk(output: str) -> WrkResult:
    """The numbers of ``wrk --latency`` output."""
    rps = re.search(r"Requests/sec:\s+([\d.]+)", output)
    total = re.search(r"(\d+) requests in", output)
    if rps is None or total is None:
        raise ValueError(f"unexpected wrk output:\n{output}")
    latency = {
        pct: _seconds(value, unit)
        for pct, value, unit in re.findall(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s|m)\s*$", output, re.M)
    }
    errors = 0
    if non_2xx := re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output):
        errors += int(non_2xx.group(1))
    if socket := re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    ):
        errors += sum(int(n) for n in socket.groups())
    return WrkResult(
        requests_per_s=float(rps.group(1)),
        latency_p50_s=latency.get("50"),
        latency_p99_s=latency.get("99"),
        requests=int(total.group(1)),
        errors=errors,
    )


async def run_wrk(
    binary: str,
    url: str,
    *,
    connections: int,
    duration_s: int,
    body: object | None,
    workdir: Path,
) -> WrkResult:
    args = ["-t1", f"-c{connections}", f"-d{max(1, duration_s)}s", "--latency"]
    if body is not None:
        script = workdir / "post.lua"
        script.write_text(lua_script(body))
        args += ["-s", str(script)]
    proc = await asyncio.create_subprocess_exec(
        binary, *args, url, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    try:
        async with asyncio.timeout(duration_s + 30):
            out, _ = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    return parse_wrk(out.decode(errors="replace"))
