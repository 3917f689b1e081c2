"""Fixtures for the operator tests: a kmock Kubernetes emulator with our CRD, and the operator running against it."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import datetime
import json
import pathlib
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from typing import Any, Final

import aiohttp.web
import attrs
import jsonpatch  # type: ignore[import-untyped]
import jsonschema
import kmock as kmocklib
import kopf
import pytest
import yaml
from kopf._cogs.structs.references import Insights  # kopf.operator's ``insights``, which kopf does not re-export

from llm_telemetry_operator.__main__ import kopf_options
from llm_telemetry_operator.config import OperatorConfig

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
SHARED_CRDS = REPO_ROOT.parent / "shared" / "crds"
CRD_PATH = REPO_ROOT / "crds" / "llmtelemetry.dev_llmtelemetries.yaml"
NAMESPACE = "llm"
PEERING = "test-peering"
#: Seconds running_operator's stop waits for kopf's startup scan of the API groups to be done (see there).
SCAN_WAIT_SECONDS = 10.0
#: The namespace collection, which kmock 0.8 cannot parse (see ApiServerEmulator.__call__).
NAMESPACES_PATH = "/api/v1/namespaces"
#: What kmock parses instead: the namespaces resource "in" the namespace "-", which no real namespace can be named.
_STAND_IN_NAMESPACE = "-"
_NAMESPACES_STAND_IN = f"{NAMESPACES_PATH}/{_STAND_IN_NAMESPACE}/namespaces"

LLMT = "llmtelemetry.dev/v1alpha1/llmtelemetries"
NAMESPACES = "v1/namespaces"
CLUSTERKOPFPEERINGS = "kopf.dev/v1/clusterkopfpeerings"
DEPLOYMENTS = "apps/v1/deployments"
STATEFULSETS = "apps/v1/statefulsets"
SERVICES = "v1/services"
CONFIGMAPS = "v1/configmaps"
SERVICEMONITORS = "monitoring.coreos.com/v1/servicemonitors"
PROMETHEUSRULES = "monitoring.coreos.com/v1/prometheusrules"


def _fast_contains(original: Callable[[Any, Any], bool]) -> Callable[[Any, Any], bool]:
    """kmock's ``request in view``, without going through every request the emulator has seen.

    For each request it serves, kmock asks whether the request is in the view of each of its reactions (some fifteen:
    its own list, watch, get, create... and ours), and answers by iterating that view: every request recorded so far,
    each through the view's filters, until it meets this one, which is the last. So serving the N-th request cost N
    filter checks per reaction, and a test's operator passes slowed down as the test went on: a test running resyncs
    every 2 s took 5 s alone and, on a machine loaded six times over its cores, more than 400 s, its passes piling up.
    The answer is the same walked the other way: a filter holds the request when its criteria take it and its source
    holds it; a priority or a plain chain link when its source does; the root when it recorded it (the newest
    first). Any other view (slices, unions, exclusions, a reaction's own requests) is asked as kmock asks it."""
    dsl, rendering = kmocklib._internal.dsl, kmocklib._internal.rendering
    links = (dsl.Priority, dsl.Chained)

    def contains(view: Any, item: Any) -> bool:
        if not isinstance(item, rendering.Request):
            return original(view, item)
        while True:
            kind = type(view)
            if kind is dsl.Filter:
                if not view.criteria(item):
                    return False
                view = view._source
            elif kind in links:
                view = view._source
            elif isinstance(view, dsl.Root):
                return any(request is item for request in reversed(view._requests))
            else:
                return original(view, item)

    return contains


kmocklib._internal.dsl.View.__contains__ = _fast_contains(kmocklib._internal.dsl.View.__contains__)


class _RecordingBus(kmocklib.Bus):  # type: ignore[misc]
    """kmock's per-resource event bus, also keeping every event with the resourceVersion it happened at."""

    def __init__(self) -> None:
        super().__init__()
        self.history: list[tuple[int, Any]] = []
        self.version: Callable[[], int] = lambda: 0

    async def put(self, *items: Any) -> None:
        self.history.extend((self.version(), item) for item in items)
        await super().put(*items)


def _review_key(request: Any) -> tuple[str, str, str, str | None]:
    """(api_group, resource, verb, namespace) of a SelfSubjectAccessReview, ``resource`` with ``/subresource``."""
    review = request.data if isinstance(request.data, Mapping) else {}
    asked = (review.get("spec") or {}).get("resourceAttributes") or {}
    resource = str(asked.get("resource", "")) + (f"/{asked['subresource']}" if asked.get("subresource") else "")
    return (str(asked.get("group", "")), resource, str(asked.get("verb", "")), asked.get("namespace") or None)


class ApiServerEmulator(kmocklib.KubernetesEmulator):  # type: ignore[misc]
    """kmock's emulator plus the resourceVersion semantics of a real API server.

    kmock stores objects as sent: no ``uid``, a ``resourceVersion`` that never changes, lists stamped
    ``resourceVersion: "..."``, and every watch starts by replaying all objects as ADDED, whatever
    ``resourceVersion`` it asks to start from. A real API server gives every created object a ``uid`` and
    every write a new ``resourceVersion``; a watch from a list's ``resourceVersion`` gets exactly the events
    after that list; a write carrying a stale ``metadata.resourceVersion`` gets 409, a JSON patch whose
    ``test`` op fails gets 422. kopf depends on all of it: it keys its per-object memory by ``uid``, and after
    its own patch it waits for the patched ``resourceVersion`` to tell fresh events from stale ones (with a
    fixed version, a replayed stale event passes for fresh and the handlers run on outdated bodies).
    """

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        #: Foreign writes to slip in right before the operator's next PATCH of an object, by (plural, name):
        #: another client writing between the operator's read and its write, which must end in a 409.
        #: A list is several such writes, each a version (and a watch event) of its own. A write that changes the
        #: spec raises ``generation``, as the API server does; :data:`GONE` deletes the object.
        self.interfere: dict[tuple[str, str], dict[str, Any] | list[dict[str, Any]]] = {}
        #: (plural, namespace) pairs the operator is refused with a 403, as RBAC refuses what no Role grants.
        self.forbid: set[tuple[str, str]] = set()
        #: Updates by the operator refused, by (plural, name) (``plural/status`` for the status subresource), each
        #: with the error answered and nothing stored: an admission webhook in enforce mode (``DENIED``), say.
        self.deny: dict[tuple[str, str], tuple[int, str, str]] = {}
        #: Refusals that start once the operator has updated an object, by (plural, name) of that object: what then
        #: goes into ``deny``.
        self.deny_after: dict[tuple[str, str], dict[tuple[str, str], tuple[int, str, str]]] = {}
        #: What the emulator's SelfSubjectAccessReviews answer as not allowed, as RBAC without the grant would:
        #: (api_group, resource, verb, namespace), ``resource`` with ``/subresource``, namespace None for a review
        #: of every namespace. The requests themselves are refused only as ``forbid`` and ``deny`` say.
        self.unauthorized: set[tuple[str, str, str, str | None]] = set()
        #: While an Event that is not set, SelfSubjectAccessReviews get no answer until it is: an authorization
        #: webhook that hangs (the API server asks it for each review).
        self.reviews_held: asyncio.Event | None = None
        #: Seconds each SelfSubjectAccessReview waits for its answer: an API server far away, or a slow webhook.
        self.review_delay = 0.0
        #: SelfSubjectAccessReviews failed at once (not held nor delayed), by the key of :attr:`unauthorized`, each
        #: with the error answered: an authorization webhook that errs on some requests.
        self.reviews_failing: dict[tuple[str, str, str, str | None], tuple[int, str, str]] = {}
        #: Requests picked by this (given the raw request) get no answer until :attr:`released` is set: an API server
        #: slow to answer one kind of request, so that the operator is stopped while it is under way.
        self.holds: Callable[[Any], bool] | None = None
        self.held = 0
        self.released = asyncio.Event()
        self._rv = 1000
        # One lock around each write (version stamp, store, event) and each list/watch cut, so that a watch
        # from a list's resourceVersion misses nothing and replays nothing.
        self._writes = asyncio.Lock()
        self._buses.default_factory = self._new_bus

    def _new_bus(self) -> _RecordingBus:
        bus = _RecordingBus()
        bus.version = lambda: self._rv
        return bus

    async def __call__(self, raw_request: Any) -> Any:
        if self.holds is not None and self.holds(raw_request):
            self.held += 1
            await self.released.wait()
        # kmock 0.8 answers every request for the namespace collection with a 500: its parsing.parse_path() reads
        # the segment after ".../namespaces" as a namespace name (`namespace, *parts = parts[1:]`), and here there
        # is none, so the ValueError is raised in Request._parse(), before any reaction or fallback is consulted.
        # kopf lists and watches that collection in namespaced mode. So let kmock parse a stand-in path that means
        # the same resource in a namespace "-" (no real namespace has that name); _handle() restores the request.
        if raw_request.path.rstrip("/") == NAMESPACES_PATH:
            stand_in = raw_request.rel_url.with_path(_NAMESPACES_STAND_IN).with_query(raw_request.rel_url.query)
            raw_request = raw_request.clone(rel_url=stand_in)
        return await super().__call__(raw_request)

    def _restore_namespaces_request(self, request: Any) -> Any:
        """The namespace-collection request as kmock would have parsed it (see __call__), also in the request log."""
        url = request.url.with_path(NAMESPACES_PATH).with_query(request.url.query)
        restored = attrs.evolve(request, namespace=None, url=url)
        self._requests[:] = [restored if seen is request else seen for seen in self._requests]
        return restored

    async def _handle(self, request: Any) -> Any:
        if (
            request.namespace == _STAND_IN_NAMESPACE
            and request.resource is not None
            and request.resource.plural == "namespaces"
        ):
            request = self._restore_namespaces_request(request)
        if request.resource is not None and request.resource.plural == "selfsubjectaccessreviews":
            failure = self.reviews_failing.get(_review_key(request))
            if failure is not None:
                raise kmocklib.KubernetesError(status=failure[0], reason=failure[1], message=failure[2])
            if self.reviews_held is not None:
                await self.reviews_held.wait()
            if self.review_delay:
                await asyncio.sleep(self.review_delay)
            return self._review(request)
        if (
            request.resource is not None
            and (request.resource.plural, request.namespace) in self.forbid
            and not request.headers.get("X-Test-Hand")
        ):
            # Worded as the API server's authorizer words a refusal (the verb left general: it is not read).
            raise kmocklib.KubernetesError(
                status=403,
                reason="Forbidden",
                message=f'{request.resource.plural} is forbidden: User "system:serviceaccount:test:operator" cannot '
                f'access resource "{request.resource.plural}" in the namespace "{request.namespace}"',
            )
        if request.resource is not None and request.action in _WRITES and self.deny:
            plural = request.resource.plural + (f"/{request.subresource}" if request.subresource else "")
            name = request.name
            if request.action == kmocklib.action.CREATE and isinstance(request.data, Mapping):
                name = (request.data.get("metadata") or {}).get("name")  # (a quota, a webhook refusing the create)
            refusal = self.deny.get((plural, name))
            if refusal is not None and not request.headers.get("X-Test-Hand"):
                raise kmocklib.KubernetesError(status=refusal[0], reason=refusal[1], message=refusal[2])
        action, data = request.action, request.data
        if action == kmocklib.action.CREATE and request.namespace and not request.headers.get("X-Test-Hand"):
            # The API server's NamespaceLifecycle admission: nothing new in a namespace being deleted.
            namespace = get_raw(self, NAMESPACES, None, request.namespace)
            if namespace is not None and (namespace.get("metadata") or {}).get("deletionTimestamp"):
                raise kmocklib.KubernetesError(
                    status=403,
                    reason="Forbidden",
                    message=f"{request.resource.plural if request.resource else 'object'} is forbidden: unable to"
                    f" create new content in namespace {request.namespace} because it is being terminated",
                )
        if request.resource is None or action not in (
            kmocklib.action.CREATE,
            kmocklib.action.UPDATE,
            kmocklib.action.DELETE,
        ):
            return await super()._handle(request)
        if action == kmocklib.action.CREATE and not any(res == request.resource for res in self._get_resources()):
            # A real API server answers 404 to a create of a kind it does not serve (a CRD not installed), as it
            # does to a list; kmock would store the object all the same.
            raise kmocklib.KubernetesError(
                status=404, reason="NotFound", message="the server could not find the requested resource"
            )
        async with self._writes:
            if action == kmocklib.action.CREATE and isinstance(data, dict):
                self._rv += 1
                meta = data.setdefault("metadata", {})
                if request.namespace:
                    meta.setdefault("namespace", request.namespace)  # as the API server fills it in from the path
                meta.setdefault("uid", str(uuid.uuid4()))
                meta.setdefault("creationTimestamp", datetime.datetime.now(tz=datetime.timezone.utc).isoformat())
                meta["resourceVersion"] = str(self._rv)
                if request.resource.plural in _GENERATED:
                    meta["generation"] = 1
            elif action == kmocklib.action.UPDATE and request.name is not None:
                foreign = None
                if not request.headers.get("X-Test-Hand"):
                    foreign = self.interfere.pop((request.resource.plural, request.name), None)
                for write in [] if foreign is None else foreign if isinstance(foreign, list) else [foreign]:
                    self._rv += 1
                    key = (request.resource, request.namespace, request.name)
                    if write is GONE:
                        last = self._objects[key].raw
                        self._objects[key].delete()
                        await self._buses[request.resource].put({"type": "DELETED", "object": last})
                        continue
                    before = get_raw(self, request.resource, request.namespace, request.name) or {}
                    write = copy.deepcopy(write)
                    write.setdefault("metadata", {})["resourceVersion"] = str(self._rv)
                    if (moved := _next_generation(request, before, write)) is not None:
                        write["metadata"]["generation"] = moved  # (as the API server does for a spec change)
                    self._objects[key].patch(write)
                    await self._buses[request.resource].put({"type": "MODIFIED", "object": self._objects[key].raw})
                current = get_raw(self, request.resource, request.namespace, request.name)
                if current is not None:
                    self._precondition(current, data)
                    self._rv += 1
                    generation = _next_generation(request, current, data)
                    if isinstance(data, dict):
                        data.setdefault("metadata", {})["resourceVersion"] = str(self._rv)
                        if generation is not None:
                            data["metadata"]["generation"] = generation
                    elif isinstance(data, list):
                        data.append({"op": "add", "path": "/metadata/resourceVersion", "value": str(self._rv)})
                        if generation is not None:
                            data.append({"op": "add", "path": "/metadata/generation", "value": generation})
            else:
                self._rv += 1
            answer = await super()._handle(request)
        if action == kmocklib.action.UPDATE and not request.headers.get("X-Test-Hand") and not request.subresource:
            self.deny.update(self.deny_after.pop((request.resource.plural, request.name), {}))
        return answer

    def write_unseen(self, resource: str, namespace: str | None, name: str, obj: Mapping[str, Any]) -> None:
        """Store ``obj`` as the object's new version (a new resourceVersion, ``generation`` as given) with no watch
        event: a write made while every watch was away, which the watchers learn of only by listing again."""
        self._rv += 1
        obj = copy.deepcopy(dict(obj))
        obj.setdefault("metadata", {})["resourceVersion"] = str(self._rv)
        self.objects[resource, namespace, name] = obj

    async def expire_watches(self, plural: str, namespace: str | None = None) -> None:
        """End every watch of the kind ``plural`` with the API server's 410 Gone (its history compacted away): a
        watcher must list again to go on. With ``namespace``, only the watches of that namespace (and of all)."""
        gone: dict[str, Any] = {"kind": "Status", "status": "Failure", "code": 410, "reason": "Expired"}
        gone["message"] = "too old"
        if namespace is not None:
            gone["metadata"] = {"namespace": namespace}  # (what _selected() sends to a namespace's watches only)
        for resource, bus in list(self._buses.items()):
            if getattr(resource, "plural", None) == plural:
                async with self._writes:
                    await bus.put({"type": "ERROR", "object": gone})

    def _review(self, request: Any) -> Any:
        """A SelfSubjectAccessReview answered from :attr:`unauthorized` (everything else is allowed)."""
        review = dict(request.data) if isinstance(request.data, Mapping) else {}
        key = _review_key(request)
        allowed = key not in self.unauthorized and (*key[:3], None) not in self.unauthorized
        return aiohttp.web.json_response({**review, "status": {"allowed": allowed}}, status=201)

    async def _serve_list(self, request: Any) -> Any:
        async with self._writes:
            result = await super()._serve_list(request)
            result["metadata"]["resourceVersion"] = str(self._rv)
        return result

    async def _serve_watch(self, request: Any) -> AsyncIterator[Any]:
        since = request.params.get("resourceVersion", "")
        if not since.isdigit():
            async for item in super()._serve_watch(request):
                yield item
            return
        yield b""  # send the headers now, as kmock's own watch does
        bus = self._buses[request.resource]
        async with self._writes:
            marker = await bus.mark()
            backlog = [event for version, event in bus.history if version > int(since)]
        try:
            for event in backlog:
                if self._selected(request, event):
                    yield event
            async for event in bus.stream(since=marker):
                if self._selected(request, event):
                    yield event
        finally:
            await bus.unmark(marker)

    @staticmethod
    def _selected(request: Any, event: Mapping[str, Any]) -> bool:
        meta = event.get("object", {}).get("metadata", {})
        return request.namespace in (None, meta.get("namespace")) and request.name in (None, meta.get("name"))

    @staticmethod
    def _precondition(current: Mapping[str, Any], data: Any) -> None:
        have = (current.get("metadata") or {}).get("resourceVersion")
        if isinstance(data, dict):
            want = (data.get("metadata") or {}).get("resourceVersion")
            if want is not None and want != have:
                raise kmocklib.KubernetesError(
                    status=409, reason="Conflict", message=f"resourceVersion {want} is stale, the object is at {have}"
                )
        elif isinstance(data, list):
            if not all(_met(current, op) for op in data if op.get("op") == "test"):
                raise kmocklib.KubernetesError(status=422, reason="Invalid", message=UNMET)
            # Met as the API server judges them (kmock's JSON patch library fails a null test of an absent member).
            data[:] = [op for op in data if op.get("op") != "test"]
            try:
                jsonpatch.apply_patch(copy.deepcopy(dict(current)), data)
            except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as exc:
                raise kmocklib.KubernetesError(status=422, reason="Invalid", message=UNMET) from exc

    async def _render_error(self, exc: Exception) -> aiohttp.web.StreamResponse:
        if isinstance(exc, kmocklib.KubernetesError) and exc.message == UNMET:
            # The API server's answer to a JSON patch an operation of which does not apply: no details.
            body = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": UNMET}
            return aiohttp.web.json_response({**body, "reason": "Invalid", "details": {}, "code": 422}, status=422)
        return await super()._render_error(exc)


#: The message of a real API server's 422 for a JSON patch an operation of which does not apply (a ``test`` not met).
UNMET: Final = "the server rejected our request due to an error in our request"


def _met(obj: Any, op: Mapping[str, Any]) -> bool:
    """Whether a JSON patch ``test`` holds as the API server judges it: by value, and a null value is met by a member
    absent from an object that exists (not by one under an absent object)."""
    steps = [step.replace("~1", "/").replace("~0", "~") for step in str(op.get("path", "")).split("/")[1:]]
    for step in steps[:-1]:
        if isinstance(obj, Mapping) and step in obj:
            obj = obj[step]
        elif isinstance(obj, list) and step.isdigit() and int(step) < len(obj):
            obj = obj[int(step)]
        else:
            return False
    if isinstance(obj, Mapping):
        return obj[steps[-1]] == op.get("value") if steps[-1] in obj else op.get("value") is None
    if isinstance(obj, list) and steps[-1].isdigit() and int(steps[-1]) < len(obj):
        return bool(obj[int(steps[-1])] == op.get("value"))
    return False


#: Resources whose ``metadata.generation`` the emulator keeps as a real API server does: 1 on create, one more for
#: every write that changes the object other than its metadata and status.
_GENERATED = {"llmtelemetries", "deployments", "statefulsets"}


#: An ``ApiServerEmulator.interfere`` write that deletes the object (one with no finalizer: gone at once).
GONE: Final[dict[str, Any]] = {}

#: The requests ``ApiServerEmulator.deny`` refuses.
_WRITES: Final = frozenset({kmocklib.action.UPDATE, kmocklib.action.CREATE})
#: Refusals for ``ApiServerEmulator.deny``.
DENIED: Final = (403, "Forbidden", 'admission webhook "policy.example.com" denied the request: updates are frozen')


def _merged(target: Any, patch: Any) -> Any:
    """A JSON merge patch (RFC 7386) applied to ``target``, without changing it."""
    if not isinstance(patch, Mapping):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, Mapping) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = _merged(result.get(key), value)
    return result


def _next_generation(request: Any, current: Mapping[str, Any], data: Any) -> int | None:
    """The generation after this write when it changes the object's spec (see :data:`_GENERATED`), else None."""
    if request.resource.plural not in _GENERATED or request.subresource:
        return None
    generation = int((current.get("metadata") or {}).get("generation") or 1)
    if isinstance(data, Mapping):
        changed = "spec" in data and _merged(current.get("spec"), data["spec"]) != current.get("spec")
    else:
        patched = jsonpatch.apply_patch(copy.deepcopy(dict(current)), [op for op in data if op.get("op") != "test"])
        changed = patched.get("spec") != current.get("spec")
    return generation + 1 if changed else None


@pytest.fixture
def kmock_options(kmock_options: dict[str, Any]) -> dict[str, Any]:
    """Every operator test talks to :class:`ApiServerEmulator`."""
    return {**kmock_options, "cls": ApiServerEmulator}


def get_raw(kmock: Any, resource: Any, namespace: str | None, name: str) -> dict[str, Any] | None:
    try:
        obj = kmock.objects[resource, namespace, name]
        return dict(obj.raw)
    except (KeyError, ValueError):
        return None


def load_crd(path: pathlib.Path) -> dict[str, Any]:
    return dict(yaml.safe_load(path.read_text()))


def crd_schema(crd: Mapping[str, Any]) -> dict[str, Any]:
    return dict(crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"])


def crd_validator(crd: Mapping[str, Any]) -> jsonschema.Draft4Validator:
    # Kubernetes' structural schemas use draft-4 style booleans for exclusiveMinimum/Maximum.
    return jsonschema.Draft4Validator(crd_schema(crd))


#: The Prometheus Operator kinds the operator writes: plural -> kind.
MONITORING_KINDS = {"servicemonitors": "ServiceMonitor", "prometheusrules": "PrometheusRule"}


def registration_crd(plural: str, kind: str) -> dict[str, Any]:
    """A CustomResourceDefinition that registers ``kind`` and keeps any field: what the emulator needs to serve the
    kind. It says nothing about the kind's schema (tests/operator/test_schemas.py checks that against the real one)."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.monitoring.coreos.com"},
        "spec": {
            "group": "monitoring.coreos.com",
            "scope": "Namespaced",
            "names": {"plural": plural, "singular": kind.lower(), "kind": kind, "listKind": f"{kind}List"},
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}},
                }
            ],
        },
    }


def load_monitoring_crds() -> dict[str, dict[str, Any]]:
    """The Prometheus Operator CRDs by plural: the real ones from ../shared/crds where they lie beside the checkout,
    else registrations of the same kinds (the emulator validates no schema either way)."""
    crds = {plural: registration_crd(plural, kind) for plural, kind in MONITORING_KINDS.items()}
    for path in SHARED_CRDS.glob("monitoring.coreos.com_*.yaml"):
        crd = load_crd(path)
        crds[crd["spec"]["names"]["plural"]] = crd
    return crds


@pytest.fixture(scope="session")
def monitoring_crds() -> dict[str, dict[str, Any]]:
    return load_monitoring_crds()


def minimal_llmt(name: str = "chat", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "llmtelemetry.dev/v1alpha1",
        "kind": "LLMTelemetry",
        "metadata": {
            "name": name,
            "namespace": NAMESPACE,
            "uid": f"uid-{name}",
            "generation": 1,
            "resourceVersion": "1",
        },
        "spec": {"selector": {"matchLabels": {"app": "chat"}}, **spec},
    }


def deployment(
    name: str = "chat", labels: Mapping[str, str] | None = None, env: list[Any] | None = None, kind: str = "Deployment"
) -> dict[str, Any]:
    labels = dict(labels if labels is not None else {"app": "chat"})
    container: dict[str, Any] = {"name": "app", "image": "example/chat:1"}
    if env:
        container["env"] = env
    return {
        "apiVersion": "apps/v1",
        "kind": kind,
        "metadata": {
            "name": name,
            "namespace": NAMESPACE,
            "labels": labels,
            "uid": f"uid-deploy-{name}",
            "resourceVersion": "1",
            "generation": 1,
        },
        "spec": {
            "selector": {"matchLabels": {"pod": name}},
            "template": {"metadata": {"labels": {"pod": name, **labels}}, "spec": {"containers": [container]}},
        },
    }


def get(kmock: Any, resource: str, name: str, namespace: str | None = NAMESPACE) -> dict[str, Any] | None:
    """The object's current state, or None (``key in kmock.objects`` is unreliable: index and catch)."""
    obj = get_raw(kmock, resource, namespace, name)
    return None if obj is None else copy.deepcopy(obj)


def condition(obj: Mapping[str, Any] | None, type_: str) -> dict[str, Any]:
    for cond in ((obj or {}).get("status") or {}).get("conditions") or []:
        if cond["type"] == type_:
            return dict(cond)
    return {}


async def eventually(check: Callable[[], Any], what: str, attempts: int = 300) -> Any:
    """Yield to the emulator (same event loop) until ``check()`` is truthy; fail naming ``what``."""
    for _ in range(attempts):
        result = check()
        if result:
            return result
        await asyncio.sleep(0.05)
    raise AssertionError(f"never happened: {what}")


async def ready(kmock: Any, name: str = "chat", what: str | None = None, attempts: int = 300) -> dict[str, Any]:
    """The LLMTelemetry ``name`` once its Ready condition is True."""
    found: dict[str, Any] = await eventually(
        lambda: condition(get(kmock, LLMT, name), "Ready").get("status") == "True" and get(kmock, LLMT, name),
        what or f"{name} Ready",
        attempts,
    )
    return found


async def reported(kmock: Any, type_: str, reason: str, what: str, name: str = "chat") -> dict[str, Any]:
    """The condition ``type_`` of the LLMTelemetry ``name`` once it has ``reason``."""

    def found() -> dict[str, Any] | None:
        written = condition(get(kmock, LLMT, name), type_)
        return written if written.get("reason") == reason else None

    result: dict[str, Any] = await eventually(found, what)
    return result


def posted_events(kmock: Any, reason: str | None = None) -> list[dict[str, Any]]:
    """The Events posted to the emulator (those with ``reason``, if given), as it received them."""
    return [
        req.data or {}
        for req in list(kmock)
        if req.method.value == "POST"
        and str(req.url.path).endswith("/events")
        and (reason is None or (req.data or {}).get("reason") == reason)
    ]


def is_write(req: Any) -> bool:
    """Whether a request the emulator received writes something: a SelfSubjectAccessReview (the operator's check
    of its permissions) is sent as a POST but stores nothing."""
    return req.method.value in ("POST", "PATCH", "PUT", "DELETE") and not str(req.url.path).endswith(
        "/selfsubjectaccessreviews"
    )


def writes(kmock: Any) -> list[tuple[str, str]]:
    """(method, path) of every write request the emulator received so far."""
    return [(req.method.value, str(req.url.path)) for req in list(kmock) if is_write(req)]


@pytest.fixture
def emulator(kmock: Any, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """kmock with the namespaces, workloads, children and peering resources the operator needs."""
    r = kmock.resources
    r[NAMESPACES] = kmock.ResourceInfo(
        kind="Namespace", namespaced=False, verbs={"list", "watch", "get", "create", "delete"}
    )
    r["v1/events"] = kmock.ResourceInfo(kind="Event", namespaced=True, verbs={"create"})
    r["apiextensions.k8s.io/v1/customresourcedefinitions"] = kmock.ResourceInfo(
        kind="CustomResourceDefinition", namespaced=False, verbs={"list", "watch"}
    )
    r[CLUSTERKOPFPEERINGS] = kmock.ResourceInfo(
        kind="ClusterKopfPeering", namespaced=False, verbs={"list", "watch", "patch", "get"}
    )
    r[LLMT] = kmock.ResourceInfo(
        kind="LLMTelemetry",
        namespaced=True,
        subresources={"status"},
        shortnames={"llmt"},
        verbs={"list", "watch", "patch", "get", "create", "delete"},
    )
    all_verbs = {"list", "watch", "patch", "get", "create", "delete"}
    for res, kind in (
        (DEPLOYMENTS, "Deployment"),
        (STATEFULSETS, "StatefulSet"),
        (SERVICES, "Service"),
        (CONFIGMAPS, "ConfigMap"),
    ):
        r[res] = kmock.ResourceInfo(kind=kind, namespaced=True, verbs=all_verbs)
    kmock.objects[NAMESPACES, None, NAMESPACE] = namespace_object(NAMESPACE)
    kmock.objects[CLUSTERKOPFPEERINGS, None, PEERING] = {
        "apiVersion": "kopf.dev/v1",
        "kind": "ClusterKopfPeering",
        "metadata": {"name": PEERING},
    }
    crd = load_crd(CRD_PATH)
    kmock.objects["apiextensions.k8s.io/v1/customresourcedefinitions", None, crd["metadata"]["name"]] = crd
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "current-context": "kmock",
                "clusters": [{"name": "kmock", "cluster": {"server": str(kmock.url).rstrip("/")}}],
                "users": [{"name": "kmock", "user": {"token": "test-token"}}],
                "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "kmock"}}],
            }
        )
    )
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    yield kmock


def namespace_object(name: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}


def by_name(request: Any, name: str = "chat", namespace: str = NAMESPACE) -> bool:
    """Whether ``request`` is a list of the LLMTelemetry ``name`` by name (the operator's reads of one resource)."""
    return bool(
        request.method.value == "GET"
        and request.url.path == f"/apis/llmtelemetry.dev/v1alpha1/namespaces/{namespace}/llmtelemetries"
        and request.params.get("fieldSelector") == f"metadata.name={name}"
    )


def consistent_reads(emulator: Any, name: str = "chat") -> list[Any]:
    """The lists of the resource ``name`` by name not served from the watch cache (no ``resourceVersion=0``)."""
    return [request for request in list(emulator) if by_name(request, name) and "resourceVersion" not in request.params]


def cache_lagging(emulator: Any, name: str = "chat") -> None:
    """From now on, a list of the resource ``name`` by name from the watch cache (``resourceVersion=0``) answers as a
    cache lagging behind would (several API servers, each with its own): without it, as if made after the cache's
    version. A consistent list is answered as stored."""
    lagging = {"kind": "LLMTelemetryList", "metadata": {"resourceVersion": "1"}, "items": []}
    emulator[lambda request: by_name(request, name) and request.params.get("resourceVersion") == "0"] << 200 << lagging


def install_prometheus_operator_crds(kmock: Any, monitoring_crds: Mapping[str, Mapping[str, Any]]) -> None:
    verbs = {"list", "watch", "patch", "get", "create", "delete"}
    for plural in ("servicemonitors", "prometheusrules"):
        crd = monitoring_crds[plural]
        kmock.resources[f"monitoring.coreos.com/v1/{plural}"] = kmock.ResourceInfo(
            kind=crd["spec"]["names"]["kind"], namespaced=True, verbs=verbs
        )
        kmock.objects["apiextensions.k8s.io/v1/customresourcedefinitions", None, crd["metadata"]["name"]] = dict(crd)


def install_default_collectors(kmock: Any) -> None:
    """The Services behind the operator's default trace and log endpoints (Jaeger's and Loki's)."""
    for name in ("jaeger", "loki-gateway"):
        kmock.objects[SERVICES, "observability", name] = {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": name, "namespace": "observability"},
            "spec": {"ports": [{"port": 4318 if name == "jaeger" else 80}]},
        }


@contextlib.asynccontextmanager
async def running_operator(config: OperatorConfig | None = None, client: Any = None) -> AsyncIterator[kopf.Memo]:
    """kopf's real operator loop, in-process, on the test's event loop (where kmock serves); ``client``: the
    operator's API client, when a test wants one made differently (say with a shorter retry policy)."""
    from llm_telemetry_operator import handlers  # noqa: F401  (registers the handlers)

    config = config or OperatorConfig(peering=PEERING, metrics_port=0, health="")
    options = kopf_options(config)  # what ``llm-telemetry-operator`` passes to kopf.run
    if client is not None:
        options["memo"] = kopf.Memo(config=config, client=client)
    memo = options["memo"]
    stop, started = asyncio.Event(), asyncio.Event()
    insights = Insights()
    task = asyncio.create_task(kopf.operator(stop_flag=stop, ready_flag=started, insights=insights, **options))
    try:
        yield memo
    finally:
        # kopf's startup scan of the API groups reads them in tasks of its own (asyncio.as_completed), which its stop
        # does not cancel: a test that ends before the scan is done (an operator standing by, say) has them go on,
        # and one that asks after kopf has closed its session fails ("Connector is closed"), an error kopf.operator
        # then raises as it ends. So the stop waits for that scan, for as long as the operator runs (a failed
        # startup ends it: its error is raised below) and at most SCAN_WAIT_SECONDS (a scan still not done then is
        # stopped as before, and any error raised). Only once the startup is done (``started``): kopf starts the scan
        # then, with its other root tasks, and a startup that failed and waits for kopf's next attempt has none under
        # way, nor will it before the stop (the wait made each such test SCAN_WAIT_SECONDS longer).
        if started.is_set():
            scanned = asyncio.ensure_future(insights.ready_resources.wait())
            await asyncio.wait({task, scanned}, timeout=SCAN_WAIT_SECONDS, return_when=asyncio.FIRST_COMPLETED)
            scanned.cancel()
            await asyncio.gather(scanned, return_exceptions=True)
        stop.set()
        await asyncio.wait_for(task, timeout=30)
