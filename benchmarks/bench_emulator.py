"""kmock's Kubernetes emulator without the costs that grow with the traffic, for the operator benchmark.

kmock 0.8 keeps every request it ever received (``RawHandler._requests``) and picks the reaction for a new
request by evaluating ``request in reaction._source`` for each of its ~15 built-in reactions; ``View.__contains__``
walks the whole request history through each reaction's filters. Every request therefore costs time in
proportion to all the requests before it, and a run costs the square of its traffic: ~7 s to Ready at N=10,
~370 s at N=50, while the operator process sat mostly idle. On top of that, every read or write of one object
(``_serve_fetch``/``_serve_create``/``_serve_update``/``_serve_delete``) scans all stored objects to find it, and
a list ignores ``labelSelector``: the operator lists each LLMTelemetry's children by label, and kmock answered
every such list with all the children of that kind in the namespace (N of them), which a real API server does not.

:class:`BenchEmulator` serves the same responses and keeps the same object store and watch streams, but:

- a request stays in the history only while it is being served (a watch for as long as it streams), so
  matching it against the reactions costs the handful of requests in flight, not all those before it;
- each request is recorded in :attr:`BenchEmulator.seen` as a small :class:`Seen` tuple (method, path,
  User-Agent, whether it is a watch), which is what the benchmark counts;
- single-object reads and writes find their object by key instead of scanning the store;
- lists keep an index of the store by resource and honour ``labelSelector`` (equality, inequality, existence,
  ``in``/``notin``), as the API server does;
- every create gets a ``uid`` and every write a new ``resourceVersion``, as the API server does (kmock stores
  objects as sent). kopf and the operator both tell their own writes' echoes from other changes by it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import kmock


class Seen(NamedTuple):
    """One request as the benchmark counts it."""

    method: str
    path: str
    agent: str
    watch: bool


class BenchEmulator(kmock.KubernetesEmulator):
    """:class:`kmock.KubernetesEmulator` whose cost per request does not grow with the requests served.

    Usage::

        async with BenchEmulator() as emu, kmock.Server(emu):
            ...
            writes = [s for s in emu.seen if s.method == "PATCH"]
    """

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        #: Every request received, in order of arrival.
        self.seen: list[Seen] = []
        # Keys of the object store by resource; kmock never removes a key (deletion is soft), so new keys are
        # always at the end of its dict and the index catches up by reading only those.
        self._index: dict[Any, list[Any]] = {}
        self._indexed = 0
        self._version = 1000

    async def _handle(self, request: Any) -> Any:
        method = request.method
        self.seen.append(
            Seen(
                method=str(getattr(method, "value", method)).upper(),
                path=str(request.url.path),
                agent=request.headers.get("User-Agent", ""),
                watch=request.params.get("watch") in ("true", "1"),
            )
        )
        self._stamp(request)
        try:
            return await super()._handle(request)
        finally:
            # Forget the request once answered: kmock's filters would walk it on every later request, and the
            # reaction that served it keeps its own list (only for assertions, which the benchmark makes on
            # ``seen``). Concurrent requests finish in any order, so remove this one by identity.
            _forget(self._requests, request)
            for payload in self._payloads:
                _forget(payload._requests, request)

    def _stamp(self, request: Any) -> None:
        action, data = request.action, request.data
        if request.resource is None or action not in (kmock.action.CREATE, kmock.action.UPDATE):
            return
        self._version += 1
        if isinstance(data, dict):
            meta = data.setdefault("metadata", {})
            meta["resourceVersion"] = str(self._version)
            if action == kmock.action.CREATE:
                meta.setdefault("uid", f"bench-{self._version}")
        elif isinstance(data, list):  # a JSON patch
            # Its tests judged as the API server judges them, then left out: kmock's JSON patch library fails a test
            # of null that a member absent from its object meets (the operator's injection tests absent annotations
            # so). The operator benchmark has put the operator tests' directory on the path by now.
            from kopf_testing import UNMET, _met

            obj = self._lookup(request.resource, request.namespace, request.name)
            current = obj.raw if obj is not None else {}
            if not all(_met(current, op) for op in data if op.get("op") == "test"):
                raise kmock.KubernetesError(status=422, reason="Invalid", message=UNMET)
            data[:] = [op for op in data if op.get("op") != "test"]
            data.append({"op": "add", "path": "/metadata/resourceVersion", "value": str(self._version)})

    # kmock's own versions scan every stored object for the one the request names (``__get_objs``).
    async def _serve_fetch(self, request: Any) -> Any:
        obj = self._lookup(request.resource, request.namespace, request.name)
        if obj is None or obj.deleted:
            raise kmock.KubernetesObjectNotFoundError()
        return obj.raw

    async def _serve_create(self, request: Any) -> Any:
        meta = request.data.get("metadata", {})
        namespace, name = request.namespace or meta.get("namespace"), request.name or meta.get("name")
        obj = self._lookup(request.resource, namespace, name)
        assert obj is not None  # created in _handle()
        return obj.raw

    async def _serve_update(self, request: Any) -> Any:
        obj = self._lookup(request.resource, request.namespace, request.name)
        assert obj is not None  # updated in _handle()
        return obj.last.raw

    async def _serve_delete(self, request: Any) -> Any:
        obj = self._lookup(request.resource, request.namespace, request.name)
        assert obj is not None  # deleted in _handle()
        return obj.last.raw

    async def _serve_list(self, request: Any) -> Any:
        if request.resource not in self._resources:
            return await super()._serve_list(request)  # kmock's discovery of undeclared resources, and its 404
        selector = _selector(request.params.get("labelSelector", ""))
        items = []
        async with self._lock:
            for key in self._keys(request.resource):
                if request.namespace is not None and key[1] != request.namespace:
                    continue
                obj = self._objects[key]
                if obj.deleted:
                    continue
                raw = obj.raw
                if selector((raw.get("metadata") or {}).get("labels") or {}):
                    items.append(raw)
        return {"metadata": {"resourceVersion": "..."}, "items": items}

    def _keys(self, resource: Any) -> list[Any]:
        keys = list(self._objects.keys())
        if len(keys) < self._indexed:  # hard-deleted from outside: start over
            self._index, self._indexed = {}, 0
        for key in keys[self._indexed :]:
            self._index.setdefault(key[0], []).append(key)
        self._indexed = len(keys)
        return self._index.get(resource, [])

    def _lookup(self, resource: Any, namespace: str | None, name: str | None) -> Any:
        if resource is None or name is None:
            return None
        try:
            return self._objects[resource, namespace, name]
        except KeyError:
            return None


def _forget(requests: list[Any], request: Any) -> None:
    for i in range(len(requests) - 1, -1, -1):
        if requests[i] is request:
            del requests[i]
            return


_TERM = re.compile(r"\s*(!?)([\w./-]+)\s*(?:(==|=|!=)\s*([\w./-]*)|\s(in|notin)\s*\(([^)]*)\))?\s*(?:,|$)")


def _selector(text: str) -> Callable[[Mapping[str, str]], bool]:
    """A Kubernetes label selector (``a=b,c!=d,e,!f,g in (h,i),j notin (k)``) as a predicate on labels."""
    terms: list[tuple[str, str, set[str]]] = []  # (operator, key, values)
    pos = 0
    while pos < len(text):
        match = _TERM.match(text, pos)
        if match is None or match.end() == pos:
            raise kmock.KubernetesError(status=400, reason="BadRequest", message=f"cannot parse labelSelector {text!r}")
        pos = match.end()
        negate, key, op, value, set_op, values = match.groups()
        if op:
            terms.append(("!=" if op == "!=" else "=", key, {value}))
        elif set_op:
            terms.append((set_op, key, {v.strip() for v in values.split(",")}))
        else:
            terms.append(("!" if negate else "exists", key, set()))

    def check(labels: Mapping[str, str]) -> bool:
        for op, key, values in terms:
            have = labels.get(key)
            if op in ("=", "in"):
                ok = have is not None and have in values
            elif op in ("!=", "notin"):
                ok = have is None or have not in values
            else:
                ok = (have is not None) == (op == "exists")
            if not ok:
                return False
        return True

    return check
