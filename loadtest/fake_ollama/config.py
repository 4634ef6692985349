"""What the fake serves and how it misbehaves: models, pacing, concurrency and failure modes."""

from __future__ import annotations

from dataclasses import dataclass, field

MODE_HEADER = "X-Fake-Mode"

# Every failure mode the fake knows; `ok` is the absence of failure.
MODES = frozenset(
    {"ok", "busy", "not_found", "error500", "hang", "stall", "midstream_error", "drop", "malformed"}
)


@dataclass
class FakeModel:
    """One installed model as /api/tags, /api/show and /api/ps describe it."""

    name: str
    size: int = 2_019_377_376
    parameter_size: str = "3.2B"
    quantization_level: str = "Q4_K_M"
    family: str = "llama"
    embedding_length: int = 8

    @property
    def is_embedding_only(self) -> bool:
        # Ollama refuses chat/generate on embedding-only architectures with a 400.
        return self.family in {"bert", "nomic-bert"}


def default_models() -> list[FakeModel]:
    """Two chat models and one embedding model, the set most tests need."""
    return [
        FakeModel("llama3.2:latest"),
        FakeModel("qwen2.5:0.5b"),
        FakeModel("all-minilm:latest", family="bert"),
    ]


@dataclass
class FakeOllamaConfig:
    """Server-wide behaviour; every field may be changed while the fake runs."""

    models: list[FakeModel] = field(default_factory=default_models)
    version: str = "0.33.0"
    tokens: int = 8
    token_interval_s: float = 0.0
    ttft_s: float = 0.0
    load_s: float = 0.0
    num_parallel: int = 1
    mode: str = "ok"
    fail_after_chunks: int = 2
    check_host: bool = True
    honor_stream_usage: bool = True
    # Not part of Ollama: a long benchmark would otherwise keep every request body in memory.
    max_seen: int | None = None
