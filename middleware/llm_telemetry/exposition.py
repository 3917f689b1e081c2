"""The metrics port's HTTP server: prometheus_client's exposition app, served within bounds.

prometheus_client's own ``start_http_server`` gives each connection a thread of its own, for as long as the client
keeps it, and each scrape its own copy of the exposition: a client that connects and sends nothing holds a thread
forever, and one that reads slowly holds a thread and a copy (several such readers of a 14 MB exposition held
~300 MB, and slowed the app beside them). This server answers the same requests with the same app (formats, gzip)
within two bounds, each with its own time limit, which the server loop enforces by shutting the connection down
however the client trickles:

- a connection has :data:`REQUEST_SECONDS` to send its request, and at most :data:`MAX_CONNECTIONS` are open at
  once (a thread each, cheap: no exposition yet);
- a request has :data:`ANSWER_SECONDS` to take its answer, and at most :data:`MAX_ANSWERS` are answered at once
  (each holding its copy of the exposition); one more waits its turn for up to :data:`QUEUE_SECONDS`, holding no
  copy, in the order the requests came.

Past the connections a request is answered 503 at once, past the answers once its wait is up. So what clients can
hold is bounded whatever they do, a scrape is refused only while that many clients hold the port for longer than
the wait, and the app's own requests never wait on them.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import io
import logging
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from typing import Any, Final, Protocol
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import ThreadingWSGIServer, choose_encoder, gzip_accepted, make_wsgi_app
from prometheus_client.metrics_core import Metric

logger = logging.getLogger(__name__)

#: Connections open at once, each a thread (one more is answered 503 at once).
MAX_CONNECTIONS = 64
#: Seconds a connection has to send its whole request.
REQUEST_SECONDS = 10.0
#: Requests answered at once, each with its own copy of the exposition (one more is answered 503). Prometheus scrapes
#: a target once per interval (twice for a pair of HA replicas).
MAX_ANSWERS = 4
#: Seconds a request that finds all :data:`MAX_ANSWERS` taken waits for one, in the order the requests came, before it
#: is answered 503. Answered at once, a storm of clients scraping without pause (six, on three workers) had a fifth
#: to a third of an HA pair of Prometheus servers' scrapes answered 503, each an ``up == 0``; a scrape answered in
#: milliseconds frees its place long before this. Clients that hold the answers (reading slowly, or not at all) keep
#: the wait from ending well: past it, 503 as before.
QUEUE_SECONDS = 1.0
#: Formats whose newest plain rendering a listener keeps at once (see _Exposition): the text format and OpenMetrics,
#: each asked for by scrapers of its own. (A format is told by its content type, which carries the version a scraper
#: asks for: bounded, so that scrapes asking for many versions keep no more than this many copies of the exposition.)
KEPT_FORMATS: Final = 2
#: A rendering of the exposition answers the plain scrapes (no query, same format) that come within this many times
#: what it took to make: clients that scrape without pause share renderings, which hold the interpreter's lock,
#: where four such clients slowed the app's requests twenty to fifty times. A Prometheus scraping every few seconds
#: gets a fresh one. Renderings are made one at a time.
SHARE = 4.0
#: Seconds the rendering under way in this thread spent waiting on purpose (a merge giving the other workers time to
#: put back files someone removed, see multiproc.SharedState.merged): not part of what it took to make, so not shared
#: for four times as long. Counted in, a rendering that waited 2 s answered the metrics port's plain scrapes for 10 s.
_paused = threading.local()


def paused(seconds: float) -> None:
    """Note that the rendering under way in this thread waited ``seconds`` on purpose (see :data:`_paused`)."""
    _paused.seconds = getattr(_paused, "seconds", 0.0) + seconds


#: Seconds a server being closed (the worker that serves the port shutting down, or recycled) waits for the answers
#: under way: their threads are daemons, which the interpreter's exit would cut off mid-answer.
CLOSE_SECONDS = 5.0
#: Seconds a request has to take its whole answer (Prometheus gives up on a scrape after its scrape_timeout, 10 s by
#: default).
ANSWER_SECONDS = 30.0

#: The body of a 503 answered to a request past the bounds.
BUSY_BODY: Final = b"metrics listener is busy.\r\n"
_BUSY = b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: text/plain\r\nRetry-After: 1\r\nContent-Length: 27\r\n\r\n"
_BUSY += BUSY_BODY


#: Exceptions that mean the client went away or ran out of time: no news for the app's log.
_CLIENT_GONE = ("TimeoutError", "socket.timeout", "ConnectionResetError", "BrokenPipeError", "ConnectionAbortedError")


class _Filterable:
    """``registry`` with the ``name[]`` filter of the exposition app (``/metrics?name[]=llm_requests_total``) applied
    to what it collects: prometheus_client's own filter serves only collectors that described their names when they
    were registered, and the OpenTelemetry reader's families have no names until the first collection."""

    def __init__(self, registry: CollectorRegistry, names: Iterable[str] | None = None) -> None:
        self.registry = registry
        self.names = set(names) if names is not None else None

    def restricted_registry(self, names: Iterable[str]) -> _Filterable:
        return _Filterable(self.registry, names)

    def collect(self) -> Iterator[Metric]:
        for family in self.registry.collect():
            if self.names is None:
                yield family
                continue
            # As prometheus_client filters: by sample name (``llm_ttft_seconds_bucket``, ``llm_requests_total``).
            samples = [sample for sample in family.samples if sample.name in self.names]
            if samples:
                kept = Metric(family.name, family.documentation, family.type, family.unit)
                kept.samples = samples
                yield kept


class _LogWriter:
    """Where wsgiref writes the traceback of a request that failed (its ``stderr``): to this module's logger, an
    ERROR when the exposition itself failed (a collector raised), DEBUG when the client went away or timed out."""

    def __init__(self) -> None:
        self.text = ""

    def write(self, text: str) -> int:
        self.text += text
        return len(text)

    def flush(self) -> None:
        text, self.text = self.text.strip(), ""
        if not text:
            return
        last = text.splitlines()[-1]
        if last.startswith(_CLIENT_GONE):
            logger.debug("llm-telemetry: metrics connection ended early: %s", last)
        else:
            logger.error("llm-telemetry: answering a scrape failed:\n%s", text)


class _Handler(WSGIRequestHandler):
    server: BoundedServer
    answering = False
    #: Writes buffered, so the status line and the headers leave in one send: unbuffered (socketserver's default),
    #: wsgiref sent the status line, the Date and Server headers and the rest in four, and a worker killed between
    #: them (SIGKILL of the one serving the port, under several workers) left its client a 200 with the headers cut
    #: short and no Content-Length, which a lenient client (Python's http.client) reads as an empty exposition.
    wbufsize = io.DEFAULT_BUFFER_SIZE

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def get_stderr(self) -> Any:
        return _LogWriter()

    def parse_request(self) -> bool:
        """The request is read: answer it if one of the answers is free, else 503 (and no copy made)."""
        if not super().parse_request():
            return False
        self.answering = self.server.start_answer(self.connection)
        if not self.answering:
            self.server.tell_busy("answers")
            self.wfile.write(_BUSY)
        return self.answering

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            if self.answering:
                self.server.end_answer()


class Places:
    """``count`` places taken one at a time: one free is taken at once, else the request waits its turn, first come
    first served (a request that came later, finding one just freed, does not take it from one waiting), for up to
    ``seconds``. A place given back goes straight to the first one waiting."""

    def __init__(self, count: int) -> None:
        self.free = count
        self.lock = threading.Lock()
        self.waiting: deque[threading.Lock] = deque()

    def take(self, seconds: float) -> bool:
        with self.lock:
            if self.free and not self.waiting:
                self.free -= 1
                return True
            if seconds <= 0:
                return False
            turn = threading.Lock()
            turn.acquire()
            self.waiting.append(turn)
        if turn.acquire(timeout=seconds):
            return True  # handed over by give()
        with self.lock:
            if turn in self.waiting:
                self.waiting.remove(turn)
                return False
        return True  # handed over as the wait ran out

    def give(self) -> None:
        with self.lock:
            if self.waiting:
                self.waiting.popleft().release()
            else:
                self.free += 1


class BoundedServer(ThreadingWSGIServer):
    """A thread per connection, as prometheus_client's server, within the bounds the module describes."""

    #: The listen backlog: socketserver's default of 5 drops the SYNs of a burst of connections beyond it, and each
    #: such client waits a second to try again (68 connections at once took 9 s to be accepted).
    request_queue_size = 128
    max_connections = MAX_CONNECTIONS
    request_seconds = REQUEST_SECONDS
    max_answers = MAX_ANSWERS
    answer_seconds = ANSWER_SECONDS
    queue_seconds = QUEUE_SECONDS
    #: Seconds between two "busy" WARNINGs.
    busy_warning_seconds = 300.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._connections = threading.BoundedSemaphore(self.max_connections)
        self._answers = Places(self.max_answers)
        self._deadlines: dict[socket.socket, float] = {}
        self._lock = threading.Lock()
        self._told_busy = -self.busy_warning_seconds
        #: Set by server_close: a request refused then is refused for the close, not for being busy.
        self._closing = False
        super().__init__(*args, **kwargs)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._connections.acquire(blocking=False):
            self.tell_busy("connections")
            self._refuse(request)
            return
        self._deadline(request, self.request_seconds)
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._release(request)
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._release(request)

    def start_answer(self, request: socket.socket) -> bool:
        if not self._answers.take(0.0 if self._closing else self.queue_seconds):
            return False
        self._deadline(request, self.answer_seconds)
        return True

    def end_answer(self) -> None:
        self._answers.give()

    def server_close(self) -> None:
        """Stop listening, then give the connections under way up to CLOSE_SECONDS to end. Those still waiting to
        be accepted are taken first: closing the socket would reset them (a scrape whose request was sent, failing
        as it reads). Each place taken here is one no connection holds any more."""
        self._closing = True
        with contextlib.suppress(OSError):  # (a socket never bound or listening: nothing waits on it)
            self.socket.setblocking(False)
            for _ in range(self.max_connections):  # (a client connecting without pause cannot hold the close)
                try:
                    request, address = self.socket.accept()
                except OSError:
                    break  # none waiting
                try:
                    request.setblocking(True)
                    self.process_request(request, address)
                except Exception:  # (no thread to be had, say): that one is dropped, the close goes on
                    self.shutdown_request(request)
        super().server_close()
        deadline = time.monotonic() + CLOSE_SECONDS
        for _ in range(self.max_connections):
            if not self._connections.acquire(timeout=max(0.0, deadline - time.monotonic())):
                break

    def _deadline(self, request: socket.socket, seconds: float) -> None:
        with self._lock:
            self._deadlines[request] = time.monotonic() + seconds

    def _release(self, request: Any) -> None:
        with self._lock:
            self._deadlines.pop(request, None)
        self._connections.release()

    def service_actions(self) -> None:
        """Called by ``serve_forever`` between polls (every half second): connections past their time are shut
        down, which ends whatever read or write their thread is blocked in."""
        now = time.monotonic()
        with self._lock:
            expired = [request for request, deadline in self._deadlines.items() if deadline < now]
        for request in expired:
            try:
                request.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def tell_busy(self, what: str) -> None:
        if self._closing:
            return
        now = time.monotonic()
        if now - self._told_busy >= self.busy_warning_seconds:
            self._told_busy = now
            limit = self.max_connections if what == "connections" else self.max_answers
            logger.warning(
                "llm-telemetry: metrics listener busy: %d %s at once, answering more with 503 (clients that read or "
                "send slowly, or send nothing; keep the metrics port for the scraper)",
                limit,
                what,
            )

    def _refuse(self, request: socket.socket) -> None:
        try:
            request.settimeout(0)  # a 100-byte answer fits any new socket's buffer; never wait on this client
            request.send(_BUSY)
        except OSError:
            pass
        self.shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        error = sys.exc_info()[1]
        if isinstance(error, OSError):  # a client that went away, timed out or was shut down at its deadline
            logger.debug("llm-telemetry: metrics connection from %s ended early: %s", client_address, error)
        else:
            logger.warning("llm-telemetry: serving a metrics connection failed", exc_info=True)


class Renderings(Protocol):
    """Where several processes answer the same scrapes (the workers of one server on the app's own path), the plain
    renderings they share with each other: the newest any of them has published, each published before it is
    answered, so a scrape that follows an answered one gets that rendering or a newer one, never an older one."""

    def shared(self, content_type: str) -> tuple[str, list[tuple[str, str]], bytes] | None:
        """The newest published rendering of ``content_type`` while it is fresh (status, headers, body), else None."""

    def publish(
        self, content_type: str, until: float, status: str, headers: list[tuple[str, str]], body: bytes
    ) -> None:
        """Offer the rendering just made in this thread, fresh until ``until`` (``time.monotonic``), to the scrapes
        that follow in any process: taken only if no newer merge has published one; one not taken leaves no older
        rendering published."""

    def supersede(self) -> None:
        """The rendering just made in this thread is not shared (a scrape with a query): one published of an earlier
        merge is no longer to be answered."""


def exposition_app(registry: CollectorRegistry, renderings: Renderings | None = None) -> Any:
    """The WSGI app the metrics port serves for ``registry``: prometheus_client's, with its formats (text,
    OpenMetrics), gzip when asked, and the ``name[]`` filter. An ``Accept`` header whose format version
    prometheus_client cannot compare (``version=1.x``: its ``choose_encoder`` raises) is answered as one with no
    ``Accept``, in the text format, where prometheus_client would fail the scrape with a 500. ``renderings``: when
    other processes answer the same scrapes, the plain renderings are shared through it, between the processes."""
    return _Exposition(make_wsgi_app(_Filterable(registry)), renderings)


class _Exposition:
    """A WSGI exposition ``app`` whose renderings are shared (see :data:`SHARE`): one at a time, and a GET without a
    query (what Prometheus asks) gets the newest rendering of its format while it is fresh, also when it waited for
    that rendering to end. gzip is applied per answer (zlib lets go of the interpreter's lock as it compresses). The
    newest plain rendering of each format is kept (of KEPT_FORMATS formats, the latest rendered) until the next one of
    its format replaces it, or, no longer fresh, another rendering is made: scrapers of the text format and of
    OpenMetrics each share their own, where one kept rendering had each scrape of the one format replace the other's,
    and nothing was shared. One more copy of the exposition per format scraped. With
    ``renderings`` (several workers answering the app's own path), the plain renderings are shared between the
    workers instead: each worker keeping its own, a scrape answered by one after another's newer one would have
    shown a counter go down (which Prometheus reads as a reset), and each worker sharing only its newest while no
    other had merged since left a storm of scrapes, which reach every worker, rendering anew for nearly every one."""

    def __init__(self, app: Any, renderings: Renderings | None = None) -> None:
        self.app = app
        self.renderings = renderings
        self.lock = threading.Lock()
        #: The newest rendering without a query of each format, by content type: (fresh until, status, headers, body).
        self.kept: dict[str, tuple[float, str, list[tuple[str, str]], bytes]] = {}

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        accept = environ.get("HTTP_ACCEPT") or ""
        try:
            content_type = choose_encoder(accept)[1]
        except Exception:
            content_type = choose_encoder("")[1]
            environ = {**environ, "HTTP_ACCEPT": ""}
        if environ.get("REQUEST_METHOD") != "GET" or environ.get("PATH_INFO") == "/favicon.ico":
            return self.app(environ, start_response)  # type: ignore[no-any-return]
        query = environ.get("QUERY_STRING") or ""
        with self.lock:
            kept = self.kept.get(content_type)
            now = time.monotonic()
            shared = self.renderings.shared(content_type) if self.renderings is not None and not query else None
            if shared is not None:
                kept = (now, *shared)
            elif query or self.renderings is not None or kept is None or now >= kept[0]:
                _paused.seconds = 0.0
                status, headers, body = _render(self.app, {**environ, "HTTP_ACCEPT_ENCODING": ""})
                ended = time.monotonic()
                kept = (ended + SHARE * max(ended - now - _paused.seconds, 0.0), status, headers, body)
                if self.renderings is not None:  # before it is answered
                    if query:
                        self.renderings.supersede()
                    else:
                        self.renderings.publish(content_type, *kept)
                elif not query:
                    self._keep(content_type, kept, now)
        _until, status, headers, body = kept
        headers = list(headers)  # (the server adds to the list it is given: the Content-Length of this answer)
        if gzip_accepted(environ.get("HTTP_ACCEPT_ENCODING") or ""):
            body = gzip.compress(body)
            headers.append(("Content-Encoding", "gzip"))
        start_response(status, headers)
        return [body]

    def _keep(self, content_type: str, rendering: tuple[float, str, list[tuple[str, str]], bytes], now: float) -> None:
        """Keep ``rendering`` as the newest of ``content_type`` (under the lock), and of the others those still fresh,
        up to KEPT_FORMATS in all."""
        kept = {kind: other for kind, other in self.kept.items() if kind != content_type and now < other[0]}
        while len(kept) >= KEPT_FORMATS:
            del kept[next(iter(kept))]  # (the one rendered longest ago)
        kept[content_type] = rendering
        self.kept = kept


def _render(app: Any, environ: dict[str, Any]) -> tuple[str, list[tuple[str, str]], bytes]:
    """What the WSGI ``app`` answers to ``environ``: (status line, headers, body)."""
    started: list[Any] = []

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        started[:] = [status, headers]
        return lambda data: None

    body = b"".join(app(environ, start_response))
    return str(started[0]), list(started[1]), body


def answer(
    app: Any, method: str, query: str, accept: str, accept_encoding: str
) -> tuple[int, list[tuple[str, str]], bytes]:
    """Call the WSGI ``app`` for one scrape (blocking: the exposition's work); (status, headers, body)."""
    environ = {
        "REQUEST_METHOD": method,
        "PATH_INFO": "/metrics",
        "QUERY_STRING": query,
        "HTTP_ACCEPT": accept,
        "HTTP_ACCEPT_ENCODING": accept_encoding,
        "SERVER_NAME": "localhost",
        "SERVER_PORT": "0",
        "wsgi.url_scheme": "http",
    }
    status, headers, body = _render(app, environ)
    return int(status.split()[0]), headers, body


def serve_metrics(
    port: int,
    host: str,
    registry: CollectorRegistry,
    *,
    max_connections: int = MAX_CONNECTIONS,
    request_seconds: float = REQUEST_SECONDS,
    max_answers: int = MAX_ANSWERS,
    answer_seconds: float = ANSWER_SECONDS,
) -> tuple[WSGIServer, threading.Thread]:
    """Serve ``registry`` on ``host``:``port`` from a daemon thread; raises ``OSError`` when it cannot bind.

    ``::`` (the default) is every address of the host, IPv6 and IPv4 alike (a dual-stack socket), so that Prometheus
    reaches the pod whatever family its address is: ``0.0.0.0`` is IPv4's alone, refused to the IPv6 pod addresses of
    an IPv6 cluster. Where the host has no IPv6 (a pod whose IPv6 is switched off), ``::`` falls back to ``0.0.0.0``."""
    try:
        return _serve(port, host, registry, max_connections, request_seconds, max_answers, answer_seconds)
    except OSError as exc:
        if host != ANY_ADDRESS or exc.errno not in _NO_IPV6:
            raise
    return _serve(port, "0.0.0.0", registry, max_connections, request_seconds, max_answers, answer_seconds)


#: The address that binds every address of the host, IPv6 and IPv4 (see serve_metrics).
ANY_ADDRESS: Final = "::"
#: Why a host without IPv6 refuses an IPv6 socket or address.
_NO_IPV6: Final = frozenset({errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL, errno.EPROTONOSUPPORT})


def listener_url(host: str, port: int, path: str = "/metrics") -> str:
    """The URL of a listener on ``host``:``port``, an IPv6 address in brackets."""
    return f"http://[{host}]:{port}{path}" if ":" in host else f"http://{host}:{port}{path}"


def _serve(
    port: int,
    host: str,
    registry: CollectorRegistry,
    max_connections: int,
    request_seconds: float,
    max_answers: int,
    answer_seconds: float,
) -> tuple[WSGIServer, threading.Thread]:
    family, _type, _proto, _name, sockaddr = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    dual_stack = host == ANY_ADDRESS and family == socket.AF_INET6

    class Server(BoundedServer):
        address_family = family

        def server_bind(self) -> None:
            if dual_stack:
                self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            super().server_bind()

    Server.max_connections, Server.request_seconds = max_connections, request_seconds
    Server.max_answers, Server.answer_seconds = max_answers, answer_seconds
    # Each read or write also gives up after the longer limit, should the server loop not be there to enforce it.
    handler = type("Handler", (_Handler,), {"timeout": max(request_seconds, answer_seconds)})
    server = make_server(str(sockaddr[0]), port, exposition_app(registry), Server, handler_class=handler)
    thread = threading.Thread(target=server.serve_forever, name="llm-telemetry-metrics", daemon=True)
    thread.start()
    return server, thread
