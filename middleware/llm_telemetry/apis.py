"""Readers for the LLM HTTP APIs: request bodies, JSON responses and SSE streams.

Each API has one :class:`API` that fills an :class:`~llm_telemetry.record.LLMCall`. Response readers see
the body incrementally and keep bounded state: an SSE stream is decoded event by event, a JSON body is kept
up to a cap and read once at the end.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from collections.abc import Callable, Iterator, Mapping
from itertools import repeat
from json.scanner import make_scanner
from operator import itemgetter
from time import perf_counter, thread_time
from typing import Any, Final, TypeAlias

from .errors import classify_error_body
from .labels import field_text, name_text
from .record import MAX_SVG_ITEMS, UNTIMED_OPERATION, LLMCall, SubUsage, ToolResult
from .sse import TAIL_BYTES, SSEDecoder

#: Reading one response's event stream may take this long (the reading thread's CPU time, added up over the chunks
#: read in full: the shortcuts for plain text deltas are not timed, and cost well under a microsecond each) plus
#: READ_BUDGET_SHARE of the rest of the time the response has taken so far; past that, the rest of it is not read
#: (see ReadBudgetSpent).
#: A real stream's text deltas take the shortcut, one to a chunk; a proxy that cuts the stream into chunks of its own
#: size has every chunk read in full, about 2 µs an event (100,000 deltas in 8 KiB pieces: 0.2 s, sent at once as a
#: cache might replay them; minutes apart, as a model writes them, they have the share of that time as well).
#: Millions of empty events sent in many chunks (or inflated from a little gzip) cost tens of seconds, which no
#: chunk alone reached.
READ_BUDGET_SECONDS: Final = 0.5
READ_BUDGET_SHARE: Final = 0.1
#: The most one chunk's reading adds to that time: a millisecond and 3 µs a byte, several times the costliest events
#: tried (``data`` lines without a colon, each an empty event: 0.65 µs a byte).
_MOST_PER_CHUNK: Final = 0.001
_MOST_PER_BYTE: Final = 3e-6
#: Deltas of a stream counted since its text-delta shape was learnt after which a whole-event delta that misses the
#: shape is learnt from instead (see ResponseReader._relearn). A stream whose deltas differ from each other (an id per
#: chunk) misses on 4 chunks out of 5 even so: it stops trying a shape (over 8 misses, see ResponseReader.feed) after
#: a dozen chunks, as it did after 9.
_RELEARN_AFTER: Final = 4


class ReadBudgetSpent(Exception):
    """Raised by a reader once reading its response has taken more than its budget (``READ_BUDGET_SECONDS``): the
    caller reads no further, and the reader still finishes with what it read."""


#: Non-streamed response bodies larger than this are passed through without being read, but for their usage, read
#: from their last TAIL_BYTES (see :func:`usage_in_tail`).
MAX_JSON_RESPONSE_BYTES: Final = 8 * 1024 * 1024
#: Error bodies are small; only this much is kept to classify them.
MAX_ERROR_BODY_BYTES: Final = 64 * 1024
#: What a request keeps of its body, and of its JSON answer, without counting it against the process's budget of bytes
#: kept to be read (``max_inspected_bytes``): the server holds about as much per connection itself (uvicorn's flow
#: control mark), and the common small request and answer so never touch the budget's lock.
UNCOUNTED_BYTES: Final = 64 * 1024
#: Distinct finish reasons kept per call (a response has one per choice; a stream cannot grow the list past this).
MAX_FINISH_REASONS: Final = 16
#: Choices whose text is kept apart for a span when content capture is on (``n`` asks for several): later ones are
#: not shown.
MAX_CAPTURED_CHOICES: Final = 16
#: Tool calls counted per response (models make a few at a time; a stream cannot grow the list past this).
MAX_TOOL_CALLS: Final = 1024
#: Generated text kept for a span when content capture is on, in characters: the span shows at most
#: ``capture_content_max_chars`` of it, and a response that never ends must not grow the memory it takes.
MAX_KEPT_TEXT_CHARS: Final = 1 << 18
#: Largest count taken from a body (tokens, max_tokens): beyond it the value is not a count but an attack.
_MAX_COUNT: Final = 2**53


def loads(data: bytes | bytearray | str) -> Any:
    """Parse JSON from a client or the app, or None: never raises. Invalid JSON and JSON nested deeper than
    the interpreter's recursion limit (``RecursionError`` from the parser, about 1,000 levels) are not read."""
    try:
        if data[:1] in _OPENERS and data[1:2] not in (b"", b"\0"):
            # UTF-8 for sure (no BOM, no NUL byte of UTF-16/32), so decoded as json.loads would decode it,
            # without its encoding detection; and since it starts with the value, it goes straight to the
            # decoder's scanner, which is what json.loads ends in (same values, same errors), then only
            # whitespace may follow.
            text = data.decode("utf-8", "surrogatepass")  # type: ignore[union-attr]
            value, end = _scan(text, 0)
            if end != len(text) and _WHITESPACE.match(text, end).end() != len(text):  # type: ignore[union-attr]
                return None  # "extra data", as json.loads says
            return value
        return json.loads(data)
    except (ValueError, RecursionError, StopIteration):
        return None


#: First bytes of a JSON object or array: with a non-NUL second byte, the encoding can only be UTF-8.
_OPENERS: Final = (b"{", b"[")
#: The scanner of json's default decoder (the C one when available), and the whitespace json allows after a value.
_scan: Final = make_scanner(json.JSONDecoder())  # type: ignore[arg-type]  # typeshed types it as its own class
_WHITESPACE: Final = re.compile(r"[ \t\n\r]*")


#: A ``usage`` member whose value is an object. In valid JSON an unescaped quote cannot be inside a string, so each
#: match is a member's name, wherever in a document the bytes searched begin.
_USAGE_MEMBER: Final = re.compile(rb'"usage"[ \t\n\r]*:[ \t\n\r]*(?=\{)')
#: A response's ``tool_usage`` member (the Responses API's hosted tools' usage, apart from its ``usage``).
_TOOL_USAGE_MEMBER: Final = re.compile(rb'"tool_usage"[ \t\n\r]*:[ \t\n\r]*(?=\{)')
#: An SVG image's ``svg_usage`` member (the tokens of the model that wrote it, apart from the image's usage): an images
#: answer's, or a Responses answer's ``image_generation_call`` item's.
_SVG_USAGE_MEMBER: Final = re.compile(rb'"svg_usage"[ \t\n\r]*:[ \t\n\r]*(?=\{)')
_USAGE_COUNTS: Final = ("input_tokens", "output_tokens", "prompt_tokens", "completion_tokens")
#: An object's end, then a line break, then another value's start: never inside one JSON document (an object's next
#: value follows a comma, and a string holds no raw line break), but how JSON Lines separates its records (a batch's
#: results, a gateway's log of answers), each of which may carry a usage of its own.
_RECORD_BREAK: Final = re.compile(rb"\}[ \t]*[\r\n][ \t\r\n]*[\{\[]")


def usage_in_tail(tail: bytes | bytearray) -> dict[str, Any] | None:
    """The usage object in the last bytes of a JSON document too large to read whole: the last ``"usage": {...}``
    member found complete in ``tail`` whose object holds a token count, or None. Each API puts its usage after the
    output (OpenAI's chat completions, embeddings and Responses, Anthropic's messages), which is what makes a large
    body large (images, long texts, embeddings). None for a tail that is not of one JSON document but of several, one
    a line (JSON Lines labelled as JSON): the last record's usage is not the answer's."""
    for value in _members_in_tail(tail, _USAGE_MEMBER):
        if any(_int(value.get(key)) is not None for key in _USAGE_COUNTS):
            return value
    return None


def _members_in_tail(tail: bytes | bytearray, member: re.Pattern[bytes], most: int = 8) -> Iterator[dict[str, Any]]:
    """The objects of the last (up to ``most``) ``member`` members found complete in ``tail``, the last first (none in
    a tail of several JSON documents: see :func:`usage_in_tail`)."""
    if _RECORD_BREAK.search(tail):
        return
    starts = [match.end() for match in member.finditer(tail)]
    for start in reversed(starts[-most:]):
        try:
            value, _ = _scan(bytes(tail[start:]).decode("utf-8", "replace"), 0)
        except (ValueError, RecursionError, StopIteration):
            continue
        if isinstance(value, dict):
            yield value


#: What a reader keeps per choice when content capture is off: nothing (shared, never written to).
_NONE_KEPT: Final[dict[int, str]] = {}
_NO_CHOICES: Final[list[int]] = []


def _int(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= _MAX_COUNT:
        return value
    return None


def _cache_writes(details: Any, usage: dict[str, Any]) -> int | None:
    """Prompt-cache writes in an OpenAI-shaped usage (part of its prompt or input tokens, as cached reads are):
    OpenAI's API reports them as ``cache_write_tokens``, and so do gateways in front of a provider that bills them.
    The LiteLLM proxy sends ``cache_creation_tokens`` (chat) or ``cache_write_tokens`` (Responses) in the details and
    ``cache_creation_input_tokens`` beside them; OpenRouter ``cache_write_tokens``."""
    if isinstance(details, dict):
        for key in ("cache_creation_tokens", "cache_write_tokens"):
            found = _int(details.get(key))
            if found is not None:
                return found
    return _int(usage.get("cache_creation_input_tokens"))


def _parts(total: int | None, first: Any, second: Any) -> tuple[int | None, int | None]:
    """Two counts a usage's details give as parts of ``total`` (the audio and the image tokens of a prompt, say),
    each cut to what is left of it: the first to the total, the second to what the first leaves. None for a count not
    reported (or not a count), and for both when the total is not: a part of an unknown whole is priced as nothing
    apart. A server's details that add up to more than its total (a gateway's sum of its own) so never price more
    tokens than it reported."""
    if total is None:
        return None, None
    part = _int(first)
    if part is not None and part > total:
        part = total
    other = _int(second)
    if other is not None:
        rest = total - (part or 0)
        if other > rest:
            other = rest
    return part, other


def _num(value: Any) -> float | None:
    if isinstance(value, float) and math.isfinite(value):
        return value
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) <= _MAX_COUNT:
        return float(value)
    return None


def _str(value: Any) -> str | None:
    """A non-empty string from a body, made safe for labels, logs and spans (see labels.py)."""
    return field_text(value) if isinstance(value, str) and value else None


def _name(value: Any) -> str | None:
    """A model name from a body, as ``_str`` makes any string, but with a secret key its cut goes through masked
    whole (see labels.name_text)."""
    return name_text(value) if isinstance(value, str) and value else None


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _get(obj: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(key)
    return obj


#: Events that end a stream's answer, by their type.
_LAST_EVENTS: Final = frozenset(
    ("message_stop", "response.completed", "response.incomplete", "response.failed", "error")
)


def _says_error(event: str, data: bytes) -> bool:
    """Whether an event's data is an error: an ``error`` member, or an error event of the Messages or Responses API."""
    obj = loads(data)
    if not isinstance(obj, dict):
        return False
    kind = obj.get("type") or event
    return bool(obj.get("error")) or (type(kind) is str and kind in ("error", "response.failed"))


def _ends_answer(event: str, data: bytes) -> bool:
    """Whether an event's data ends the answer: OpenAI's ``[DONE]``, a finish or stop reason, a closing event of
    the Messages or Responses API, an error."""
    if data.startswith(b"[DONE]"):
        return True
    obj = loads(data)
    if not isinstance(obj, dict):
        return False
    kind = obj.get("type") or event
    if (type(kind) is str and kind in _LAST_EVENTS) or obj.get("error"):
        return True
    delta, choices = obj.get("delta"), obj.get("choices")
    if isinstance(delta, dict) and delta.get("stop_reason"):
        return True
    return isinstance(choices, list) and any(isinstance(c, dict) and c.get("finish_reason") for c in choices)


def _add_finish_reason(call: LLMCall, reason: Any, index: int = 0) -> None:
    """A finish reason read, of choice ``index``. A choice's later finish replaces its earlier one (see
    ``LLMCall.add_choice_finish``), in the reasons counted too unless another choice has the earlier one."""
    if isinstance(reason, str) and reason:
        reason = field_text(reason)
        earlier = call.choice_finishes.get(index) if call.choice_finishes else None
        call.add_choice_finish(index, reason)
        reasons = call.finish_reasons
        if earlier is not None and earlier != reason and earlier in reasons:
            if earlier not in call.choice_finishes.values():  # type: ignore[union-attr]
                reasons.remove(earlier)
        if len(reasons) < MAX_FINISH_REASONS and reason not in reasons:
            reasons.append(reason)


def _is_tool_item(item: dict[str, Any]) -> bool:
    """Whether a Responses API output item is a tool call (its ``type`` a string naming one)."""
    kind = item.get("type")
    return type(kind) is str and kind in _RESPONSES_TOOL_ITEMS


def _tool_item_name(item: dict[str, Any]) -> str | None:
    """The tool a Responses API tool call item calls (see ``_RESPONSES_TOOL_ITEMS``), or None (no tool call, or one
    whose name is missing)."""
    kind = item.get("type")
    if type(kind) is not str or kind not in _RESPONSES_TOOL_ITEMS:
        return None
    return _RESPONSES_TOOL_ITEMS[kind] or _str(item.get("name"))


def _add_tool_call(call: LLMCall, name: str, call_id: Any = None, hosted: str | None = None) -> None:
    if len(call.tool_calls) < MAX_TOOL_CALLS:
        call.add_tool_call(name, call_id, hosted)


#: Responses API items of the tools OpenAI runs itself, by the kind of tool each calls (a tool search may be left to
#: the client, ``execution: client``; a shell is the API's when it runs in the API's container, see hosted_shell): a
#: ``program`` is the JavaScript the model wrote for programmatic tool calling (the tool of type
#: ``programmatic_tool_calling``), which the API runs, its result a ``program_output`` item of the API's. (Tracing
#: shows them, in an answer and sent back, by the same table.)
RESPONSES_HOSTED_ITEMS: Final = {
    "web_search_call": "web_search",
    "file_search_call": "file_search",
    "code_interpreter_call": "code_interpreter",
    "image_generation_call": "image_generation",
    "mcp_call": "mcp",
    "tool_search_call": "tool_search",
    "program": "programmatic_tool_calling",
}
#: Responses API items that carry the result of a tool the API may run, by that tool's kind: a tool search's (when
#: ``execution: server``), a program's, a shell's (when its call ran in the API's container). The results of its other
#: tools come in their call's item.
RESPONSES_HOSTED_OUTPUTS: Final = {
    "tool_search_output": "tool_search",
    "program_output": "programmatic_tool_calling",
    "shell_call_output": "shell",
}


def hosted_shell(item: Mapping[str, Any]) -> bool:
    """Whether a Responses API item is a call of the shell tool the API runs in its own container (the tool's
    ``container_auto`` environment: its calls name a ``container_reference``), not the application."""
    environment = item.get("environment")
    return (
        item.get("type") == "shell_call"
        and isinstance(environment, Mapping)
        and environment.get("type") == "container_reference"
    )


def _server_output(item: dict[str, Any], call: LLMCall) -> None:
    """Record a Responses API output item of an answer that is the result of a tool the API ran (a tool search it ran,
    ``execution: server``; a program's, ``program_output``; a shell's it ran in its container, after that call in the
    answer), to be shown after its call, as Anthropic's result blocks of the tools it runs are (a web search's, an MCP
    call's and the code interpreter's come in their call's item); any other item is left."""
    kind = item.get("type")
    hosted = RESPONSES_HOSTED_OUTPUTS.get(kind) if type(kind) is str else None
    call_id = item.get("call_id")
    if (
        hosted is None
        or (kind == "tool_search_output" and item.get("execution") != "server")
        or (
            kind == "shell_call_output"
            and not (isinstance(call_id, str) and (call_id[:256], "shell") in (call.tool_call_ids or ()))
        )
    ):
        return
    if not call_id:
        # (A tool search's ``call_id`` may be null: its result answers the first call of it the answer has left
        # unanswered, as outputs follow their calls in order; tracing._conversation links those sent back alike.)
        answered = {answer for answer, _ in call.server_tool_results or ()}
        call_id = next(
            (made for made, tool in call.tool_call_ids or () if tool == hosted and made not in answered),
            item.get("id"),
        )
    call.add_server_tool_result(call_id, hosted)


def _hosted_item(item: dict[str, Any]) -> str | None:
    """The kind of hosted tool a Responses API output item calls (``web_search``, ``mcp``, a shell in the API's
    container), or None."""
    kind = item.get("type")
    if type(kind) is not str:
        return None
    if kind == "tool_search_call":
        return "tool_search" if item.get("execution") != "client" else None
    if kind == "shell_call":
        return "shell" if hosted_shell(item) else None
    return RESPONSES_HOSTED_ITEMS.get(kind)


#: Tool names of the Responses API's recent function calls, by ``call_id``, for the process: a conversation continued
#: with ``previous_response_id`` sends only the tool outputs, whose call the response before it made (served by this
#: process, most often; by another worker, the name stays unknown).
RECENT_TOOL_CALLS: Final = 4096
_recent_tool_calls: dict[str, str] = {}


def _remember_tool_call(item: dict[str, Any], name: str) -> None:
    call_id = item.get("call_id")
    if type(call_id) is str and 0 < len(call_id) <= 256:
        recent = _recent_tool_calls
        if len(recent) >= RECENT_TOOL_CALLS:
            with contextlib.suppress(StopIteration, KeyError, RuntimeError):
                del recent[next(iter(recent))]  # the oldest (dicts keep insertion order)
        recent[call_id] = name


#: How an event stream's first line starts (after whitespace); a JSON body starts with none of these.
_SSE_FIELDS: Final = (b"data:", b"event:", b"id:", b"retry:", b":")
#: The UTF-8 byte order mark an event stream may start with (before its first line; the SSE standard skips it).
_BOM: Final = b"\xef\xbb\xbf"


class ResponseReader:
    """Reads one response body; subclasses implement ``_on_event`` (streams) or ``_on_json`` (JSON)."""

    __slots__ = (
        "_buffer",
        "_choices_full",
        "_chunks",
        "_closed",
        "_decoder",
        "_ends",
        "_fast",
        "_finishes",
        "_inner",
        "_kept_chars",
        "_learnt",
        "_misses",
        "_overflow",
        "_pending",
        "_shape",
        "_shortcuts",
        "_spent",
        "_text",
        "_text_chars",
        "_tool_choices",
        "call",
        "capture",
        "hold",
    )

    #: Where a plain text delta's text value starts (the text itself varies from chunk to chunk).
    _TEXT_KEYS: tuple[bytes, ...] = ()
    #: Whether this API's reader has once-per-stream shortcuts: an event before the first token may be set aside,
    #: to be read only if the next parsed event does not prove it redundant (see :meth:`_same_head`), and the
    #: stream's last events may be read by templates learnt from its first token (see :meth:`_learn_ends`).
    _DEFERS = False

    def __init__(self, call: LLMCall, *, stream: bool, capture: bool = False, shortcuts: bool = True) -> None:
        self.call = call
        self.capture = capture
        #: Whether this reader's once-per-stream shortcuts are on (see ``_DEFERS``). Off, every event before the
        #: first token and every last event is parsed in full; the per-chunk shortcuts stay either way.
        self._shortcuts = shortcuts and self._DEFERS
        self._decoder = SSEDecoder() if stream else None
        self._buffer = bytearray()
        self._overflow = False
        #: Asked before a JSON body's bytes past its first UNCOUNTED_BYTES are kept, with their count: False when the
        #: process's budget for bytes kept to be read has no room (read then as a body over MAX_JSON_RESPONSE_BYTES
        #: is); a negative count gives freed bytes back. None: no budget (see the middleware's ``_Exchange.hold``).
        self.hold: Callable[[int], bool] | None = None
        #: The generated text kept for the span (content capture on), by choice index; None when capture is off.
        self._text: dict[int, list[str]] | None = {} if capture else None
        #: Each choice's finish reason, by index (kept with the text, for the span's output messages).
        self._finishes: dict[int, str] = {} if capture else _NONE_KEPT  # (written to only when capturing)
        #: The choice each tool call counted was made in (content capture on; the chat API's ``n`` choices).
        self._tool_choices: list[int] = [] if capture else _NO_CHOICES
        #: Characters in ``_text`` (kept up to MAX_KEPT_TEXT_CHARS).
        self._kept_chars = 0
        #: Whether MAX_CAPTURED_CHOICES choices are kept (content capture on): no other choice's text or finish is.
        self._choices_full = False
        #: Deltas seen that carry output (see OpenAIChatReader._on_event): the output-token estimate when a stream
        #: reports no usage.
        self._chunks = 0
        #: Characters of generated text in a JSON response, for the estimate when it has no usage block.
        self._text_chars = 0
        #: (bytes before the text, bytes after it, their lengths, None) of a whole-chunk plain text delta of this
        #: stream; for a delta that ends in an obfuscation member (see ``_split_shape``), the bytes after its value,
        #: and the bytes between the text and the value instead of None.
        self._shape: _Shape | None = None
        #: ``_shape`` while the decoder is between events (the only time it applies), else None.
        self._fast: _Shape | None = None
        #: ``_shape`` for an event's data alone (without its ``event:`` and ``data:`` fields and its blank line): an
        #: event of a chunk that is not one whole event (a proxy's re-chunking) is of the shape when its data is.
        self._inner: _Shape | None = None
        self._misses = 0
        #: ``_chunks`` when ``_shape`` was learnt (see ``_RELEARN_AFTER``).
        self._learnt = 0
        #: (event, data, time) of an event set aside before the first token, read (or found redundant) later.
        self._pending: tuple[str, bytes, float] | None = None
        #: How the end of this stream looks, learnt from its first token (see ``_learn_ends``), or None: the bytes
        #: of its finish event before and after the finish reason (up to an obfuscation value, when the events end
        #: with one), the bytes of its usage event before the usage value, where those start to differ from the
        #: first token's, and whether its events end with an obfuscation member.
        self._ends: _Ends | None = None
        #: The stream's closing event came: OpenAI's ``[DONE]``, one of ``_LAST_EVENTS`` (``message_stop``, the
        #: Responses API's ``response.completed`` and the like).
        self._closed = False
        #: Seconds spent reading this stream's chunks in full (see READ_BUDGET_SECONDS).
        self._spent = 0.0

    def feed(self, chunk: bytes, now: float | None = None, shaped: bool = True) -> None:
        """Read the next piece of the body; ``now`` is when the app sent it (read from the clock when None, and
        only when this chunk needs a time). ``shaped=False``: the chunk is known not to be of the learnt shape."""
        if self._fast is not None:
            # Hot path: a chunk shaped exactly like an earlier plain text delta of this stream is another one.
            if shaped and self._shaped(chunk):
                self._chunks += 1
                return
            self._misses += 1
            if self._misses > 8:
                self._shape = None  # this stream's chunks vary (e.g. sequence numbers): stop trying
        decoder = self._decoder
        if decoder is not None and chunk == b"data: [DONE]\n\n" and decoder.idle:
            # OpenAI's last event, alone in its chunk: nothing to learn from it but the end, and the decoder stays idle.
            self._fast = self._shape
            self._closed = True
            return
        if now is None:
            now = perf_counter()
        if decoder is not None:
            started = thread_time()
            was_idle = decoder.idle
            events = decoder.feed(chunk)
            # A shape is learnt only from a chunk that is exactly one event: it starts and ends between events.
            # (A chunk with one event and the head of the next would teach a shape that later swallows heads.)
            whole = was_idle and decoder.idle and len(events) == 1
            for event, data in events:
                if self._event(event, data, now) and whole:
                    if self._shape is None and not self._misses:
                        self._shape = shape = self._shape_of(chunk, data)
                        self._learnt = self._chunks
                        if shape is not None and self._inner is None:
                            self._inner = _inner_shape(shape, chunk, data)
                    elif self._shape is not None and self._chunks - self._learnt > _RELEARN_AFTER:
                        self._relearn(chunk, data)
            # The shape applies only to a chunk that starts between events (nothing buffered in the decoder).
            self._fast = self._shape if decoder.idle else None
            # This thread's CPU time: waiting for the interpreter while another thread holds it, or in a throttled
            # container, spends none. A garbage collection does, and one inside this chunk's reading counts no more
            # than reading the chunk itself can cost: the budget is for the many chunks of costly junk, and one
            # pause must not cut a real stream short.
            spent = self._spent + min(thread_time() - started, _MOST_PER_CHUNK + len(chunk) * _MOST_PER_BYTE)
            self._spent = spent
            if spent > READ_BUDGET_SECONDS:
                self._over_budget(spent)
        elif not self._buffer and not self._overflow and chunk.removeprefix(_BOM).lstrip().startswith(_SSE_FIELDS):
            # (Only the body's first bytes say: past an overflow the buffer is empty again, mid-body.)
            # An event stream labelled as JSON (Litestar does, for a handler typed to return Any) or as text: the
            # SDKs read it as a stream whatever the label, and so do we. A JSON body starts with neither of these.
            self._decoder = SSEDecoder()
            self.call.stream = True
            self.feed(chunk, now, shaped)
        elif not self._overflow:
            if not self._buffer and (not (lead := chunk.removeprefix(_BOM)) or lead.isspace()):
                # Blank lines or a byte order mark before the body's first bytes, in chunks of their own: left out,
                # so that the next chunk is still the body's start above (an event stream's, maybe); a JSON value
                # reads the same without them.
                return
            hold = self.hold
            kept = len(self._buffer)
            size = kept + len(chunk)
            if size > MAX_JSON_RESPONSE_BYTES or (
                hold is not None and size > UNCOUNTED_BYTES and not hold(size - max(kept, UNCOUNTED_BYTES))
            ):
                # Too large to read, or no room left to keep it: only the body's last bytes are kept from now on,
                # for its usage (a small tail, not counted against the budget: the bytes counted are given back).
                self._overflow = True
                if hold is not None and kept > UNCOUNTED_BYTES:
                    hold(UNCOUNTED_BYTES - kept)
                self._buffer = bytearray((self._buffer + chunk)[-TAIL_BYTES:])
            else:
                self._buffer += chunk
        else:
            tail = self._buffer
            tail += chunk
            if len(tail) > 2 * TAIL_BYTES:
                del tail[:-TAIL_BYTES]

    def let_go(self) -> bool:
        """Keep only the last bytes of a JSON body from now on, for its usage, and give back what was counted of the
        rest: it is then read as a body past the budget is (see the middleware's ``_Exchange.let_go``). Whether it
        gave any back."""
        kept = len(self._buffer)
        if self._decoder is not None or self._overflow or kept <= UNCOUNTED_BYTES:
            return False
        self._overflow = True
        self._buffer = bytearray(self._buffer[-TAIL_BYTES:])
        hold = self.hold
        if hold is not None:
            hold(UNCOUNTED_BYTES - kept)
        return True

    @property
    def closed(self) -> bool:
        """Whether the stream came to its closing event (``[DONE]``, ``message_stop``, ``response.completed``...)."""
        return self._closed

    @property
    def holding(self) -> bool:
        """Whether the next chunks can be kept and read later with :meth:`feed_held`: a text-delta shape is
        known (so the first token's time is too) and the decoder is between events."""
        return self._fast is not None

    def cut_short(self) -> bool:
        """Whether a stream this reader read whole (after :meth:`finish`) ended before its end: no finish reason,
        no error and no closing event. An event too large to read might have held any of them: then False. So
        does a last event that came without its blank line (a server that leaves it out, which no SSE reader
        dispatches): what its data says decides."""
        decoder = self._decoder
        if decoder is None or decoder.dropped_events or self._closed:
            return False
        call = self.call
        if call.finished_choices(call.stream_choices) or call.error_type is not None:
            return False  # (a finish reason for each choice the stream had: a server may ignore ``n``)
        last = decoder.unfinished()
        return last is None or not _ends_answer(*last)

    def _relearn(self, chunk: bytes, data: bytes) -> None:
        """Learn the shape again from ``chunk``, one whole event whose data (``data``) is a text delta with nothing
        else in it (parsed: see :meth:`_text_only`), which missed the shape after the shape had served: the bytes
        of a stream's deltas that change now and then outside their text (llama.cpp's and TGI's ``created``, a
        second's clock; the thinking before an Anthropic answer's text) are of a shape again from then on, where
        they were parsed to the end of the stream. The miss it made is not held against the stream."""
        shape = self._shape_of(chunk, data)
        if shape is not None:
            self._shape = shape
            self._learnt = self._chunks
            self._inner = _inner_shape(shape, chunk, data)
            self._misses -= 1

    def _over_budget(self, spent: float) -> None:
        """Raise ReadBudgetSpent when ``spent`` is over the budget: READ_BUDGET_SECONDS and a share of the time the
        response took otherwise (a stream that lasts minutes may read for longer than one sent all at once)."""
        taken = perf_counter() - self.call.start - spent
        if spent > READ_BUDGET_SECONDS + READ_BUDGET_SHARE * taken:
            self._fast = self._shape = self._inner = None
            raise ReadBudgetSpent

    def feed_held(self, chunks: list[bytes]) -> None:
        """Read chunks that arrived one after another while :attr:`holding`, exactly as :meth:`feed` would one by
        one. Runs of chunks of the learnt shape are checked together with a few C-level operations (joins, one
        comparison, byte scans) instead of per chunk; chunks of another shape are fed one by one."""
        hi = len(chunks)
        # The end of a stream (finish reason, usage, [DONE]) has other shapes: peeled off first (each tested
        # without side effects), so the run before it is checked in one pass.
        fast = self._fast
        while hi and len(chunks) - hi < 8 and not self._shaped(chunks[hi - 1]):
            hi -= 1
        self._held_run(chunks, 0, hi)
        # Those are not of the shape, unless it was learnt again from one of them (see _relearn): then the ones
        # after it are tried on the new shape.
        for chunk in chunks[hi:]:
            self.feed(chunk, None, self._fast is not fast)

    def _held_run(self, chunks: list[bytes], lo: int, hi: int) -> None:
        fast = self._fast
        if fast is not None and hi - lo > 1:
            if self._run_shaped(fast, chunks[lo:hi] if lo or hi < len(chunks) else chunks):
                self._chunks += hi - lo
                return
            if hi - lo >= 8:
                middle = (lo + hi) // 2
                self._held_run(chunks, lo, middle)
                self._held_run(chunks, middle, hi)
                return
        for i in range(lo, hi):
            self.feed(chunks[i])

    def _run_shaped(self, fast: _Shape, run: list[bytes]) -> bool:
        """Whether every chunk of ``run`` is of the learnt shape ``fast``, as :meth:`_shaped` would say of each."""
        if fast[4] is not None:
            return _obfuscated_run(fast, run)
        head, tail, start, tail_length, _ = fast
        # Each chunk's text is what lies between the shape's head and tail lengths. The run is of the shape exactly
        # when putting every text back between a head and a tail rebuilds the run byte for byte (the lengths line
        # up, so every chunk is its own head, text and tail) and every text is non-empty.
        texts = list(map(itemgetter(slice(start, -tail_length)), run))
        if all(texts) and head + (tail + head).join(texts) + tail == b"".join(run):
            return _unescaped(b"".join(texts)) or all(map(_JSON_TEXT.fullmatch, texts))
        return False

    def _shaped(self, chunk: bytes) -> bool:
        """Whether ``chunk`` is of the learnt text-delta shape (see ``_fits``)."""
        fast = self._fast
        return fast is not None and _fits(fast, chunk)

    def finish(self, now: float) -> None:
        if self._decoder is not None:
            if self._pending is not None:
                self._read_pending(self._pending)
            decoder = self._decoder
            for event, data in decoder.close():
                self._event(event, data, now)
            last = decoder.unfinished()
            if last is not None and self.call.error_type is None and _says_error(*last):
                # An error event whose blank line never came: no SSE reader dispatches it, so the client's SDK raises
                # nothing and its stream just stops; but the server said it failed, and how.
                self._event(*last, now)
            if self._pending is not None:
                # Set aside just now, with no later event to prove it redundant (an error before the first token
                # looks like the role chunk that opens a stream): read.
                self._read_pending(self._pending)
            if decoder.dropped_events and self.call.input_tokens is None and self.call.output_tokens is None:
                tail = decoder.dropped_tail()
                usage = usage_in_tail(tail)
                if usage is not None:
                    self._on_tail(tail)
                    self._on_dropped(decoder.dropped_event, usage)
            if self.call.output_tokens is None and self._chunks:
                self.call.output_tokens = self._chunks
                self.call.usage_source = "estimated"
        elif self._overflow:
            usage = usage_in_tail(self._buffer)
            if usage is not None:
                self._on_tail(self._buffer)
            self._buffer = bytearray()
            if usage is not None:
                self._on_json({"usage": usage})
        elif self._buffer:
            # Not JSON after all (or nested too deep): the client gets it as it is, we learn nothing from it.
            obj = loads(self._buffer)
            self._buffer = bytearray()
            if isinstance(obj, dict):
                self._on_json(obj)
                if self.call.output_tokens is None and self._text_chars:
                    # No usage block: estimate from the generated text at ~4 characters per token.
                    self.call.output_tokens = math.ceil(self._text_chars / 4)
                    self.call.usage_source = "estimated"
        kept = self._text
        if kept is not None and (kept or self._finishes or self._tool_choices):
            # One output message per choice, as the conventions ask, each with its own finish reason: every choice
            # the answer showed, by its text, its finish or its tool calls (choices that only call tools have no text).
            indexes = sorted(kept.keys() | self._finishes.keys() | set(self._tool_choices))[:MAX_CAPTURED_CHOICES]
            self.call.output_text = ["".join(kept.get(i, ())) for i in indexes]
            if self._finishes:
                # (A choice shown for its tool calls alone, past the choices kept, has its finish from those the call
                # keeps apart for every choice: without it, its message would show another choice's.)
                every = self.call.choice_finishes or {}
                self.call.output_finish_reasons = [self._finishes.get(i) or every.get(i) for i in indexes]
            if self._tool_choices and len(indexes) > 1:
                # Which output message each tool call goes to (the first, for a choice not shown).
                position = {index: n for n, index in enumerate(indexes)}
                self.call.output_tool_messages = [position.get(i, 0) for i in self._tool_choices]

    # Streams -----------------------------------------------------------------------------------
    def _event(self, event: str, data: bytes, now: float) -> bool:
        """Read one event; True when it is a plain text delta (one a shape may be learnt from), the first token
        or one after it."""
        if data == b"[DONE]":
            self._closed = True
            return False
        call = self.call
        if call.first_token_at is not None:
            if self._text is None:
                ends = self._ends
                if ends is not None and self._end(data, ends):
                    return False
                if self._plain_delta(event, data):
                    # Hot path: after the first token most events are plain text deltas. Recognising them from
                    # their bytes (an event of the learnt shape), without a JSON parse, keeps the per-chunk cost to a
                    # few byte comparisons.
                    self._chunks += 1
                    call.first_output_whole = False  # (text streamed after it, see _first_token)
                    return True
        elif self._shortcuts and self._pending is None and self._text is None and self._deferrable(data):
            # The role chunk that opens a stream: nothing in it but the model and id, which the next event most
            # likely repeats. Set aside: read only if that event does not prove it redundant.
            self._pending = (event, data, now)
            return False
        obj = loads(data)  # a keep-alive or a non-JSON event gives None: nothing to learn from it
        pending = self._pending
        if not isinstance(obj, dict):
            if data.startswith(b"[DONE]"):
                self._closed = True  # (with something after it, which the SDKs allow too)
            if pending is not None:
                self._read_pending(pending)
            return False
        plain = None
        if pending is not None:
            self._pending = None
            plain = self._plain_delta(event, data) or self._text_only(event, obj, read=True)
            if not (plain and self._same_head(pending[1], data, obj)):
                self._read_pending(pending)
                if call.first_token_at is not None:
                    # It was the first token after all (a tool call): read this one as it would have been read.
                    return self._event(event, data, now)
        first = call.first_token_at is None
        if not first and self._text is None and self._text_only(event, obj):
            # After the first token, a delta whose bytes are not of the learnt shape (a stream whose events differ
            # outside their text, or none learnt yet): counted from its parse. Only what the parse shows to be one
            # counts: a null or empty text, a text outside a choice, bytes that are no JSON document count none.
            self._chunks += 1
            call.first_output_whole = False
            return True
        self._on_event(event, obj, now)
        # The first token, read in full: when its bytes make it a plain text delta too, its shape is the one the
        # next deltas have (so they take the fast path from the second token on).
        if first and call.first_token_at is not None and self._text is None:
            if plain is None:
                plain = self._plain_delta(event, data) or self._text_only(event, obj, read=True)
            if plain:
                if self._shortcuts:
                    self._learn_ends(data, obj)
                return True
        return False

    def _shape_of(self, chunk: bytes, data: bytes) -> _Shape | None:
        """The text-delta shape of ``chunk``, one whole event whose data (``data``) is the first token's."""
        return _text_shape(chunk, self._TEXT_KEYS)

    def _read_pending(self, pending: tuple[str, bytes, float]) -> None:
        """Read the event set aside, as it would have been read when it came."""
        event, data, now = pending
        self._pending = None
        obj = loads(data)
        if isinstance(obj, dict):
            self._on_event(event, obj, now)

    def _deferrable(self, data: bytes) -> bool:
        """Whether an event before the first token is worth setting aside (see :meth:`_same_head`)."""
        return False

    def _same_head(self, pending: bytes, data: bytes, obj: dict[str, Any]) -> bool:
        """True when the event set aside (``pending``), read before ``data`` (parsed: ``obj``; a plain text delta,
        see :meth:`_plain_delta`), would change nothing that reading ``data`` does not."""
        return False

    def _learn_ends(self, data: bytes, obj: dict[str, Any]) -> None:
        """Learn from the first token's event (parsed, and a plain text delta) how this stream's last events look."""

    def _end(self, data: bytes, ends: _Ends) -> bool:
        """Read ``data`` when it is one of the stream's last events as learnt by ``_learn_ends``; else False."""
        return False

    def _on_event(self, event: str, obj: dict[str, Any], now: float) -> None:
        raise NotImplementedError

    def _plain_delta(self, event: str, data: bytes) -> bool:
        """True when ``data`` is, from its bytes alone, certainly a text delta with nothing else to learn from it
        (see :meth:`_text_only`): an event of the learnt shape (see ``_inner``)."""
        return False

    def _text_only(self, event: str, obj: dict[str, Any], read: bool = False) -> bool:
        """True when ``obj`` (an event, parsed) is a text delta with nothing else to learn from it: reading it in full
        would count one delta with output in the estimate and record nothing else. ``read``: the caller reads it in
        full all the same (so what reading it records beside the delta, a choice it opens, is recorded)."""
        return False

    def _on_json(self, obj: dict[str, Any]) -> None:
        raise NotImplementedError

    def _on_dropped(self, event: str, usage: dict[str, Any]) -> None:
        """A stream event too large to read (``event``: its name) ended with ``usage``, and no other event had any.
        Only the Responses API sends events that large, and its usage is in its last one."""

    def _on_tail(self, tail: bytes | bytearray) -> None:
        """The last bytes of an answer (or of its last event) too large to read whole, whose usage was found in them:
        what else an API puts after its output may be read there too."""

    def _first_token(self, now: float, reasoning: bool = False, whole: bool = False) -> None:
        """Output came ``now``, the first token if none came before; ``reasoning``: a piece of the reasoning, streamed;
        ``whole``: an item whose tokens were all made before it came (see LLMCall.first_output_whole)."""
        call = self.call
        if call.first_token_at is None:
            call.first_token_at = now
            call.reasoning_shown = reasoning
            call.first_output_whole = whole
        elif call.first_output_whole and not whole:
            call.first_output_whole = False  # (streamed output after it: tokens made after the first)

    def _keep_text(self, text: Any, choice: int = 0) -> None:
        kept = self._text
        if kept is not None and isinstance(text, str) and self._kept_chars < MAX_KEPT_TEXT_CHARS:
            parts = kept.get(choice)
            if parts is None:
                if not self._holds(choice):
                    return
                parts = kept[choice] = []
            parts.append(text)
            self._kept_chars += len(text)

    def _keep_finish(self, reason: Any, choice: int) -> None:
        """A choice's finish reason, kept beside its text when content capture is on: the last one read, as for the
        span's ``gen_ai.response.finish_reasons`` (see LLMCall.add_choice_finish)."""
        if self._text is not None and isinstance(reason, str) and reason and self._holds(choice):
            self._finishes[choice] = field_text(reason)

    def _holds(self, choice: int) -> bool:
        """Whether ``choice``'s text and finish are kept (content capture on): those of the first MAX_CAPTURED_CHOICES
        choices read, by their text or by their finish, each with both, so that no message a span shows is of a
        choice whose text or finish was left out for a later choice's."""
        kept, finishes = self._text, self._finishes
        assert kept is not None
        if choice in kept or choice in finishes:
            return True
        if self._choices_full:
            return False
        if len(kept.keys() | finishes.keys()) < MAX_CAPTURED_CHOICES:
            return True
        self._choices_full = True  # (the choices kept are never fewer again: no set is made for the rest)
        return False

    def _stream_error(self, obj: dict[str, Any]) -> None:
        # The stream began with 200: an error event inside it is the server's unless its body says otherwise.
        self.call.error_type = classify_error_body(obj, default="server_error")


#: The rest of a JSON string after its opening quote, up to and including the closing quote.
_JSON_STRING_REST: Final = re.compile(rb'(?:[^"\\]|\\.)*"')
#: The inside of a JSON string, escapes included (text without any quote, backslash or line break, the common
#: case, is recognised without it). A raw line break is no JSON, and would end an SSE line.
_JSON_TEXT: Final = re.compile(rb'(?:[^"\\\r\n]|\\[^\r\n])*')


def _unescaped(text: bytes) -> bool:
    """No quote, backslash or line break in ``text``: the inside of a JSON string without escapes, the common case
    (four byte-value ``in`` tests, each a memchr)."""
    return 0x22 not in text and 0x5C not in text and 0x0A not in text and 0x0D not in text


def _fits(shape: _Shape, chunk: bytes) -> bool:
    """Whether ``chunk`` is of the text-delta ``shape``: the same bytes around the text as the delta it was
    learnt from (one whole event, or its data), and between them nothing but the inside of one JSON string (no quote,
    backslash or line break but escaped ones), so the bytes around it can only be structure, never text. For a
    shape with an obfuscation member: the learnt bytes before the text, the text, the learnt bytes between the
    text and the member's value, a value of printable ASCII without quote or backslash, and the learnt bytes
    after the value."""
    head, tail, start, tail_length, middle = shape
    end = len(chunk) - tail_length
    if middle is None:
        # Slices compared with ``==`` are the cheapest checks CPython has: no method call, no regex state.
        if start < end and chunk[:start] == head and chunk[end:] == tail:
            return _unescaped(chunk[start:end]) or _JSON_TEXT.fullmatch(chunk, start, end) is not None
        return False
    if chunk[:start] != head or chunk[end:] != tail:
        return False
    # The value has no quote: the last quote before it ends the middle (which ends with the value's opening quote).
    value = chunk.rfind(b'"', start, end) + 1
    text_end = value - len(middle)
    if start < text_end and chunk[text_end:value] == middle:
        obfuscation = chunk[value:end]
        if obfuscation.isalnum() or _OBFUSCATION_VALUE.fullmatch(obfuscation) is not None:
            return _unescaped(chunk[start:text_end]) or _JSON_TEXT.fullmatch(chunk, start, text_end) is not None
    return False


def _inner_shape(shape: _Shape, chunk: bytes, data: bytes) -> _Shape | None:
    """``shape``, learnt from ``chunk`` (one whole event whose data is ``data``, on one line), for the data alone:
    the bytes of the fields before the data and of the blank line after it taken off its ends."""
    before = chunk.find(data)
    after = len(chunk) - before - len(data)
    head, tail, start, tail_length, middle = shape
    if before < 0 or before > start or after > tail_length:
        return None
    return head[before:], tail[: tail_length - after], start - before, tail_length - after, middle


def _obfuscated_run(shape: _Shape, run: list[bytes]) -> bool:
    """Whether every chunk of ``run`` (bytes) is of ``shape``, one with an obfuscation member, as ``_shaped`` would
    say of each: a few C-level passes over the run (``map`` over bytes methods and a slice, joins, one comparison),
    no Python step per chunk."""
    head, tail, start, tail_length, middle = shape
    assert middle is not None
    # The tail (the value's closing quote, the event's closing brace and end) off every chunk: each chunk that ends
    # with it is that much shorter, any other is left whole, so the lengths add up only when all of them do.
    cut = list(map(bytes.removesuffix, run, repeat(tail)))
    if len(b"".join(cut)) != len(b"".join(run)) - tail_length * len(run):
        return False
    # Then each ends with its value: stripping the bytes a value may have takes exactly the value off a chunk of the
    # shape (the middle ends with the value's opening quote, which is not one of them). What is left must be the
    # head, a text and the middle: the plain shape's test (see _held_run), with the middle as its tail.
    heads = list(map(bytes.rstrip, cut, repeat(_OBFUSCATION_BYTES)))
    texts = list(map(itemgetter(slice(start, -len(middle))), heads))
    if all(texts) and head + (middle + head).join(texts) + middle == b"".join(heads):
        return _unescaped(b"".join(texts)) or all(map(_JSON_TEXT.fullmatch, texts))
    return False


#: A text-delta shape (see ``ResponseReader._shape``).
_Shape = tuple[bytes, bytes, int, int, bytes | None]
#: How a stream's last events look (see ``ResponseReader._ends``).
_Ends = tuple[bytes | None, bytes, bytes | None, int, bool]
#: The key of the member OpenAI adds last to every streamed event (random characters of random length that pad the
#: event's size against side channels), compact or spaced.
_OBFUSCATION_KEYS: Final = (b',"obfuscation":"', b', "obfuscation": "')
#: An obfuscation value that can only be the inside of one JSON string, with nothing to decode: printable ASCII
#: without quote or backslash.
_OBFUSCATION_VALUE: Final = re.compile(rb"[ !#-\[\]-~]*")
#: An obfuscation member that ends an event (its value as ``_OBFUSCATION_VALUE`` has it), as text.
_OBFUSCATION_END: Final = re.compile(r'(?:,"obfuscation":"|, "obfuscation": ")[ !#-\[\]-~]*"}')
#: The bytes of such a value (what ``_OBFUSCATION_VALUE`` matches), for ``bytes.rstrip``.
_OBFUSCATION_BYTES: Final = bytes(c for c in range(0x20, 0x7F) if c not in b'"\\')


def _split_shape(head: bytes, tail: bytes) -> _Shape:
    """The shape of a one-event chunk that is ``head``, a text and ``tail``. When the event ends with an obfuscation
    member whose value is recognised (see ``_OBFUSCATION_VALUE``), split there too, so that the value may vary."""
    # Its value's closing quote, then the closing brace of the event's object and the event's end.
    if tail.endswith(b'"}\n\n'):
        close = len(tail) - 4
        value = _obfuscation_at(tail, close)
        if value > 0:
            after = tail[close:]
            return head, after, len(head), len(after), tail[:value]
    return head, tail, len(head), len(tail), None


def _obfuscation_at(data: bytes, close: int) -> int:
    """Where the value of an obfuscation member of ``data`` starts, the member's closing quote at ``close``, when its
    value is recognised (see ``_OBFUSCATION_VALUE``); else -1."""
    # A recognised value has no quote: the last one before its end opens it.
    value = data.rfind(b'"', 0, close) + 1
    if value and data.endswith(_OBFUSCATION_KEYS, 0, value) and _OBFUSCATION_VALUE.fullmatch(data, value, close):
        return value
    return -1


def _text_shape(chunk: bytes, keys: tuple[bytes, ...]) -> _Shape | None:
    """Split a one-event chunk around the value of its first text key: the bytes before and after it."""
    for key in keys:
        start = chunk.find(key)
        if start < 0:
            continue
        start += len(key)
        end = _JSON_STRING_REST.match(chunk, start)
        if end is None or end.end() - 1 <= start:
            return None
        return _split_shape(chunk[:start], chunk[end.end() - 1 :])
    return None


class ErrorReader(ResponseReader):
    """Reads an error response (status >= 400): keeps a bounded prefix to classify the provider's error."""

    __slots__ = ()

    def feed(self, chunk: bytes, now: float | None = None, shaped: bool = True) -> None:
        room = MAX_ERROR_BODY_BYTES - len(self._buffer)
        if room > 0:
            self._buffer += chunk[:room]

    def finish(self, now: float) -> None:
        obj = loads(self._buffer)
        if isinstance(obj, dict):
            self.call.error_type = classify_error_body(obj, self.call.status_code)


# --- OpenAI Chat Completions and legacy Completions ------------------------------------------------


#: The role delta that opens a chat stream, as the members of its delta object: a role, and fields that are null or
#: empty (``"role":"assistant","content":"","refusal":null``).
_ROLE_MEMBERS: Final = re.compile(
    rb'(?:"role": ?"[a-z]{1,32}"|"[A-Za-z_]{1,32}": ?(?:null|""))'
    rb'(?:, ?(?:"role": ?"[a-z]{1,32}"|"[A-Za-z_]{1,32}": ?(?:null|"")))*'
)
#: The commonest of those, recognised without the regular expression.
_ROLE_DELTAS: Final = frozenset(
    (", " if spaced else ",").join(members).replace('":', '": ' if spaced else '":').encode()
    for spaced in (False, True)
    for members in (
        ['"role":"assistant"'],
        ['"role":"assistant"', '"content":""'],
        ['"role":"assistant"', '"content":null'],
        ['"role":"assistant"', '"content":""', '"refusal":null'],
        ['"role":"assistant"', '"content":null', '"refusal":null'],
    )
)
#: The rest of a JSON string after its opening quote, on text decoded as latin-1 (one character per byte).
_STRING_REST: Final = re.compile(r'(?:[^"\\]|\\.)*"')
#: Finish reasons as the finish event of a known shape spells them (others are left to the full parse).
_REASONS: Final = {
    f'"{reason}"'.encode(): reason for reason in ("stop", "length", "tool_calls", "content_filter", "function_call")
}


def _lone_delta(data: bytes, obj: dict[str, Any]) -> tuple[str, int, int, int] | None:
    """For a plain text delta (see ``OpenAIChatReader._plain_delta``; ``obj`` parsed from ``data``) whose only text
    is the member ``"content": "..."``, alone in its object (``{"content": "..."}``): the event as latin-1 text
    (one character per byte: str searches cost less than bytes ones), where the member starts, where its text
    starts and where the member ends; else None. Outside the member there is no backslash (so every key is
    spelled out and byte patterns find them all; a quoted key cannot occur inside a string, where every quote is
    escaped), no other text field, and the top-level usage is null or missing."""
    text = data.decode("latin-1")
    start = text.find('"content"')
    if start < 1 or text[start - 1] != "{":
        return None
    value = start + 9
    if text.startswith(':"', value):
        value += 2
    elif text.startswith(': "', value):
        value += 3
    else:
        return None
    if "\\" in text:
        found = _STRING_REST.match(text, value)
        if found is None:
            return None
        end = found.end()
        if text.find("\\", 0, start) >= 0 or text.find("\\", end) >= 0:
            return None
    else:
        end = text.find('"', value) + 1
    if (
        end > value + 1
        and text.startswith("}", end)
        and text.count('"content"') == 1
        and '"reasoning' not in text
        and '"text"' not in text
        and not obj.get("usage")
    ):
        return text, start, value, end
    return None


def _tool_output(tool_calls: list[Any]) -> bool:
    """Whether pieces of streamed tool calls carry output: a function's or custom tool's name, or a piece of its
    arguments or input (an empty one too, as an empty text delta is: see OpenAIChatReader._on_event). A piece with
    neither (only the call's id, which a server may send after the name, or a null input) is none."""
    for call in tool_calls:
        if isinstance(call, dict):
            for kind, text in (("function", "arguments"), ("custom", "input")):
                tool = call.get(kind)
                if isinstance(tool, dict) and (tool.get("name") or isinstance(tool.get(text), str)):
                    return True
    return False


#: Choice indexes a stream's count of choices (and of those with output) is taken from, for the time per output token
#: (OpenAI allows n up to 128; a legacy completions batch asks n for each of its prompts).
MAX_STREAM_CHOICES: Final = 4096


#: Hugging Face TGI's kinds of error (its events' ``error_type``) and the status it answers each with.
_TGI_ERROR_STATUS: Final = {
    "validation": 422,
    "template_error": 422,
    "tool_error": 422,
    "overloaded": 429,
    "generation": 424,
    "incomplete_generation": 500,
}


class OpenAIChatReader(ResponseReader):
    __slots__ = ("_seen", "_tool_ids", "_tool_indexes", "_writing")
    #: (A reasoning model's deltas before its answer carry their text in a reasoning member, with a null content:
    #: DeepSeek's, vLLM's and llama.cpp's ``reasoning_content``, OpenRouter's and vLLM's newer ``reasoning``.)
    _TEXT_KEYS = (
        b'"content":"', b'"content": "', b'"text":"', b'"text": "',
        b'"reasoning_content":"', b'"reasoning_content": "', b'"reasoning":"', b'"reasoning": "',
    )  # fmt: skip
    _DEFERS = True

    def __init__(self, call: LLMCall, *, stream: bool, capture: bool = False, shortcuts: bool = True) -> None:
        super().__init__(call, stream=stream, capture=capture, shortcuts=shortcuts)
        #: The tool calls counted, by (choice, index): the id of the latest (None until a delta gave one) and its
        #: position among the calls counted.
        self._tool_indexes: dict[tuple[int, int], tuple[str | None, int]] = {}
        #: (choice, id) of every tool call counted that had an id.
        self._tool_ids: set[tuple[int, str]] = set()
        #: The last event looked at by ``_member`` and what it found (the first token's, used up to three times).
        self._seen: tuple[bytes, tuple[str, int, int, int] | None] | None = None
        #: The indexes of the choices that had output (under MAX_STREAM_CHOICES).
        self._writing: set[int] = set()

    def _plain_delta(self, event: str, data: bytes) -> bool:
        inner = self._inner
        return inner is not None and _fits(inner, data)

    def _text_only(self, event: str, obj: dict[str, Any], read: bool = False) -> bool:
        # What _on_event reads: one choice whose delta has text, reasoning or a refusal (or, in a legacy completions
        # stream, whose text is not empty), and no finish reason, tool call, usage or error. A null or empty text,
        # or a text outside a choice, is none.
        error = obj.get("error")
        if isinstance(error, dict) or (isinstance(error, str) and error) or obj.get("usage"):
            return False
        choices = obj.get("choices")
        if type(choices) is not list or len(choices) != 1:
            return False
        choice = choices[0]
        if type(choice) is not dict or choice.get("finish_reason") is not None:
            return False
        index = choice.get("index")
        if index is None:
            index = 0  # (the only choice, as the full read takes it: see _wrote)
        if not read and type(index) is int and 0 <= index < MAX_STREAM_CHOICES and index not in self._writing:
            return False  # (a choice's first output: reading it records how many choices have output)
        delta = choice.get("delta")
        if not isinstance(delta, dict):
            return bool(choice.get("text"))
        tool_calls = delta.get("tool_calls")
        if (isinstance(tool_calls, list) and tool_calls) or (
            tool_calls is None and isinstance(delta.get("function_call"), dict)
        ):
            return False
        return bool(
            delta.get("content") or delta.get("reasoning_content") or delta.get("reasoning") or delta.get("refusal")
        )

    def _deferrable(self, data: bytes) -> bool:
        # Likely the role chunk: no text in it (a first token set aside would not teach the stream's shape).
        text = data.decode("latin-1")
        return '"reasoning' not in text and (
            '"content":""' in text or ('"content"' not in text and '"text"' not in text)
        )

    def _member(self, data: bytes, obj: dict[str, Any]) -> tuple[str, int, int, int] | None:
        seen = self._seen
        if seen is not None and seen[0] is data:
            return seen[1]
        member = _lone_delta(data, obj)
        self._seen = (data, member)
        return member

    def _same_head(self, pending: bytes, data: bytes, obj: dict[str, Any]) -> bool:
        # ``data`` carries nothing but one text (a plain delta, see _lone_delta). ``pending`` is the same bytes with
        # that text's member replaced by a role and null or empty fields (and the value of an obfuscation member
        # that ends both by another, which nothing reads): read in full, it would set nothing but the model and id,
        # and only to what reading ``data`` sets them to (same top-level members, or null or empty ones), with
        # nothing else to record: the first token's tests (no tool call, error, other text, usage or finish
        # reason) hold for every byte outside the member.
        member = self._member(data, obj)
        if member is None:
            return False
        _, start, _, end = member
        stop, pending_stop = len(data), len(pending)
        if data[-2:] == b'"}' and pending[-2:] == b'"}':  # (slices compared: no method call on the way)
            # Both end with an obfuscation member, each with a value of its own: compared up to the values.
            value = _obfuscation_at(data, stop - 2)
            pending_value = _obfuscation_at(pending, pending_stop - 2) if value > 0 else -1
            if pending_value > 0:
                stop, pending_stop = value, pending_value
        middle = pending_stop - (stop - end)
        if middle <= start or pending[:start] != data[:start] or pending[middle:pending_stop] != data[end:stop]:
            return False
        members = bytes(pending[start:middle])
        if members in _ROLE_DELTAS:
            return True
        # Empty content without a role is a token whose text is not whole yet (see _on_event): not redundant.
        if b'"role"' not in members and (b'"content":""' in members or b'"content": ""' in members):
            return False
        return _ROLE_MEMBERS.fullmatch(members) is not None

    def _shape_of(self, chunk: bytes, data: bytes) -> _Shape | None:
        seen = self._seen
        # What _text_shape finds, known already: the only "content" key starts the text (no "text" key).
        if seen is not None and seen[0] is data and seen[1] is not None and chunk == b"data: " + data + b"\n\n":
            _, _, value, end = seen[1]
            return _split_shape(chunk[: value + 6], chunk[end + 5 :])
        return _text_shape(chunk, self._TEXT_KEYS)

    def _learn_ends(self, data: bytes, obj: dict[str, Any]) -> None:
        # The finish event of a stream like this one is the first token's bytes with the delta emptied and the null
        # finish reason replaced by a string; its usage event keeps the top-level members before "choices", whose
        # list is empty, and adds the usage object. Templates for both, kept when what those events record follows
        # from the first token's parse: with the model and id known, they have nothing else to add.
        member = self._member(data, obj)
        if member is None or self.call.response_model is None or self.call.response_id is None:
            return
        text, start, _, end = member
        # An event that ends with an obfuscation member (its key spelled out, so it is the last top-level member:
        # see _split_shape) has a value of its own: the templates stop before it, and _end checks what follows.
        obfuscation = _obfuscation_at(data, len(data) - 2) if text[-2:] == '"}' else -1
        finish_head = None
        finish_tail = b""
        reason = text.find('"finish_reason"', end)
        if reason >= 0 and text.count('"finish_reason"') == 1:
            value = reason + 15
            if text.startswith(":null", value):
                value += 1
            elif text.startswith(": null", value):
                value += 2
            else:
                value = -1
            # Its only spelling belongs to a choice: the one finish reason the finish event can report. Only of the
            # first choice (index 0, or none given), which is where _end files it: a first token of another choice
            # (a server may start with any) teaches no template.
            if value > 0:
                for choice in _list(obj.get("choices")):
                    if isinstance(choice, dict) and "finish_reason" in choice and not _int(choice.get("index")):
                        finish_head = data[:start] + data[end:value]
                        finish_tail = data[value + 4 : obfuscation] if obfuscation > 0 else data[value + 4 :]
                        break
        usage_head = None
        cut = text.find('"choices"', 0, start)
        if cut > 0 and text.count('"choices"') == 1 and "choices" in obj:
            # Its only spelling is the top-level key: everything before it is whole top-level members.
            if text.startswith('"choices":[', cut):
                usage_head = data[:cut] + b'"choices":[],"usage":'
            elif text.startswith('"choices": [', cut):
                usage_head = data[:cut] + b'"choices": [], "usage": '
        if finish_head is not None or usage_head is not None:
            self._ends = (finish_head, finish_tail, usage_head, cut, obfuscation > 0)

    def _end(self, data: bytes, ends: _Ends) -> bool:
        finish_head, finish_tail, usage_head, cut, obfuscated = ends
        if finish_head is not None and data.startswith(finish_head):
            if obfuscated:
                # The template's bytes, then a value of its own (recognised as the first token's was) and its end.
                close = len(data) - 2
                value = _obfuscation_at(data, close) if data[close:] == b'"}' else -1
                middle = value - len(finish_tail)
                matched = value > 0 and data.startswith(finish_tail, middle)
            else:
                middle = len(data) - len(finish_tail)
                matched = data.endswith(finish_tail)
            if matched and middle > len(finish_head) and self.call.stream_choices <= 1:
                reason = _REASONS.get(bytes(data[len(finish_head) : middle]))  # (a chunk may be a bytearray)
                if reason is None:
                    return False
                _add_finish_reason(self.call, reason)
                return True
        if usage_head is not None and data.startswith(usage_head):
            # What follows is the usage value and the closing brace: the value parsed on its own by the scanner
            # that parses whole events (same values, same errors); anything else is left to the full parse.
            try:
                text = data[cut:].decode("utf-8", "surrogatepass")
                usage, end = _scan(text, len(usage_head) - cut)
            except (ValueError, RecursionError, StopIteration):
                return False
            # The event's end, or an obfuscation member (a value of its own, without anything to decode) and its end.
            if (end == len(text) - 1 and text[end] == "}") or _OBFUSCATION_END.fullmatch(text, end) is not None:
                if usage:
                    self._usage(usage)
                return True
        return False

    def _usage(self, usage: Any) -> None:
        if not isinstance(usage, dict):
            return
        prompt, completion = _int(usage.get("prompt_tokens")), _int(usage.get("completion_tokens"))
        if prompt == 0 and completion == 0:
            # Nothing in and nothing out is no count but a placeholder: the LiteLLM proxy puts one in every chunk
            # of a legacy completions stream whose client did not ask for the usage. Read as none, so the tokens
            # are estimated, as for any stream without usage.
            return
        call = self.call
        call.input_tokens = prompt
        call.output_tokens = completion
        # (What _get reads, without its calls: this runs once per stream, and its cost showed.)
        details = usage.get("prompt_tokens_details")
        if isinstance(details, dict):
            call.cache_read_tokens = _int(details.get("cached_tokens"))
            # The LiteLLM proxy passes on Anthropic's split of the writes by cache lifetime (one hour at a price of
            # its own) as ``cache_creation_token_details``: without it, those writes were priced as five-minute ones.
            split = details.get("cache_creation_token_details")
            call.cache_creation_1h_tokens = (
                _int(split.get("ephemeral_1h_input_tokens")) if isinstance(split, dict) else None
            )
            # Audio and image input (a spoken prompt to gpt-4o-audio-preview): parts of the prompt, at prices of their
            # own.
            call.input_audio_tokens, call.input_image_tokens = _parts(
                prompt, details.get("audio_tokens"), details.get("image_tokens")
            )
        else:
            call.cache_read_tokens = call.cache_creation_1h_tokens = None
            call.input_audio_tokens = call.input_image_tokens = None
        call.cache_creation_tokens = _cache_writes(details, usage)
        details = usage.get("completion_tokens_details")
        if isinstance(details, dict):
            call.reasoning_tokens = _int(details.get("reasoning_tokens"))
            call.output_audio_tokens = _parts(completion, details.get("audio_tokens"), None)[0]
        else:
            call.reasoning_tokens = call.output_audio_tokens = None
        call.usage_source = "reported"

    def _head(self, obj: dict[str, Any]) -> None:
        call = self.call
        if call.response_model is None:
            call.response_model = _name(obj.get("model"))
        if call.response_id is None:
            call.response_id = _str(obj.get("id"))
        if call.system_fingerprint is None:
            call.system_fingerprint = obj.get("system_fingerprint")  # (made safe by the span that shows it)
        if call.response_service_tier is None:
            call.response_service_tier = obj.get("service_tier")

    def _on_event(self, event: str, obj: dict[str, Any], now: float) -> None:
        error = obj.get("error")
        if isinstance(error, dict):
            self._stream_error(obj)
            return
        if isinstance(error, str) and error:
            # Hugging Face TGI's error event: the message as a string, and its kind beside it, read as the status TGI
            # answers that kind with outside a stream (a prompt too long is a validation error there, a 422).
            kind = obj.get("error_type")
            status = _TGI_ERROR_STATUS.get(kind) if isinstance(kind, str) else None
            self.call.error_type = classify_error_body({"error": {"message": error}}, status, default="server_error")
            return
        self._head(obj)
        choices = obj.get("choices")
        if isinstance(choices, list):
            for choice in choices:
                if not isinstance(choice, dict):
                    continue
                index = choice.get("index")
                if type(index) is int and self.call.stream_choices <= index < MAX_STREAM_CHOICES:
                    # (Each choice's first chunk is read here: the shortcuts take only chunks shaped like one read.)
                    self.call.stream_choices = index + 1
                delta = choice.get("delta")
                if isinstance(delta, dict):
                    # Role-only and empty chunks are not a first token: only text, reasoning, a refusal or a tool call
                    # is (a legacy ``function_call`` delta is read as the one tool call it is).
                    raw = delta.get("content")
                    reasoning = not raw and (delta.get("reasoning_content") or delta.get("reasoning"))
                    content = raw or reasoning or delta.get("refusal")
                    tool_calls = delta.get("tool_calls")
                    if tool_calls is None and isinstance(delta.get("function_call"), dict):
                        tool_calls = [{"index": -1, "function": delta["function_call"]}]
                    opening = "role" in delta
                    audio = None if content else delta.get("audio")
                else:
                    raw = content = choice.get("text")  # legacy completions stream
                    reasoning = None
                    tool_calls = None
                    opening = False
                    audio = None
                calls = isinstance(tool_calls, list) and tool_calls
                # (A piece of a tool call with neither a name nor a piece of its input, only an id, is no output: no
                # token, and no first token either.)
                pieces = calls and _tool_output(calls)
                if content:
                    self._first_token(now, reasoning=bool(reasoning))
                    self._wrote(index)
                    self._chunks += 1
                    if self._text is not None and not reasoning:
                        # (The answer and a refusal are kept; reasoning is no part of the output message, as an answer
                        # that is not streamed has it apart too.)
                        self._keep_text(content, _int(choice.get("index")) or 0)
                elif isinstance(audio, dict) and (audio.get("transcript") or audio.get("data")):
                    # A spoken answer (``modalities`` with ``audio``): a piece of its transcript or of its audio is
                    # output the client gets. A piece of the transcript counts in the estimate as a piece of text
                    # does; the audio itself says nothing of its tokens.
                    self._first_token(now)
                    self._wrote(index)
                    if audio.get("transcript"):
                        self._chunks += 1
                elif pieces or (raw == "" and not opening and choice.get("finish_reason") is None):
                    # For the estimate, a delta is about a token: a piece of a tool call is one too, and so is an
                    # empty delta from a server that sends one per generated token (llama-cpp-python), for a token
                    # whose bytes are not a whole character yet. (An opening role delta or a closing finish delta
                    # with empty content stands for no token.)
                    self._chunks += 1
                if calls:
                    if pieces:
                        self._first_token(now)
                        self._wrote(index)
                    self._stream_tool_calls(choice, calls)
                _add_finish_reason(self.call, choice.get("finish_reason"), _int(choice.get("index")) or 0)
                if self._text is not None:
                    self._keep_finish(choice.get("finish_reason"), _int(choice.get("index")) or 0)
        if obj.get("usage"):
            self._usage(obj["usage"])

    def _wrote(self, index: Any) -> None:
        """Choice ``index`` (as the chunk gave it: none is the only choice, 0) had output."""
        if index is None:
            index = 0
        writing = self._writing
        if type(index) is int and 0 <= index < MAX_STREAM_CHOICES and index not in writing:
            writing.add(index)
            self.call.output_choices = len(writing)

    def _stream_tool_calls(self, choice: dict[str, Any], tool_calls: list[Any]) -> None:
        choice_index = _int(choice.get("index")) or 0
        for tool_call in tool_calls:
            if not isinstance(tool_call, dict):
                continue
            # A tool call streams as several deltas with one index; only the first one names the function. A named
            # delta whose id differs from the one its index had is another call (parallel calls each sent whole
            # with no index, or all at index 0, as the LiteLLM proxy re-emits some providers' calls).
            key = (choice_index, _int(tool_call.get("index")) or 0)
            name = _str(_get(tool_call, "function", "name")) or _str(_get(tool_call, "custom", "name"))
            call_id = _str(tool_call.get("id"))
            # (Bounded by the calls counted, so the indexes seen cannot grow past MAX_TOOL_CALLS either.)
            if name and len(self.call.tool_calls) < MAX_TOOL_CALLS:
                if call_id is not None and (choice_index, call_id) in self._tool_ids:
                    continue  # a later delta of a call counted, whichever call its index had last
                known = self._tool_indexes.get(key)
                if known is not None and (call_id is None or known[0] is None):
                    # The same call: a later delta of it, or one that gives no id to tell.
                    if call_id is not None:
                        self._late_tool_id(key, known[1], call_id)
                    continue
                self._tool_indexes[key] = (call_id, len(self.call.tool_calls))
                if call_id is not None:
                    self._tool_ids.add((choice_index, call_id))
                self.call.add_tool_call(name, call_id)
                if self._text is not None:
                    self._tool_choices.append(choice_index)
            elif not name and call_id is not None:
                # A later delta that gives the id of a call whose first delta gave none (some servers send the id
                # after the name): the call's id, as the client's SDK puts it together.
                known = self._tool_indexes.get(key)
                if known is not None and known[0] is None and (choice_index, call_id) not in self._tool_ids:
                    self._late_tool_id(key, known[1], call_id)

    def _late_tool_id(self, key: tuple[int, int], position: int, call_id: str) -> None:
        """The id of the tool call counted ``position``-th (at ``key``), given after its first delta."""
        self._tool_indexes[key] = (call_id, position)
        self._tool_ids.add((key[0], call_id))
        ids = self.call.tool_call_ids
        if ids is not None and position < len(ids) and ids[position][0] is None:
            ids[position] = (call_id[:256], ids[position][1])

    def _on_json(self, obj: dict[str, Any]) -> None:
        self._head(obj)
        choices = obj.get("choices")
        if isinstance(choices, list):
            capture = self._text is not None
            index = 0
            for position, choice in enumerate(choices):
                if not isinstance(choice, dict):
                    continue
                given = _int(choice.get("index"))
                index = position if given is None else given
                _add_finish_reason(self.call, choice.get("finish_reason"), index)
                if capture:
                    self._keep_finish(choice.get("finish_reason"), index)
                message = choice.get("message")
                text = message.get("content") if isinstance(message, dict) else choice.get("text")
                if not text and isinstance(message, dict) and isinstance(message.get("refusal"), str):
                    text = message["refusal"]  # (the answer a refusal is, as a stream's refusal deltas are)
                if isinstance(text, str):
                    self._text_chars += len(text)
                    if capture:
                        self._keep_text(text, index)
                if not text and isinstance(message, dict) and isinstance(message.get("audio"), dict):
                    # A spoken answer (``modalities`` with ``audio``): its transcript counts in the estimate as text
                    # does, as a stream's transcript deltas do (and, as theirs, is no text of the output message).
                    transcript = message["audio"].get("transcript")
                    if isinstance(transcript, str):
                        self._text_chars += len(transcript)
                # Its tool calls, or a legacy function call (none, most often: then nothing to look at).
                calls: list[Any] = []
                if isinstance(message, dict):
                    calls = _list(message.get("tool_calls"))
                    if not calls and message.get("function_call"):
                        calls = [{"function": message["function_call"]}]
                for tool_call in calls:
                    name = _str(_get(tool_call, "function", "name")) or _str(_get(tool_call, "custom", "name"))
                    # A tool call's input is output to estimate, as a stream's pieces of it are.
                    tool_input = _get(tool_call, "function", "arguments") or _get(tool_call, "custom", "input")
                    if isinstance(tool_input, str):
                        self._text_chars += len(tool_input)
                    if name and len(self.call.tool_calls) < MAX_TOOL_CALLS:
                        _add_tool_call(self.call, name, _get(tool_call, "id"))
                        if capture:
                            self._tool_choices.append(index)
        self._usage(obj.get("usage"))


class OpenAIEmbeddingsReader(ResponseReader):
    __slots__ = ()

    def _on_json(self, obj: dict[str, Any]) -> None:
        self.call.response_model = _name(obj.get("model"))
        self.call.input_tokens = _int(_get(obj, "usage", "prompt_tokens"))
        self.call.output_tokens = None

    def _on_event(self, event: str, obj: dict[str, Any], now: float) -> None:
        pass


# --- OpenAI Responses API -------------------------------------------------------------------------


#: The inside of a JSON string, non-empty, exactly as the reader's parse (``loads``) takes it: UTF-8 (surrogates
#: let through, as it decodes), no raw quote, backslash or control character, and only the escapes JSON defines.
_JSON_TEXT_STRICT: Final = (
    # Runs of plain ASCII, each run followed by an escape or a multi-byte character, which cannot start a run: so
    # there is one way to match any text, and a text that does not match fails in time linear in its length.
    rb'(?!")[ !#-\[\]-\x7f]*(?:(?:\\(?:["\\/bfnrt]|u[0-9A-Fa-f]{4})'
    rb"|(?:[\xc2-\xdf]|\xe0[\xa0-\xbf]|[\xe1-\xef][\x80-\xbf]|\xf0[\x90-\xbf][\x80-\xbf]"
    rb"|[\xf1-\xf3][\x80-\xbf]{2}|\xf4[\x80-\x8f][\x80-\xbf])[\x80-\xbf])[ !#-\[\]-\x7f]*)*"
)
#: A member of a text-delta event besides its type and text, with a value of nothing to read: a JSON integer, a plain
#: string (printable ASCII without quote or backslash, as ids and OpenAI's obfuscation values are), an empty list,
#: null or a boolean. Its key can be neither "type" nor "delta", so the event has each of those once.
_PLAIN_MEMBER: Final = rb'"(?!(?:type|delta)")[a-z_]+": ?(?:-?(?:0|[1-9][0-9]*)|"[ !#-\[\]-~]*"|\[\]|null|true|false)'
_TYPE_MEMBER: Final = rb'"type": ?"response\.(?:output_text|reasoning_summary_text|refusal)\.delta"'
_DELTA_MEMBER: Final = rb'"delta": ?"' + _JSON_TEXT_STRICT + rb'"'
_OTHERS: Final = rb"(?:, ?" + _PLAIN_MEMBER + rb")*"
#: The data of a Responses text-delta event, in any order of its members: an object with its type and its non-empty
#: text, once each, and plain members (``_PLAIN_MEMBER``).
_DELTA_OBJECT: Final = b"".join((
    rb"\{(?:", _PLAIN_MEMBER, rb", ?)*",
    rb"(?:", _TYPE_MEMBER, _OTHERS, rb", ?", _DELTA_MEMBER,  # the type before the text,
    rb"|", _DELTA_MEMBER, _OTHERS, rb", ?", _TYPE_MEMBER, rb")",  # or after it
    _OTHERS, rb"\}",
))  # fmt: skip
_RESPONSES_DELTA_DATA: Final = re.compile(_DELTA_OBJECT)
#: One whole chunk that is one Responses text-delta event: an optional event line, then one data line with such an
#: object. Every event of a Responses stream numbers itself (``sequence_number``) and OpenAI's end with a random
#: ``obfuscation``, so no two are byte for byte alike around their text, as the shapes of chat streams are: this
#: pattern is their shape.
_RESPONSES_DELTA: Final = re.compile(
    rb"(?:event: ?response\.[a-z_]+\.delta\r?\n)?data: ?" + _DELTA_OBJECT + rb"\r?\n\r?\n"
)
#: The shape of a Responses stream whose text deltas ``_RESPONSES_DELTA`` matches (its fields are not used).
_RESPONSES_SHAPE: Final[_Shape] = (b"", b"", 0, 0, None)


#: Responses events whose delta is generated text: the answer, reasoning (a summary, or the text itself as open models
#: send it), a refusal.
_RESPONSES_TEXT_EVENTS: Final = frozenset(
    (
        "response.output_text.delta",
        "response.reasoning_summary_text.delta",
        "response.reasoning_text.delta",
        "response.refusal.delta",
    )
)
#: Responses events whose delta is a piece of the input of a tool call the model makes: a function's arguments, a custom
#: tool's input, the code it has the code interpreter run, an MCP tool's arguments, the commands it has a shell run.
_RESPONSES_TOOL_DELTA_EVENTS: Final = frozenset(
    (
        "response.function_call_arguments.delta",
        "response.custom_tool_call_input.delta",
        "response.code_interpreter_call_code.delta",
        "response.mcp_call_arguments.delta",
        "response.shell_call_command.delta",
    )
)
#: Of those, the reasoning's: a stream that starts with them shows its reasoning tokens after its first token.
_RESPONSES_REASONING_EVENTS: Final = frozenset(
    ("response.reasoning_summary_text.delta", "response.reasoning_text.delta")
)
#: Responses events whose delta is a piece of a spoken answer: its audio, its transcript.
_RESPONSES_AUDIO_EVENTS: Final = frozenset(("response.audio.delta", "response.audio.transcript.delta"))
#: Output items that are the model calling a tool, and the name of the tool each calls when the item names none: the
#: application's (function and custom tools, and the computer, shell and patch tools it runs for the model), one the
#: API runs (web and file search, code interpreter, image generation, tool search), one of an MCP server the API
#: calls (named by the item), and the program the model wrote for programmatic tool calling, which the API runs. An
#: item the API names after its tool's type (``web_search_call``) is that type's tool, as Anthropic names its own
#: (``web_search``); a ``program`` is the ``programmatic_tool_calling`` tool's.
_RESPONSES_TOOL_ITEMS: Final[dict[str, str | None]] = {
    "function_call": None,
    "custom_tool_call": None,
    "mcp_call": None,
    "web_search_call": "web_search",
    "file_search_call": "file_search",
    "code_interpreter_call": "code_interpreter",
    "image_generation_call": "image_generation",
    "tool_search_call": "tool_search",
    "program": "programmatic_tool_calling",
    "computer_call": "computer",
    "local_shell_call": "local_shell",
    "shell_call": "shell",
    "apply_patch_call": "apply_patch",
}
#: The output item that asks the application to approve a call of an MCP server's tool the model chose (its tool's name
#: and arguments): output the model made (a first token), but no tool call yet. The call is made, and counted as the
#: ``mcp_call`` item it is, in the response that follows an approval (an MCP call that needs none is that item at
#: once): counted here too, an approved call would be counted twice, and a refused one that never ran once.
_RESPONSES_APPROVAL: Final = "mcp_approval_request"
#: The input items that carry a tool's output back to the model: function and custom tools', and those of the tools
#: the application runs for the model (computer, shell, local shell, apply_patch) and of a tool search it ran. (A
#: ``program_output`` item is the result of a program the API runs, as a ``mcp_call`` carries its own output.)
_RESPONSES_TOOL_OUTPUTS: Final = frozenset(
    (
        "function_call_output",
        "custom_tool_call_output",
        "computer_call_output",
        "shell_call_output",
        "local_shell_call_output",
        "apply_patch_call_output",
        "tool_search_output",
    )
)


#: The status a Responses stream's last event names.
_RESPONSE_END_STATUS: Final = {
    "response.completed": "completed",
    "response.incomplete": "incomplete",
    "response.failed": "failed",
}


class OpenAIResponsesReader(ResponseReader):
    __slots__ = ()
    _TEXT_KEYS = (b'"delta":"',)

    def _plain_delta(self, event: str, data: bytes) -> bool:
        return _RESPONSES_DELTA_DATA.fullmatch(data) is not None

    def _shape_of(self, chunk: bytes, data: bytes) -> _Shape | None:
        if _RESPONSES_DELTA.fullmatch(chunk) is not None:
            return _RESPONSES_SHAPE
        self._misses += 1  # this stream's deltas carry more (log probabilities, say): no shape is tried again
        return None

    def _shaped(self, chunk: bytes) -> bool:
        return self._fast is not None and _RESPONSES_DELTA.fullmatch(chunk) is not None

    def _run_shaped(self, fast: _Shape, run: list[bytes]) -> bool:
        return all(map(_RESPONSES_DELTA.fullmatch, run))

    def _response(self, response: Any, ended: str | None = None) -> None:
        """Read a response object; ``ended``: the status the closing event that carried it names (``failed`` for
        ``response.failed``), which is how the response ended whatever its own status says (a proxy's may say none)."""
        if not isinstance(response, dict):
            response = {}
        call = self.call
        call.response_model = _name(response.get("model")) or call.response_model
        call.response_id = _str(response.get("id")) or call.response_id
        call.response_service_tier = response.get("service_tier") or call.response_service_tier
        usage = response.get("usage")
        if isinstance(usage, dict):
            call.input_tokens = _int(usage.get("input_tokens"))
            call.output_tokens = _int(usage.get("output_tokens"))
            details = usage.get("input_tokens_details")
            call.cache_read_tokens = _int(details.get("cached_tokens")) if isinstance(details, dict) else None
            call.cache_creation_tokens = _cache_writes(details, usage)
            call.reasoning_tokens = _int(_get(usage, "output_tokens_details", "reasoning_tokens"))
            call.usage_source = "reported"
        tool_usage = response.get("tool_usage")
        if isinstance(tool_usage, dict):
            # (In the response a stream's last event carries, read once: no event before it has it.)
            call.image_tool_usage = _image_tool_usage(tool_usage.get("image_gen"))
        output = response.get("output")
        if output and type(output) is list:
            # Each SVG image's author's tokens, by item: those its output item event gave are replaced, not added to.
            for index, item in enumerate(output):
                if type(item) is dict and item.get("type") == "image_generation_call" and "svg_usage" in item:
                    _add_svg_item(call, item, index)
        status = ended or response.get("status")
        if status == "incomplete":
            _add_finish_reason(call, _get(response, "incomplete_details", "reason") or "incomplete")
        elif status == "completed":
            _add_finish_reason(call, "stop")
        elif status == "failed":
            error = response.get("error")
            if isinstance(error, dict) or self.call.error_type is None:
                # (Read as an ``error`` event's error is; one without its own error keeps what such an event said.)
                self._stream_error({"error": error})

    def _on_event(self, event: str, obj: dict[str, Any], now: float) -> None:
        kind = obj.get("type") or event
        if type(kind) is not str:
            kind = event  # (a list or an object would not even hash)
        if kind in _RESPONSES_TEXT_EVENTS:
            if obj.get("delta"):
                reasoning = kind in _RESPONSES_REASONING_EVENTS
                self._first_token(now, reasoning=reasoning)
                self._chunks += 1
                if not reasoning:
                    # (The answer and a refusal: reasoning is no part of the output message, as in an answer that is
                    # not streamed, where it is an item of its own.)
                    self._keep_text(obj.get("delta"))
        elif kind == "response.output_item.added":
            item = obj.get("item")
            if isinstance(item, dict) and _is_tool_item(item):
                # (Whole unless its input streams after it: a function's arguments, the code interpreter's code.)
                self._first_token(now, whole=True)
                name = _tool_item_name(item)
                if name:
                    _add_tool_call(self.call, name, item.get("call_id") or item.get("id"), _hosted_item(item))
                    _remember_tool_call(item, name)
            elif isinstance(item, dict) and item.get("type") == _RESPONSES_APPROVAL:
                self._first_token(now, whole=True)  # (output the model made, whole; see _RESPONSES_APPROVAL)
            elif isinstance(item, dict):
                _server_output(item, self.call)
            if isinstance(item, dict) and item.get("type") == "image_generation_call" and "svg_usage" in item:
                _add_svg_item(self.call, item, obj.get("output_index"))
        elif kind == "response.output_item.done":
            # A finished item: an SVG image's carries its author's tokens (again in ``response.completed``, which may
            # be too large to read whole).
            item = obj.get("item")
            if isinstance(item, dict) and item.get("type") == "image_generation_call" and "svg_usage" in item:
                _add_svg_item(self.call, item, obj.get("output_index"))
        elif kind in ("response.created", "response.completed", "response.incomplete", "response.failed"):
            if kind in _LAST_EVENTS:
                self._closed = True  # whatever its response's status says (or leaves out)
            self._response(obj.get("response"), _RESPONSE_END_STATUS.get(kind))
        elif kind in _RESPONSES_TOOL_DELTA_EVENTS:
            if obj.get("delta"):
                self._first_token(now)
                self._chunks += 1  # (a piece of a tool call's input counts like a piece of text in the estimate)
        elif kind in _RESPONSES_AUDIO_EVENTS:
            # A spoken answer: a piece of its audio or of its transcript is output the client gets. A piece of the
            # transcript counts in the estimate as a piece of text does; the audio itself says nothing of its tokens.
            if obj.get("delta"):
                self._first_token(now)
                if kind == "response.audio.transcript.delta":
                    self._chunks += 1
        elif kind == "error":
            # OpenAI documents the error's members on the event itself; its API has also sent them in an ``error``
            # object inside it, as its error bodies do.
            self._stream_error(obj if isinstance(obj.get("error"), dict) else {"error": obj})

    def _on_tail(self, tail: bytes | bytearray) -> None:
        # The image generation tool's usage, after the images that make the response large, as the usage is.
        call = self.call
        for tool_usage in _members_in_tail(tail, _TOOL_USAGE_MEMBER):
            call.image_tool_usage = _image_tool_usage(tool_usage.get("image_gen"))
            break
        if call.svg_usage is None:
            # The SVG images whose items end in the tail, each its own member (the item's id, before its image, is
            # not there). Not when an item's own event gave one: the tail repeats the last items, which could not
            # be told apart from them.
            found: dict[str | int, tuple[str | None, SubUsage]] = {}
            for number, svg in enumerate(_members_in_tail(tail, _SVG_USAGE_MEMBER, MAX_SVG_ITEMS), 1):
                counted = _svg_usage(svg)
                if counted is not None:
                    found[-number] = counted
            call.svg_usage = found or None

    def _on_dropped(self, event: str, usage: dict[str, Any]) -> None:
        # ``response.completed`` repeats the whole response: with image results or long instructions it may be
        # larger than an event can be. Its name (OpenAI sends ``event:`` lines) still says how the response ended.
        self._response({"usage": usage, "status": _RESPONSE_END_STATUS.get(event)})

    def _on_json(self, obj: dict[str, Any]) -> None:
        self._response(obj)
        for item in _list(obj.get("output")):
            if not isinstance(item, dict):
                continue
            name = _tool_item_name(item)
            if name:
                _add_tool_call(self.call, name, item.get("call_id") or item.get("id"), _hosted_item(item))
                _remember_tool_call(item, name)
                # Its input (a function's or MCP tool's arguments, a custom tool's input, the code interpreter's code)
                # is output to estimate, as a stream's pieces of it are.
                tool_input = item.get("arguments") or item.get("input") or item.get("code")
                if isinstance(tool_input, str):
                    self._text_chars += len(tool_input)
                elif item.get("type") == "shell_call":  # the commands it has a shell run
                    self._text_chars += sum(
                        len(c) for c in _list(_get(item, "action", "commands")) if isinstance(c, str)
                    )
            elif item.get("type") == _RESPONSES_APPROVAL:
                arguments = item.get("arguments")  # (its arguments are output the model made, to estimate)
                if isinstance(arguments, str):
                    self._text_chars += len(arguments)
            else:
                _server_output(item, self.call)
            if item.get("role", "assistant") != "assistant":
                continue  # (a compaction's answer, ``responses.compact``, repeats the user's messages: no output)
            # (A reasoning item's text, which open models send, is output to estimate, but no part of the answer.)
            answer = item.get("type") != "reasoning"
            for part in _list(item.get("content")):
                if not isinstance(part, dict):
                    continue
                # (A refusal part has its text under ``refusal``: the answer, as a stream's refusal deltas are.)
                text = part.get("text") if "text" in part else part.get("refusal")
                if isinstance(text, str):
                    self._text_chars += len(text)
                    if answer:
                        self._keep_text(text)


# --- OpenAI images and transcriptions -------------------------------------------------------------


#: The events that end the answer of a streamed image generation or edit (each carries the image and the usage of
#: the GPT image models) or of a streamed transcription (the whole text, and the usage of models billed by token).
_MEDIA_DONE_EVENTS: Final = frozenset(("image_generation.completed", "image_edit.completed", "transcript.text.done"))


class OpenAIMediaReader(ResponseReader):
    """The answers of OpenAI's image generations and edits (``gpt-image-1`` and the other GPT image models) and of
    its transcriptions (``gpt-4o-transcribe``): whole JSON or an event stream. Only their token usage is read:
    ``input_tokens`` and ``output_tokens`` (the input's text and image, or audio, tokens together, as the usage's
    own totals count them). A usage of another kind (a transcription's ``type: duration``, seconds of audio priced by
    the minute: ``whisper-1``) or none (DALL-E) counts no token, and nothing is estimated: a transcript's text says
    nothing of the audio tokens it was made from, nor an image of its own. The answer names no model: the request's (its
    ``model`` field, a form field of a multipart request) labels it. No first token is taken: a partial image or a
    piece of a transcript would put image and audio waits into the streams' time to first token, whose objective
    is a chat model's.

    Of the input, the audio and image tokens the details count (an image's ``input_tokens_details``, a
    transcription's ``input_token_details``) are kept apart, priced at their own prices; so are the output's, from
    ``output_tokens_details`` when given. An image's output is its image (the SDK's stream events say its
    ``output_tokens`` are image tokens): without details saying otherwise, all of it (:class:`OpenAIImagesReader`)."""

    __slots__ = ()

    #: Whether the output is an image, unless its details say how much of it is.
    _IMAGE_OUTPUT = False

    def _usage(self, usage: Any) -> None:
        if not isinstance(usage, dict):
            return
        input_tokens, output_tokens = _int(usage.get("input_tokens")), _int(usage.get("output_tokens"))
        if input_tokens is None and output_tokens is None:
            return
        call = self.call
        call.input_tokens, call.output_tokens = input_tokens, output_tokens
        (call.input_audio_tokens, call.input_image_tokens), (call.output_audio_tokens, call.output_image_tokens) = (
            _media_parts(usage, input_tokens, output_tokens, self._IMAGE_OUTPUT)
        )
        call.usage_source = "reported"

    def _on_json(self, obj: dict[str, Any]) -> None:
        self._usage(obj.get("usage"))
        svg = obj.get("svg_usage")
        if svg is not None:
            self._svg(svg)

    def _on_tail(self, tail: bytes | bytearray) -> None:
        # (An SVG answer too large to read whole: its svg_usage, beside its usage after the image.)
        for svg in _members_in_tail(tail, _SVG_USAGE_MEMBER):
            self._svg(svg)
            break

    def _svg(self, svg: Any) -> None:
        counted = _svg_usage(svg)
        self.call.svg_usage = None if counted is None else {0: counted}

    def _on_event(self, event: str, obj: dict[str, Any], now: float) -> None:
        kind = obj.get("type") or event
        if type(kind) is not str:
            kind = event
        if kind in _MEDIA_DONE_EVENTS:
            # (With several images streamed, each ends with an event of its own: the last one's usage is the call's.)
            self._closed = True
            self._usage(obj.get("usage"))
        elif kind == "error" or obj.get("error"):
            self._stream_error(obj if isinstance(obj.get("error"), dict) else {"error": obj})

    def _on_dropped(self, event: str, usage: dict[str, Any]) -> None:
        # An image's last event holds the whole image in base64 (megabytes) before its usage: too large to read as an
        # event, its usage is read from its last bytes. Only that event carries a usage: it was the last one.
        self._closed = True
        self._usage(usage)


Parts: TypeAlias = tuple[int | None, int | None]


def _media_parts(
    usage: dict[str, Any], input_tokens: int | None, output_tokens: int | None, image: bool
) -> tuple[Parts, Parts]:
    """The (audio, image) tokens of the input and of the output of an image's or a transcription's usage, each a
    part of its total (see :func:`_parts`; None: not reported). ``image``: the output is an image, so its tokens are
    image tokens but for the text and audio its ``output_tokens_details`` count."""
    # (``input_tokens_details`` in an image's usage, ``input_token_details`` in a transcription's.)
    details = usage.get("input_tokens_details")
    if not isinstance(details, dict):
        details = usage.get("input_token_details")
    modal_input: Parts = (None, None)
    if isinstance(details, dict):
        modal_input = _parts(input_tokens, details.get("audio_tokens"), details.get("image_tokens"))
    details = usage.get("output_tokens_details")
    if isinstance(details, dict):
        audio, images = _parts(output_tokens, details.get("audio_tokens"), details.get("image_tokens"))
        if image and images is None and output_tokens is not None:
            # (Details without an image count: the output is the image but for the text and audio they count.)
            text = _int(details.get("text_tokens")) or 0
            images = max(output_tokens - (audio or 0) - text, 0)
    else:
        audio, images = None, output_tokens if image else None
    return modal_input, (audio, images)


def _image_tool_usage(usage: Any) -> SubUsage | None:
    """The tokens of a response's image generation tool (``tool_usage.image_gen``, which the response's ``usage``
    leaves out), read as an image's usage is: its input's image tokens apart (``input_tokens_details``), its output
    image tokens unless ``output_tokens_details`` counts text among them; its ``cached_tokens`` (when reported) are
    cache reads, and the cached image tokens among them (``cached_tokens_details.cached_image_tokens``, at most the
    reads) are no fresh image input, priced at the entry's ``cache_read_image``. None when it reports no token."""
    if not isinstance(usage, dict):
        return None
    input_tokens, output_tokens = _int(usage.get("input_tokens")), _int(usage.get("output_tokens"))
    if not input_tokens and not output_tokens:
        return None
    (_, image_in), (audio_out, image_out) = _media_parts(usage, input_tokens, output_tokens, True)
    read = min(_int(usage.get("cached_tokens")) or 0, input_tokens or 0)
    cached_image = 0
    if read:
        cached_image = min(_int(_get(usage, "cached_tokens_details", "cached_image_tokens")) or 0, read)
        if image_in:
            image_in = max(image_in - cached_image, 0)
    return (
        input_tokens or 0,
        read,
        0,
        0,
        output_tokens or 0,
        (0, image_in or 0),
        (audio_out or 0, image_out or 0),
        cached_image,
    )


def _svg_usage(usage: Any) -> tuple[str | None, SubUsage] | None:
    """An SVG image's ``svg_usage`` (an images answer's, a Responses ``image_generation_call`` item's): the model that
    wrote it (a text model, billed at its own prices apart from the image's usage) and its input and output tokens
    (the output with its reasoning, as a text model's output counts it). None when it reports no token."""
    if not isinstance(usage, dict):
        return None
    input_tokens, output_tokens = _int(usage.get("input_tokens")), _int(usage.get("output_tokens"))
    if not input_tokens and not output_tokens:
        return None
    return _name(usage.get("model")), (input_tokens or 0, 0, 0, 0, output_tokens or 0, (0, 0), (0, 0), 0)


def _add_svg_item(call: LLMCall, item: dict[str, Any], index: Any) -> None:
    """Keep the ``svg_usage`` of a Responses ``image_generation_call`` item at ``index`` of the output, by the item's
    id (else its index): an item read again (a stream's ``response.output_item.done``, then ``response.completed``)
    replaces what it gave, so each image is priced once. At most MAX_SVG_ITEMS images are kept."""
    item_id = item.get("id")
    key: str | int
    if isinstance(item_id, str) and item_id:
        key = item_id[:256]
    else:
        position = _int(index)
        key = "" if position is None else position
    counted = _svg_usage(item.get("svg_usage"))
    items = call.svg_usage
    if items is None:
        if counted is None:
            return
        items = call.svg_usage = {}
    if counted is None:
        items.pop(key, None)  # (read again without its usage: it has none)
    elif key in items or len(items) < MAX_SVG_ITEMS:
        items[key] = counted
    if not items:
        call.svg_usage = None


class OpenAIImagesReader(OpenAIMediaReader):
    """The answers of OpenAI's image generations and edits: an :class:`OpenAIMediaReader` whose output is an image."""

    __slots__ = ()

    _IMAGE_OUTPUT = True


# --- Anthropic Messages ---------------------------------------------------------------------------


#: The counts of an Anthropic usage that a stream's ``message_delta`` may repeat, leave out or send as null.
_ANTHROPIC_COUNTS: Final = ("input_tokens", "cache_read_input_tokens", "cache_creation_input_tokens", "output_tokens")
#: The counts of a compaction entry of ``usage.iterations``, and where their sums are kept.
_COMPACTION_COUNTS: Final = (
    ("input_tokens", "compaction_input"),
    ("cache_read_input_tokens", "compaction_read"),
    ("cache_creation_input_tokens", "compaction_creation"),
    ("output_tokens", "compaction_output"),
)


def _plus(count: int | None, more: int) -> int | None:
    """``count`` (None: none reported) with ``more`` added: None when both are none."""
    return None if count is None and not more else min((count or 0) + more, _MAX_COUNT)


#: Most advisor entries of one usage kept for pricing (the tool's ``max_uses`` bounds them; a body could hold more).
MAX_ADVISOR_ENTRIES: Final = 64


def _advisors(iterations: list[Any]) -> list[tuple[str | None, tuple[int, int, int, int, int]]] | None:
    """The entries of ``type`` ``advisor_message`` of an Anthropic usage's ``iterations``: each a sub-inference of the
    advisor tool, run and billed as its own ``model``, that the usage's top-level counts leave out. Per entry its
    model and (input, cache reads, cache writes, one-hour cache writes, output), input counted with the cache as at
    the top level; None when there are none."""
    found: list[tuple[str | None, tuple[int, int, int, int, int]]] = []
    for entry in iterations:
        if not (isinstance(entry, dict) and entry.get("type") == "advisor_message"):
            continue
        fresh, output = _int(entry.get("input_tokens")) or 0, _int(entry.get("output_tokens")) or 0
        read = _int(entry.get("cache_read_input_tokens")) or 0
        written = _int(entry.get("cache_creation_input_tokens")) or 0
        one_hour = min(_int(_get(entry, "cache_creation", "ephemeral_1h_input_tokens")) or 0, written)
        if fresh or read or written or output:
            counts = (min(fresh + read + written, _MAX_COUNT), read, written, one_hour, output)
            found.append((_name(entry.get("model")), counts))
            if len(found) == MAX_ADVISOR_ENTRIES:
                break
    return found or None


def _compactions(iterations: list[Any], counts: dict[str, int]) -> None:
    """Sum the entries of ``type`` ``compaction`` of an Anthropic usage's ``iterations`` into ``counts``, in place of
    the sums of an earlier list. Anthropic leaves a compaction pass out of the usage's top-level counts (the message's
    own sampling, the ``message`` entries, is what those count), though it is billed: its input (cache reads and
    writes included, as at the top level) and output are added to the call's."""
    sums = dict.fromkeys(("compaction_input", "compaction_read", "compaction_creation", "compaction_output"), 0)
    one_hour = 0
    for entry in iterations:
        if isinstance(entry, dict) and entry.get("type") == "compaction":
            for key, total in _COMPACTION_COUNTS:
                sums[total] += _int(entry.get(key)) or 0
            one_hour += _int(_get(entry, "cache_creation", "ephemeral_1h_input_tokens")) or 0
    sums["compaction_input"] += sums["compaction_read"] + sums["compaction_creation"]
    for total, value in sums.items():
        counts[total] = min(value, _MAX_COUNT)
    counts["compaction_one_hour"] = min(one_hour, _MAX_COUNT)


#: Anthropic content blocks that are the model calling a tool: the application's, one the API runs (web search, code
#: execution), one of an MCP server the API connects to.
_ANTHROPIC_TOOL_BLOCKS: Final = frozenset(("tool_use", "server_tool_use", "mcp_tool_use"))


def _json_chars(value: Any) -> int:
    """Characters of ``value`` written as compact JSON (0 for None, or a value too deep to write)."""
    if value is None:
        return 0
    try:
        return len(json.dumps(value, separators=(",", ":"), ensure_ascii=False))
    except (RecursionError, ValueError, TypeError):
        return 0


def _hosted_block(block_type: Any, name: str) -> str | None:
    """The kind of hosted tool an Anthropic tool block calls (its name, ``mcp`` for an MCP server's), or None."""
    return None if block_type == "tool_use" else "mcp" if block_type == "mcp_tool_use" else name


class AnthropicMessagesReader(ResponseReader):
    __slots__ = ("_counts",)
    _TEXT_KEYS = (b'"text":"', b'"thinking":"', b'"partial_json":"')

    def __init__(self, call: LLMCall, *, stream: bool, capture: bool = False, shortcuts: bool = True) -> None:
        super().__init__(call, stream=stream, capture=capture, shortcuts=shortcuts)
        #: The usage read so far, as Anthropic's SDK merges a stream's: each count its last value given (a null or a
        #: count left out erases none), and the sums of the last ``iterations`` list's compaction entries.
        self._counts: dict[str, int] = {}

    def _plain_delta(self, event: str, data: bytes) -> bool:
        # (The event's name is no part of its data, and says what it is when its data has no type.)
        inner = self._inner
        return event == "content_block_delta" and inner is not None and _fits(inner, data)

    def _text_only(self, event: str, obj: dict[str, Any], read: bool = False) -> bool:
        # What _on_event counts: a delta with text, thinking or a tool's input. A null or missing one is none.
        if (obj.get("type") or event) != "content_block_delta":
            return False
        delta = obj.get("delta")
        return isinstance(delta, dict) and bool(delta.get("text") or delta.get("thinking") or delta.get("partial_json"))

    def _usage(self, usage: Any) -> None:
        if not isinstance(usage, dict):
            return
        counts = self._counts
        for key in _ANTHROPIC_COUNTS:
            value = _int(usage.get(key))
            if value is not None:
                counts[key] = value
        one_hour = _int(_get(usage, "cache_creation", "ephemeral_1h_input_tokens"))
        if one_hour is not None:
            counts["one_hour"] = one_hour
        thinking = _int(_get(usage, "output_tokens_details", "thinking_tokens"))
        if thinking is not None:
            counts["thinking"] = thinking
        iterations = usage.get("iterations")
        call = self.call
        if isinstance(iterations, list):
            _compactions(iterations, counts)
            # (A later list replaces an earlier one, as the SDK's merged usage has it.)
            call.advisor_usage = _advisors(iterations)
        fresh = counts.get("input_tokens")
        cache_read = counts.get("cache_read_input_tokens")
        cache_creation = counts.get("cache_creation_input_tokens")
        if fresh is not None or cache_read is not None or cache_creation is not None:
            # Anthropic counts cached input apart; the semantic conventions' input count includes it. A compaction
            # pass (the beta's server-side compaction) is left out of the top-level counts: its tokens are added.
            call.input_tokens = min(
                (fresh or 0) + (cache_read or 0) + (cache_creation or 0) + counts.get("compaction_input", 0), _MAX_COUNT
            )
            call.cache_read_tokens = _plus(cache_read, counts.get("compaction_read", 0))
            call.cache_creation_tokens = _plus(cache_creation, counts.get("compaction_creation", 0))
        one_hour = _plus(counts.get("one_hour"), counts.get("compaction_one_hour", 0))
        if one_hour is not None:
            call.cache_creation_1h_tokens = one_hour
        output = counts.get("output_tokens")
        if output is not None:
            compacted = counts.get("compaction_output", 0)
            call.output_tokens = min(output + compacted, _MAX_COUNT)
            call.compaction_output_tokens = compacted
            # The tokens of thinking: shown or not (``display: omitted``), a part of the message's output.
            call.reasoning_tokens = counts.get("thinking")
        call.usage_source = "reported"

    def _message(self, message: Any, *, stream: bool = False) -> None:
        if not isinstance(message, dict):
            return
        self.call.response_model = _name(message.get("model")) or self.call.response_model
        self.call.response_id = _str(message.get("id")) or self.call.response_id
        usage = message.get("usage")
        if stream and isinstance(usage, dict):
            # message_start carries the real input counts but a placeholder output count (0 or 1): the output
            # is reported by message_delta, and a stream cut before it is estimated from what was sent instead.
            usage = {k: v for k, v in usage.items() if k != "output_tokens" and k != "output_tokens_details"}
            if not any(_int(usage.get(key)) for key in _ANTHROPIC_INPUT_COUNTS):
                # No input at all is a placeholder too: a gateway translating another provider's stream (the LiteLLM
                # proxy) sends 0 and the real count in message_delta; a stream cut before that has its input
                # estimated from the request, as one without usage has.
                return
        self._usage(usage)

    def _on_event(self, event: str, obj: dict[str, Any], now: float) -> None:
        kind = obj.get("type") or event
        if kind == "content_block_delta":
            delta = obj.get("delta")
            if isinstance(delta, dict):
                text = delta.get("text") or delta.get("thinking") or delta.get("partial_json")
                if text:
                    self._first_token(now, reasoning=delta.get("type") == "thinking_delta")
                    self._chunks += 1
                    if delta.get("type") == "text_delta":
                        self._keep_text(text)
        elif kind == "content_block_start":
            block = obj.get("content_block")
            if isinstance(block, dict):
                block_type = block.get("type")
                if type(block_type) is not str:
                    block_type = None  # (a list or an object would not even hash)
                if block_type in _ANTHROPIC_TOOL_BLOCKS:
                    self._first_token(now)
                    name = _str(block.get("name"))
                    if name:
                        _add_tool_call(self.call, name, block.get("id"), _hosted_block(block_type, name))
                elif block_type is not None and block_type.endswith("_tool_result"):
                    self.call.add_server_tool_result(block.get("tool_use_id"), block_type[: -len("_tool_result")])
                elif block_type == "redacted_thinking":
                    # Reasoning sent as one encrypted block once made (no deltas): the first output the client gets.
                    self._first_token(now)
                    self._chunks += 1
        elif kind == "message_delta":
            _add_finish_reason(self.call, _get(obj, "delta", "stop_reason"))
            self._usage(obj.get("usage"))
        elif kind == "message_start":
            self._message(obj.get("message"), stream=True)
        elif kind == "message_stop":
            self._closed = True
        elif kind == "error":
            self._stream_error(obj)

    def _on_json(self, obj: dict[str, Any]) -> None:
        self._message(obj)
        _add_finish_reason(self.call, obj.get("stop_reason"))
        for block in _list(obj.get("content")):
            if not isinstance(block, dict):
                continue
            name = _str(block.get("name"))
            if name and type(block.get("type")) is str and block["type"] in _ANTHROPIC_TOOL_BLOCKS:
                _add_tool_call(self.call, name, block.get("id"), _hosted_block(block["type"], name))
                if not isinstance(obj.get("usage"), dict):
                    # Its input is output to estimate, as a stream's ``partial_json`` pieces of it are (written out
                    # only when there is no usage to read instead).
                    self._text_chars += _json_chars(block.get("input"))
            elif type(kind := block.get("type")) is str and kind.endswith("_tool_result"):
                self.call.add_server_tool_result(block.get("tool_use_id"), kind[: -len("_tool_result")])
            elif isinstance(block.get("text"), str):
                self._text_chars += len(block["text"])
                self._keep_text(block["text"])
            elif kind == "thinking" and isinstance(block.get("thinking"), str):
                # Output the model made, to estimate as a stream's thinking deltas are (no part of the answer).
                self._text_chars += len(block["thinking"])


# --- requests -------------------------------------------------------------------------------------


def _tool_results_openai(messages: list[Any]) -> list[ToolResult]:
    """Tool results after the last assistant turn: the ones this request reports for the first time. An assistant
    turn that ends the messages is a prefill the model is to continue, not an answer to them: the results before it
    are this request's."""
    names: dict[str, str] = {}
    results: list[ToolResult] = []
    before: list[ToolResult] = []
    model_last = False
    for message in messages:
        if not isinstance(message, dict):
            continue
        role = message.get("role")
        model_last = role == "assistant"
        if model_last:
            before, results = results, []
            for tool_call in _list(message.get("tool_calls")):
                call_id = _str(tool_call.get("id")) if isinstance(tool_call, dict) else None
                if call_id:
                    name = _str(_get(tool_call, "function", "name")) or _str(_get(tool_call, "custom", "name"))
                    names[call_id] = name or "unknown"
        elif role == "tool":
            name = names.get(_str(message.get("tool_call_id")) or "", "unknown")
            results.append(ToolResult(name, _looks_like_error(message.get("content"))))
        elif role == "function":
            # The result of a legacy ``function_call`` (counted as a tool call): the message names its function.
            name = _str(message.get("name")) or "unknown"
            results.append(ToolResult(name, _looks_like_error(message.get("content"))))
    return before if model_last else results


def _tool_results_anthropic(messages: list[Any]) -> list[ToolResult]:
    names: dict[str, str] = {}
    results: list[ToolResult] = []
    before: list[ToolResult] = []
    model_last = False
    for message in messages:
        if not isinstance(message, dict):
            continue
        content = message.get("content")
        model_last = message.get("role") == "assistant"
        if model_last:
            # A model turn, its content given as blocks or as a plain string: the results before it were sent
            # with an earlier request, and counted then; unless it ends the messages, a prefill the model is to
            # continue (as _tool_results_openai).
            before, results = results, []
            for block in content if isinstance(content, list) else ():
                block_id = _str(block.get("id")) if isinstance(block, dict) else None
                if block_id and block.get("type") == "tool_use":
                    names[block_id] = _str(block.get("name")) or "unknown"
        elif isinstance(content, list):
            for block in content:
                if isinstance(block, dict) and block.get("type") == "tool_result":
                    name = names.get(_str(block.get("tool_use_id")) or "", "unknown")
                    results.append(ToolResult(name, block.get("is_error") is True))
    return before if model_last else results


def _tool_results_responses(items: list[Any]) -> list[ToolResult]:
    names: dict[str, str] = {}
    results: list[ToolResult] = []
    hosted: set[str] = set()  # shell calls the API ran in its own container: their outputs are its, not the app's
    for item in items:
        if not isinstance(item, dict):
            continue
        kind = item.get("type")
        if kind is not None and type(kind) is not str:
            continue  # ("type": [...] or {...}: no item of this API, and a set cannot look it up)
        if kind in _RESPONSES_TOOL_ITEMS or (kind in (None, "message") and item.get("role") == "assistant"):
            if results:
                results = []  # a model turn after tool outputs: those outputs belong to an earlier request
            call_id = _str(item.get("call_id"))
            if kind in _RESPONSES_TOOL_ITEMS and call_id:
                names[call_id] = _tool_item_name(item) or "unknown"
                if hosted_shell(item):
                    hosted.add(call_id)
        elif kind in _RESPONSES_TOOL_OUTPUTS and not (
            kind == "tool_search_output" and item.get("execution") == "server"
        ):
            # (A tool search the API ran itself sent back with the conversation is its result, as a web search's is:
            # no tool result of the application's; so is a shell call's output it ran in its container.) A local
            # shell call's output names its call in ``id``.
            call_id = _str(item.get("call_id")) or _str(item.get("id")) or ""
            if kind == "shell_call_output" and call_id in hosted:
                continue
            name = names.get(call_id) or _recent_tool_calls.get(call_id, "unknown")
            results.append(ToolResult(name, _tool_output_failed(kind, item)))
    return results


def _tool_output_failed(kind: str, item: dict[str, Any]) -> bool:
    """Whether a Responses API tool output item reports a failure: a shell call's commands' outcome (one that timed out
    or exited with a status other than 0), an apply_patch call's status ``failed``, else its output as a function
    call's is read (see _looks_like_error; a computer call's screenshot is never one)."""
    if kind == "shell_call_output":
        for chunk in _list(item.get("output")):
            outcome = chunk.get("outcome") if isinstance(chunk, dict) else None
            if isinstance(outcome, dict):
                code = outcome.get("exit_code")
                if outcome.get("type") == "timeout" or (type(code) is int and code != 0):
                    return True
        return False
    if kind == "apply_patch_call_output":
        return item.get("status") == "failed"
    return _looks_like_error(item.get("output"))


def _looks_like_error(content: Any) -> bool:
    """OpenAI has no error flag on tool results; a JSON object with an ``error`` key, or text that starts
    with "error", is taken as a failed tool call."""
    if isinstance(content, list):  # content parts
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    if not isinstance(content, str):
        return False
    text = content.lstrip()
    if text[:5].lower() == "error":
        return True
    if text.startswith("{") and '"error"' in text:  # (no need to parse an object that names no error key)
        obj = loads(text)
        return isinstance(obj, dict) and bool(obj.get("error"))
    return False


def _content_chars(value: Any, key: str) -> int:
    """Characters of text in ``value``: a string; a list of strings, of text parts (``{"text": ...}``), or of
    messages holding either under ``key``; and of tool results sent back, as a tool message's content is counted: an
    Anthropic ``tool_result`` block's content, a Responses API tool output item's output (see ``_output_chars``)."""
    if isinstance(value, str):
        return len(value)
    if not isinstance(value, list):
        return 0
    chars = 0
    for item in value:
        if isinstance(item, str):
            chars += len(item)
        elif isinstance(item, dict):
            text = item.get("text")
            kind = item.get("type")
            if isinstance(text, str):
                chars += len(text)
            elif key and key in item:
                chars += _content_chars(item[key], "")
            elif kind == "tool_result":
                # (Its blocks' text, and that of a search result's own content blocks.)
                chars += _content_chars(item.get("content"), "content")
            elif type(kind) is str and kind in _RESPONSES_TOOL_OUTPUTS:
                chars += _output_chars(item.get("output"))
    return chars


def _output_chars(output: Any) -> int:
    """Characters of text in a Responses API tool output: a string, or a list of text parts or of a shell call's
    stdout and stderr (a screenshot has none)."""
    if isinstance(output, str):
        return len(output)
    chars = 0
    for part in _list(output):
        if isinstance(part, dict):
            for key in ("text", "stdout", "stderr"):
                text = part.get(key)
                if isinstance(text, str):
                    chars += len(text)
    return chars


#: The input counts of an Anthropic usage: fresh input, cache reads, cache writes.
_ANTHROPIC_INPUT_COUNTS: Final = ("input_tokens", "cache_read_input_tokens", "cache_creation_input_tokens")


#: The form fields read from a multipart request (see :func:`form_fields`), and the most bytes of a value kept.
_FORM_FIELDS: Final = frozenset((b"model", b"stream"))
_FORM_VALUE_BYTES: Final = 1024
#: A form part's name in its Content-Disposition header, and a file part's file name.
_FORM_NAME: Final = re.compile(rb'(?i)content-disposition:[^\r\n]*?;[ \t]*name="([^"\r\n]*)"')
_FORM_FILE: Final = re.compile(rb"(?i)content-disposition:[^\r\n]*?;[ \t]*filename\*?=")


def form_fields(body: bytes) -> dict[str, Any] | None:
    """The ``model`` and ``stream`` fields of a ``multipart/form-data`` body (RFC 7578, as the SDKs send an image edit
    or a transcription: the fields, then the files), as a JSON body would hold them (``stream`` true or false), or
    None when ``body`` is not a form. The boundary is the body's first line. Parts are found with byte searches,
    never copied but for a field's value (at most 1 KiB; a file part, or a longer value, is passed over)."""
    if not body.startswith(b"--"):
        return None
    line = body.find(b"\r\n", 2, 2 + 72)  # (a boundary is at most 70 characters)
    if line < 3:
        return None
    delimiter = b"\r\n" + body[:line]
    fields: dict[str, Any] = {}
    start = line + 2
    while len(fields) < len(_FORM_FIELDS):
        end = body.find(delimiter, start)
        if end < 0:
            break
        head_end = body.find(b"\r\n\r\n", start, min(end, start + 1024))
        if head_end >= 0:
            head = body[start:head_end]
            name = _FORM_NAME.search(head)
            value_start = head_end + 4
            if (
                name is not None
                and name.group(1) in _FORM_FIELDS
                and not _FORM_FILE.search(head)
                and end - value_start <= _FORM_VALUE_BYTES
            ):
                key = name.group(1).decode()
                value = body[value_start:end].decode("utf-8", "replace")
                fields.setdefault(key, value if key != "stream" else value == "true")
        start = body.find(b"\r\n", end + len(delimiter))
        if start < 0 or body.startswith(b"--", end + len(delimiter)):
            break  # (the closing delimiter)
        start += 2
    return fields


def _path_model(path: str) -> str | None:
    """The model a path names when the body does not: Azure OpenAI's ``/openai/deployments/{deployment}/...`` (its
    REST API takes no ``model`` in the body) and the legacy ``/engines/{model}/...``."""
    for marker in ("/deployments/", "/engines/"):
        at = path.rfind(marker)
        if at >= 0:
            name = path[at + len(marker) :].partition("/")[0]
            return name or None
    return None


class API:
    """One LLM HTTP API: its operation, provider, and how to read its requests and responses."""

    def __init__(
        self,
        name: str,
        operation: str,
        provider: str,
        reader: type[ResponseReader],
        api_type: str | None = None,
        form: bool = False,
    ) -> None:
        self.name = name
        self.operation = operation
        self.provider = provider
        self.reader = reader
        #: The conventions' ``openai.api.type``: which of OpenAI's two chat APIs this is (None for the others).
        self.api_type = api_type
        #: Whether its requests may be multipart forms (an image edit, a transcription: files and fields), whose
        #: fields are read as a JSON body's members (see :func:`form_fields`).
        self.form = form

    def __repr__(self) -> str:
        return f"API({self.name!r})"

    def read_request(self, call: LLMCall, body: dict[str, Any], capture: bool, parameters: bool = True) -> None:
        """Fill ``call`` from the request ``body``; ``parameters``: also the parameters only a span shows."""
        call.request_model = _name(body.get("model")) or _path_model(call.path)
        call.stream = body.get("stream") is True
        call.max_tokens = _int(
            body.get("max_tokens") or body.get("max_completion_tokens") or body.get("max_output_tokens")
        )
        call.temperature = _num(body.get("temperature"))
        call.top_p = _num(body.get("top_p"))
        if parameters:
            _read_parameters(call, body)
        if self.provider == "anthropic":
            messages = body.get("messages")
            if isinstance(messages, list):
                call.tool_results = _tool_results_anthropic(messages)
        elif self.name == "openai.responses":
            items = body.get("input")
            if isinstance(items, list):
                call.tool_results = _tool_results_responses(items)
            tools = body.get("tools")
            if isinstance(tools, list):
                call.image_tool_model = _image_tool_model(tools)
        else:
            messages = body.get("messages")
            if isinstance(messages, list):
                call.tool_results = _tool_results_openai(messages)
            # Read with or without a span: with n choices, the answer ends once each has its finish reason.
            n = _int(body.get("n"))
            if n is not None and n != 1:
                call.choice_count = n
        if capture:
            call.input_messages = _capture_input(body)
            system = body.get("system") or body.get("instructions")
            if isinstance(system, (str, list)):
                call.system_instructions = system

    def estimate_input_tokens(self, body: Mapping[str, Any]) -> int | None:
        """Input tokens of a request whose response reported no usage, from the text it sends at ~4 characters a
        token (as the output estimate of a body's text), or None. A lower bound: message framing, tool definitions
        and images are not counted. None for embeddings, whose responses always report their input. Anthropic's
        stream reports it in its first event, but a gateway translating another provider's stream sends 0 there
        and the count only at the end: a stream cut before that is estimated too."""
        if self.name == "openai.chat":
            chars = _content_chars(body.get("messages"), "content")
        elif self.name == "anthropic.messages":
            chars = _content_chars(body.get("messages"), "content") + _content_chars(body.get("system"), "")
        elif self.name == "openai.responses":
            chars = _content_chars(body.get("input"), "content") + _content_chars(body.get("instructions"), "")
        elif self.name == "openai.completions":
            chars = _content_chars(body.get("prompt"), "")
        else:
            return None
        return math.ceil(chars / 4) if chars else None

    def response_reader(self, call: LLMCall, *, stream: bool, capture: bool) -> ResponseReader:
        reader = self.reader
        return reader(call, stream=stream, capture=capture)


#: Most entries of a Responses request's ``tools`` looked through for its image generation tool (OpenAI takes 128).
MAX_TOOLS_READ: Final = 256


def _image_tool_model(tools: list[Any]) -> str | None:
    """The ``model`` of the first ``image_generation`` tool among a Responses request's first MAX_TOOLS_READ
    ``tools``, or None (none, or one naming no model: the API's choice, not known here)."""
    for tool in tools[:MAX_TOOLS_READ]:
        if isinstance(tool, dict) and tool.get("type") == "image_generation":
            return _name(tool.get("model"))
    return None


#: Stop sequences kept for a span, and the characters kept of each (OpenAI takes up to 4).
MAX_STOP_SEQUENCES: Final = 8
MAX_STOP_SEQUENCE_CHARS: Final = 64
#: Characters kept of a conversation id (OpenAI's are ``conv_`` and 48 hexadecimal digits).
MAX_CONVERSATION_ID_CHARS: Final = 256
#: ``response_format.type`` (chat) or ``text.format.type`` (Responses) -> ``gen_ai.output.type``.
_OUTPUT_TYPES: Final = {"text": "text", "json_object": "json", "json_schema": "json"}


def _read_parameters(call: LLMCall, body: Mapping[str, Any]) -> None:
    """The request parameters besides the model, token limit, temperature and top_p that the GenAI conventions put
    on the span. A value of the wrong type is left out, as a server would refuse it."""
    get = body.get
    call.top_k = _num(get("top_k"))
    call.frequency_penalty = _num(get("frequency_penalty"))
    call.presence_penalty = _num(get("presence_penalty"))
    seed = get("seed")
    if isinstance(seed, int) and not isinstance(seed, bool) and abs(seed) <= _MAX_COUNT:
        call.seed = seed
    stop = get("stop")
    if stop is None:
        stop = get("stop_sequences")  # Anthropic's name
    if isinstance(stop, str):
        stop = [stop]
    if isinstance(stop, list) and stop:
        sequences = tuple(
            field_text(s, MAX_STOP_SEQUENCE_CHARS) for s in stop[:MAX_STOP_SEQUENCES] if isinstance(s, str)
        )
        call.stop_sequences = sequences or None
    encoding = get("encoding_format")
    if isinstance(encoding, str) and encoding:
        call.encoding_format = field_text(encoding, MAX_STOP_SEQUENCE_CHARS)
    dimensions = get("dimensions")
    if isinstance(dimensions, int) and not isinstance(dimensions, bool) and 0 < dimensions <= _MAX_COUNT:
        call.dimension_count = dimensions
    conversation = get("conversation")
    if isinstance(conversation, dict):
        conversation = conversation.get("id")  # (given as an object: {"id": "conv_..."})
    if isinstance(conversation, str) and conversation:
        call.conversation_id = field_text(conversation, MAX_CONVERSATION_ID_CHARS)
    tier = get("service_tier")
    if isinstance(tier, str) and tier and tier != "auto":  # (the default: the conventions leave it out)
        call.service_tier = field_text(tier, MAX_STOP_SEQUENCE_CHARS)
    output_format = get("response_format")
    if output_format is None:
        text = get("text")  # the Responses API's {"format": {...}}
        output_format = text.get("format") if isinstance(text, dict) else None
    if isinstance(output_format, dict):
        kind = output_format.get("type")
        call.output_type = _OUTPUT_TYPES.get(kind) if isinstance(kind, str) else None


def _capture_input(body: Mapping[str, Any]) -> list[dict[str, Any]]:
    # System instructions given apart from the messages go to their own attribute (LLMCall.system_instructions).
    captured: list[dict[str, Any]] = []
    for key in ("messages", "input", "prompt"):
        value = body.get(key)
        if isinstance(value, str):
            captured.append({"role": "user", "content": value})
        elif isinstance(value, list):
            captured.extend(m for m in value if isinstance(m, dict))
    return captured


APIS: Final[dict[str, API]] = {
    p.name: p
    for p in (
        API("openai.chat", "chat", "openai", OpenAIChatReader, "chat_completions"),
        API("openai.completions", "text_completion", "openai", OpenAIChatReader),
        API("openai.embeddings", "embeddings", "openai", OpenAIEmbeddingsReader),
        API("openai.responses", "chat", "openai", OpenAIResponsesReader, "responses"),
        API("anthropic.messages", "chat", "anthropic", AnthropicMessagesReader),
        # The GenAI conventions have no operation of their own for images or transcriptions: "generate_content",
        # their multimodal generation, is the one that applies.
        API("openai.images", UNTIMED_OPERATION, "openai", OpenAIImagesReader, form=True),
        API("openai.transcriptions", UNTIMED_OPERATION, "openai", OpenAIMediaReader, form=True),
    )
}

#: Path suffixes recognised out of the box, longest first so ``/chat/completions`` wins over ``/completions``.
DEFAULT_ROUTES: Final[dict[str, str]] = {
    "/chat/completions": "openai.chat",
    "/completions": "openai.completions",
    "/embeddings": "openai.embeddings",
    "/responses": "openai.responses",
    # A compaction pass (``responses.compact``): the model reads the conversation and writes it shorter, billed as
    # any Responses call (its answer has the same usage).
    "/responses/compact": "openai.responses",
    "/messages": "anthropic.messages",
    # Image generations and edits and transcriptions, for the token usage of the models that report one (the GPT image
    # models, gpt-4o-transcribe). Edits and transcriptions are multipart forms: their model is read from its field.
    "/images/generations": "openai.images",
    "/images/edits": "openai.images",
    "/audio/transcriptions": "openai.transcriptions",
}
