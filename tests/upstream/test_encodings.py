"""Content codings the gateway reads a copy of: every member of a gzip or deflate body."""

from __future__ import annotations

import gzip
import zlib

import pytest

from proxy.upstream.encodings import decoder_for

MEMBERS = [b'{"done":false}\n', b"x" * 5000 + b"\n", b'{"done":true,"eval_count":3}\n']


def _decode(coding: str, body: bytes, *, step: int, max_length: int) -> bytes:
    """``body`` fed ``step`` bytes at a time, each decoded ``max_length`` at most per call,
    the way the relay's DecodingScanner drives a decompressor."""
    factory = decoder_for(coding)
    assert factory is not None
    decompressor = factory()
    out = []
    for i in range(0, len(body), step):
        chunk = body[i : i + step]
        while chunk:
            out.append(decompressor.decompress(chunk, max_length))
            chunk = decompressor.unconsumed_tail
    return b"".join(out) + decompressor.flush()


@pytest.mark.parametrize(("step", "max_length"), [(1, 0), (7, 3), (100_000, 0), (100_000, 64)])
@pytest.mark.parametrize(
    ("coding", "compress"), [("gzip", gzip.compress), ("deflate", zlib.compress)]
)
def test_every_member_is_decoded_however_it_is_cut(
    coding: str, compress: object, step: int, max_length: int
) -> None:
    """Members one after another (RFC 1952 allows a series) decode to their concatenation,
    cut anywhere, with or without an output limit per call."""
    assert callable(compress)
    body = b"".join(compress(member) for member in MEMBERS)
    assert _decode(coding, body, step=step, max_length=max_length) == b"".join(MEMBERS)


def test_a_limited_call_keeps_the_input_it_did_not_reach() -> None:
    """With max_length reached inside the first member, the rest of the input, the next
    member included, waits in unconsumed_tail."""
    body = gzip.compress(b"a" * 1000) + gzip.compress(b"b" * 10)
    factory = decoder_for("gzip")
    assert factory is not None
    decompressor = factory()
    first = decompressor.decompress(body, 100)
    assert first == b"a" * 100
    assert decompressor.unconsumed_tail
    rest = decompressor.decompress(decompressor.unconsumed_tail)
    assert first + rest == b"a" * 1000 + b"b" * 10
    assert decompressor.unconsumed_tail == b""


def test_zero_padding_after_the_last_member_is_skipped() -> None:
    """Zeros after a member (gzip(1) and Python's gzip skip them) are not a broken body."""
    body = gzip.compress(b"one\n") + b"\0" * 3
    assert _decode("gzip", body, step=2, max_length=0) == b"one\n"
    assert _decode("gzip", body + gzip.compress(b"two\n"), step=5, max_length=0) == b"one\ntwo\n"
