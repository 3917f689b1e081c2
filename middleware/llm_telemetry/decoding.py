"""Response bodies the app compressed itself (``Content-Encoding: gzip`` or ``deflate``), read decompressed.

Starlette's and FastAPI's ``GZipMiddleware``, added before this middleware (so it runs inside it), compresses
every JSON response of 500 bytes or more for a client that accepts gzip, and the official SDKs all do: read as
sent, such answers would show no usage, model or error body. The client still gets the compressed bytes exactly as
the app sent them; what is decompressed here is a copy for the reader, bounded like the readers themselves.
"""

from __future__ import annotations

import zlib
from typing import Final

from .apis import ResponseReader

#: Content codings read, and zlib's window bits for each: gzip's container, or zlib's (``deflate`` as HTTP defines
#: it; a bare deflate stream, which some servers send instead, is recognised by its missing header).
WINDOW_BITS: Final = {b"gzip": 16 + zlib.MAX_WBITS, b"x-gzip": 16 + zlib.MAX_WBITS, b"deflate": zlib.MAX_WBITS}

#: Decompressed bytes of a stream read at most (a JSON or error body stops at its reader's own limit). An answer
#: of millions of tokens stays below it; a body that inflates past it is not read further, so a compression bomb
#: costs no more than this.
MAX_DECODED_STREAM_BYTES: Final = 64 * 1024 * 1024


class DecodingReader:
    """Decompresses a body as it passes and hands the result to the reader it wraps, at most ``limit`` bytes.

    A body that is not what its ``Content-Encoding`` says, or inflates past ``limit``, is read no further; the
    wrapped reader then finishes with what it got (a JSON body cut short does not parse, so it records nothing).
    """

    __slots__ = ("_head", "_inflate", "_left", "reader")

    #: Chunks are read as they pass, never kept for later (see ``_Exchange.send``).
    holding: Final = False

    def __init__(self, reader: ResponseReader, coding: bytes, limit: int) -> None:
        self.reader = reader
        self._inflate: zlib._Decompress | None = zlib.decompressobj(WINDOW_BITS[coding])
        #: For ``deflate``, the body's bytes until its first two have passed: if they are no zlib header, the body
        #: is a bare deflate stream, read again from its start. None once that is settled.
        self._head: bytes | None = b"" if coding == b"deflate" else None
        self._left = limit

    def feed(self, chunk: bytes, now: float | None = None, shaped: bool = True) -> None:
        inflate = self._inflate
        if inflate is None or not chunk:
            return
        head = self._head
        if head is not None:
            head += chunk
            self._head = head if len(head) < 2 else None
        try:
            data = inflate.decompress(chunk, self._left)
        except zlib.error:
            self._inflate = None
            if head is None:
                return
            self._head = None
            inflate = self._inflate = zlib.decompressobj(-zlib.MAX_WBITS)
            try:
                data = inflate.decompress(head, self._left)
            except zlib.error:
                self._inflate = None
                return
        self._left -= len(data)
        if inflate.unconsumed_tail or self._left <= 0:
            self._inflate = None  # past the limit (``max_length`` 0 would mean no limit at all)
        if data:
            self.reader.feed(data, now)

    def feed_held(self, chunks: list[bytes]) -> None:
        for chunk in chunks:
            self.feed(chunk)

    def finish(self, now: float) -> None:
        inflate = self._inflate
        if inflate is not None:
            self._inflate = None
            try:
                data = inflate.flush()[: self._left]
            except zlib.error:
                data = b""
            if data:
                self.reader.feed(data, now)
        self.reader.finish(now)
