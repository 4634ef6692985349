"""Content codings an upstream may use although the gateway asked for ``identity`` (some
proxies in between compress anyway): which ones the gateway can read, and reading a body
decoded. The relay never decodes what it forwards; it only reads a decoded copy."""

from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import Protocol

from proxy.upstream.client import UpstreamError, UpstreamResponse


class Decompressor(Protocol):
    """What ``zlib.decompressobj()`` gives."""

    @property
    def unconsumed_tail(self) -> bytes: ...

    def decompress(self, data: bytes, max_length: int = 0, /) -> bytes: ...

    def flush(self, length: int = ..., /) -> bytes: ...


_MAX_DECODED = 64 * 1024 * 1024  # a gzip bomb stops here


class _Members:
    """A body of one or more members, one after another (RFC 1952: a gzip body is "a series
    of members"; a streaming compressor may close one per flush). zlib decodes one member
    and stops; each next member gets a fresh decompressor, as aiohttp's client does.

    Input goes in through a window that grows to 64 KB: a finished decompressor copies
    all the input after its member, which would be quadratic over many small members."""

    _FIRST_WINDOW = 64
    _MAX_WINDOW = 64 * 1024

    def __init__(self, wbits: int) -> None:
        self._wbits = wbits
        self._current = zlib.decompressobj(wbits)
        self._tail = b""

    @property
    def unconsumed_tail(self) -> bytes:
        """Input left over because ``max_length`` was reached."""
        return self._tail

    def decompress(self, data: bytes, max_length: int = 0, /) -> bytes:
        view = memoryview(data)
        parts: list[bytes] = []
        size = pos = 0
        window = self._FIRST_WINDOW
        while pos < len(view) and not (max_length and size >= max_length):
            if self._current.eof:
                while pos < len(view) and view[pos] == 0:
                    pos += 1  # zero padding after a member, which gzip(1) skips too
                if pos == len(view):
                    break
                self._current = zlib.decompressobj(self._wbits)
                window = self._FIRST_WINDOW
            piece = view[pos : pos + window]
            part = self._current.decompress(piece, max_length - size if max_length else 0)
            parts.append(part)
            size += len(part)
            if self._current.eof:
                pos += len(piece) - len(self._current.unused_data)
            elif self._current.unconsumed_tail:  # max_length reached inside this piece
                pos += len(piece) - len(self._current.unconsumed_tail)
                break
            else:
                pos += len(piece)
                window = min(window * 2, self._MAX_WINDOW)
        self._tail = bytes(view[pos:])
        return b"".join(parts)

    def flush(self, length: int = zlib.DEF_BUF_SIZE, /) -> bytes:
        return self._current.flush(length)


def _gzip() -> Decompressor:
    return _Members(16 + zlib.MAX_WBITS)


def _deflate() -> Decompressor:
    # "deflate" means a zlib stream (RFC 9110 section 8.4.1.2); some servers send it raw,
    # which the automatic header detection does not cover, so zlib's is asked for.
    return _Members(32 + zlib.MAX_WBITS)


_DECODERS: dict[str, Callable[[], Decompressor]] = {
    "gzip": _gzip,
    "x-gzip": _gzip,
    "deflate": _deflate,
}


def decoder_for(content_encoding: str) -> Callable[[], Decompressor] | None:
    """A decompressor factory for a body's content coding; None if it cannot be read."""
    return _DECODERS.get(content_encoding)


class UnreadableBodyError(UpstreamError):
    """The upstream's body is in a coding the gateway cannot decode, or does not decode."""


class DecodedBody:
    """An upstream body read as its decoded bytes, whatever its content coding."""

    def __init__(self, upstream: UpstreamResponse) -> None:
        self._upstream = upstream
        self._decoded = 0
        self._decompressor: Decompressor | None = None
        coding = upstream.content_encoding
        if coding != "identity":
            factory = decoder_for(coding)
            if factory is None:
                raise UnreadableBodyError(
                    f"the upstream answered in a content coding the gateway cannot read ({coding})"
                )
            self._decompressor = factory()

    async def readany(self) -> bytes:
        """Decoded bytes as they arrive; b"" at the end."""
        decompressor = self._decompressor
        while True:
            chunk = await self._upstream.readany()
            if decompressor is None:
                return chunk
            room = _MAX_DECODED - self._decoded + 1
            try:
                data = decompressor.decompress(chunk, room) if chunk else decompressor.flush()
            except zlib.error as exc:
                raise UnreadableBodyError(
                    f"the upstream's compressed body is broken: {exc}"
                ) from exc
            self._decoded += len(data)
            if self._decoded > _MAX_DECODED or decompressor.unconsumed_tail:
                raise UnreadableBodyError("the upstream's compressed body decodes to too much")
            if data or not chunk:
                return data

    async def read(self) -> bytes:
        parts = []
        while part := await self.readany():
            parts.append(part)
        return b"".join(parts)
