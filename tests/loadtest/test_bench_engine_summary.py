"""The engine section's arithmetic: per-round ratios, added TTFTs and CPU per token, and
medians with their range over rounds."""

from __future__ import annotations

import pytest

from loadtest.bench import engine

pytestmark = pytest.mark.timeout(5)


def stream(tokens: int, decode_s: float, ttft_s: float) -> dict[str, float]:
    return {"tokens": tokens, "decode_s": decode_s, "ttft_s": ttft_s}


def round_of(direct_s: float, gateway_s: float, cpu_s: float) -> dict[str, object]:
    """Three streams a side of 11 tokens: 10 after the first, in ``*_s`` seconds."""
    return {
        "direct": [stream(11, direct_s, 0.100), stream(11, direct_s, 0.110), stream(11, 9, 0.5)],
        "gateway": [stream(11, gateway_s, 0.101), stream(11, gateway_s, 0.112), stream(11, 9, 1)],
        "cpu_s": {"gateway": cpu_s},
    }


def test_rounds_are_summarised_per_side_with_their_range() -> None:
    runs = [round_of(0.1, 0.125, 0.0033), round_of(0.1, 0.1, 0.0066), round_of(0.2, 0.2, 0.0)]
    block = engine.summarise(runs, threads=2, cpus=2, tokens=11)  # type: ignore[arg-type]
    assert block["relays"] == ["gateway"]
    assert block["streams_per_round"] == 3
    # Round speeds (medians): direct 100, 100, 50 tok/s; gateway 80, 100, 50.
    assert [r["gateway_ratio"] for r in block["rounds"]] == pytest.approx([0.8, 1.0, 1.0])
    assert block["gateway_ratio"] == pytest.approx(1.0)
    assert block["gateway_ratio_range"] == pytest.approx([0.8, 1.0])
    assert block["direct_tokens_per_s"] == pytest.approx(100)
    # TTFT p50 is the middle stream's: 0.112 - 0.110; p99 the slowest's: 1 - 0.5.
    assert block["gateway_ttft_p50_added_ms"] == pytest.approx(2.0)
    assert block["gateway_ttft_p99_added_ms"] == pytest.approx(500.0)
    # 33 tokens a round through the gateway: 100 us, 200 us, 0 us per token.
    assert block["gateway_cpu_us_per_token"] == pytest.approx(100)
    assert block["gateway_cpu_us_per_token_range"] == pytest.approx([0, 200])
    assert engine.target(block)["passed"] is True
    assert any("/ direct" in line and "0.800 to 1.000" in line for line in engine.lines(block))


def test_a_skipped_section_says_why() -> None:
    block = {"skipped": "the engine is not installed: run just engine"}
    assert engine.target(block)["passed"] is None
    assert "run just engine" in engine.lines(block)[-1]
