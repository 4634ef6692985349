"""The prompts a load test sends: built-in sets of different lengths, or one per line of a file.

Prompt length matters on a real model: prompt evaluation is most of the time to first
token on a CPU, so ``long`` shows what a box does with a pasted document and ``short``
what it does with chat.
"""

from __future__ import annotations

from pathlib import Path

SHORT = (
    "Why is the sky blue?",
    "Name three primary colours.",
    "What is the capital of France?",
    "Say hello in Spanish.",
)

MEDIUM = (
    "Explain in a short paragraph how a reverse proxy differs from a load balancer, and "
    "when a small team would want both in front of one service.",
    "Summarise the trade-offs between streaming a model's answer token by token and "
    "returning it in one response, from the point of view of a user on a slow network.",
)

LONG = (
    "You are reviewing an incident report. A single-board computer runs a language model "
    "server behind a gateway. At 09:12 the gateway's queue filled up and clients received "
    "503 responses with a Retry-After header of 30 seconds. At 09:14 one client retried "
    "without waiting and was rate limited with 429 responses. The model server itself "
    "reported no errors, but its time to first token rose from 0.8 s to 14 s because "
    "several long prompts arrived together and prompt evaluation is serial on this "
    "machine. Memory stayed below the limit and nothing was restarted. Write a short "
    "summary of what happened, the likely root cause, and two changes to the gateway's "
    "limits that would have kept interactive users responsive, with the reason for each.",
    "Read this configuration and point out anything risky. The gateway listens on all "
    "interfaces on port 8000. API keys are required, with a limit of 60 requests per "
    "minute per key and a burst of 10. The concurrency gate allows one request at a time "
    "with a queue of 8, at most 4 per client, and a queue timeout of 60 seconds. The "
    "upstream connect timeout is 5 seconds, the time allowed for response headers is 300 "
    "seconds, and a stream may be idle for 120 seconds between chunks. Model management "
    "routes are enabled with an admin key. Logs are written as JSON at level info, and "
    "Prometheus scrapes the metrics endpoint every 15 seconds without authentication.",
)

BUILT_IN: dict[str, tuple[str, ...]] = {
    "short": SHORT,
    "mixed": SHORT[:2] + MEDIUM + LONG[:1],
    "long": LONG,
}


def load_prompts(spec: str) -> tuple[str, ...]:
    """``short``, ``mixed`` or ``long``; or ``@FILE`` with one prompt per non-blank line."""
    if spec.startswith("@"):
        path = Path(spec[1:])
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise ValueError(f"cannot read prompts from {path}: {exc.strerror}") from exc
        prompts = tuple(line.strip() for line in lines if line.strip())
        if not prompts:
            raise ValueError(f"{path} holds no prompts (one per line expected)")
        return prompts
    if spec not in BUILT_IN:
        raise ValueError(f"unknown prompt set {spec!r}: use {', '.join(BUILT_IN)} or @FILE")
    return BUILT_IN[spec]
