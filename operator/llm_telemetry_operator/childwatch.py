"""Watches of the operator's children and of the workloads, carrying the objects' metadata only.

A pass needs to hear of a child only to tell the echo of its own write (a resourceVersion it created, repaired or
found as desired) from a hand edit or a deletion, which it repairs; of a workload, whether it may now be selected,
lost or changed from the state the last pass left it in (labels, the injection record, ``generation``). Every such
decision reads the object's metadata alone, and the pass it starts reads what it compares. kopf's watches deliver
whole objects: a dashboard ConfigMap is some 40 KB of JSON and a PrometheusRule 16 KB, decoded for every event
(mostly the echoes of our own creates and the deployment controller's updates), and each event also goes through
kopf's per-object machinery (a worker, its memory, a body and patch wrapper, the handler registry). So they are
watched here instead, with the API server's metadata-only answer (``PartialObjectMetadata``), the children with a
label selector: the server sends a few hundred bytes per event, for children only those this operator manages.

Each watch runs in a thread of its own (a watch request blocks for minutes) and hands every event to the event
loop. It starts with a list (metadata only): every current object is handed on as ADDED, and the watch goes on from
the list's resourceVersion. It continues from the last version seen (bookmarks included) when the server ends the
stream or the connection breaks (the server then sends every change since, deletions included), and lists again,
at once, when the version is too old to resume from (410): an object it knew that the new list lacks was deleted
in the gap, and is handed on as DELETED with the metadata last seen (an informer's relist). So it keeps the
metadata of every object it watches, without ``managedFields``. A kind that is not served (the Prometheus
Operator's CRDs not installed yet) is tried again every ``missing_retry`` seconds (the operator's timers', 30 by
default: see ``config.Timers``), and the first list that succeeds after that calls ``served`` once, so that whoever
waited for the kind hears it is there now; other failures back off up to :data:`MAX_BACKOFF`. Each time a watch
fails otherwise than for a kind not served or a request refused (404, 403): the connection broke, the API server was
out of reach or erred, or the version expired (410), it calls ``broken`` before handing on any event read after that:
whoever else watched through the same server may have missed events too (see ``handlers._reread_after_gap``).
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlencode

from llm_telemetry_operator.config import Timers
from llm_telemetry_operator.errors import ApiError
from llm_telemetry_operator.kube import KubeClient, Resource

#: The ``Accept`` of a metadata-only watch: each event's object is a ``PartialObjectMetadata`` (a server that
#: cannot transform it sends the whole object, which is read the same way).
WATCH_METADATA_ONLY = "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1, application/json"
#: The same for a list: a ``PartialObjectMetadataList``.
LIST_METADATA_ONLY = "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1, application/json"
#: Seconds the API server keeps one watch request open: a minute, so that a quiet watch is answered within the read
#: timeout (``kube.STREAM_READ_TIMEOUT``), which then tells a dead connection from a quiet one. A watch goes on
#: from its last version: one request a minute per watch.
SERVER_TIMEOUT = 60
#: The longest wait before watching again after a failure.
MAX_BACKOFF = 30.0

logger = logging.getLogger(__name__)

#: What each event is handed to, on the event loop: (type, the object's metadata).
Deliver = Callable[[str, dict[str, Any]], None]


class MetadataWatch:
    """Watch one kind's objects with ``labels`` in ``namespace`` (None: all), or the one object named ``name``
    there, and call ``deliver(type, metadata)`` on ``loop``, in the context the watch was made in, for each ADDED,
    MODIFIED and DELETED event, until :meth:`stop`; and ``served()`` there once each time the kind, found not served
    (404), is served again (its first list since succeeded), which it tries every ``missing_retry`` seconds."""

    def __init__(
        self,
        client: KubeClient,
        resource: Resource,
        namespace: str | None,
        labels: Mapping[str, str],
        deliver: Deliver,
        loop: asyncio.AbstractEventLoop,
        name: str | None = None,
        served: Callable[[], None] | None = None,
        broken: Callable[[], None] | None = None,
        missing_retry: float = Timers.missing_retry_seconds,
    ) -> None:
        self.client = client
        self.resource = resource
        self.namespace = namespace
        self.labels = dict(labels)
        self.name = name
        self.deliver = deliver
        self.served = served
        self.broken = broken
        self.missing_retry = missing_retry
        self.loop = loop
        # The context of whoever made the watch (kopf's startup handler): the passes events start post Kubernetes
        # events through kopf, which finds its settings and event queue in context variables.
        self.context = contextvars.copy_context()
        self._stopped = threading.Event()
        self._response: Any = None
        #: The last resourceVersion seen, kept as events are read: a stream that breaks resumes from it; None: list.
        self._version: str | None = None
        #: The metadata last seen of every object watched, by (namespace, name): what a relist finds gone was deleted.
        self._known: dict[tuple[str, str], dict[str, Any]] = {}
        #: Whether the kind was last found not served (404): the next list that succeeds calls ``served``.
        self._missing = False
        #: Set on the event loop once the events of the first list have been delivered (see :meth:`_list`).
        self.listed = asyncio.Event()
        where = namespace or "all namespaces"
        what = resource.plural if name is None else f"{resource.plural}-{name}"
        self._thread = threading.Thread(target=self._run, name=f"watch-{what}-{where}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop watching; a request in flight is cut."""
        self._stopped.set()
        response = self._response
        if response is not None:
            try:
                response.shutdown()
            except Exception:  # already closed
                pass

    def _selected(self, meta: Mapping[str, Any]) -> bool:
        if self.name is not None and meta.get("name") != self.name:
            return False
        labels = meta.get("labels") or {}
        return all(labels.get(k) == v for k, v in self.labels.items())

    def _run(self) -> None:
        backoff = 1.0
        # The status of the failure told last, until a watch succeeds: a failure of the same status is said once, not
        # at every retry. A watched namespace being deleted takes the Role with it (namespaced mode), and its watches
        # are refused (403) until the namespace leaves watchNamespaces; an API server away (0: no answer) fails each
        # retry of every watch, every 30 s for as long as it is away (a WARNING per watch and retry, before).
        told: int | None = None
        while not self._stopped.is_set():
            try:
                if self._version is None:
                    self._list(fresh=bool(self._known))
                self._watch(self._version)
                backoff, told = 1.0, None
            except ApiError as exc:
                if self._stopped.is_set():
                    break
                if exc.status not in (403, 404):
                    self._broke()
                if exc.status == 404:
                    wait = self.missing_retry
                elif exc.status == 410:
                    wait = 0.0  # not a failure: the version is too old to resume from; list again now
                    logger.info("watch of %s expired (%s); watching anew", self.resource.plural, exc)
                else:
                    wait = exc.retry_after if exc.retry_after is not None else backoff
                    backoff = min(MAX_BACKOFF, backoff * 2)
                    log = logger.debug if exc.status == told else logger.warning
                    log("watching %s failed (%s); again in %.0f s", self.resource.plural, exc, wait)
                    told = exc.status
                if exc.status in (404, 410):
                    self._version = None
                if exc.status == 404:
                    self._missing = True
                self._stopped.wait(wait)
            except Exception as exc:  # a dropped connection, a garbled line: watch again from the last version
                if self._stopped.is_set():
                    break
                self._broke()
                logger.debug("watch of %s ended (%s); watching again", self.resource.plural, exc)
                self._stopped.wait(backoff)
                backoff = min(MAX_BACKOFF, backoff * 2)

    def _broke(self) -> None:
        """Call ``broken`` on the loop: before any event read after this failure is delivered (the loop runs its
        callbacks in the order they were scheduled)."""
        if self.broken is not None:
            self.loop.call_soon_threadsafe(self.broken, context=self.context)

    def _selector(self) -> list[tuple[str, str]]:
        selector = []
        if self.labels:
            selector.append(("labelSelector", ",".join(f"{k}={v}" for k, v in sorted(self.labels.items()))))
        if self.name is not None:
            selector.append(("fieldSelector", f"metadata.name={self.name}"))
        return selector

    def _list(self, fresh: bool) -> None:
        """Every current object as ADDED, and every object known before and now gone as DELETED; the watch goes on
        from the list's version.

        The first list is served from the API server's watch cache ("any version", as informers list). A list
        after a 410 (``fresh``) is read from etcd: a cache behind the versions already seen (another API server's,
        say) could lack objects created since, and they would be handed on as deleted."""
        params = [] if fresh else [("resourceVersion", "0")]
        path = self.resource.path(self.namespace) + "?" + urlencode([*params, *self._selector()])
        response = self.client.open_stream(self.resource, "list", path, LIST_METADATA_ONLY)
        try:
            body = json.loads(response.data)
        finally:
            response.release_conn()
        current: dict[tuple[str, str], dict[str, Any]] = {}
        for item in body.get("items") or []:
            meta = (item or {}).get("metadata") or {}
            if meta.get("name") and self._selected(meta):
                current[str(meta.get("namespace") or ""), str(meta["name"])] = _kept(meta)
        for key in self._known.keys() - current.keys():
            self.loop.call_soon_threadsafe(self.deliver, "DELETED", dict(self._known[key]), context=self.context)
        for meta in current.values():
            self.loop.call_soon_threadsafe(self.deliver, "ADDED", dict(meta), context=self.context)
        # After them: callbacks run in the order they were scheduled, so whoever waits for it has seen every object.
        self.loop.call_soon_threadsafe(self.listed.set)
        self._known = current
        self._version = str((body.get("metadata") or {}).get("resourceVersion") or "") or None
        if self._missing:
            self._missing = False
            if self.served is not None:
                self.loop.call_soon_threadsafe(self.served, context=self.context)

    def _watch(self, version: str | None) -> None:
        """One watch request, from ``version`` (None: every current object first); each event's version is kept
        in ``_version`` as it is read."""
        params = [("watch", "true"), ("allowWatchBookmarks", "true"), ("timeoutSeconds", str(SERVER_TIMEOUT))]
        params += self._selector()
        if version is not None:
            params.append(("resourceVersion", version))
        started = time.monotonic()
        response = self.client.open_stream(
            self.resource, "watch", self.resource.path(self.namespace) + "?" + urlencode(params), WATCH_METADATA_ONLY
        )
        self._response = response
        try:
            if self._stopped.is_set():
                return
            buffer = b""
            for chunk in response.stream(amt=None, decode_content=False):
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    if line.strip():
                        self._event(json.loads(line))
        finally:
            self._response = None
            response.release_conn()
        if time.monotonic() - started < 1.0:
            self._stopped.wait(1.0)  # a server that ends watches at once is not asked again in a tight loop

    def _event(self, event: Mapping[str, Any]) -> None:
        kind = event.get("type")
        obj = event.get("object") or {}
        if kind == "ERROR":
            code = int(obj.get("code") or 0)
            raise ApiError(code, str(obj.get("reason") or ""), str(obj.get("message") or "watch error"))
        meta = obj.get("metadata") or {}
        self._version = str(meta.get("resourceVersion") or self._version or "") or None
        if kind in ("ADDED", "MODIFIED", "DELETED") and meta.get("name") and self._selected(meta):
            key = (str(meta.get("namespace") or ""), str(meta["name"]))
            if kind == "DELETED":
                self._known.pop(key, None)
            else:
                self._known[key] = _kept(meta)
            self.loop.call_soon_threadsafe(self.deliver, str(kind), dict(meta), context=self.context)


def _kept(meta: Mapping[str, Any]) -> dict[str, Any]:
    """The metadata worth keeping: all but ``managedFields``, the bulk of it and read by no decision."""
    return {k: v for k, v in meta.items() if k != "managedFields"}
