"""The load test's pure parts: wire parsing, the summary, the table, the /metrics comparison."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from loadtest.dialects import StreamParser, parse_document, request_body
from loadtest.plot import in_flight
from loadtest.progress import LiveProgress, progress_line
from loadtest.prompts import BUILT_IN, load_prompts
from loadtest.report import Sample, classify, percentile, render_table, summarize
from loadtest.scrape import (
    delta,
    histogram_quantile,
    parse_text,
    queue_wait_summary,
    render_comparison,
    server_view,
    total,
)

pytestmark = pytest.mark.timeout(10)


def ok(index: int, latency_s: float, **kw: object) -> Sample:
    fields: dict[str, object] = {
        "index": index,
        "start_s": index * 0.1,
        "latency_s": latency_s,
        "outcome": "success",
        "status": 200,
        "streamed": True,
        "ttft_s": latency_s / 4,
        "prompt_tokens": 10,
        "completion_tokens": 20,
    }
    fields.update(kw)
    return Sample(**fields)  # type: ignore[arg-type]


# ---- dialects ---------------------------------------------------------------------------


def test_request_bodies_follow_each_dialect() -> None:
    """Each route gets its own body shape, and max tokens goes where that route reads it."""
    chat = request_body("chat", "hi", model=None, stream=True, max_tokens=5)
    assert chat == {"prompt": "hi", "stream": True, "options": {"num_predict": 5}}
    native = request_body("ollama", "hi", model="m", stream=False, max_tokens=5)
    assert native["messages"] == [{"role": "user", "content": "hi"}]
    assert native["options"] == {"num_predict": 5}
    openai = request_body("openai", "hi", model="m", stream=True, max_tokens=5)
    assert openai["max_tokens"] == 5
    assert openai["stream_options"] == {"include_usage": True}
    with pytest.raises(ValueError, match="dialect"):
        request_body("grpc", "hi", model="m", stream=True, max_tokens=None)


def test_sse_stream_split_anywhere_yields_content_usage_and_end() -> None:
    """An SSE body cut at arbitrary bytes still gives its content chunks, usage and [DONE]."""
    body = (
        b'data: {"choices":[{"delta":{"role":"assistant","content":"The"}}]}\r\n\r\n'
        b'data: {"choices":[{"delta":{"content":" sky"}}]}\n\n'
        b'data: {"choices":[{"delta":{},"finish_reason":"stop"}]}\n\n'
        b'data: {"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":2}}\n\n'
        b"data: [DONE]\n\n"
    )
    for cut in (1, 7, 50, len(body)):
        parser = StreamParser("openai")
        found = sum(parser.feed(body[i : i + cut]) for i in range(0, len(body), cut))
        parser.finish()
        assert found == 2
        assert parser.reply.complete
        assert (parser.reply.prompt_tokens, parser.reply.completion_tokens) == (7, 2)


def test_native_stream_reads_final_statistics_and_missing_fields_are_zero() -> None:
    """Ollama's done line gives the counts and decode speed; an omitted count reads as 0."""
    lines = [
        {"message": {"role": "assistant", "content": "Hi"}, "done": False},
        {
            "message": {"role": "assistant", "content": ""},
            "done": True,
            "eval_count": 4,
            "eval_duration": 2_000_000_000,
        },
    ]
    parser = StreamParser("ollama")
    assert parser.feed(b"".join(json.dumps(x).encode() + b"\n" for x in lines)) == 1
    assert parser.reply.complete
    assert parser.reply.prompt_tokens == 0
    assert parser.reply.eval_tokens_per_s == pytest.approx(2.0)


def test_error_frames_and_cut_streams_are_not_complete() -> None:
    """An in-stream error frame is an error; a stream that just stops is not complete."""
    parser = StreamParser("chat")
    parser.feed(b'{"response":"a","done":false}\n{"error":{"message":"boom"}}\n')
    assert parser.reply.error == "boom"
    assert not parser.reply.complete
    cut = StreamParser("openai")
    cut.feed(b'data: {"choices":[{"delta":{"content":"x"}}]}\n\n')
    cut.finish()
    assert not cut.reply.complete
    assert cut.reply.error is None
    last_line = StreamParser("chat")
    last_line.feed(b'{"response":"","done":true,"completion_tokens":3}')
    last_line.finish()
    assert last_line.reply.complete
    assert last_line.reply.completion_tokens == 3


def test_documents_give_usage_or_the_error_message() -> None:
    """A non-streamed answer gives its counts; an error body gives its message in both shapes."""
    answer = {"choices": [{"message": {"content": "hi"}}], "usage": {"completion_tokens": 9}}
    reply = parse_document("openai", json.dumps(answer).encode())
    assert reply.complete
    assert reply.completion_tokens == 9
    assert parse_document("ollama", b'{"error":"model not found"}').error == "model not found"
    nested = parse_document("chat", b'{"error":{"message":"slow down"}}')
    assert nested.error == "slow down"
    assert parse_document("chat", b"<html>").error == "the body is not JSON"


# ---- the summary and the table -----------------------------------------------------------


def test_classify_maps_statuses_and_stream_endings_to_outcomes() -> None:
    """200 needs a complete answer; 429 and 503 are their own; 5xx and no answer are errors."""
    assert classify(200, complete=True, error=None) == "success"
    assert classify(200, complete=False, error=None) == "error"
    assert classify(200, complete=False, error="cut") == "error"
    assert classify(429, complete=True, error="x") == "429"
    assert classify(503, complete=True, error="x") == "503"
    assert classify(502, complete=True, error="x") == "error"
    assert classify(0, complete=False, error="refused") == "error"
    assert classify(401, complete=True, error="x") == "other"


def test_percentile_interpolates_between_ranks() -> None:
    """Percentiles interpolate linearly; an empty list has none."""
    values = [1.0, 2.0, 3.0, 4.0, 5.0]
    assert percentile(values, 50) == 3.0
    assert percentile(values, 95) == pytest.approx(4.8)
    assert percentile([7.0], 99) == 7.0
    assert percentile([], 50) is None


def test_summary_counts_outcomes_and_measures_only_successes() -> None:
    """Latency, TTFT and tokens come from successful requests; refusals only count."""
    samples = [ok(i, 1.0 + i) for i in range(4)]
    samples.append(Sample(4, 0.5, 0.01, "429", 429, retry_after_s=3.0, error="HTTP 429: slow down"))
    samples.append(Sample(5, 0.6, 0.02, "503", 503, retry_after_s=1.0, error="HTTP 503: full"))
    samples.append(Sample(6, 0.7, 5.0, "error", 0, error="ClientConnectorError"))
    summary = summarize(samples, wall_s=10.0)
    assert summary.outcomes == {"success": 4, "error": 1, "429": 1, "503": 1, "other": 0}
    assert summary.latency_s.count == 4
    assert summary.latency_s.p50 == pytest.approx(2.5)
    assert summary.ttft_s.mean == pytest.approx(2.5 / 4)
    assert summary.completion_tokens == 80
    assert summary.aggregate_tokens_per_s == pytest.approx(8.0)
    # 20 tokens over the decode phase (3/4 of the latency): 20 / 1.5 and 20 / 2.25 around p50.
    assert summary.tokens_per_s.p50 == pytest.approx((20 / 1.5 + 20 / 2.25) / 2)
    assert summary.retry_after_s["429"].p50 == 3.0
    assert summary.retry_after_s["503"].p50 == 1.0
    assert summary.answered_latency_mean_s == pytest.approx((1 + 2 + 3 + 4 + 0.01 + 0.02) / 6)
    assert next(iter(summary.errors)).startswith("HTTP 429")


def test_tokens_per_second_uses_the_decode_phase_only_when_streamed() -> None:
    """Streamed: tokens over the time after the first token; not streamed: the whole request."""
    assert ok(0, 2.0, ttft_s=1.0).tokens_per_s == pytest.approx(20.0)
    assert ok(0, 2.0, streamed=False, ttft_s=None).tokens_per_s == pytest.approx(10.0)
    assert ok(0, 2.0, completion_tokens=1).tokens_per_s is None
    assert Sample(0, 0, 1.0, "429", 429).tokens_per_s is None


def test_table_shows_every_outcome_percentiles_and_the_queue_wait_source() -> None:
    """The table lists each outcome with its share, the three spreads and where queue wait is."""
    samples = [ok(i, 1.0) for i in range(3)] + [Sample(3, 0, 0.01, "429", 429, retry_after_s=2)]
    text = render_table(
        summarize(samples, 2.0), "Load test", streamed=True, queue_wait_note="see /metrics"
    )
    for needle in ("success", "error", "429", "503", "other", "Retry-After p50 2 s"):
        assert needle in text
    assert "latency (s)" in text
    assert "TTFT (s)" in text
    assert "tokens/s aggregate" in text
    assert "queue wait           see /metrics" in text
    unstreamed = [ok(0, 1.0, streamed=False, ttft_s=None)]
    assert "rerun with --stream" in render_table(
        summarize(unstreamed, 1.0), "t", streamed=False, queue_wait_note=""
    )
    # A streamed run where nothing succeeded has no TTFT either, for another reason.
    refused = summarize([Sample(0, 0, 0.01, "429", 429, retry_after_s=1)], 1.0)
    text = render_table(refused, "t", streamed=True, queue_wait_note="")
    assert "(no streamed request succeeded)" in text
    assert "rerun with --stream" not in text


# ---- the gateway's view -------------------------------------------------------------------

BEFORE = """\
# TYPE ollama_requests_total counter
ollama_requests_total{method="POST",endpoint="/chat",model="m",status="success"} 5
ollama_requests_total{method="POST",endpoint="/api/chat",model="m",status="success"} 100
ollama_completion_tokens_total{model="m"} 50
ollama_queue_wait_seconds_bucket{le="0.1"} 1
ollama_queue_wait_seconds_bucket{le="1.0"} 1
ollama_queue_wait_seconds_bucket{le="+Inf"} 1
ollama_queue_wait_seconds_sum 0.05
ollama_queue_wait_seconds_count 1
ollama_time_to_first_token_seconds_sum{endpoint="/chat",model="m"} 1.0
ollama_time_to_first_token_seconds_count{endpoint="/chat",model="m"} 5
"""
AFTER = """\
ollama_requests_total{method="POST",endpoint="/chat",model="m",status="success"} 9
ollama_requests_total{method="POST",endpoint="/chat",model="m",status="rate_limited"} 2
ollama_requests_total{method="POST",endpoint="/chat",model="m",status="cancelled"} 0
ollama_requests_total{method="POST",endpoint="/api/chat",model="m",status="success"} 130
ollama_rejected_total{reason="queue_full"} 0
ollama_rate_limited_total{client="anonymous"} 2
ollama_completion_tokens_total{model="m"} 90
ollama_queue_wait_seconds_bucket{le="0.1"} 3
ollama_queue_wait_seconds_bucket{le="1.0"} 5
ollama_queue_wait_seconds_bucket{le="+Inf"} 5
ollama_queue_wait_seconds_sum 1.05
ollama_queue_wait_seconds_count 5
ollama_time_to_first_token_seconds_sum{endpoint="/chat",model="m"} 1.8
ollama_time_to_first_token_seconds_count{endpoint="/chat",model="m"} 9
ollama_request_duration_seconds_sum{endpoint="/chat",model="m"} 3.0
ollama_request_duration_seconds_count{endpoint="/chat",model="m"} 6
"""


def test_parse_and_delta_sum_series_by_label() -> None:
    """Deltas are per series, and totals sum across the labels not matched on."""
    d = delta(parse_text(BEFORE), parse_text(AFTER))
    assert total(d, "ollama_requests_total", endpoint="/chat") == 6
    assert total(d, "ollama_requests_total", status="success") == 34
    assert total(d, "ollama_completion_tokens_total") == 40
    restarted = delta(parse_text("x_total 10"), parse_text("x_total 3"))
    assert total(restarted, "x_total") == 3


def test_histogram_quantile_interpolates_within_buckets() -> None:
    """Like Prometheus: the rank is found in the bucket deltas and interpolated linearly."""
    d = delta(parse_text(BEFORE), parse_text(AFTER))
    # Delta buckets: 2 at <= 0.1, 4 at <= 1.0. The median (rank 2) is at the first bound.
    assert histogram_quantile(d, "ollama_queue_wait_seconds", 0.5) == pytest.approx(0.1)
    assert histogram_quantile(d, "ollama_queue_wait_seconds", 0.75) == pytest.approx(0.55)
    assert histogram_quantile(d, "nothing", 0.5) is None


def test_server_view_and_comparison_point_at_differences() -> None:
    """The gateway's counts for the run's route sit beside the client's; a mismatch is explained."""
    view = server_view(parse_text(BEFORE), parse_text(AFTER), "/chat")
    assert view.requests == {"success": 4, "rate_limited": 2}
    assert view.ttft_mean_s == pytest.approx(0.8 / 4)
    assert view.queue_wait_mean_s == pytest.approx(0.25)
    assert view.rejected == {}
    samples = [ok(i, 0.5) for i in range(4)] + [Sample(4, 0, 0.01, "429", 429)]
    text = render_comparison(summarize(samples, 1.0), view)
    assert "Client vs gateway" in text
    assert "differs by +1" in text  # the gateway saw two 429s, the client one
    assert "tokens differ" in text  # 80 client tokens, 40 at the gateway
    assert "TTFT: the client's" in text
    assert "p50" in queue_wait_summary(view)
    assert "--metrics" in queue_wait_summary(None)


# ---- progress, prompts, plot data ---------------------------------------------------------


def test_progress_line_shows_counts_rate_and_bar() -> None:
    """The line names done/total, non-zero outcomes, requests in flight, rate and time."""
    counts = {"success": 8, "error": 0, "429": 2, "503": 0, "other": 0}
    line = progress_line(counts, in_flight=3, elapsed_s=2.0, total=20, duration_s=None, bar=True)
    assert line.startswith("[")
    assert "10/20" in line
    assert "429 2" in line
    assert "503" not in line
    assert "3 in flight" in line
    assert "5.0 req/s" in line
    timed = progress_line(counts, in_flight=0, elapsed_s=1.0, total=None, duration_s=4, bar=False)
    assert "1.0 s/4 s" in timed


def test_progress_without_a_terminal_logs_a_line_per_tenth() -> None:
    """Piped output gets one plain line per 10 % of the run, not a redraw per request."""
    out = io.StringIO()
    now = [0.0]
    progress = LiveProgress(out, is_tty=False, total=100, duration_s=None, clock=lambda: now[0])
    for _ in range(100):
        progress.request_started()
        now[0] += 0.01
        progress.request_finished("success")
    progress.finish()
    lines = out.getvalue().splitlines()
    assert len(lines) == 10
    assert "\r" not in out.getvalue()
    assert "100/100" in lines[-1]


def test_progress_on_a_terminal_redraws_in_place() -> None:
    """On a terminal the line is redrawn with a carriage return and ends with a newline."""
    out = io.StringIO()
    progress = LiveProgress(out, is_tty=True, total=2, duration_s=None)
    progress.request_started()
    progress.request_finished("success")
    progress.finish()
    assert out.getvalue().startswith("\r[")
    assert out.getvalue().endswith("\n")


def test_prompt_sets_and_files(tmp_path: Path) -> None:
    """Built-in sets differ in length; a file gives one prompt per non-blank line."""
    assert max(map(len, BUILT_IN["short"])) < min(map(len, BUILT_IN["long"]))
    path = tmp_path / "prompts.txt"
    path.write_text("first\n\n  second  \n")
    assert load_prompts(f"@{path}") == ("first", "second")
    with pytest.raises(ValueError, match="unknown prompt set"):
        load_prompts("huge")
    with pytest.raises(ValueError, match="cannot read"):
        load_prompts(f"@{tmp_path / 'missing.txt'}")
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(ValueError, match="no prompts"):
        load_prompts(f"@{tmp_path / 'empty.txt'}")


def test_in_flight_steps_up_at_starts_and_down_at_ends() -> None:
    """The in-flight curve rises at each start and falls at each end."""
    samples = [Sample(0, 0.0, 2.0, "success", 200), Sample(1, 1.0, 2.0, "success", 200)]
    times, counts = in_flight(samples)
    assert times == [0.0, 0.0, 1.0, 2.0, 3.0]
    assert counts == [0, 1, 2, 1, 0]
