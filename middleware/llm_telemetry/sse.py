"""An incremental Server-Sent Events decoder with bounded memory.

It follows the WHATWG event-stream rules that matter for LLM APIs: lines end in LF, CRLF or CR; ``data``
lines of one event are joined with LF; ``event`` names the event; lines starting with ``:`` are comments;
a blank line dispatches. Chunks may split anything anywhere, including a CRLF pair.
"""

from __future__ import annotations

from typing import Final

#: An event larger than this is dropped (and counted) instead of growing the buffer without end.
DEFAULT_MAX_EVENT_BYTES: Final = 1024 * 1024
#: The last bytes of a dropped event that are kept (see :meth:`SSEDecoder.dropped_tail`).
TAIL_BYTES: Final = 64 * 1024

Event = tuple[str, bytes]


class SSEDecoder:
    """Decodes a byte stream into ``(event name, data)`` pairs in time linear in its size.

    Memory is bounded by ``max_event_bytes``: the partial line kept between chunks and the data lines of the
    event being assembled (each line counted with its joining newline, so empty ``data:`` lines count too) never
    exceed it; an event that would is dropped whole (``dropped_events``) and its remaining lines are skipped. The
    lines are joined as they come, in one buffer: kept as objects, a million one-byte lines would cost some forty
    times their bytes. Of the last event dropped only its name and its last TAIL_BYTES are kept
    (:meth:`dropped_tail`): an API that puts its usage at the end of a large last event can still be read.
    """

    __slots__ = (
        "_buffer",
        "_data",
        "_data_bytes",
        "_discarding",
        "_event",
        "_pending_cr",
        "_skipping",
        "_tail",
        "dropped_event",
        "dropped_events",
        "idle",
        "max_event_bytes",
    )

    def __init__(self, max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES) -> None:
        self.max_event_bytes = max_event_bytes
        self.dropped_events = 0
        #: The name of the last event dropped, and its data's last bytes so far (its data lines as they came; once
        #: an overlong line began, every byte up to the event's end, line breaks as LF).
        self.dropped_event = ""
        self._tail = bytearray()
        #: The partial line after the last line break seen (a bytearray: appends do not copy it).
        self._buffer = bytearray()
        #: The event's data lines so far, joined by newlines; ``_data_bytes`` counts one more (0: no data line yet).
        self._data = bytearray()
        self._data_bytes = 0
        #: The rest of an overlong line is being thrown away, up to its line break.
        self._discarding = False
        self._event = ""
        self._pending_cr = False
        self._skipping = False
        #: True between events (nothing buffered): the next chunk starts a fresh line.
        self.idle = True

    def feed(self, chunk: bytes) -> list[Event]:
        """Decode ``chunk`` and return the events it completes, as ``(event name, data)`` pairs."""
        if self.idle and chunk[:6] == b"data: " and chunk[-2:] == b"\n\n" and len(chunk) <= self.max_event_bytes:
            # The commonest chunk of all: one event of one ``data: `` line. It leaves the decoder idle.
            data = chunk[6:-2]
            if 0x0A not in data and 0x0D not in data:
                return [("message", data)]
        events = self._feed(chunk)
        self.idle = not (
            self._buffer or self._pending_cr or self._data_bytes or self._event or self._skipping or self._discarding
        )
        return events

    def _feed(self, chunk: bytes) -> list[Event]:
        if self.idle and len(chunk) <= self.max_event_bytes:
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
        # Only the new bytes are searched for a line break: the buffer holds none.
        cut = chunk.rfind(b"\n")
        if cut < 0:
            if self._discarding:
                self._keep(chunk)
            else:
                self._buffer += chunk
                self._check_size()
            return []
        events: list[Event] = []
        lines = chunk[:cut].split(b"\n")
        if self._discarding:
            self._discarding = False
            self._keep(lines[0])
            del lines[0]  # the end of the overlong line: not a line of its own (an empty one would end the event)
        elif self._buffer:
            self._buffer += lines[0]
            lines[0] = bytes(self._buffer)
        self._buffer = bytearray(chunk[cut + 1 :])
        for line in lines:
            self._line(line, events)
        self._check_size()
        return events

    def close(self) -> list[Event]:
        """End of stream: a last line without its newline still counts, an undispatched event does not."""
        events: list[Event] = []
        if self._buffer:
            self._line(bytes(self._buffer), events)
            self._buffer = bytearray()
        return events

    def unfinished(self) -> Event | None:
        """After :meth:`close`: the event whose data lines came but whose blank line did not (none of the SSE
        readers dispatch it), or None."""
        return (self._event or "message", bytes(self._data)) if self._data_bytes and not self._skipping else None

    def dropped_tail(self) -> bytes:
        """The last TAIL_BYTES (at most) of the last event dropped; empty when none was."""
        return bytes(self._tail[-TAIL_BYTES:])

    def _keep(self, data: bytes | bytearray) -> None:
        tail = self._tail
        tail += data
        if len(tail) > 2 * TAIL_BYTES:
            del tail[:-TAIL_BYTES]

    def _check_size(self) -> None:
        if len(self._buffer) > self.max_event_bytes:
            if not self._skipping:
                self._drop()
            elif self._tail:
                self._keep(b"\n")
            self._keep(self._buffer)
            self._buffer = bytearray()
            self._discarding = True

    def _drop(self) -> None:
        self.dropped_events += 1
        self.dropped_event = self._event or "message"
        self._tail = bytearray(self._data[-TAIL_BYTES:])
        if self._data_bytes:
            self._tail.append(0x0A)
        self._data.clear()
        self._data_bytes = 0
        self._event = ""
        self._skipping = True

    def _line(self, line: bytes, events: list[Event]) -> None:
        if not line:
            if self._skipping:
                self._skipping = False
            elif self._data_bytes:
                events.append((self._event or "message", bytes(self._data)))
            self._data.clear()
            self._data_bytes = 0
            self._event = ""
            return
        if self._skipping:
            self._keep(b"\n" + line[-TAIL_BYTES:])
            return
        if len(line) > self.max_event_bytes:
            # The same bound as on a partial line kept between chunks, so the chunking never changes the outcome.
            self._drop()
            self._keep(line[-TAIL_BYTES:])
            return
        if line[0] == 0x3A:  # ':' starts a comment
            return
        field, sep, value = line.partition(b":")
        if sep and value[:1] == b" ":
            value = value[1:]
        if field == b"data":
            size = self._data_bytes + len(value) + 1
            if size > self.max_event_bytes:
                # (_drop puts the LF that joins this line to the ones before in the tail.)
                self._drop()
                self._keep(value[-TAIL_BYTES:])
            else:
                if self._data_bytes:
                    self._data.append(0x0A)
                self._data_bytes = size
                self._data += value
        elif field == b"event":
            self._event = value.decode("utf-8", "replace")


def _whole_events(chunk: bytes) -> list[Event] | None:
    """The common case, decoded without line-by-line work: a chunk of whole events, each one optional
    ``event:`` line and one ``data:`` line, LF-terminated. Anything else returns None for the general path."""
    # (Byte values searched with ``in`` are a memchr; a bytes needle costs several times more in CPython.)
    if not chunk.endswith(b"\n\n") or 0x0D in chunk:
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
        if not block.startswith(b"data:") or 0x0A in block:
            return None
        data = block[5:]
        if data[:1] == b" ":
            data = data[1:]
        events.append((name, data))
    return events
