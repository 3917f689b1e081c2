"""Response bodies the app compressed itself (``Content-Encoding``), read decompressed.

Starlette's and FastAPI's ``GZipMiddleware``, added before this middleware (so it runs inside it), compresses
every JSON response of 500 bytes or more for a client that accepts gzip, and the official SDKs all do: read as
sent, such answers would show no usage, model or error body. ``gzip`` and ``deflate`` are always read; ``br``
when the ``brotli`` package (1.2 or later, which can bound its output) is importable, as it is wherever the app
compresses with it (``brotli-asgi``, Litestar's brotli backend); ``zstd`` when ``backports.zstd`` (what
``zstd-asgi`` uses) or Python 3.14's ``compression.zstd`` is. The client still gets the compressed bytes exactly as
the app sent them; what is decompressed here is a copy for the reader, bounded like the readers themselves.
"""

from __future__ import annotations

import importlib
import zlib
from collections.abc import Callable
from time import thread_time
from typing import Any, Final, Protocol

from .apis import ReadBudgetSpent, ResponseReader


def _module(*names: str) -> Any:
    """The first of these modules that imports, or None."""
    for name in names:
        try:
            return importlib.import_module(name)
        except ImportError:
            pass
    return None


_brotli = _module("brotli")
_zstd = _module("compression.zstd", "backports.zstd")  # Python 3.14's, or its backport to 3.9-3.13

#: Decompressed bytes of a stream read at most (a JSON or error body stops at its reader's own limit). An answer
#: of millions of tokens stays below it; a body that inflates past it is not read further, so a compression bomb
#: costs no more than this.
MAX_DECODED_STREAM_BYTES: Final = 64 * 1024 * 1024


#: Decompressed bytes asked for at a time, and read before the next are: a chunk of a few kilobytes may inflate to
#: the whole limit (a compression bomb), which asked for at once would be held in full, and again by the reader's
#: buffer. (Brotli's output grows in blocks until it reaches the number asked for, and may end up twice as large.)
DECODE_STEP: Final = 64 * 1024

#: CPU seconds (of the thread reading) one chunk of the app's may take to read: past them the rest of the response
#: is not read (what comes after is then unknown; what was read is recorded). Within the size limits, reading costs
#: what the events cost: a chunk of millions of empty or non-JSON events, or a compressed chunk of 100 KB inflating
#: to them, held the event loop for half a minute. A chunk of real events costs a few microseconds an event (a
#: 1.3 MB stream sent whole, 16 ms). The thread's CPU time, not the clock: a thread waiting for the interpreter's
#: lock, or a container throttled, spends none, and a normal answer read meanwhile is read whole.
MAX_READ_SECONDS: Final = 0.1
#: Bytes of a large chunk read at a time, between two looks at the CPU time (64 KiB of the costliest events tried,
#: ``data:`` lines with nothing in them, took 40 ms).
READ_STEP: Final = 64 * 1024


def _most(size: int) -> float:
    """The most one step of reading (``size`` bytes of a chunk, or of one piece inflated) adds to a chunk's time: a
    millisecond and a microsecond a byte (of READ_STEP at most: brotli's pieces may be larger), above what the
    costliest events cost (0.65 µs a byte) and, for a whole step, well under MAX_READ_SECONDS. A full garbage
    collection of a large heap takes the CPU for longer than that limit, and may come inside any step: counted
    whole, that one pause stopped a real answer's reading at its largest event, and its usage, read later, was
    lost."""
    return 0.001 + min(size, READ_STEP) * 1e-6


def read_within(reader: Any, chunk: bytes, now: float) -> bool:
    """Feed ``chunk`` to ``reader`` READ_STEP bytes at a time; False, and the rest unread, once reading it has taken
    more than MAX_READ_SECONDS of this thread's CPU time (each step counting at most what it can cost)."""
    spent = 0.0
    last = thread_time()
    for start in range(0, len(chunk), READ_STEP):
        step = chunk[start : start + READ_STEP]
        reader.feed(step, now)
        at = thread_time()
        spent += min(at - last, _most(len(step)))
        if spent > MAX_READ_SECONDS:
            return False
        last = at
    return True


class Inflater(Protocol):
    def take(self, chunk: bytes, limit: int) -> tuple[bytes, bool] | None:
        """The decompressed bytes that ``chunk`` completes, at most ``limit`` (> 0), and whether more may be
        waiting (then ``take(b"", ...)`` gives them); None when the body is not what its coding says."""

    def rest(self) -> bytes:
        """Output still held once the body has ended."""


class _Zlib:
    """``gzip``, or ``deflate``: zlib's container as HTTP defines it, or a bare deflate stream, which some servers
    send instead, recognised by its missing header. A gzip body may hold several members one after another (Django's
    GZipMiddleware compresses each piece of a streamed answer as one): each is read in turn.

    zlib is given at most :data:`DECODE_STEP` bytes of input at a time, a view into the chunk: handed a whole chunk
    of megabytes, it would copy what it left unread (``unconsumed_tail``) at every step, and a chunk read in many
    steps would cost the square of its size."""

    __slots__ = ("_at", "_gzip", "_head", "_inflate", "_input")

    def __init__(self, coding: bytes) -> None:
        self._gzip = coding != b"deflate"
        self._inflate = zlib.decompressobj(16 + zlib.MAX_WBITS if self._gzip else zlib.MAX_WBITS)
        #: For ``deflate``, the body's bytes until its first two have passed: if they are no zlib header, the body
        #: is a bare deflate stream, read again from its start. None once that is settled.
        self._head: bytes | None = None if self._gzip else b""
        #: Input not decompressed yet: ``_input`` from offset ``_at``.
        self._input = b""
        self._at = 0

    def take(self, chunk: bytes, limit: int) -> tuple[bytes, bool] | None:
        step = limit if limit < DECODE_STEP else DECODE_STEP
        held, at = self._input, self._at
        if chunk:
            held = self._input = held[at:] + chunk if at < len(held) else chunk
            at = self._at = 0
        # Input read in one step is given as it is: a view costs more than inflating a chunk of a few bytes does.
        piece: bytes | memoryview = (
            held if not at and len(held) <= DECODE_STEP else memoryview(held)[at : at + DECODE_STEP]
        )
        inflate = self._inflate
        if self._gzip:
            if inflate.eof:  # the member before ended: the next one starts here
                if not piece:
                    return b"", False
                inflate = self._inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)
            try:
                data = inflate.decompress(piece, step)
            except zlib.error:
                return None
        else:
            if inflate.eof:  # the stream ended: what follows it is not read
                self._input, self._at = b"", 0
                return b"", False
            head = self._head
            if head is not None:
                head += piece
                self._head = head if len(head) < 2 else None
            try:
                data = inflate.decompress(piece, step)
            except zlib.error:
                if head is None:
                    return None
                # No zlib header: a bare deflate stream, read again from the body's start.
                self._head = None
                inflate = self._inflate = zlib.decompressobj(-zlib.MAX_WBITS)
                held = self._input = head + held[at + len(piece) :]
                piece, at = memoryview(held)[:DECODE_STEP], 0
                try:
                    data = inflate.decompress(piece, step)
                except zlib.error:
                    return None
        # What zlib left of the piece: past a member's end, the bytes after it (``unconsumed_tail`` may still hold
        # the last step's); else what the step's output limit left.
        unread = inflate.unused_data if inflate.eof else inflate.unconsumed_tail
        self._at = at = at + len(piece) - len(unread)
        if inflate.eof and not self._gzip:
            return data, False
        return data, at < len(held) or len(data) >= step

    def rest(self) -> bytes:
        try:
            return self._inflate.flush()
        except zlib.error:
            return b""


class _Brotli:
    """Given its input a :data:`DECODE_STEP` piece at a time, as zlib is: the decompressor keeps what a step leaves
    unread, and takes no more until that is read (``can_accept_more_data``)."""

    __slots__ = ("_at", "_inflate", "_input")

    def __init__(self, coding: bytes) -> None:
        self._inflate = _brotli.Decompressor()
        #: Input not handed to the decompressor yet: ``_input`` from offset ``_at``.
        self._input = b""
        self._at = 0

    def take(self, chunk: bytes, limit: int) -> tuple[bytes, bool] | None:
        step = min(limit, DECODE_STEP)
        if chunk:
            at, held = self._at, self._input
            self._input, self._at = (held[at:] + chunk if at < len(held) else chunk), 0
        inflate = self._inflate
        piece: bytes | memoryview = b""
        if inflate.can_accept_more_data():
            piece = memoryview(self._input)[self._at : self._at + DECODE_STEP]
            self._at += len(piece)
        try:
            data = inflate.process(piece, output_buffer_limit=step)
        except _brotli.error:
            return None
        # More waits when input is left, or the decompressor holds some of its own (an output that reached the step).
        more = self._at < len(self._input) or not inflate.can_accept_more_data() or len(data) >= step
        return data[:limit], more and not inflate.is_finished()

    def rest(self) -> bytes:
        return b""


class _Zstd:
    """One Zstandard frame after another (a stream may hold several)."""

    __slots__ = ("_inflate",)

    def __init__(self, coding: bytes) -> None:
        self._inflate = _zstd.ZstdDecompressor()

    def take(self, chunk: bytes, limit: int) -> tuple[bytes, bool] | None:
        inflate = self._inflate
        try:
            if inflate.eof:  # the frame before ended: the next one starts with what followed it
                chunk = inflate.unused_data + chunk
                if not chunk:
                    return b"", False
                inflate = self._inflate = _zstd.ZstdDecompressor()
            data = inflate.decompress(chunk, min(limit, DECODE_STEP))
        except (_zstd.ZstdError, EOFError):
            return None
        # More output may wait (asked for with b""), or another frame may have begun in this chunk.
        return data, (not inflate.eof and not inflate.needs_input) or (inflate.eof and bool(inflate.unused_data))

    def rest(self) -> bytes:
        return b""


def _brotli_usable() -> bool:
    try:
        _brotli.Decompressor().process(b"", output_buffer_limit=1)
    except Exception:
        return False  # before 1.2, its output cannot be bounded: a few bytes could inflate to gigabytes
    return True


#: Content codings read, and how.
CODINGS: Final[dict[bytes, Callable[[bytes], Inflater]]] = {b"gzip": _Zlib, b"x-gzip": _Zlib, b"deflate": _Zlib}
if _brotli is not None and _brotli_usable():
    CODINGS[b"br"] = _Brotli
if _zstd is not None:
    CODINGS[b"zstd"] = _Zstd


class DecodingReader:
    """Decompresses a body as it passes and hands the result to the reader it wraps, at most ``limit`` bytes.

    A body that is not what its ``Content-Encoding`` says, inflates past ``limit``, or one chunk of which takes more
    than MAX_READ_SECONDS to read, is read no further; the wrapped reader then finishes with what it got (a JSON
    body cut short does not parse, so it records nothing).
    """

    __slots__ = ("_inflate", "_left", "_whole", "reader")

    #: Chunks are read as they pass, never kept for later (see ``_Exchange.send``).
    holding: Final = False

    def __init__(self, reader: ResponseReader, coding: bytes, limit: int) -> None:
        self.reader = reader
        self._inflate: Inflater | None = CODINGS[coding](coding)
        self._left = limit
        #: No byte was left unread: the body was what its coding says, within the limits.
        self._whole = True

    def feed(self, chunk: bytes, now: float | None = None, shaped: bool = True) -> None:
        inflate = self._inflate
        if inflate is None or not chunk:
            return
        last: float | None = None
        spent = 0.0
        while True:
            taken = inflate.take(chunk, self._left)
            if taken is None:
                self._inflate = None
                self._whole = False
                return
            data, more = taken
            self._left -= len(data)
            if self._left <= 0:
                self._inflate = None  # past the limit (a limit of 0 would mean no limit at all to zlib)
                self._whole = False
            if data:
                try:
                    self.reader.feed(data, now)
                except ReadBudgetSpent:
                    self._inflate = None  # (nothing more is inflated, at the end either)
                    self._whole = False
                    raise
            if not more or self._inflate is None:
                return
            at = thread_time()
            if last is not None:  # (a chunk that inflates in one piece reads no clock)
                spent += min(at - last, _most(len(data)))
                if spent > MAX_READ_SECONDS:
                    self._inflate = None  # too slow to read (see MAX_READ_SECONDS)
                    self._whole = False
                    return
            last = at
            chunk = b""

    def feed_held(self, chunks: list[bytes]) -> None:
        for chunk in chunks:
            self.feed(chunk)

    def finish(self, now: float) -> None:
        inflate = self._inflate
        if inflate is not None:
            self._inflate = None
            data = inflate.rest()[: self._left]
            if data:
                try:
                    self.reader.feed(data, now)
                except ReadBudgetSpent:
                    self._whole = False  # (what it read counts, as for a chunk that spent the budget)
        self.reader.finish(now)

    def cut_short(self) -> bool:
        return self._whole and self.reader.cut_short()
