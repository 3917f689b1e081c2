"""The metadata watches' resumption: a stream that breaks resumes from the last version it delivered, and a
version too old to resume from is answered by a list that tells what was deleted in the gap.

The API server answers a watch from a resourceVersion with every change after it, deletions included; a list
sends only what exists. So a connection cut (an API server restart, a proxy's idle timeout) must not lose the
versions read on it, and a list after a 410 must be compared with what was known, or the deletions made meanwhile
are never heard of. The API server is played by a stand-in that serves scripted lists and watch streams and
records the requests made.
"""

from __future__ import annotations

import asyncio
import http.server
import json
import logging
import threading
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import urllib3

from llm_telemetry_operator import kube
from llm_telemetry_operator.childwatch import MetadataWatch
from llm_telemetry_operator.config import Timers
from llm_telemetry_operator.errors import ApiError


class _Stream:
    """One watch response: its event lines, then the end of the stream or a broken connection."""

    def __init__(self, events: list[dict[str, Any]], then: BaseException | None) -> None:
        self.events, self.then = events, then

    def stream(self, amt: Any = None, decode_content: bool = False) -> Iterator[bytes]:
        for event in self.events:
            yield json.dumps(event).encode() + b"\n"
        if self.then is not None:
            raise self.then

    def release_conn(self) -> None:
        pass

    def shutdown(self) -> None:
        pass


class _List:
    """One list response: the objects' metadata and the list's resourceVersion."""

    def __init__(self, version: str, *names: str) -> None:
        items = [{"metadata": {"name": name, "namespace": "llm", "resourceVersion": version}} for name in names]
        self.data = json.dumps({"metadata": {"resourceVersion": version}, "items": items}).encode()

    def release_conn(self) -> None:
        pass


class _Server:
    """Serves the scripted responses in turn, recording each request (``list``, or the version a watch asks for);
    then none."""

    def __init__(self, *responses: _Stream | _List | _Garbled | ApiError) -> None:
        self.responses = list(responses)
        self.versions: list[str | None] = []
        self.done = asyncio.Event()
        self.loop = asyncio.get_running_loop()

    def open_stream(self, resource: Any, verb: str, path: str, accept: str) -> Any:
        query = parse_qs(urlsplit(path).query)
        version = query.get("resourceVersion", [None])[0]
        # A list from the watch cache ("any version": resourceVersion=0), or a fresh one from etcd (none).
        self.versions.append(("list from cache" if version == "0" else "list") if verb == "list" else version)
        if not self.responses:
            self.loop.call_soon_threadsafe(self.done.set)
            raise ApiError(503, "ServiceUnavailable", "no more")
        response = self.responses.pop(0)
        if isinstance(response, ApiError):
            raise response
        return response


def _event(kind: str, name: str, version: str) -> dict[str, Any]:
    return {"type": kind, "object": {"metadata": {"name": name, "namespace": "llm", "resourceVersion": version}}}


async def _watch(server: _Server) -> list[tuple[str, str]]:
    return (await _served_calls(server, 30))[1]


async def test_a_broken_stream_resumes_from_the_last_version_it_delivered() -> None:
    """The first watch (from the list's version) breaks after two events: the next asks for the changes after the
    second, and so hears of the deletion made meanwhile."""
    server = _Server(
        _List("4"),
        _Stream([_event("ADDED", "a", "5"), _event("ADDED", "b", "6")], urllib3.exceptions.ProtocolError("cut")),
        _Stream([_event("DELETED", "a", "9")], None),
    )
    delivered = await _watch(server)
    assert server.versions[:3] == ["list from cache", "4", "6"]
    assert delivered == [("ADDED", "a"), ("ADDED", "b"), ("DELETED", "a")]


async def test_an_expired_version_lists_again_and_tells_what_went_meanwhile() -> None:
    """410 Gone: the version is too old to resume from. A list at once: what it lacks of what was known (``a``,
    deleted while no watch could say so) is handed on as DELETED, what it has as ADDED; the watch goes on from the
    list's version."""
    server = _Server(
        _List("4", "a"),
        _Stream([_event("ADDED", "b", "5")], urllib3.exceptions.ProtocolError("cut")),
        ApiError(410, "Expired", "too old resource version"),
        _List("12", "b", "c"),
        _Stream([_event("MODIFIED", "c", "13")], None),
    )
    delivered = await _watch(server)
    # The first list from the API server's cache, the one after the 410 from etcd: a cache behind what the watch
    # has seen could lack objects created since, which would pass for deleted.
    assert server.versions[:5] == ["list from cache", "4", "5", "list", "12"]
    assert delivered == [
        ("ADDED", "a"),
        ("ADDED", "b"),
        ("DELETED", "a"),
        ("ADDED", "b"),
        ("ADDED", "c"),
        ("MODIFIED", "c"),
    ]


async def test_refusals_are_told_once_until_a_watch_succeeds(caplog: Any) -> None:
    """A watched namespace deleted in namespaced mode takes the chart's Role with it: every watch there is refused
    until the namespace leaves the watched list. The first refusal of a run is a WARNING, the rest are not."""
    caplog.set_level(logging.DEBUG, logger="llm_telemetry_operator.childwatch")
    forbidden = ApiError(403, "Forbidden", "services is forbidden")
    server = _Server(forbidden, forbidden, _List("4"), _Stream([_event("ADDED", "a", "5")], None), forbidden)
    await _watch(server)
    told = [r for r in caplog.records if "403" in r.getMessage()]
    assert [r.levelno for r in told] == [logging.WARNING, logging.DEBUG, logging.WARNING]


async def test_an_api_server_away_is_told_once_per_watch_until_a_watch_succeeds(caplog: Any) -> None:
    """The API server away (stopped, restarted, out of reach): each retry of a watch finds no answer, every 30 s for
    as long as it lasts, and every watch of every kind (in namespaced mode of every watched namespace) retries so. The
    first failure is a WARNING, its repeats are not, until a watch succeeds: the next outage is told again. On a
    real API server stopped for 180 s, each of the operator's watches logged a WARNING at every retry (a dozen
    each), where the operator's own message says so once a minute."""
    caplog.set_level(logging.DEBUG, logger="llm_telemetry_operator.childwatch")
    away = ApiError(0, "Unreachable", "GET /api/v1/services: no answer from the API server")
    server = _Server(away, away, _List("4"), _Stream([_event("ADDED", "a", "5")], None), away)
    await _watch(server)
    told = [r for r in caplog.records if "Unreachable" in r.getMessage()]
    assert [r.levelno for r in told] == [logging.WARNING, logging.DEBUG, logging.WARNING]


class _SilentOnce(http.server.BaseHTTPRequestHandler):
    """An API server whose first watch connection goes silent for good (as one a NAT or load balancer dropped
    without a word): the headers, then nothing. Lists answer at version 4; the next watch sends one event."""

    protocol_version = "HTTP/1.1"
    watches: list[str] = []
    hang = threading.Event()

    def do_GET(self) -> None:
        query = parse_qs(urlsplit(self.path).query)
        if "watch" not in query:
            body = json.dumps({"metadata": {"resourceVersion": "4"}, "items": []}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        self.watches.append(query.get("resourceVersion", [""])[0])
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.wfile.flush()
        if len(self.watches) == 1:
            self.hang.wait(30)  # silent: no bytes, no close
            return
        line = json.dumps(_event("ADDED", "a", "5")).encode() + b"\n"
        self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
        self.wfile.flush()
        self.hang.wait(30)

    def log_message(self, *args: Any) -> None:
        pass


async def test_a_watch_whose_connection_goes_silent_is_resumed_within_the_read_timeout() -> None:
    """Through a real socket: the first watch's connection goes silent (no bytes, no close). The watch gives it up
    after the client's stream read timeout and resumes from the list's version, so the change made meanwhile
    arrives; with the old timeout of 400 s (the server asked for 300 s watches) it took minutes."""
    _SilentOnce.watches, _SilentOnce.hang = [], threading.Event()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _SilentOnce)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    client = kube.KubeClient(
        kube.server_configuration(f"http://127.0.0.1:{server.server_address[1]}"), stream_timeout=0.5
    )
    delivered: list[tuple[str, str]] = []
    arrived = asyncio.Event()

    def deliver(kind: str, meta: dict[str, Any]) -> None:
        delivered.append((kind, meta["name"]))
        arrived.set()

    watch = MetadataWatch(client, kube.SERVICES, "llm", {}, deliver, asyncio.get_running_loop())
    watch.start()
    try:
        await asyncio.wait_for(arrived.wait(), 10)
    finally:
        watch.stop()
        _SilentOnce.hang.set()
        server.shutdown()
        server.server_close()
        await client.close()
    assert delivered == [("ADDED", "a")]
    assert _SilentOnce.watches[:2] == ["4", "4"]


def test_a_watch_asks_the_server_to_end_it_before_the_client_would_give_it_up() -> None:
    """A quiet watch must be ended by the server (and resumed) before the client's read timeout counts it dead."""
    from llm_telemetry_operator.childwatch import SERVER_TIMEOUT

    assert SERVER_TIMEOUT < kube.STREAM_READ_TIMEOUT <= 120


async def _served_calls(
    server: _Server, timeout: float, missing_retry: float = Timers().missing_retry_seconds
) -> tuple[int, list[tuple[str, str]]]:
    """Run a watch with a ``served`` callback until the script ends: how often it was called, and what was delivered."""
    delivered: list[tuple[str, str]] = []
    calls: list[None] = []
    watch = MetadataWatch(
        server,  # type: ignore[arg-type]
        kube.SERVICES,
        None,
        {},
        lambda kind, meta: delivered.append((kind, meta["name"])),
        asyncio.get_running_loop(),
        served=lambda: calls.append(None),
        missing_retry=missing_retry,
    )
    watch.start()
    try:
        await asyncio.wait_for(server.done.wait(), timeout)
    finally:
        watch.stop()
    await asyncio.sleep(0)  # the callbacks queued on the loop
    return len(calls), delivered


async def test_a_kind_served_from_the_start_is_never_told_served_not_at_a_relist_either() -> None:
    """``served`` is for a kind found not served (404) that is served now. A watch whose first list succeeds, and
    which lists again after a 410 (an informer's relist), calls it never: called there, every resource of the
    operator would get a pass at each start and at each expired watch."""
    server = _Server(
        _List("4", "a"),
        ApiError(410, "Expired", "too old resource version"),
        _List("12", "a"),
        _Stream([_event("MODIFIED", "a", "13")], None),
    )
    calls, delivered = await _served_calls(server, 30)
    assert server.versions[:4] == ["list from cache", "4", "list", "12"]
    assert delivered == [("ADDED", "a"), ("ADDED", "a"), ("MODIFIED", "a")]
    assert calls == 0


async def test_a_kind_served_after_a_404_is_told_once_whatever_failed_between() -> None:
    """404 (the CRD not installed), then a 403 and a list whose answer cannot be read before one succeeds: the
    kind is told served once, on that list, and not again at the relist after a 410. (One 404: the watch tries a kind
    not served again after ``missing_retry`` seconds, half a minute in the operator, 1 s here: the retry's interval
    is not what is tested.)"""
    server = _Server(
        ApiError(404, "NotFound", "the server could not find the requested resource"),
        ApiError(403, "Forbidden", "servicemonitors is forbidden"),
        _Garbled(),
        _List("4", "a"),
        ApiError(410, "Expired", "too old resource version"),
        _List("12", "a"),
        _Stream([], None),
    )
    calls, _ = await _served_calls(server, 60, missing_retry=1.0)
    assert server.versions[:6] == ["list from cache"] * 4 + ["4", "list"]
    assert calls == 1


class _Garbled:
    """A list response cut short: not JSON."""

    data = b'{"metadata": {"resourceVersion": "3"}, "items": ['

    def release_conn(self) -> None:
        pass


async def test_broken_is_called_for_each_failure_that_may_have_hidden_changes_before_the_events_after_it() -> None:
    """``broken`` tells the operator that whoever watched through the same API server may have missed changes (its
    passes then read their resource again). It is called, before any event read after the failure is handed on, for
    a broken connection and an expired version; not for a watch the server ended as it does every minute, nor for a
    refusal (403: the server answered, and a namespace being deleted is refused for minutes)."""
    server = _Server(
        _List("4", "a"),
        _Stream([_event("MODIFIED", "a", "5")], None),
        _Stream([_event("MODIFIED", "a", "6")], urllib3.exceptions.ProtocolError("cut")),
        ApiError(403, "Forbidden", "services is forbidden"),
        ApiError(410, "Expired", "too old resource version"),
        _List("12", "a"),
        _Stream([_event("MODIFIED", "a", "13")], None),
    )
    seen: list[str] = []
    watch = MetadataWatch(
        server,  # type: ignore[arg-type]
        kube.SERVICES,
        None,
        {},
        lambda kind, meta: seen.append(f"{kind} {meta['resourceVersion']}"),
        asyncio.get_running_loop(),
        broken=lambda: seen.append("broken"),
    )
    watch.start()
    try:
        await asyncio.wait_for(server.done.wait(), 30)
    finally:
        watch.stop()
    await asyncio.sleep(0)  # the callbacks queued on the loop
    # (then "broken" for the scripted server's 503 once it has nothing more to answer)
    assert seen[:7] == ["ADDED 4", "MODIFIED 5", "MODIFIED 6", "broken", "broken", "ADDED 12", "MODIFIED 13"]
