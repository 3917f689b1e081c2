"""The metrics port's HTTP server: prometheus_client's exposition app, served within bounds.

prometheus_client's own ``start_http_server`` gives each connection a thread of its own, for as long as the client
keeps it, and each scrape its own copy of the exposition: a client that connects and sends nothing holds a thread
forever, and one that reads slowly holds a thread and a copy (several such readers of a 14 MB exposition held
~300 MB, and slowed the app beside them). This server answers the same requests with the same app (formats,
``name[]`` filters, gzip), but serves at most :data:`MAX_CONNECTIONS` at once, answering the ones beyond with a 503,
and gives every connection :data:`SOCKET_TIMEOUT` seconds to send its request and to take each answer. So what
scrapers can hold is bounded by these two numbers, whatever they do; the app's own requests never wait on them.
"""

from __future__ import annotations

import logging
import socket
import threading
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import ThreadingWSGIServer, make_wsgi_app

logger = logging.getLogger(__name__)

#: Connections served at once; one more is answered 503 at once. Prometheus scrapes a target once per interval
#: (twice for a pair of HA replicas), with one connection per scrape.
MAX_CONNECTIONS = 4
#: Seconds a connection has to send its request, and to take the whole answer (Prometheus gives up on a scrape
#: after its scrape_timeout, 10 s by default).
SOCKET_TIMEOUT = 30.0

_BUSY = b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: text/plain\r\nRetry-After: 1\r\nContent-Length: 27\r\n\r\n"
_BUSY += b"metrics listener is busy.\r\n"


class _Discard:
    """Where wsgiref writes the traceback of a client that timed out: nowhere (the app's stderr is not ours)."""

    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass


class _Handler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass

    def get_stderr(self) -> Any:
        return _Discard()


class BoundedServer(ThreadingWSGIServer):
    """A thread per connection, as prometheus_client's server, but at most ``max_connections`` of them."""

    max_connections = MAX_CONNECTIONS

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._slots = threading.BoundedSemaphore(self.max_connections)
        self._told_busy = False
        super().__init__(*args, **kwargs)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self._refuse(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def _refuse(self, request: socket.socket) -> None:
        if not self._told_busy:
            self._told_busy = True
            logger.warning(
                "llm-telemetry: metrics listener busy: %d connections open, answering more with 503 (a client that "
                "reads slowly or sends nothing; keep the metrics port for the scraper)",
                self.max_connections,
            )
        try:
            request.settimeout(0)  # a 100-byte answer fits any new socket's buffer; never wait on this client
            request.send(_BUSY)
        except OSError:
            pass
        self.shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that timed out or went away: nothing to report on the app's stderr.
        logger.debug("llm-telemetry: metrics connection from %s ended early", client_address, exc_info=True)


def serve_metrics(
    port: int,
    host: str,
    registry: CollectorRegistry,
    *,
    max_connections: int = MAX_CONNECTIONS,
    timeout: float = SOCKET_TIMEOUT,
) -> tuple[WSGIServer, threading.Thread]:
    """Serve ``registry`` on ``host``:``port`` from a daemon thread; raises ``OSError`` when it cannot bind."""
    family, _type, _proto, _name, sockaddr = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]

    class Server(BoundedServer):
        address_family = family

    Server.max_connections = max_connections
    handler = type("Handler", (_Handler,), {"timeout": timeout})
    server = make_server(str(sockaddr[0]), port, make_wsgi_app(registry), Server, handler_class=handler)
    thread = threading.Thread(target=server.serve_forever, name="llm-telemetry-metrics", daemon=True)
    thread.start()
    return server, thread
