"""kmock's Kubernetes emulator without the costs that grow with the traffic, for the operator benchmark.

kmock 0.8 keeps every request it ever received (``RawHandler._requests``) and picks the reaction for a new
request by evaluating ``request in reaction._source`` for each of its ~15 built-in reactions; ``View.__contains__``
walks the whole request history through each reaction's filters. Every request therefore costs time in
proportion to all the requests before it, and a run costs the square of its traffic: ~7 s to Ready at N=10,
~370 s at N=50, while the operator process sat mostly idle. On top of that, every read or write of one object
(``_serve_fetch``/``_serve_create``/``_serve_update``/``_serve_delete``) scans all stored objects to find it.

:class:`BenchEmulator` serves the same responses and keeps the same object store and watch streams, but:

- a request stays in the history only while it is being served (a watch for as long as it streams), so
  matching it against the reactions costs the handful of requests in flight, not all those before it;
- each request is recorded in :attr:`BenchEmulator.seen` as a small :class:`Seen` tuple (method, path,
  User-Agent, whether it is a watch), which is what the benchmark counts;
- single-object reads and writes find their object by key instead of scanning the store.
"""

from __future__ import annotations

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
        try:
            return await super()._handle(request)
        finally:
            # Forget the request once answered: kmock's filters would walk it on every later request, and the
            # reaction that served it keeps its own list (only for assertions, which the benchmark makes on
            # ``seen``). Concurrent requests finish in any order, so remove this one by identity.
            _forget(self._requests, request)
            for payload in self._payloads:
                _forget(payload._requests, request)

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
