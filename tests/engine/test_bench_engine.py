"""``just bench --engine`` at tiny sizes, against the real engine: it runs, and its JSON and
table hold every figure the README reports."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from tests.engine.conftest import engine_missing

pytestmark = [
    pytest.mark.engine,
    pytest.mark.timeout(150),
    pytest.mark.skipif(
        engine_missing() is not None, reason=f"real-engine tier: {engine_missing()}"
    ),
]

ROOT = Path(__file__).resolve().parents[2]


async def test_engine_bench_smoke(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "loadtest.bench", "--engine", "--smoke", "--json", str(out),
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        async with asyncio.timeout(120):
            stdout, stderr = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, stderr.decode()[-3000:]
    block = json.loads(out.read_text())["engine"]
    relays = ["gateway", "nginx"] if shutil.which("nginx") else ["gateway"]
    assert block["relays"] == relays
    assert block["threads"] >= 1
    assert block["cpus"] == os.cpu_count()
    assert block["direct_tokens_per_s"] > 0
    for name in relays:
        assert block[f"{name}_tokens_per_s"] > 0
        low, high = block[f"{name}_ratio_range"]
        assert low <= block[f"{name}_ratio"] <= high
        assert block[f"{name}_cpu_us_per_token"] > 0
        assert f"{name}_ttft_p99_added_ms" in block
    table = stdout.decode()
    assert "real engine: SmolLM2-135M on llama.cpp" in table
    assert f"{block['threads']} engine thread(s) on {block['cpus']} CPU(s)" in table
    assert "engine tokens/s via gateway >= 0.99 x" in table
