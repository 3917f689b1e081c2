"""An incremental Server-Sent Events decoder with bounded memory.

It follows the WHATWG event-stream rules that matter for LLM APIs: lines end in LF, CRLF or CR; ``data``
lines of one event are joined with LF; ``event`` names the event; lines starting with ``:`` are comments;
a blank line dispatches. Chunks may split anything anywhere, including a CRLF pair.
"""

from __future__ import annotations

from typing import Final

#: An event larger than this is dropped (and counted) instead of growing the buffer without end.
DEFAULT_MAX_EVENT_BYTES: Final = 1024 * 1024

Event = tuple[str, bytes]


class SSEDecoder:
    __slots__ = (
        "_buffer",
        "_data",
        "_event",
        "_pending_cr",
        "_skipping",
        "dropped_events",
        "idle",
        "max_event_bytes",
    )

    def __init__(self, max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES) -> None:
        self.max_event_bytes = max_event_bytes
        self.dropped_events = 0
        self._buffer = b""
        self._data: list[bytes] = []
        self._event = ""
        self._pending_cr = False
        self._skipping = False
        #: True between events (nothing buffered): the next chunk starts a fresh line.
        self.idle = True

    def feed(self, chunk: bytes) -> list[Event]:
        """Decode ``chunk`` and return the events it completes, as ``(event name, data)`` pairs."""
        events = self._feed(chunk)
        self.idle = not (self._buffer or self._pending_cr or self._data or self._event or self._skipping)
        return events

    def _feed(self, chunk: bytes) -> list[Event]:
        if (
            not self._buffer
            and not self._pending_cr
            and not self._data
            and not self._event
            and not self._skipping
            and len(chunk) <= self.max_event_bytes
        ):
            fast = _whole_events(chunk)
            if fast is not None:
                return fast
        if self._pending_cr:
            # A CR ended the previous chunk; a LF starting this one belongs to the same line break.
            self._pending_cr = False
            if chunk[:1] == b"\n":
                chunk = chunk[1:]
        if b"\r" in chunk:
            if chunk.endswith(b"\r"):
                self._pending_cr = True
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        if self._buffer:
            chunk = self._buffer + chunk
        cut = chunk.rfind(b"\n")
        if cut < 0:
            self._buffer = chunk
            self._check_size()
            return []
        self._buffer = chunk[cut + 1 :]
        self._check_size()
        events: list[Event] = []
        for line in chunk[:cut].split(b"\n"):
            self._line(line, events)
        return events

    def close(self) -> list[Event]:
        """End of stream: a last line without its newline still counts, an undispatched event does not."""
        events: list[Event] = []
        if self._buffer:
            self._line(self._buffer, events)
            self._buffer = b""
        return events

    def _check_size(self) -> None:
        if len(self._buffer) > self.max_event_bytes:
            self._buffer = b""
            self._drop()

    def _drop(self) -> None:
        self.dropped_events += 1
        self._data = []
        self._event = ""
        self._skipping = True

    def _line(self, line: bytes, events: list[Event]) -> None:
        if not line:
            if self._skipping:
                self._skipping = False
            elif self._data:
                events.append((self._event or "message", b"\n".join(self._data)))
            self._data = []
            self._event = ""
            return
        if self._skipping or line[0] == 0x3A:  # ':' starts a comment
            return
        field, sep, value = line.partition(b":")
        if sep and value[:1] == b" ":
            value = value[1:]
        if field == b"data":
            self._data.append(value)
            if sum(map(len, self._data)) > self.max_event_bytes:
                self._drop()
        elif field == b"event":
            self._event = value.decode("utf-8", "replace")


def _whole_events(chunk: bytes) -> list[Event] | None:
    """The common case, decoded without line-by-line work: a chunk of whole events, each one optional
    ``event:`` line and one ``data:`` line, LF-terminated. Anything else returns None for the general path."""
    if not chunk.endswith(b"\n\n") or b"\r" in chunk:
        return None
    events: list[Event] = []
    for block in chunk[:-2].split(b"\n\n"):
        name = "message"
        if block.startswith(b"event:"):
            head, sep, block = block.partition(b"\n")
            if not sep:
                return None
            value = head[6:]
            if value[:1] == b" ":
                value = value[1:]
            name = value.decode("utf-8", "replace") or "message"
        if not block.startswith(b"data:") or b"\n" in block:
            return None
        data = block[5:]
        if data[:1] == b" ":
            data = data[1:]
        events.append((name, data))
    return events
