"""The part every inference route shares: body parsing, failure modes, load, slot and pacing.

A generation follows Ollama's order of events: the scheduler hands back a (possibly freshly
loaded) runner, the request waits for one of `num_parallel` slots, the prompt is evaluated,
then tokens come out one per chunk. Each phase is timed with the monotonic clock so the
final statistics describe what really happened.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from . import wire
from .config import MODE_HEADER, MODES, FakeModel
from .recorder import Exchange

if TYPE_CHECKING:
    from .server import FakeOllama

_FAILING_MODES = frozenset({"stall", "midstream_error", "drop", "malformed"})
# Not Ollama's: what a broken upstream (or a proxy between) might send, then end cleanly.
_MALFORMED_LINE = b'{"model": "broken\n'
_MALFORMED_EVENT = b'data: {"choices": [broken\n\n'

_JSON_STARTS = frozenset('{["-0123456789tfn')


def request_object(ex: Exchange, go_type: str) -> tuple[dict[str, Any], str]:
    """The JSON object body, or ({}, the error text Go's decoder would give)."""
    if isinstance(ex.body, dict):
        return ex.body, ""
    raw = ex.seen.body.strip()
    if not raw:
        return {}, "missing request body"
    if raw == b"null":
        return {}, ""  # Go decodes null into a struct as "no fields set"
    if ex.body is None:
        try:
            orjson.loads(raw)
        except orjson.JSONDecodeError:
            first = raw[:1].decode(errors="replace")
            if first not in _JSON_STARTS:
                return {}, f"invalid character '{first}' looking for beginning of value"
            return {}, "unexpected EOF"
    kind = {list: "array", str: "string", bool: "bool"}.get(type(ex.body), "number")
    return {}, f"json: cannot unmarshal {kind} into Go value of type {go_type}"


def resolve_mode(fake: FakeOllama, ex: Exchange) -> tuple[str, str]:
    """The request's failure mode (header over server-wide), or ("", error text)."""
    mode = ex.request.headers.get(MODE_HEADER) or fake.config.mode
    if mode not in MODES:
        return "", f"unknown fake failure mode {mode!r}; expected one of {sorted(MODES)}"
    return mode, ""


def prelude_error(mode: str) -> tuple[int, str] | None:
    """Failures answered before any model work, as (status, message)."""
    if mode == "busy":
        return 503, wire.BUSY
    if mode == "error500":
        return 500, wire.RUNNER_STOPPED
    return None


@dataclass(slots=True)
class Admission:
    """A request that got past parsing, the failure-mode prelude and the model lookup."""

    body: dict[str, Any]
    name: str
    model: FakeModel
    mode: str
    keep_alive: object = None  # native only: Ollama's OpenAI layer does not pass it on


async def admit(
    fake: FakeOllama,
    ex: Exchange,
    go_type: str,
    not_found: str,
    *,
    model_required: bool,
    native: bool = True,
) -> Admission | tuple[int, str]:
    """Parse, apply busy/not_found/error500/hang, find the model; or (status, message).

    `not_found` is the endpoint's 404 text with a `{name}` placeholder: Ollama words it
    differently per endpoint.
    """
    body, error = request_object(ex, go_type)
    mode = ""
    if not error:
        mode, error = resolve_mode(fake, ex)
    if error:
        return 400, error
    if mode == "hang":
        await ex.hang()
    name = body.get("model")
    if name is not None and not isinstance(name, str):
        struct = go_type.rsplit(".", 1)[-1]
        kind = {list: "array", dict: "object", bool: "bool"}.get(type(name), "number")
        return (
            400,
            f"json: cannot unmarshal {kind} into Go struct field {struct}.model of type string",
        )
    name = name or ""
    if not name and model_required:
        return 400, "model is required"
    model = fake.find_model(name)
    if model is None or mode == "not_found":
        return 404, not_found.format(name=name)
    keep_alive = body.get("keep_alive") if native else None
    return prelude_error(mode) or Admission(body, name, model, mode, keep_alive)


def num_predict(body: dict[str, Any]) -> tuple[int | None, str]:
    """options.num_predict as Ollama coerces it (any JSON number), or an error text."""
    options = body.get("options")
    if not isinstance(options, dict) or options.get("num_predict") is None:
        return None, ""
    value = options["num_predict"]
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None, 'option "num_predict" must be of type integer'
    return int(value), ""


def token_budget(default: int, cap: object) -> tuple[int, str]:
    """Tokens to generate and the done_reason, given num_predict / max_tokens."""
    if isinstance(cap, int) and not isinstance(cap, bool) and 0 <= cap < default:
        return cap, "length"
    return max(default, 0), "stop"


class Generation:
    """One admitted request's model work: load, slot, prompt evaluation, paced tokens, stats.

    Used as an async context so the slot is released however the handler ends.
    """

    def __init__(
        self,
        fake: FakeOllama,
        ex: Exchange,
        adm: Admission,
        prompt_tokens: int,
        *,
        n_tokens: int = 0,
        reason: str = "stop",
    ) -> None:
        self.fake = fake
        self.ex = ex
        self.adm = adm
        self.prompt_tokens = prompt_tokens
        self.n_tokens = n_tokens
        self.reason = reason
        self._holding = False
        self.t_loaded = self.t_slot = self.t_prompt = self.t_eval = ex.t0_ns
        self._first_token_at = 0.0

    @property
    def failing(self) -> bool:
        return self.adm.mode in _FAILING_MODES

    @property
    def limit(self) -> int:
        """How many content chunks to produce before the injected failure (or all of them)."""
        if self.failing:
            return min(max(self.fake.config.fail_after_chunks, 0), self.n_tokens)
        return self.n_tokens

    @property
    def fails_first(self) -> bool:
        """midstream_error before any chunk: Ollama then answers with a plain status 500."""
        return self.adm.mode == "midstream_error" and self.limit == 0

    async def __aenter__(self) -> Generation:
        fake = self.fake
        await fake.ensure_loaded(self.adm.model)
        self.t_loaded = time.monotonic_ns()
        await fake.acquire_slot()
        self._holding = True
        self.t_slot = time.monotonic_ns()
        if fake.config.ttft_s > 0:
            try:
                await asyncio.sleep(fake.config.ttft_s)
            except BaseException:
                self._release()  # __aexit__ does not run when __aenter__ raises
                raise
        self.t_prompt = self.t_eval = time.monotonic_ns()
        self._first_token_at = asyncio.get_running_loop().time()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._release()

    def _release(self) -> None:
        # No await here: this also runs when the handler is cancelled by a disconnect.
        if self._holding:
            self._holding = False
            self.fake.release_slot()
        self.fake.touch(self.adm.model, self.adm.keep_alive)

    async def pace(self, index: int) -> None:
        """Wait until token `index` is due: evenly spaced, so drift does not accumulate."""
        interval = self.fake.config.token_interval_s
        if index and interval > 0:
            delay = self._first_token_at + index * interval - asyncio.get_running_loop().time()
            if delay > 0:
                await asyncio.sleep(delay)
        self.t_eval = time.monotonic_ns()

    async def generate_silently(self, n_tokens: int) -> None:
        """Spend the time of n tokens without sending them (stream:false)."""
        for i in range(n_tokens):
            await self.pace(i)

    def stats(self) -> dict[str, int]:
        """Ollama's final statistics for this generation, zero values omitted."""
        return wire.metrics(
            total_ns=time.monotonic_ns() - self.ex.t0_ns,
            load_ns=self.t_loaded - self.ex.t0_ns,
            prompt_count=self.prompt_tokens,
            prompt_ns=self.t_prompt - self.t_slot,
            eval_count=self.n_tokens,
            eval_ns=self.t_eval - self.t_prompt if self.n_tokens else 0,
        )

    def count(self) -> None:
        """Add what was just sent (final statistics or usage) to the fake's totals."""
        self.fake.add_totals(self.prompt_tokens, self.n_tokens)

    async def fail_stream(self, error_chunk: bytes | None) -> web.StreamResponse:
        """The injected failure once `limit` chunks are out; returns the response to finish."""
        if self.adm.mode == "stall":
            await self.ex.hang()
        if self.adm.mode == "drop":
            return self.ex.abort()
        assert self.ex.response is not None, "fail_stream() runs after the stream started"
        if self.adm.mode == "malformed":
            sse = self.ex.response.content_type == "text/event-stream"
            await self.ex.send(_MALFORMED_EVENT if sse else _MALFORMED_LINE)
        elif error_chunk is not None:
            await self.ex.send(error_chunk)
        return self.ex.response

    async def fail_silently(self) -> web.StreamResponse | None:
        """The injected failure for stream:false, where nothing was sent yet.

        midstream_error becomes the status-500 JSON Ollama returns for stream:false;
        `None` tells the caller to render that error in its own dialect.
        """
        await self.generate_silently(self.limit)
        if self.adm.mode == "stall":
            await self.ex.hang()
        if self.adm.mode == "drop":
            return self.ex.abort()
        return None
