"""The scaling run's pure parts: its ratios, its CPU comparison, its target, its table, and
the requests per backend read from the gateway's metrics."""

from __future__ import annotations

from typing import Any

import pytest

from loadtest.bench import results
from loadtest.bench.__main__ import parse_args, settings_from
from loadtest.bench.scaling import served_by_backend


def _run(rate: float, cpu_us: float, errors: int = 0) -> dict[str, Any]:
    return {"generations_per_s": rate, "cpu_us_per_request": cpu_us, "errors": errors}


# Two rounds; in the second the machine was slower for everyone.
RUNS = {
    "one:1": [_run(10.0, 1000), _run(8.0, 1100)],
    "backends:1": [_run(10.0, 1010), _run(8.0, 1120)],
    "one:2": [_run(20.0, 800), _run(16.0, 900)],
    "backends:2": [_run(19.0, 850), _run(16.0, 930, errors=1)],
}
SERVED = {"backends:2": {"b1": 20, "b2": 21}, "one:2": {"default": 41}}


def summary() -> dict[str, Any]:
    return results.summarise_scaling(
        RUNS, SERVED, generation_ms=60.0, clients_per_slot=2, generations_per_slot=8
    )


@pytest.mark.timeout(5)
def test_scaling_ratio_is_paired_with_one_slot_within_each_round() -> None:
    """N backends' rate is divided by N times one slot's rate of the same round."""
    sc = summary()
    two = sc["backends"]["2"]
    assert two["ratio_range"] == pytest.approx([0.95, 1.0])  # 19 / 20, 16 / 16
    assert two["ratio"] == pytest.approx(0.975)
    assert sc["backends"]["1"]["ratio"] == pytest.approx(1.0)
    assert sc["worst_ratio"] == pytest.approx(0.975)
    assert two["generations_per_s"] == pytest.approx(17.5)
    assert two["errors"] == 1
    assert two["served"] == {"b1": 20, "b2": 21}
    assert sc["one_upstream"]["2"]["served"] == {"default": 41}
    assert sc["generation_ms"] == 60.0


@pytest.mark.timeout(5)
def test_routing_cpu_is_compared_with_one_upstream_of_as_many_slots() -> None:
    """The CPU routing adds is N backends' minus one upstream of N slots' (the same load)."""
    two = summary()["backends"]["2"]
    assert two["cpu_added_range_us"] == pytest.approx([30, 50])  # 850 - 800, 930 - 900
    assert two["cpu_added_us"] == pytest.approx(40)
    assert two["cpu_us_per_request"] == pytest.approx(890)


@pytest.mark.timeout(5)
def test_scaling_target_is_the_worst_n() -> None:
    """The target passes at 0.95 of N times one backend, judged on the worst N."""
    sc = summary()
    (target,) = results.evaluate_targets({"scaling": sc})
    assert target["target"] == results.TARGETS[-1][0]
    assert target["measured"] == pytest.approx(0.975)
    assert target["passed"] is True
    worse = sc | {"worst_ratio": 0.94}
    assert results.evaluate_targets({"scaling": worse})[0]["passed"] is False
    unknown = sc | {"worst_ratio": None}
    assert results.evaluate_targets({"scaling": unknown})[0]["passed"] is None


@pytest.mark.timeout(5)
def test_a_scaling_only_result_renders() -> None:
    """`--only scaling` prints the scaling table and its one target, nothing else."""
    result: dict[str, Any] = {
        "machine": {"nproc": 2, "cpu": "test CPU", "python": "3.11"},
        "settings": {"rounds": 2},
        "scaling": summary(),
    }
    result["targets"] = results.evaluate_targets(result)
    text = results.render(result)
    assert "N backends / (N x one of 1 slot)" in text
    assert "b1 20, b2 21" in text
    assert "streaming" not in text
    assert text.rstrip().endswith("PASS  (the worst N's median over rounds)")


@pytest.mark.timeout(5)
def test_requests_per_backend_are_read_from_the_metrics() -> None:
    """Every series of ollama_requests_total counts for its backend; refusals (none) do not."""
    text = "\n".join(
        [
            "# TYPE ollama_requests_total counter",
            'ollama_requests_total{backend="b1",endpoint="/api/chat",status="success"} 3',
            'ollama_requests_total{backend="b1",endpoint="/v1/chat/completions",status="error"} 2',
            'ollama_requests_total{endpoint="/api/chat",backend="b2",status="success"} 4.0',
            'ollama_requests_total{backend="none",endpoint="/api/chat",status="rejected"} 9',
            'ollama_upstream_retries_total{backend="b1"} 7',
        ]
    )
    assert served_by_backend(text) == {"b1": 5, "b2": 4}


@pytest.mark.timeout(5)
def test_the_cli_runs_one_section_or_both() -> None:
    """`--only scaling` picks the section; the scaling sizes come from their flags."""
    args = parse_args(["--only", "scaling", "--scaling-backends", "3"])
    assert args.only == "scaling"
    assert settings_from(args).scaling_backends == 3
    assert parse_args([]).only is None
    with pytest.raises(SystemExit):
        parse_args(["--only", "everything"])
