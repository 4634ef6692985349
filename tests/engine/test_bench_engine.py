"""``just bench --engine`` at tiny sizes, against the real engine: it runs, and its JSON and
table hold every figure the README reports."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from tests.conftest import run_module
from tests.engine.conftest import engine_missing

pytestmark = [
    pytest.mark.engine,
    pytest.mark.timeout(150),
    pytest.mark.skipif(
        engine_missing() is not None, reason=f"real-engine tier: {engine_missing()}"
    ),
]


async def test_engine_bench_smoke(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    code, table, stderr = await run_module(
        "loadtest.bench", "--engine", "--smoke", "--json", str(out), timeout_s=120
    )
    assert code == 0, stderr[-3000:]
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
    assert "real engine: SmolLM2-135M on llama.cpp" in table
    assert f"{block['threads']} engine thread(s) on {block['cpus']} CPU(s)" in table
    assert "engine tokens/s via gateway >= 0.99 x" in table
