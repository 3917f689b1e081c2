"""The ASGI middleware: watches LLM API requests and responses as they pass, never changing them."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import sys
import threading
import weakref
from collections.abc import Awaitable, Callable, Mapping
from inspect import CO_COROUTINE
from time import monotonic, perf_counter
from types import CodeType
from typing import Any, BinaryIO, Final, Protocol, TypeAlias

import anyio
import anyio.to_thread
from opentelemetry import context, trace
from opentelemetry.metrics import MeterProvider
from opentelemetry.trace import TracerProvider

from .apis import (
    API,
    APIS,
    DEFAULT_ROUTES,
    MAX_ERROR_BODY_BYTES,
    MAX_JSON_RESPONSE_BYTES,
    UNCOUNTED_BYTES,
    ErrorReader,
    ReadBudgetSpent,
    ResponseReader,
    form_fields,
    loads,
)
from .config import (
    DEFAULT_MAX_INSPECTED_BYTES,
    OTEL_LOGS_EXPORTER,
    OTEL_TRACES_EXPORTER,
    ConfigurationError,
    Settings,
)
from .decoding import CODINGS, MAX_DECODED_STREAM_BYTES, READ_STEP, DecodingReader, read_within
from .errors import classify_status
from .instruments import LLM_TELEMETRY_BODY, LLM_TELEMETRY_REASON
from .labels import field_text, name_text
from .logs import new_request_id
from .record import LLMCall
from .sse import TAIL_BYTES
from .telemetry import DRAIN_SECONDS, SHUTDOWN_SECONDS, Telemetry
from .tracing import detach, leaked_into
from .types import ASGIApp, Message, Receive, Scope, Send

logger = logging.getLogger("llm_telemetry")

#: Request header carrying the request id; read for the logs, echoed on the response when the app sets none.
REQUEST_ID_HEADER = b"x-request-id"
#: Anthropic's response header for its request id (``req_...``), which its SDKs expose as the response's id: adopted
#: like an app's own ``x-request-id`` when the app sets no ``x-request-id``.
ANTHROPIC_REQUEST_ID_HEADER = b"request-id"
#: The ASGI scope key an instance sets on a request it observes: an instance nested inside it passes it through.
OBSERVED = "llm_telemetry.observed"

#: Stream chunks kept unread at most before they are read together, and the largest chunk kept (a larger one
#: is read as it passes): so at most MAX_HELD_BYTES (64 KiB) are kept. Counting chunks, rather than adding up
#: their sizes, keeps the per-chunk work of ``send`` to two ``len`` calls and no attribute write; each reading
#: of the kept chunks costs about as much as 10 chunks, hence 128 rather than fewer.
MAX_HELD_CHUNKS = 128
MAX_HELD_CHUNK_BYTES = 512
MAX_HELD_BYTES = MAX_HELD_CHUNKS * MAX_HELD_CHUNK_BYTES
#: Bytes of a ``pathsend`` answer's file read at a time, each piece read before the next (a stream's file may be
#: up to MAX_DECODED_STREAM_BYTES long).
FILE_PIECE: Final = 1024 * 1024
#: A stream chunk larger than this is handed on before it is read (through ``_watched_send``, a coroutine of ours):
#: reading a chunk of many events takes long enough to delay its bytes (1 MB of small events: ~35 ms). Smaller ones
#: are read first, in microseconds, which costs less than the coroutine would.
READ_AFTER_BYTES = 16 * 1024

#: What keeping one piece of a request body costs besides its bytes (the bytes object's header with its allocator
#: rounding, and its slot in the list), counted against the body limit with the piece's length. A client that
#: drips its body gets one piece per read from the server, a byte or two each: counted by their bytes alone, the
#: pieces of an 8 MiB body would keep hundreds of MB alive until the response ends (~55 bytes a piece measured).
BODY_PIECE_OVERHEAD = 64


#: A request keeping bytes against the budget that has gained less than UNCOUNTED_BYTES of them in this many seconds
#: is stalled: a client that stopped sending its body part-way, or one that does not read (or reads a byte a second) a
#: JSON answer sent in pieces, whose next piece waits on the client. When another request finds the budget full, a
#: stalled request gives up what it keeps (see :meth:`_Exchange.let_go`), rather than holding the budget for as long as
#: its connection lives and leaving every later large body unread: at once when it runs on the same event loop, and
#: when its own loop next runs a callback when it runs on another (see _Budget.reclaim).
STALLED_SECONDS: Final = 5.0

#: How another thread has a request's event loop run a function (asyncio's ``call_soon_threadsafe``, trio's
#: ``run_sync_soon``), or None when the request's loop is neither.
Owner: TypeAlias = "Callable[[Callable[[], None]], object] | None"


def _owner() -> Owner:
    """How another thread has the event loop running in this one call a function (see Owner)."""
    try:
        return asyncio.get_running_loop().call_soon_threadsafe
    except RuntimeError:
        pass
    trio = sys.modules.get("trio")
    if trio is not None:
        try:
            return trio.lowlevel.current_trio_token().run_sync_soon  # type: ignore[no-any-return]
        except RuntimeError:
            pass
    return None


class _Budget:
    """The bytes every request of this process keeps to read (its request body's pieces, its JSON answer's copy),
    counted together: each is bounded per request (``max_request_bytes``, MAX_JSON_RESPONSE_BYTES), and this bounds
    them across requests, so N connections sending large bodies, or reading a large answer slowly, keep at most
    ``max_inspected_bytes`` alive for reading rather than N times a body (and UNCOUNTED_BYTES of each, uncounted).
    A request gives back all it took when it ends (see :meth:`_Exchange.give_back`), and a stalled one when another
    finds the budget full (see STALLED_SECONDS). Locked: requests of event loops in several threads share it (Granian's
    workers are threads of one process on a free-threaded Python, each with its own loop)."""

    __slots__ = ("asked", "held", "holders", "lock", "logged", "logged_stalled")

    def __init__(self) -> None:
        self.held = 0
        #: The requests keeping bytes now, each with the thread it runs in and how to reach that thread's event loop
        #: (only requests with bodies or answers past UNCOUNTED_BYTES are ever here).
        self.holders: dict[_Exchange, tuple[int, Owner]] = {}
        #: The threads whose loops have been asked to have their stalled requests give up their bytes and have not done
        #: it yet, with when (``time.monotonic``): asked once, however many requests find the budget full meanwhile,
        #: and again after STALLED_SECONDS (a loop that stopped without closing never answers).
        self.asked: dict[int, float] = {}
        self.lock = threading.Lock()
        self.logged = False
        self.logged_stalled = False

    def take(self, size: int, limit: int, asking: _Exchange | None = None) -> bool:
        """Count ``size`` more bytes kept, unless that would pass ``limit``: then False, nothing counted. ``asking``:
        the request taking them, for which stalled requests give up theirs when there is no room (see reclaim)."""
        with self.lock:
            held = self.held + size
            if held <= limit:
                self.held = held
                return True
        if asking is not None and self.reclaim(asking):
            with self.lock:
                held = self.held + size
                if held <= limit:
                    self.held = held
                    return True
        if not self.logged:
            self.logged = True
            logger.warning(
                "llm-telemetry: the bodies kept to be read reached LLM_TELEMETRY_MAX_INSPECTED_BYTES (%d bytes, over"
                " all requests in flight); a body past it is passed on unread, as one over its own limit is: a"
                " request without its request fields, a JSON answer read only for its usage (logged once)",
                limit,
            )
        return False

    def give(self, size: int) -> None:
        with self.lock:
            self.held -= size

    def reclaim(self, asking: _Exchange) -> bool:
        """Have the stalled requests (see STALLED_SECONDS) other than ``asking`` give up what they keep; whether any of
        this thread's did. Only the loop a request runs on touches it: this thread's are suspended while it runs, never
        in the middle of their reading, and let go at once; the loops of other threads keeping bytes are asked to let
        theirs go when they next run a callback, which is after this take: it fails, and the bytes given back are
        there for the next one."""
        thread, now = threading.get_ident(), monotonic()
        with self.lock:
            others = [holder for holder, (owner, _) in self.holders.items() if owner == thread and holder is not asking]
            loops = {
                owner: call
                for owner, call in self.holders.values()
                if owner != thread
                and call is not None
                and now - self.asked.get(owner, -STALLED_SECONDS) >= STALLED_SECONDS
            }
            self.asked.update(dict.fromkeys(loops, now))
        for owner, call in loops.items():
            try:
                call(self._reclaim_here)
            except Exception:  # (its loop closed: its requests have ended, or will not go on)
                with self.lock:
                    self.asked.pop(owner, None)
        return self._let_go(others)

    def _reclaim_here(self) -> None:
        """Run by the event loop of a thread asked by another (see reclaim): its stalled requests give up theirs."""
        thread = threading.get_ident()
        try:
            with self.lock:
                self.asked.pop(thread, None)
                mine = [holder for holder, (owner, _) in self.holders.items() if owner == thread]
            self._let_go(mine)
        except Exception:  # (a callback of trio's run_sync_soon must not raise)
            logger.warning("llm-telemetry: stalled requests could not give the budget back", exc_info=True)

    def _let_go(self, holders: list[_Exchange]) -> bool:
        """Have those of ``holders`` (requests of this thread) that are stalled give up what they keep; whether any
        were."""
        now = monotonic()
        stalled = [holder for holder in holders if holder.stalled(now)]
        for holder in stalled:
            holder.let_go()
        if stalled and not self.logged_stalled:
            self.logged_stalled = True
            logger.warning(
                "llm-telemetry: requests whose bodies or JSON answers were kept to be read made no progress for %g s"
                " (a client not sending the rest of its body, or not reading its answer) while another found"
                " LLM_TELEMETRY_MAX_INSPECTED_BYTES full: they gave back what they kept, and are recorded as a body"
                " past the budget is (logged once)",
                STALLED_SECONDS,
            )
        return bool(stalled)


#: The process's budget of bytes kept to be read (see _Budget).
BUDGET: Final = _Budget()


#: Longest request id taken from the client's header (longer ones are cut).
_MAX_REQUEST_ID_CHARS = 128

#: Resource collections of the OpenAI API whose sub-paths end like an inference endpoint but are not one:
#: ``/v1/threads/{id}/messages`` (Assistants), ``/v1/chat/completions/{id}/messages`` (stored completions).
_NOT_INFERENCE_PARENTS = frozenset({"threads", "completions", "assistants", "runs", "conversations", "batches"})


#: What reads a response body: the API's reader, or one that decompresses the body for it.
Reader: TypeAlias = "ResponseReader | DecodingReader | _Unread"


class Observer(Protocol):
    """Something told about each LLM call: the metrics recorder, tracing, request logs."""

    def start(self, call: LLMCall) -> None: ...

    def end(self, call: LLMCall) -> None: ...


class Router:
    """Matches request paths to APIs by suffix, so ``/v1/...``, ``/openai/v1/...``, Azure's
    ``/openai/deployments/{name}/...`` and gateway prefixes work.

    A suffix preceded by ``<collection>/{id}`` of another OpenAI resource (``/v1/threads/{id}/messages``) is that
    resource, not an inference call. Answers are remembered for short paths (the few an app serves), in a
    cache of bounded size that starts over when full, so client-chosen paths cannot grow it.
    """

    #: Paths remembered at most, and the longest one remembered.
    CACHE_SIZE = 256
    CACHED_PATH_CHARS = 256

    def __init__(self, extra: Mapping[str, str] | None = None) -> None:
        routes = dict(DEFAULT_ROUTES)
        for suffix, name in (extra or {}).items():
            if name not in APIS:
                raise ConfigurationError(f"route {suffix!r}: unknown API {name!r}; known: {', '.join(APIS)}")
            routes["/" + suffix.strip("/")] = name
        # Longest suffix first: "/chat/completions" must win over "/completions".
        self._routes = sorted(((s, APIS[n]) for s, n in routes.items()), key=lambda r: -len(r[0]))
        self._extra = {"/" + suffix.strip("/") for suffix in (extra or {})}
        self._cache: dict[str, API | None] = {}

    def match(self, path: str) -> API | None:
        cache = self._cache
        try:
            return cache[path]
        except KeyError:
            pass
        api = self._match(path)
        if len(path) <= self.CACHED_PATH_CHARS:
            if len(cache) >= self.CACHE_SIZE:
                cache.clear()
            cache[path] = api
        return api

    def _match(self, path: str) -> API | None:
        stripped = path.rstrip("/")
        for suffix, api in self._routes:
            if stripped.endswith(suffix):
                if suffix not in self._extra and _nested_resource(stripped[: -len(suffix)]):
                    return None
                return api
        return None


def _nested_resource(prefix: str) -> bool:
    """True when ``prefix`` ends in ``/<collection>/<id>`` of a non-inference OpenAI resource."""
    parent, _, _resource_id = prefix.rpartition("/")
    return parent.rpartition("/")[2] in _NOT_INFERENCE_PARENTS


class _Failsafe:
    """Counts and logs (once per component) failures inside our own code, which must never reach the client."""

    def __init__(self, telemetry: Telemetry) -> None:
        self._telemetry = telemetry
        self._logged: set[str] = set()

    def __call__(self, component: str, exc: BaseException) -> None:
        try:
            self._telemetry.instruments.internal_errors.add(1, {"llm_telemetry.component": component})
            if component not in self._logged:
                self._logged.add(component)
                logger.warning("llm-telemetry: internal error in %s (logged once): %r", component, exc, exc_info=exc)
        except Exception:
            pass


class _Exchange:
    """Per-request state: wraps ``receive`` and ``send`` to watch the bodies as they pass."""

    __slots__ = (
        "_receive",
        "_send",
        "adopt_id",
        "api",
        "body",
        "body_done",
        "body_ok",
        "body_size",
        "broke_protocol",
        "call",
        "capture",
        "complete",
        "content_length",
        "disconnected",
        "echo_id",
        "failsafe",
        "form_head",
        "gained",
        "held",
        "kept",
        "kept_limit",
        "left_early",
        "left_unanswered",
        "max_body",
        "observers",
        "parameters",
        "read",
        "reader",
        "request",
        "send_code",
        "send_failed",
        "send_refused",
        "settled",
        "started",
        "taken_at",
        "telemetry",
        "token",
        "trailers",
    )

    def __init__(
        self,
        api: API,
        call: LLMCall,
        receive: Receive,
        send: Send,
        max_body: int,
        capture: bool,
        failsafe: _Failsafe,
        parameters: bool = True,
        observers: tuple[Observer, ...] | None = None,
        telemetry: Telemetry | None = None,
        kept_limit: int = DEFAULT_MAX_INSPECTED_BYTES,
    ) -> None:
        self.api = api
        self.call = call
        self._receive = receive
        self._send = send
        self.max_body = max_body
        self.capture = capture
        #: Read the request parameters only a span shows (seed, stop sequences, ...): when tracing is on.
        self.parameters = parameters
        self.failsafe = failsafe
        #: The request body's pieces as the app received them (kept by reference, parsed once the app has
        #: answered: parsing here, inside the app's ``receive()``, would delay its work and its first token).
        self.body: list[bytes] = []
        #: What the kept pieces cost: their lengths and BODY_PIECE_OVERHEAD each, at most ``max_body``.
        self.body_size = 0
        self.body_ok = max_body > 0
        #: The bytes this request has taken from the process's BUDGET (its body's pieces, its JSON answer's copy),
        #: all given back by :meth:`give_back` when it ends; counted here rather than by an object of their own,
        #: which every request would pay for while only bodies past UNCOUNTED_BYTES take any.
        self.kept = 0
        #: The budget's limit; -1 once the request has ended: it takes no more.
        self.kept_limit = kept_limit
        #: When this request last made progress while keeping bytes (``time.monotonic``: it took some, gaining
        #: UNCOUNTED_BYTES or more since the time before, or its answer started), and the bytes it took since then
        #: (see STALLED_SECONDS).
        self.taken_at = 0.0
        self.gained = 0
        #: The whole body arrived within ``max_body``: parse it in :meth:`finish`.
        self.body_done = False
        #: The first UNCOUNTED_BYTES of a multipart form too large to keep (an image edit, a transcription of a long
        #: recording): its fields come before its files, and are read from here (see :meth:`_read_request`).
        self.form_head: bytes | None = None
        #: The request's Content-Length, when it declared one: an app may stop reading once it has that many bytes,
        #: before the server's closing message (``more_body`` false), as Falcon does under Granian and Hypercorn,
        #: which deliver the body and then an empty closing message.
        self.content_length: int | None = None
        #: The parsed request body, until :meth:`finish` knows whether the response reported its usage.
        self.request: dict[str, Any] | None = None
        self.reader: Reader | None = None
        #: Stream chunks sent but not read yet (see :meth:`send`), or None while chunks are read as they pass.
        self.held: list[bytes] | None = None
        self.started = False
        self.complete = False
        #: The server told us the client left: an ``http.disconnect`` message, or its ``send`` raised.
        self.disconnected = False
        #: The ``http.disconnect`` came before the response's last message (see :meth:`finish`).
        self.left_early = False
        self.left_unanswered = False
        self.send_failed = False
        self.send_refused = False
        #: The app sent a second ``http.response.start``: its failure, whatever the server raises for it.
        self.broke_protocol = False
        #: Request id to add to the response headers (when the app sets none), or None.
        self.echo_id: bytes | None = None
        #: Whether the request came without an id and one was generated: an id the app puts on its response is
        #: then the one the client sees, and the call takes it instead.
        self.adopt_id = False
        #: The code of the server's ``send`` when it runs as a Python frame (see :meth:`send`), else None.
        self.send_code = _code_of(send)
        #: Told the call's end by :meth:`whole`, which takes the request out of ``telemetry.in_flight``; None (an
        #: exchange driven by hand): the call is settled only by calling :meth:`finish`.
        self.observers = observers
        self.telemetry = telemetry
        #: The response declared trailers (``http.response.start``'s ``trailers``): whole only after them.
        self.trailers = False
        #: The response and the request have been read to their end (see :meth:`finish`).
        self.read = False
        #: The call was recorded when its answer was whole (:meth:`whole`), before the app returned.
        self.settled = False
        #: The token that made the LLM span current, kept from a call settled before the app returned: the
        #: context is restored where it was set, once the app has returned (see :meth:`whole`).
        self.token: Any = None

    async def receive(self) -> Message:
        receive = self._receive  # (called through the slot itself, the call would not be specialised)
        message = await receive()
        kind = message["type"]
        if kind == "http.request":
            if self.body_ok:
                chunk = message.get("body", b"")
                if chunk:
                    cost = len(chunk) + BODY_PIECE_OVERHEAD
                    size = self.body_size + cost
                    if size > self.max_body or (
                        size > UNCOUNTED_BYTES and not self.hold(size - max(self.body_size, UNCOUNTED_BYTES))
                    ):
                        # Too large to inspect, or no room in the process's budget for what it keeps past its first
                        # UNCOUNTED_BYTES: it still reaches the app untouched.
                        self.body_ok = False
                        if self.api.form:
                            self.form_head = _head(self.body, chunk)
                        self.body = []
                        if self.body_size > UNCOUNTED_BYTES:
                            self.hold(UNCOUNTED_BYTES - self.body_size)
                    else:
                        self.body_size = size
                        # bytes are immutable: a reference is enough (a server reusing a buffer gets a copy).
                        self.body.append(chunk if type(chunk) is bytes else bytes(chunk))
                if not message.get("more_body", False) and self.body_ok:
                    self.body_ok = False
                    self.body_done = True
        elif kind == "http.disconnect":
            self.disconnected = True
            if self.call.left_at is None:
                self.call.left_at = perf_counter()
            self.left_early = not self.complete
            self.left_unanswered = not self.started
        return message

    def hold(self, size: int, body: str = "request") -> bool:
        """Take ``size`` bytes to keep from the process's budget: False when it has no room for them, or the request
        has ended. A negative ``size`` gives back bytes no longer kept. ``body``: whose bytes they are, the request's
        or the ``response``'s (for ``llm_telemetry.unread_bodies``)."""
        if size >= 0:
            if self.kept_limit < 0:
                return False
            if not BUDGET.take(size, self.kept_limit, self):
                self._unread(body, "budget")
                return False
            kept = self.kept
            self.kept = kept + size
            gained = self.gained + size
            if not kept or gained >= UNCOUNTED_BYTES:
                gained = 0
                self.taken_at = monotonic()
                if not kept:
                    owner = threading.get_ident(), _owner()
                    with BUDGET.lock:
                        BUDGET.holders[self] = owner
            self.gained = gained
            return True
        size = min(-size, self.kept)  # (never more than it took: what it gave back already is the budget's again)
        if size:
            self.kept -= size
            BUDGET.give(size)
            if not self.kept:
                with BUDGET.lock:
                    BUDGET.holders.pop(self, None)
        return True

    def hold_answer(self, size: int) -> bool:
        """:meth:`hold` for the copy of a JSON answer (its reader's ``hold``)."""
        return self.hold(size, "response")

    def give_back(self) -> None:
        """Give back everything this request took from the budget, and take no more: once its reading is over
        (see :meth:`finish`), and in any case when the app returns, raises or is cancelled."""
        kept, self.kept, self.kept_limit = self.kept, 0, -1
        if kept:
            BUDGET.give(kept)
            with BUDGET.lock:
                BUDGET.holders.pop(self, None)

    def stalled(self, now: float) -> bool:
        """Whether this request keeps bytes and has made no progress for STALLED_SECONDS (see there): its body still
        arriving, or its JSON answer not yet whole. Not a request whose app is at work on its whole body, or whose
        answer is a stream (its body is kept until the stream ends, which the model's pace decides)."""
        if not self.kept or now - self.taken_at < STALLED_SECONDS:
            return False
        if not self.started:
            return self.body_ok  # (true only while the body is still arriving)
        reader = self.reader
        if isinstance(reader, (_Unread, DecodingReader)):
            reader = reader.reader
        return not self.complete and isinstance(reader, ResponseReader) and not self.call.stream

    def let_go(self) -> None:
        """Give back what this stalled request keeps (see STALLED_SECONDS): its body's pieces, when it is larger than
        UNCOUNTED_BYTES (the body is then not read, as one past the budget is: the first UNCOUNTED_BYTES of a form
        are kept, for its fields), and its JSON answer's copy, of which only the last bytes are kept from then on,
        for the usage. What arrives after is not kept either."""
        if (self.body_ok or self.body_done) and self.body_size > UNCOUNTED_BYTES:  # (a body within it takes none)
            if self.api.form and self.body:
                self.form_head = _head(self.body, b"")
            self.body, self.body_ok, self.body_done = [], False, False
            self.hold(UNCOUNTED_BYTES - self.body_size)
            self._unread("request", "stalled")
        reader = self.reader
        if isinstance(reader, (_Unread, DecodingReader)):
            reader = reader.reader
        if isinstance(reader, ResponseReader) and reader.let_go():
            self._unread("response", "stalled")

    def _unread(self, body: str, reason: str) -> None:
        """Count a body of this call not read whole for want of room in the budget (``llm_telemetry.unread_bodies``)."""
        telemetry = self.telemetry
        if telemetry is not None:
            try:
                telemetry.instruments.unread_bodies.add(1, {LLM_TELEMETRY_BODY: body, LLM_TELEMETRY_REASON: reason})
            except Exception as exc:
                self.failsafe("unread_bodies", exc)

    def _read_request(self) -> None:
        parts, self.body, self.body_done = self.body, [], False
        call = self.call
        event_stream = call.stream  # an SSE response seen already makes the call a stream, whatever the body says
        try:
            body = parts[0] if len(parts) == 1 else b"".join(parts)
            # Not JSON, or nested too deep: the app will answer it; we learn nothing from it.
            if self.api.form and body.startswith(b"--"):
                parsed = form_fields(body)  # a multipart form (an image edit, a transcription): its fields
            else:
                parsed = loads(body) if body else None
            if isinstance(parsed, dict):
                self.request = parsed
                self.api.read_request(call, parsed, self.capture, self.parameters)
        except Exception as exc:
            self.failsafe("request_parse", exc)
        finally:
            call.stream = call.stream or event_stream

    async def _forward(self, message: Message) -> None:
        send = self._send
        try:
            await send(message)
        except BaseException as error:
            self._send_failed(error)
            raise

    def _send_failed(self, error: BaseException) -> bool:
        """Note that the server's ``send`` raised ``error``; returns whether the connection is gone (else the server
        refused the message). The exception itself is not kept: it holds the frames that hold this object."""
        gone = _client_gone(error)
        if gone:
            self.send_failed = True
            if self.call.left_at is None:
                self.call.left_at = perf_counter()
        else:
            self.send_refused = True
        return gone

    def send(self, message: Message) -> Awaitable[None]:
        """The ``send`` the app gets. A body chunk with more to follow (the hot path of a stream, once per chunk)
        is read here and handed on as the server's own awaitable, with no coroutine of ours around it: a
        failure of the server's ``send`` is then recognised in :meth:`finish` by the server's frame in the
        traceback. Everything else, and servers whose ``send`` has no Python frame, goes through
        :meth:`_watched_send`."""
        held = self.held  # a list only when send_code is not None
        if held is not None:
            # Subscripts cost less than ``get``; a message without these keys takes the general path below.
            try:
                more = message["more_body"]
                body = message["body"]
            except KeyError:
                more = body = None
            if more and type(body) is bytes and (size := len(body)) <= MAX_HELD_CHUNK_BYTES:
                # Hottest path: the reader knows this stream's text-delta shape and needs no more clock readings,
                # so the chunk is only kept (bytes are immutable: a reference is enough) and read with the others
                # later, in bulk: every MAX_HELD_CHUNKS chunks, or before the next message read here. The type is
                # not compared: once the response has started, only ``http.response.body`` carries both keys in
                # ASGI (``http.response.zerocopy`` has no ``body``), and the server rejects any other message
                # that would, failing the request.
                if size:
                    held.append(body)
                    if len(held) >= MAX_HELD_CHUNKS:
                        self.release()
                send = self._send  # (a slot holding a function: ``self._send(...)`` would not be specialised)
                return send(message)
            if not (more and message["type"] == "http.response.body") or len(body or b"") > READ_AFTER_BYTES:
                return self._watched_send(message)
            self.release()  # the kept chunks come first; this one is read as it passes
        elif self.send_code is not None and message["type"] == "http.response.body" and message.get("more_body"):
            body = message.get("body")
            if body and len(body) > READ_AFTER_BYTES:
                return self._watched_send(message)
        else:
            return self._watched_send(message)
        reader = self.reader
        if reader is not None and body:
            try:
                if type(body) is memoryview:
                    body = bytes(body)  # ASGI says bytes; a memoryview has no decode(): read a copy
                reader.feed(body)  # reads the clock itself, before the chunk is handed on, if it needs to
                if reader.holding:
                    self.held = []
            except ReadBudgetSpent:
                self.reader = _budget_spent(reader)
            except Exception as exc:
                self.reader = None
                self.failsafe("response_parse", exc)
        send = self._send
        return send(message)

    def release(self) -> None:
        """Read the chunks kept by :meth:`send`, in order; keep holding only while the reader can take more."""
        held, self.held = self.held, None
        reader = self.reader
        if reader is None:
            return
        try:
            if held:
                reader.feed_held(held)
            if reader.holding:
                self.held = []
        except ReadBudgetSpent:
            self.reader = _budget_spent(reader)
        except Exception as exc:
            self.reader = None
            self.failsafe("response_parse", exc)

    async def _watched_send(self, message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.body":
            now = perf_counter()
            # Read before handing it on: a middleware outside ours may rewrite the message it is given (Starlette's
            # GZip responder puts the compressed bytes in its "body"), and what the app sent is what we read.
            body = message.get("body")
            more = message.get("more_body")
            send = self._send
            try:
                await send(message)
            except BaseException as error:
                if self._send_failed(error) and not more and not body:
                    # Only the end of the response was lost, none of its bytes: a client that stops reading at a
                    # stream's last event may close first (Hypercorn's trio worker then fails this send).
                    self.complete = True
                    self.call.end = perf_counter()
                raise
            if self.held is not None:
                self.release()  # the chunks kept by send() came before this one
            reader = self.reader
            if reader is not None and body:
                self._feed(reader, body if type(body) is not memoryview else bytes(body), now)  # (as in send())
            if not more:
                self.complete = True
                self.call.end = perf_counter()
                if not self.trailers:
                    self.whole()
        elif kind == "http.response.start":
            if self.started:
                # A second start breaks ASGI: the server refuses it (raising into the app), and the client keeps the
                # first one's status. Not read, and the app's failure, not the client leaving.
                self.broke_protocol = True
                send = self._send
                await send(message)
                return
            self.started = True
            if self.kept:
                self.taken_at = monotonic()  # (the answer starts: progress, for a request keeping its body)
            if message.get("trailers"):
                self.trailers = True
            headers = message.get("headers")
            if headers is not None and not isinstance(headers, (list, tuple)):
                # ASGI allows any iterable: read a generator once, so both we and the server see every header. (A copy
                # of the message: the app may send the same dict again, for another request.)
                message = {**message, "headers": list(headers)}
            try:
                if self._start_response(message) and self.echo_id is not None:
                    message = {
                        **message,
                        "headers": [*(message.get("headers") or ()), (REQUEST_ID_HEADER, self.echo_id)],
                    }
            except Exception as exc:
                self.failsafe("response_start", exc)
            try:
                await self._forward(message)
            except BaseException:
                if self.send_refused:
                    self.call.status_code = None  # the start refused (a header value with a line break): not sent
                raise
        else:
            await self._forward(message)
            if kind == "http.response.pathsend" or (
                kind == "http.response.zerocopysend" and not message.get("more_body")
            ):
                # The whole response (pathsend), or its last part: sent by the server from a file.
                self.complete = True
                self.call.end = perf_counter()
                if kind == "http.response.pathsend" and self.reader is not None:
                    await self._read_file(message.get("path"))
                # (A zerocopysend answer is not read: its file descriptor's position is the server's to move.)
                if not self.trailers:
                    self.whole()
            elif kind == "http.response.trailers" and not message.get("more_trailers"):
                self.whole()

    async def _read_file(self, path: Any) -> None:
        """Read the file a ``pathsend`` answer was sent from (Starlette's FileResponse, under a server offering the
        extension: a cached completion, say), as much of it as the reader reads of a body, in a worker thread; once
        the server has it, before the app goes on (which may remove the file)."""
        call = self.call
        status = call.status_code or 0
        if status >= 400:
            limit, tail = MAX_ERROR_BODY_BYTES, 0
        elif call.stream:
            limit, tail = MAX_DECODED_STREAM_BYTES, 0
        else:
            # A JSON answer's usage comes last: past the reader's limit only its last bytes are read.
            limit, tail = MAX_JSON_RESPONSE_BYTES + 1, (TAIL_BYTES if isinstance(self.reader, ResponseReader) else 0)
        try:
            file, data = await anyio.to_thread.run_sync(_open_file, os.fsdecode(path), min(limit, FILE_PIECE))
        except (OSError, TypeError, ValueError):
            return  # no such file, or no path: the server failed to send it too
        try:
            now = call.end or perf_counter()
            left = limit
            # The head in pieces, each fed before the next is read: a stream's file is never held whole.
            while data and self._reading():
                self._feed(self.reader, data, now)
                left -= len(data)
                if left <= 0 or len(data) < FILE_PIECE:
                    break
                data = await anyio.to_thread.run_sync(file.read, min(left, FILE_PIECE))
            if left > 0 or not tail or not self._reading():
                return
            end = await anyio.to_thread.run_sync(_file_tail, file, limit, tail)
            if end is None or not self._reading():
                return
            if call.stream:
                # Read as a JSON answer's head and found to be a stream (a file labelled text/plain, say): its middle
                # is not read, so its end is unknown, not missing (the last bytes go only after a JSON one's head).
                self.reader = _Unread(self.reader)
                return
            self._feed(self.reader, end, now)
        except OSError:
            return
        finally:
            file.close()

    def _reading(self) -> bool:
        """Whether the answer is still being read (no failure, and not given up as too costly)."""
        return self.reader is not None and not isinstance(self.reader, _Unread)

    def _feed(self, reader: Any, data: bytes, now: float) -> None:
        """Hand ``data`` to the response's reader, in steps a slow reading can be stopped between."""
        try:
            if len(data) <= READ_STEP:
                reader.feed(data, now)
            elif not read_within(reader, data, now):
                # Too slow to read (see decoding.MAX_READ_SECONDS): the rest is not read, what was is recorded (the
                # reader still finishes: estimates, a usage already seen).
                self.reader = _Unread(reader)
        except ReadBudgetSpent:
            self.reader = _budget_spent(reader)
        except Exception as exc:
            self.reader = None
            self.failsafe("response_parse", exc)

    def _start_response(self, message: Message) -> bool:
        """Read the response's status and headers, choose the reader; True when the app set no request id header
        (one scan of the headers answers both)."""
        call = self.call
        status = message["status"]
        call.status_code = status
        content_type = b""
        coding: bytes | None = None
        no_id = True
        other_id = b""
        for key, value in message.get("headers", ()):
            key = key.lower()
            if key == b"content-type":
                content_type = value.lower()
            elif key == b"content-encoding" and (value := value.strip().lower()) not in (b"", b"identity"):
                coding = value
            elif key == REQUEST_ID_HEADER:
                no_id = False  # the app chose its own: keep it
                if self.adopt_id and value:
                    # The client sees the app's id, not the one generated: log and trace that one.
                    call.request_id = field_text(_header_text(value), _MAX_REQUEST_ID_CHARS)
            elif key == ANTHROPIC_REQUEST_ID_HEADER and not other_id:
                other_id = value
        if no_id and other_id and self.adopt_id:
            # Anthropic's name for it (its SDKs show it as the response's request id): the id the client can quote,
            # and the one echoed as ``x-request-id`` too, so that the two agree.
            call.request_id = field_text(_header_text(other_id), _MAX_REQUEST_ID_CHARS)
            if self.echo_id is not None:
                self.echo_id = other_id
        if coding is not None and coding not in CODINGS:
            return no_id  # other codings (several at once, or one with no decoder here) pass unread, not misread
        reader: Reader
        if status >= 400:
            reader, limit = ErrorReader(call, stream=False), MAX_ERROR_BODY_BYTES
        elif content_type.startswith(b"text/event-stream"):
            call.stream = True
            reader = self.api.response_reader(call, stream=True, capture=self.capture)
            limit = MAX_DECODED_STREAM_BYTES
        elif content_type.startswith((b"application/json", b"text/plain")) or not content_type:
            # (An event stream labelled as one of these, which the SDKs read as a stream whatever the label, is
            # found by its first bytes: see ResponseReader.feed.)
            reader = self.api.response_reader(call, stream=False, capture=self.capture)
            # (Its copy of the body past UNCOUNTED_BYTES counts against the budget. The reader holding a method of this
            # exchange makes a reference cycle, broken when the request ends: see LLMTelemetryMiddleware._observe.)
            reader.hold = self.hold_answer
            limit = MAX_JSON_RESPONSE_BYTES + 1  # one byte more than the reader reads, so that it sees the excess
        else:
            return no_id
        self.reader = reader if coding is None else DecodingReader(reader, coding, limit)
        return no_id

    def whole(self) -> None:
        """The answer's last message has reached the server: the client has all of it, whatever the app does next
        (Starlette runs an answer's background tasks now, inside the app's call, for as long as they take). The
        call is recorded here unless what the app does next can still change its outcome: an exception raised after
        a 500 answer (Starlette's error handler answers 500, then raises it again), or after a stream that ended
        without the end of its answer, is the app's failure (see :meth:`finish`); those are recorded when the app
        returns."""
        call = self.call
        status = call.status_code
        if self.observers is None or self.settled or status is None or status == 500:
            return
        failsafe = self.failsafe
        try:
            if not self.finish(None, True):
                return
        except Exception as exc:
            failsafe("finish", exc)
        self.settled = True
        # The context that makes the LLM span current was set in the request's task, which this may not be (a
        # streaming response sends from a task of its own): restored there, once the app has returned.
        self.token, call.otel_token = call.otel_token, None
        for observer in self.observers:
            try:
                observer.end(call)
            except Exception as exc:
                failsafe("observer_end", exc)
        if self.telemetry is not None:
            self.telemetry.in_flight -= 1  # (the lifespan shutdown waits for it to be recorded)

    def finish(self, exc: BaseException | None, whole: bool = False) -> bool:
        """Settle the outcome once the app has returned or raised (``exc``); or, ``whole``, once the answer is whole:
        then False, and nothing settled, when what the app does next can still change the outcome (a stream cut
        short). What is left of the request and the response is read once."""
        call = self.call
        if not self.read:
            self.read = True
            now = perf_counter()
            if call.end is None:
                call.end = now
            if self.body_done or (
                self.body_ok and self.body and self.content_length == sum(len(piece) for piece in self.body)
            ):
                self._read_request()
            elif self.form_head is not None:
                self.body, self.form_head = [self.form_head], None
                self._read_request()
            elif self.body:
                # Not read (the app stopped reading part-way): let go of now, with the budget they took, not when the
                # app returns (it may go on for long after its answer, with background tasks).
                self.body = []
            self.body_ok = False  # (pieces the app may still receive are not kept)
            if self.held is not None:
                self.release()
            if self.reader is not None:
                try:
                    self.reader.finish(now)
                except Exception as error:
                    self.reader = None  # not finished: nothing more is asked of it
                    self.failsafe("response_parse", error)
            left = call.left_at
            if left is not None and call.first_token_at is not None and call.first_token_at > left:
                # Sent after the client had left (an app waiting on its upstream notices only when it answers;
                # uvicorn's and Granian's send take a gone client's bytes without a word): no first token reached
                # the client.
                call.first_token_at = None
            request, self.request = self.request, None
            if request is not None and call.usage_source == "estimated" and call.input_tokens is None:
                # No usage in the response (a stream whose client did not ask for it): its output was estimated,
                # and so is its input, or its tokens and cost would count none.
                try:
                    call.input_tokens = self.api.estimate_input_tokens(request)
                    call.input_estimated = call.input_tokens is not None
                except Exception as error:
                    self.failsafe("request_parse", error)
            # The body's pieces and the answer's copy are let go of now, with the budget they took (most requests took
            # none: their bodies are within UNCOUNTED_BYTES).
            if self.kept:
                self.give_back()
            self.kept_limit = -1
        if whole and self.reader is not None and self.reader.cut_short():
            return False
        # Classified by origin: only the server says a client left (an ``http.disconnect`` message, a ``send``
        # failing for want of a connection, or cancelling the app). An exception the app raises itself is the
        # app's failure, whatever its type: an upstream TimeoutError or ConnectionRefusedError is an OSError, not a
        # client leaving; and so is a message the server refuses (a body longer than its Content-Length).
        if exc is not None and not (self.send_failed or self.send_refused) and self.send_code is not None:
            failed = _raised_in(exc, self.send_code)  # the server's own awaitable, handed on by send()
            if failed is not None:
                self._send_failed(failed)
        client_left = not self.broke_protocol and (
            self.disconnected or self.send_failed or (exc is not None and _cancelled(exc))
        )
        # Raised after a whole answer that is no server error (by a background task, say): the client got its
        # answer, and the call stands by it; the server still logs the exception. A whole 5xx answer is the
        # framework's error handler answering for the exception: the app's failure.
        status = call.status_code
        answered = (
            self.complete
            and status is not None
            and status < 500
            # A stream the app ended without the end of its answer and then raised: its failure, whatever closed the
            # response (Starlette's BaseHTTPMiddleware sends the last message before it raises again).
            and not (exc is not None and self.reader is not None and self.reader.cut_short())
        )
        if exc is not None and not client_left and not answered:
            call.error_type = "app_exception"
            if call.status_code is None:
                call.status_code = 500
        elif (
            (not self.complete and not (client_left and _answer_ended(call, self.reader)))
            or (self.left_early and not _answer_ended(call, self.reader))
            or self.left_unanswered
        ):
            # The app stopped before the last byte: the client went away, or the app gave up without raising. Or the
            # client left before the end and the app (or a middleware inside ours, such as Starlette's
            # BaseHTTPMiddleware) ended the response early rather than raising. A client that leaves once the
            # answer has reached its own end (an SDK closes the connection after a stream's last event) got all
            # of it, whether or not the app had sent its closing message by then (Litestar stops at the leave). A
            # client that left before the response started got none of it, whatever the app sent after.
            call.error_type = "client_disconnect" if client_left else "other"
            if not self.started and not client_left:
                call.status_code = 500  # the app returned without an answer: the server answers 500 for it
        elif call.status_code is not None and call.status_code >= 400:
            call.error_type = call.error_type or classify_status(call.status_code)
        elif (
            exc is None
            and self.complete
            and 200 <= (status or 0) < 300
            and status not in (204, 205)  # (no body, by their definition)
            and not whole  # (then not cut short: see above)
            and self.reader is not None
            and self.reader.cut_short()
        ):
            # A stream the app ended, read whole, without the end of its answer (no finish reason, no error, no
            # closing event): its upstream cut it off, and the app passed on what it had. The client's SDK ends the
            # stream without a word. (A client that left before the end is a client_disconnect above; one that
            # closed the connection afterwards got what the app sent.)
            call.error_type = "incomplete_stream"
        return True


class _Unread:
    """A reader whose answer is read no further: later chunks are not read, and it still finishes."""

    holding = False

    def __init__(self, reader: Any) -> None:
        self.reader = reader

    def feed(self, chunk: bytes, now: float | None = None, shaped: bool = True) -> None:
        pass

    def feed_held(self, chunks: list[bytes]) -> None:
        pass

    def finish(self, now: float) -> None:
        self.reader.finish(now)

    def cut_short(self) -> bool:
        return False  # what was left unread may have held the end


_BUDGET_SPENT_LOGGED = [False]


def _budget_spent(reader: Any) -> _Unread:
    """The reader of an answer that took longer to read than its budget (``apis.READ_BUDGET_SECONDS``): read no
    further. Logged once per process: what came after (the usage, the finish reason) is unknown for such answers."""
    if not _BUDGET_SPENT_LOGGED[0]:
        _BUDGET_SPENT_LOGGED[0] = True
        logger.warning(
            "llm-telemetry: an answer took more CPU time to read than its budget (apis.READ_BUDGET_SECONDS; a stream"
            " of junk events, say); the rest of it was passed on unread, and its usage and finish reason, if they"
            " came later, are unknown (logged once)"
        )
    return _Unread(reader)


def _open_file(path: str, size: int) -> tuple[BinaryIO, bytes]:
    """The file at ``path``, open, and its first ``size`` bytes."""
    file = open(path, "rb")  # closed by the caller, once read
    try:
        return file, file.read(size)
    except BaseException:
        file.close()
        raise


def _file_tail(file: BinaryIO, limit: int, tail: int) -> bytes | None:
    """The last ``tail`` bytes of ``file`` that come after its first ``limit`` (none read twice); None when there
    are none."""
    size = os.fstat(file.fileno()).st_size
    if size <= limit:
        return None
    file.seek(max(limit, size - tail))
    return file.read(tail)


def _header_text(value: bytes) -> str:
    """A header value as text: UTF-8, as clients send non-ASCII values today, else Latin-1 (HTTP's old default)."""
    try:
        return value.decode()
    except UnicodeDecodeError:
        return value.decode("latin-1")


def _cancelled(exc: BaseException) -> bool:
    """Whether ``exc`` is the server cancelling the request: asyncio's cancellation, or trio's (Hypercorn's trio
    worker cancels the requests in flight at shutdown) as anyio names it for the running library."""
    if isinstance(exc, asyncio.CancelledError):
        return True
    try:
        return isinstance(exc, anyio.get_cancelled_exc_class())
    except Exception:  # no async library running (a synchronous caller): not a cancellation
        return False


def _head(pieces: list[bytes], chunk: bytes) -> bytes:
    """The first UNCOUNTED_BYTES of a body kept as ``pieces`` and followed by ``chunk``, joining no more than that."""
    head = bytearray()
    for piece in (*pieces, chunk):
        head += piece[: UNCOUNTED_BYTES - len(head)]
        if len(head) >= UNCOUNTED_BYTES:
            break
    return bytes(head)


def _answer_ended(call: LLMCall, reader: Any = None) -> bool:
    """Whether the answer read reached its own end: a finish reason for each choice asked for (which streams send
    last, before their usage), an error, a stream's closing event (``[DONE]``, ``message_stop``; the SDKs close the
    connection on it), or a JSON body read whole (a cut one does not parse)."""
    if call.error_type is not None or (call.finish_reasons and call.finished_choices(call.choice_count or 1)):
        return True
    while reader is not None and not isinstance(reader, ResponseReader):
        reader = getattr(reader, "reader", None)  # (a decoding or unread wrapper's own reader)
    if reader is not None and reader.closed:
        return True
    return not call.stream and (call.response_model is not None or call.input_tokens is not None)


def _code_of(send: Send) -> CodeType | None:
    """The code of a ``send`` that is a coroutine function or method (so whatever it raises passes through a
    frame of that code), else None."""
    code = getattr(getattr(send, "__func__", send), "__code__", None)
    return code if isinstance(code, CodeType) and code.co_flags & CO_COROUTINE else None


def _raised_in(exc: BaseException, code: CodeType) -> BaseException | None:
    """``exc``, or the exception it was raised while handling or from, that passed through a frame of ``code``
    (the server's ``send``: the server could not deliver, whatever the app made of it), or None."""
    seen: set[int] = set()
    error: BaseException | None = exc
    while error is not None and id(error) not in seen and len(seen) < 16:
        seen.add(id(error))
        tb = error.__traceback__
        while tb is not None:
            if tb.tb_frame.f_code is code:
                return error
            tb = tb.tb_next
        error = error.__cause__ or error.__context__
    return None


#: Exceptions servers and their I/O libraries raise from ``send`` when the connection is gone, besides ``OSError``
#: (anyio's and trio's closed or broken streams, h2's reset stream, a server's own disconnect error), by class name:
#: none of those libraries need be importable here.
_GONE_ERRORS: Final = frozenset(
    {"BrokenResourceError", "ClosedResourceError", "EndOfStream", "StreamClosedError", "ClientDisconnected"}
)


def _client_gone(error: BaseException) -> bool:
    """Whether an exception from the server's ``send`` says the connection is gone (closed, reset, cancelled),
    rather than that the server refused the message, which is the app's failure: a body longer than its
    Content-Length, a header value with a line break, a message of the wrong type (a ``RuntimeError``, or the
    HTTP library's protocol error)."""
    if isinstance(error, (OSError, EOFError)) or _cancelled(error):
        return True
    return any(cls.__name__ in _GONE_ERRORS for cls in type(error).__mro__)


def _shutdown_quietly(telemetry: Telemetry) -> None:
    try:
        telemetry.shutdown()
    except Exception:
        logger.debug("llm-telemetry: shutdown after a failed setup failed too", exc_info=True)


#: The telemetry behind each metrics listener of this process, by (host, port), with the settings it was made with.
#: Another middleware instance with the same settings records into it rather than failing to bind the port and
#: recording where nothing is scraped: Litestar makes one instance per route handler of ``middleware=[...]``, and
#: an app may add the middleware to several mounted sub-apps.
_LISTENERS: dict[tuple[str, int], tuple[Settings, Telemetry]] = {}
_LISTENERS_LOCK = threading.Lock()
#: Every middleware instance of this process that has set up, for :func:`shutdown`.
_INSTANCES: weakref.WeakSet[LLMTelemetryMiddleware] = weakref.WeakSet()


async def shutdown() -> None:
    """Flush and stop the telemetry of every middleware instance of this process: the spans, OTLP log records and
    metrics they still hold are exported, as the lifespan shutdown of an instance around the whole app does.

    For instances the server's lifespan never reaches (the middleware added to mounted sub-apps only, Litestar's
    ``DefineMiddleware``): call it from the app's own shutdown (Starlette's ``lifespan``, Litestar's
    ``on_shutdown=[shutdown]``). It waits for the requests in flight to be recorded (at most DRAIN_SECONDS), then
    for the export, SHUTDOWN_SECONDS at most in all. The instances set up anew on their next use."""
    instances = list(_INSTANCES)
    found: dict[int, Telemetry] = {}
    for instance in instances:
        with instance._lock:
            telemetry = instance._telemetry
            if instance._set_up and telemetry is not None:
                found[id(telemetry)] = telemetry
    await _drain_and_shut_down(list(found.values()))
    for instance in instances:
        # Only now: a request meanwhile found its pipeline still set up, rather than setting the one being shut down
        # up again (a listener not yet closed is shared), which would have stayed in use, closed, for good.
        with instance._lock:
            if instance._telemetry is not None and id(instance._telemetry) in found:
                instance._set_up = False  # (the shut-down one stays readable through .telemetry until then)


async def _drain_and_shut_down(pipelines: list[Telemetry]) -> None:
    """Wait (up to DRAIN_SECONDS) for the requests ``pipelines`` are recording to end (streams the server has just
    cancelled, as uvicorn's ``--timeout-graceful-shutdown`` does, are still unwinding: their spans and lines are
    recorded once they end), then shut them down, SHUTDOWN_SECONDS at most in all. In daemon threads: one still
    flushing to a collector that does not answer is left behind at exit. (A worker thread abandoned by anyio is not a
    daemon: the interpreter's exit would wait for it, and for the exporters' own timeouts after it, half a minute
    and more.)"""
    start = monotonic()
    # Polled: an event would cost every request a check whether to set it.
    while any(telemetry.in_flight > 0 for telemetry in pipelines) and monotonic() - start < DRAIN_SECONDS:  # noqa: ASYNC110
        await anyio.sleep(0.01)
    deadline = start + SHUTDOWN_SECONDS
    done = [telemetry.shutdown_in_background() for telemetry in pipelines]

    def wait() -> None:
        for event in done:
            event.wait(max(0.0, deadline - monotonic()))

    await anyio.to_thread.run_sync(wait)


class LLMTelemetryMiddleware:
    """ASGI middleware that records metrics (and, when configured, traces and logs) for LLM API traffic.

    It recognises OpenAI-compatible (chat completions, completions, embeddings, responses) and Anthropic
    (messages) endpoints by path suffix, reads their request and response bodies as they pass (SSE streams
    incrementally), and leaves every byte the client sees unchanged.

    Args:
        app: the ASGI application to wrap.
        pricing: pricing table path (YAML/JSON) or mapping; default: the embedded table.
        metrics_port: port of the separate Prometheus listener (default 9464; 0 turns it off).
        metrics_host: address of that listener (default ``::``: every address, IPv6 and IPv4).
        metrics_app_path: also answer scrapes at this path on the app's own port (default off).
        attribution_headers: request header to label, e.g. ``{"x-tenant-id": "tenant"}``.
        max_label_values: distinct values kept per label before folding into ``other`` (default 100).
        max_request_bytes: request bodies above this are not inspected (default 8 MiB).
        routes: extra path suffix to API mappings, e.g. ``{"/generate": "openai.chat"}``.
        meter_provider: record into this OpenTelemetry meter provider (and its readers) instead of creating one;
            no metrics port is bound then. A global SDK provider is not used unless passed here.
        tracer_provider: trace with this provider; by default a global SDK provider is used if the app set one,
            else one is built when ``OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT`` is set, else tracing is off.
        observers: extra observers told about every call.
        **options: any other :class:`~llm_telemetry.config.Settings` field.

    Every option left as None is read from its ``LLM_TELEMETRY_*`` environment variable, then its default.

    Example::

        from fastapi import FastAPI
        from llm_telemetry import LLMTelemetryMiddleware

        app = FastAPI()
        app.add_middleware(LLMTelemetryMiddleware, pricing="prices.yaml")
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        pricing: str | Mapping[str, Any] | None = None,
        metrics_port: int | None = None,
        metrics_host: str | None = None,
        metrics_app_path: str | None = None,
        attribution_headers: Mapping[str, str] | None = None,
        max_label_values: int | None = None,
        max_request_bytes: int | None = None,
        routes: Mapping[str, str] | None = None,
        meter_provider: MeterProvider | None = None,
        tracer_provider: TracerProvider | None = None,
        observers: list[Observer] | None = None,
        settings: Settings | None = None,
        **options: Any,
    ) -> None:
        self.app = app
        #: A setting the middleware cannot use (``LLM_TELEMETRY_*``, an option, the pricing table): the server's
        #: lifespan startup fails with it. Not raised here: Starlette and FastAPI build their middleware inside the
        #: first ASGI call, the lifespan's, where an exception reads to uvicorn as "lifespan unsupported" and every
        #: request after it would fail. Until then, and without a lifespan, requests pass through unmeasured.
        self.configuration_error: ConfigurationError | None = None
        given = {
            name: value
            for name, value in dict(
                pricing=pricing,
                metrics_port=metrics_port,
                metrics_host=metrics_host,
                metrics_app_path=metrics_app_path,
                attribution_headers=attribution_headers,
                max_label_values=max_label_values,
                max_request_bytes=max_request_bytes,
                routes=routes,
                **options,
            ).items()
            if value is not None
        }
        try:
            if settings is None:
                self.settings = Settings.resolve(**given)
            elif given:
                # (Ignored, a metrics_port=, or a misspelt option, beside settings= was lost without a word.)
                Settings.resolve(env={}, **given)  # a misspelt option is named as such
                raise ConfigurationError(
                    f"{', '.join(sorted(given))} given beside settings=, which is used instead of the arguments and"
                    " the environment: pass them to Settings.resolve(...) instead"
                )
            else:
                self.settings = settings
            if self.settings.pricing is not None:
                # Fail at startup, not on the first request, when the pricing file is wrong.
                from .pricing import PricingTable

                PricingTable(self.settings.pricing)
            self.router = Router(self.settings.routes)
        except ConfigurationError as error:
            logger.error("llm-telemetry: %s; startup fails, and requests pass through unmeasured", error)
            self.configuration_error = error
            self.settings = dataclasses.replace(Settings.resolve(env={}), enabled=False)
            self.router = Router(self.settings.routes)
        self._attribution = {
            h.lower().encode("latin-1"): label for h, label in self.settings.attribution_headers.items()
        }
        self._meter_provider = meter_provider
        self._tracer_provider = tracer_provider
        #: ``_observe`` inside OpenTelemetry's ASGI middleware (the server span), when tracing is on.
        self._traced: ASGIApp | None = None
        self._extra_observers = list(observers or ())
        self._telemetry: Telemetry | None = None
        self._observers: tuple[Observer, ...] = ()
        self._failsafe: _Failsafe | None = None
        self._lock = threading.Lock()
        #: Set once setup has run, whether it worked or not: it never runs twice.
        self._set_up = False
        #: False when setup failed: requests pass straight through, unobserved.
        self._observing = False
        #: Whether a request without an ``x-request-id`` header gets a generated one (see ``_start``).
        self._request_ids = True
        #: Whether the request parameters only a span shows are read: tracing is on (see ``_start``).
        self._span_parameters = False

    @property
    def telemetry(self) -> Telemetry:
        """The meter provider, instruments and exposition; created on first use (or at lifespan startup). After a
        lifespan shutdown, the one shut down, until the next call sets up anew."""
        if self.configuration_error is not None:
            raise self.configuration_error
        telemetry = self._telemetry if self._set_up or self._telemetry is not None else self._setup()
        if telemetry is None:
            raise RuntimeError("llm-telemetry setup failed; see the log")
        return telemetry

    def _setup(self) -> Telemetry | None:
        """Build everything once, before the first request is observed (the server's lifespan startup, or the
        first call of any kind). Any failure is logged and leaves the middleware a pass-through: the app keeps
        serving. The failure is counted in ``llm_telemetry_internal_errors_total{component="setup"}`` when a
        plain single-process setup can still be made to expose it."""
        with self._lock:
            if self._set_up:
                return self._telemetry
            telemetry: Telemetry | None = None
            fresh = True
            try:
                telemetry, fresh = self._listening_telemetry()
                self._start(telemetry, fresh)
                self._observing = True
            except Exception as exc:
                logger.error("llm-telemetry: setup failed; requests pass through unobserved: %r", exc, exc_info=exc)
                if telemetry is not None and fresh:  # (one another instance uses stays up)
                    _shutdown_quietly(telemetry)
                self._observers = ()
                self._traced = None
                telemetry = self._fallback(exc)
            self._telemetry = telemetry
            self._set_up = True
            _INSTANCES.add(self)
            return telemetry

    def _listening_telemetry(self) -> tuple[Telemetry, bool]:
        """A new :class:`Telemetry` (and True), or the one another instance of this process made with the same
        settings for the same metrics listener (and False; see :data:`_LISTENERS`)."""
        settings = self.settings
        if (
            self._meter_provider is not None
            or self._tracer_provider is not None
            or settings.metrics_port == 0
            or "prometheus" not in settings.metrics_exporters
        ):
            return Telemetry(settings, self._meter_provider, self._tracer_provider), True
        key = (settings.metrics_host, settings.metrics_port)
        with _LISTENERS_LOCK:
            found = _LISTENERS.get(key)
            if found is not None and not found[1].closed:
                if found[0] == settings:
                    return found[1], False
                logger.warning(
                    "llm-telemetry: another LLMTelemetryMiddleware in this process serves metrics on %s:%s with "
                    "other settings, so this one's metrics are not served; add the middleware once, around the whole "
                    "app, or give each its own metrics_port",
                    *key,
                )
                return Telemetry(settings).without_listener(), True
            telemetry = Telemetry(settings)
            _LISTENERS[key] = (settings, telemetry)
            return telemetry, True

    def _start(self, telemetry: Telemetry, fresh: bool = True) -> None:
        """Set this instance up on ``telemetry``; ``fresh`` when no other instance uses it yet (then its listener
        and shared label counts are started here)."""
        failsafe = self._failsafe = _Failsafe(telemetry)
        workers = telemetry.workers
        if fresh:
            telemetry.start_server()
            if workers is not None and workers.state is not None:
                # Label values are counted per deployment of workers, across worker restarts (see labels.py).
                telemetry.limit.share(workers.state)
            elif workers is not None and workers.error is not None:
                failsafe("multiproc_setup", workers.error)  # serving, but this worker reports only its own share
        self._wire(telemetry)

    def _wire(self, telemetry: Telemetry) -> None:
        """Hand each request to what ``telemetry`` records it with."""
        observers: list[Observer] = [telemetry.recorder]
        if telemetry.tracing is not None:
            observers.append(telemetry.tracing.observer)
            if self.settings.tracing_http_span:
                self._traced = telemetry.tracing.wrap(self._observe_routed)
        if telemetry.request_logs is not None:
            observers.append(telemetry.request_logs.observer)
        self._observers = (*observers, *self._extra_observers)
        # A request without an x-request-id gets one of ours only when something reads it.
        readers = [o for o in self._observers if o is not telemetry.recorder]
        self._request_ids = bool(self.settings.echo_request_id or readers)
        self._span_parameters = telemetry.tracing is not None

    def _fallback(self, error: Exception) -> Telemetry | None:
        """Metrics with nothing but the failure in them, so that it shows up where alerts look."""
        exporters = self.settings.metrics_exporters
        if "prometheus" in exporters:
            # The exposition alone, without the OTLP push: an OTLP metric exporter or reader the SDK refuses
            # (OTEL_METRIC_EXPORT_INTERVAL=0, a compression its gRPC exporter lacks) failed the setup, and again here.
            exporters = ("prometheus",)
        plain = dataclasses.replace(self.settings, multiproc_dir="off", request_logs=False, metrics_exporters=exporters)
        # Nor the spans or OTLP log records the environment asks for: a span processor the SDK refuses (an
        # OTEL_BSP_* value out of its range) failed the setup, and again here, leaving not even this counter.
        env = {**os.environ, OTEL_TRACES_EXPORTER: "none", OTEL_LOGS_EXPORTER: "none"}
        try:
            telemetry = Telemetry(plain, env=env)
            telemetry.start_server()
            _Failsafe(telemetry)("setup", error)
        except Exception:
            logger.exception("llm-telemetry: no metrics either: the setup failure is only in this log")
            return None
        return telemetry

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self.settings.enabled:
            if self.configuration_error is not None and scope["type"] == "lifespan":
                await self._fail_startup(receive, send)
                return
            await self.app(scope, receive, send)
            return
        telemetry = self._telemetry if self._set_up else self._setup()
        if scope["type"] != "http":
            if scope["type"] == "lifespan" and telemetry is not None:
                send = self._flushing_on_shutdown(send, telemetry)
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        if telemetry is not None and path == self.settings.metrics_app_path:
            await telemetry.metrics_app(scope, receive, send)
            return
        api = self.router.match(path) if self._observing and scope["method"] == "POST" else None
        if api is None or OBSERVED in scope:
            # Not an LLM request; or one an instance further out observes already (nested instances, say one
            # around the app and one in a mounted sub-app): each request is counted once, by the outermost.
            await self.app(scope, receive, send)
            return
        traced = self._traced
        current = trace.get_current_span().get_span_context() if traced is not None else None
        if traced is not None and current is not None and (not current.is_valid or current.is_remote or leaked_into()):
            # Two-span tracing (``tracing_http_span``) and no span of this process current: OpenTelemetry's ASGI
            # middleware opens the server span, continuing the caller's ``traceparent``. With a span of this process
            # already current, the LLM span joins it. By default ``_traced`` is None and the LLM span itself is the
            # server span (tracing.py). The caller's span context alone may be current (OpenTelemetry's ASGI
            # middleware further out, without an SDK, leaves it so), which OpenTelemetry's middleware would take for
            # a server span and open an INTERNAL one under: it is set aside, and the header read again. So is an LLM
            # span of an earlier request on the connection, which uvicorn may leave current (tracing.leaked_into).
            token = context.attach(trace.set_span_in_context(trace.INVALID_SPAN)) if current.is_valid else None
            try:
                await traced(scope, receive, send)
            finally:
                if token is not None:
                    context.detach(token)
            return
        await self._observe(api, scope, receive, send)

    async def _fail_startup(self, receive: Receive, send: Send) -> None:
        """Answer the server's lifespan startup with the configuration error: the server reports it and exits."""
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.failed", "message": f"llm-telemetry: {self.configuration_error}"})

    def _flushing_on_shutdown(self, send: Send, telemetry: Telemetry) -> Send:
        """The lifespan ``send``: before the app's shutdown is reported, the exporters are flushed and stopped.

        Servers end the process right after (uvicorn raises SIGTERM again once it has shut down, so no exit handler
        of the OpenTelemetry SDK runs): without this, the spans and log records still queued, up to a batch delay's
        worth, would be lost at every rollout. The requests still in flight (streams the server cut at its graceful
        timeout) are waited for first, up to DRAIN_SECONDS of it. Bounded by SHUTDOWN_SECONDS in all, so an
        unreachable collector cannot hold it up. The next use (another lifespan, as a test client entered again
        starts one, or a request) sets everything up anew.
        """

        async def lifespan_send(message: Message) -> None:
            if message["type"] == "lifespan.startup.complete":
                # Set up as the lifespan began (the metrics port open while the app starts, a model loading, say);
                # a tracer provider the app installed in its startup (FastAPI's lifespan, where apps commonly set
                # up OpenTelemetry) is taken up now, before the server takes any request. No span was made before.
                # So is a logger provider it installed there: the request logs are then set up anew, with an
                # observer of their own to wire in. A logging configuration it applied there, which disabled the
                # request logger with every other logger it found, is undone for that logger.
                # (An instance inside this one, sharing its pipeline, may have set the request logs up anew first:
                # whether this one's observers are the pipeline's is what tells.)
                with self._lock:
                    if self._observing and self._telemetry is telemetry:
                        telemetry.adopt_global_tracing()
                        logs = telemetry.request_logs
                        if logs is not None:
                            logs.keep_enabled()
                        if (logs is not None and logs.observer not in self._observers) or (
                            telemetry.tracing is not None and not self._span_parameters  # (_wire sets it)
                        ):
                            self._wire(telemetry)
            elif message["type"] in ("lifespan.shutdown.complete", "lifespan.shutdown.failed"):
                # And the pipeline in use now, when shutdown() replaced the one the lifespan started with.
                current = self._telemetry
                pipelines = [telemetry] if current is None or current is telemetry else [telemetry, current]
                await _drain_and_shut_down(pipelines)
                with self._lock:
                    if any(self._telemetry is pipeline for pipeline in pipelines):
                        self._set_up = False  # (the shut-down one stays readable through .telemetry until then)
            await send(message)

        return lifespan_send

    async def _observe_routed(self, scope: Scope, receive: Receive, send: Send) -> None:
        api = self.router.match(scope["path"])
        assert api is not None
        await self._observe(api, scope, receive, send)

    async def _observe(self, api: API, scope: Scope, receive: Receive, send: Send) -> None:
        failsafe = self._failsafe
        telemetry = self._telemetry
        assert failsafe is not None and telemetry is not None
        call = LLMCall(
            api.operation,
            api.provider,
            perf_counter(),
            path=name_text(scope["path"]),  # (a key its cut goes through masked whole: an Azure deployment's name)
            scope=scope,
            api_type=api.api_type,
        )
        max_body = self.settings.max_request_bytes
        request_id: bytes | None = None
        content_length: bytes | None = None
        adopt = False
        for key, value in scope["headers"]:
            if key == b"content-encoding" and value.strip().lower() not in (b"", b"identity"):
                max_body = 0  # a compressed request body is not read
            elif key == REQUEST_ID_HEADER:
                # The first, as the app reads it (Starlette's ``request.headers[...]`` gives the first of several);
                # an empty one is none, to the app too: the request gets an id of ours, not a later header's.
                if request_id is None:
                    request_id = value
            elif key == b"content-length":
                content_length = value
            label = self._attribution.get(key)
            if label is not None:
                # As sent: the recorder bounds it once the outcome is known (a refused request admits no new value).
                call.attribution[label] = _header_text(value)
        if request_id:
            call.request_id = field_text(_header_text(request_id), _MAX_REQUEST_ID_CHARS)
        elif self._request_ids:
            call.request_id = new_request_id()
            adopt = True
        for label in self._attribution.values():
            call.attribution.setdefault(label, "")  # absent: recorded as none
        observers = self._observers
        exchange = _Exchange(
            api,
            call,
            receive,
            send,
            max_body,
            self.settings.capture_content,
            failsafe,
            self._span_parameters,
            observers,
            telemetry,
            self.settings.max_inspected_bytes,
        )
        exchange.adopt_id = adopt
        if content_length is not None and len(content_length) <= 18 and content_length.isdigit():
            exchange.content_length = int(content_length)
        if self.settings.echo_request_id and call.request_id is not None:
            # The client's own bytes when it sent one; ours are ASCII.
            exchange.echo_id = request_id or call.request_id.encode("ascii")
        for observer in observers:
            try:
                observer.start(call)
            except Exception as exc:
                failsafe("observer_start", exc)
        error: BaseException | None = None
        scope[OBSERVED] = True
        telemetry.in_flight += 1  # (the lifespan shutdown waits for it to be recorded)
        try:
            app = self.app
            await app(scope, exchange.receive, exchange.send)
        except BaseException as exc:
            error = exc
            raise
        finally:
            try:
                if not exchange.settled:
                    try:
                        exchange.finish(error)
                        if call.error_type == "app_exception":
                            call.exception = error
                    except Exception as exc:
                        failsafe("finish", exc)
                    for observer in observers:
                        try:
                            observer.end(call)
                        except Exception as exc:
                            failsafe("observer_end", exc)
                    telemetry.in_flight -= 1
                elif exchange.token is not None:
                    # Recorded when its answer was whole (see _Exchange.whole); what the app did since changes nothing.
                    detach(exchange.token)
            finally:
                # Whatever happened above: a budget a request kept would be lost to every later one for good. (Given
                # back already once the request was read, in finish(): then its limit is -1.)
                if exchange.kept_limit >= 0:
                    exchange.give_back()
                # The reader (a JSON answer's) may hold the exchange's ``hold``: without it, no cycle is left for the
                # garbage collector, and the answer's copy goes now.
                exchange.reader = None
