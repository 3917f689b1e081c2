"""Whether the trace and log collectors a resource would export to have a Service behind them.

An exporter pointed at a Service that does not exist fails in every pod, on every batch, in the pods' own logs,
where nobody connects it to the operator. So before injecting an exporter whose endpoint names an in-cluster
Service, the operator looks the Service up: when it is missing, that exporter is not injected (its
``OTEL_*_EXPORTER`` is ``none``), the resource's ``CollectorsAvailable`` condition names the Service and the
remedy, and an event says the same. The operator then watches that Service (see ``handlers.py``): once it exists,
or serves the endpoint's port, the resources waiting for it get a pass, which injects the exporter (and the changed
config hash rolls the pods). A Service that lists ports but not the endpoint's (given, or the scheme's 80
or 443) counts as missing too: the exporter could not connect either.

Endpoints checked: the built-in defaults (Jaeger and Loki in ``observability``), and any endpoint whose host is
written as a Service name, ``<service>.<namespace>.svc[.<cluster domain>]``. Other hosts (external names,
IPs, ``<service>.<namespace>`` set by the user) are trusted as given.
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass
from typing import Final, Literal
from urllib.parse import urlsplit

from llm_telemetry_operator import kube
from llm_telemetry_operator.config import DEFAULT_LOGS_ENDPOINT, DEFAULT_TRACES_ENDPOINT, grpc_default
from llm_telemetry_operator.errors import ApiError, NotFoundError

_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_SERVICE_HOST = re.compile(rf"^(?P<name>{_LABEL})\.(?P<namespace>{_LABEL})(?P<svc>\.svc(\.[a-z0-9.-]+)?)?$")
#: What a Service read tells: the ports it lists, None when any port reaches it, False when it does not exist.
Ports = frozenset[int] | None | Literal[False]
#: Seconds a lookup is reused: passes for many resources share one read, and a Service installed later is
#: noticed by the first pass after this.
CACHE_SECONDS = 30.0
#: Seconds a namespaced operator's reads of a watched namespace's Service may be refused (403) before the Service
#: counts as not checked: a refusal that long is no RBAC cache filling after a restart, but the namespace deleted
#: (its Role with it) or the Role taken away, and failing every pass on it stopped the operator serving resources
#: in the namespaces it still watches.
REFUSED_SECONDS = 60.0
#: Refusals further apart than this are not one run: a transient refusal long after an old one starts anew.
REFUSALS_APART_SECONDS = 900.0


#: The operator's own default endpoints: in the cluster, though named without ``.svc``.
_DEFAULTS: Final = (DEFAULT_TRACES_ENDPOINT, grpc_default(DEFAULT_TRACES_ENDPOINT), DEFAULT_LOGS_ENDPOINT)


def service_of(endpoint: str) -> tuple[str, str] | None:
    """The (namespace, name) of the Service an endpoint names, or None when it does not name one."""
    host = (urlsplit(endpoint).hostname or "").lower()
    match = _SERVICE_HOST.fullmatch(host)
    if match is None:
        return None
    if match.group("svc") or endpoint.rstrip("/") in _DEFAULTS:
        return match.group("namespace"), match.group("name")
    return None


def port_of(endpoint: str) -> int | None:
    """The TCP port an exporter connects to for ``endpoint``: the one given, else its scheme's; None if unknown."""
    parts = urlsplit(endpoint)
    try:
        port = parts.port
    except ValueError:
        return None
    return port if port is not None else {"http": 80, "https": 443}.get(parts.scheme.lower())


@dataclass(frozen=True)
class Lookup:
    """What is known about one endpoint's Service: ``found`` True/False, or None (not checked, see ``note``);
    ``ports``: the ports the Service lists, when it was found without the endpoint's."""

    endpoint: str
    service: tuple[str, str] | None
    found: bool | None
    note: str = ""
    ports: tuple[int, ...] = ()


class CollectorCheck:
    """Looks up collector Services, remembering each answer for :data:`CACHE_SECONDS`; lookups of one Service made
    while a read of it is under way wait for that read (passes started together read it once, not once each).

    Args:
        namespaces: the namespaces the operator may read Services in (its watched namespaces); empty: all.
        refused_seconds: how long reads of a Service in one of ``namespaces`` may be refused before it counts as
            not checked (see :data:`REFUSED_SECONDS`).

    Example::

        check = CollectorCheck()
        lookup = await check.lookup(client, "http://jaeger.observability:4318")
    """

    def __init__(
        self, namespaces: tuple[str, ...] = (), ttl: float = CACHE_SECONDS, refused_seconds: float = REFUSED_SECONDS
    ) -> None:
        self.namespaces = namespaces
        self.ttl = ttl
        self.refused_seconds = refused_seconds
        #: Per Service of a watched namespace: since when every read of it has been refused, and the last refusal.
        self._refused: dict[tuple[str, str], tuple[float, float]] = {}
        #: Per Service: when it was read, and its ports (None: any port reaches it; False: no such Service). An entry
        #: past its ``ttl`` is dropped at the next read of any Service, so that the Services of resources long gone
        #: (one collector per preview namespace, say) leave nothing behind.
        self._cache: dict[tuple[str, str], tuple[float, Ports]] = {}
        self._reading: dict[tuple[str, str], asyncio.Future[Ports]] = {}
        #: The reads under way when their Service was seen to change (:meth:`forget`): their answers are not kept.
        #: Only while they run: a record per Service ever changed grew for the operator's life.
        self._stale: set[asyncio.Future[Ports]] = set()

    def forget(self, service: tuple[str, str]) -> None:
        """The Service ``(namespace, name)`` was created or changed: the next lookup reads it again, and a read
        already under way, which may have missed the change, is neither kept nor shared."""
        self._cache.pop(service, None)
        reading = self._reading.pop(service, None)
        if reading is not None and not reading.done():
            self._stale.add(reading)
            reading.add_done_callback(self._stale.discard)

    async def stop(self) -> None:
        """Cancel the reads under way, and wait for their end: the operator is stopping, its passes stopped. A read is
        shielded from the stop of any one pass waiting for it, so none of them ends it: left running, it outlived the
        cleanup, and on an API server that did not answer, held the exit up for kopf's 5 s wait for hung tasks. The
        reads a change made stale (:meth:`forget`) are no longer shared but still run for the passes that wait for them:
        they are cancelled too."""
        reading = [*self._reading.values(), *self._stale]
        self._reading.clear()
        for read in reading:
            read.cancel()
        await asyncio.gather(*reading, return_exceptions=True)

    async def lookup(self, client: kube.KubeClient, endpoint: str) -> Lookup:
        service = service_of(endpoint)
        if service is None:
            note = "not checked (an in-cluster Service is checked when named <name>.<namespace>.svc)"
            return Lookup(endpoint, None, None, note)
        namespace = service[0]
        if self.namespaces and namespace not in self.namespaces:
            # In namespaced mode the operator has no right to read Services elsewhere: say so, do not 403.
            return Lookup(endpoint, service, None, f"namespace {namespace} is not watched; not checked")
        cached = self._cache.get(service)
        if cached is not None and time.monotonic() - cached[0] < self.ttl:
            ports = cached[1]
        else:
            reading = self._reading.get(service)
            if reading is None:
                reading = self._reading[service] = asyncio.ensure_future(self._read(client, service))
                reading.add_done_callback(
                    lambda done: self._reading.pop(service) if self._reading.get(service) is done else None
                )
            # Shielded: a waiter cancelled (its pass stopped) leaves the read to the others. A read the API server
            # refuses (403 while its RBAC cache fills after a restart, a role edited) or fails raises: the pass fails
            # and is retried, changing nothing, where injecting as if the Service were there rolled the workloads
            # to exporters aimed at a collector known to be missing, and back at the next pass.
            try:
                ports = await asyncio.shield(reading)
            except ApiError as exc:
                if exc.status != 403 or not self.namespaces:
                    raise
                # A namespaced operator refused for long in a namespace it watches: the namespace was deleted, or
                # the Role the chart made there was taken away. The Service is left unchecked, as in a namespace it
                # does not watch, rather than failing every pass of every resource exporting there.
                now = time.monotonic()
                since, last = self._refused.get(service, (now, now))
                if now - last > REFUSALS_APART_SECONDS:
                    since = now
                self._refused[service] = (since, now)
                if now - since < self.refused_seconds:
                    raise
                note = (
                    f"reading Services in namespace {namespace} has been refused for over {self.refused_seconds:.0f} s"
                    " (was the namespace deleted, or the operator's Role there?); not checked"
                )
                return Lookup(endpoint, service, None, note)
        if ports is False:
            return Lookup(endpoint, service, False)
        port = port_of(endpoint)
        if ports is not None and port is not None and port not in ports:
            return Lookup(endpoint, service, False, f"has no port {port}", tuple(sorted(ports)))
        return Lookup(endpoint, service, True)

    async def _read(self, client: kube.KubeClient, service: tuple[str, str]) -> Ports:
        namespace, name = service
        ports: Ports
        try:
            body = await client.get(kube.SERVICES, namespace, name)
        except NotFoundError:
            ports = False
        else:
            spec = body.get("spec") or {}
            listed = frozenset(p["port"] for p in spec.get("ports") or () if isinstance(p.get("port"), int))
            # An ExternalName Service is a DNS alias, and a headless one without ports resolves to its pods: any
            # port reaches what is behind them.
            ports = listed if listed and spec.get("type") != "ExternalName" else None
        self._refused.pop(service, None)
        now = time.monotonic()
        for other in [s for s, (read, _) in self._cache.items() if now - read >= self.ttl]:
            del self._cache[other]
        for other in [s for s, (_, last) in self._refused.items() if now - last > REFUSALS_APART_SECONDS]:
            del self._refused[other]  # (a refusal after this long starts a run of its own anyway)
        if asyncio.current_task() not in self._stale:
            self._cache[service] = (now, ports)
        return ports
