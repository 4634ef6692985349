"""A protocol-faithful fake Ollama server: a test and benchmark tool, not a substitute for Ollama.

It speaks Ollama's native API (/api/*) and its OpenAI-compatible layer (/v1/*) byte for byte
as Ollama 0.33 writes them (as read from its source, not captured from a server): NDJSON framing
with a flush per line, Go's JSON key order and escaping, final statistics in integer
nanoseconds with zero values omitted, the exact error bodies and statuses, SSE in the
>= 0.32.6 layout, and the DNS-rebinding Host check. Generation is deterministic (a fixed
cycle of words, one token per chunk) and cheap per token, so proxy tests and benchmarks can
drive thousands of requests a second through it.

What it adds for tests:

- failure modes (`ok`, `busy`, `not_found`, `error500`, `hang`, `stall`, `midstream_error`,
  `drop`, and `malformed`: a line or event that is not JSON, then a clean end, which is not
  Ollama's but a broken upstream's), server-wide through `config.mode` or per request with
  the `X-Fake-Mode` header;
  they apply to the inference routes (generate, chat, embed, embeddings and their /v1 forms);
- pacing: cold `load_s`, `ttft_s` and `token_interval_s`, with `num_parallel` slots and an
  unbounded FIFO wait beyond them, as Ollama behaves for a warm model;
- a recorder: `seen` (every request with headers, body, and how it ended), slot counters and
  `totals` of the token counts it actually sent, plus `wait_for()` to await any condition
  without sleeping.

Run it alone with `python -m loadtest.fake_ollama --port 11434`.
"""

from .config import MODE_HEADER, MODES, FakeModel, FakeOllamaConfig
from .recorder import SeenRequest
from .server import FakeOllama

__all__ = ["MODES", "MODE_HEADER", "FakeModel", "FakeOllama", "FakeOllamaConfig", "SeenRequest"]
