"""The Kubernetes API client the handlers use: the official ``kubernetes`` package, kept off kopf's event loop.

Credentials come from the ``kubernetes`` package's own loaders (:func:`load_configuration`), so every form a
kubeconfig can take works: inline ``*-data`` fields, certificate and key files, tokens, exec plugins, and the
in-cluster ServiceAccount token, which the package re-reads as it is rotated. Calls are blocking (urllib3);
each runs in a small thread pool of this client's own, so kopf's event loop never waits on the network.

Every call names its ``(api_group, resource, verb)`` and is refused unless :data:`rbac.PERMISSIONS` declares it,
so the chart's RBAC (rendered from the same list) always covers what the code does. Patches are JSON merge
patches (``application/merge-patch+json``): dicts merge, lists are replaced whole, which is why callers always
send complete lists (env, ports, volumes); a list of operations is sent as a JSON patch
(``application/json-patch+json``, the workloads' injection: see ``resources.guarded_patch``). Lists are read in
pages (``limit`` / ``continue``); every request has a connect and a read timeout.

An overloaded or restarting API server answers 429 (API Priority and Fairness) or 5xx: such a request is sent
again after a backoff that honours the server's ``Retry-After`` (see :class:`Retry`), so a burst of passes
slows down instead of failing. Lists are served from the API server's watch cache (``resourceVersion=0``):
they cost the server a scan of objects it already holds in memory instead of reading and decoding every object
of the kind from etcd (see :meth:`KubeClient.list`).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import email.utils
import json
import logging
import os
import queue
import random
import threading
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import quote, urlencode

import kopf
import urllib3
from kubernetes import client as k8s_client
from kubernetes import config as k8s_config
from kubernetes.config import incluster_config

from llm_telemetry_operator import constants as c
from llm_telemetry_operator import rbac
from llm_telemetry_operator.errors import (
    ApiError,
    ConflictError,
    NotFoundError,
    PermissionNotDeclaredError,
    WriteWithheld,
)

#: (connect, read) seconds for every request: a dead connection fails the pass instead of hanging it.
DEFAULT_TIMEOUT: tuple[float, float] = (10.0, 60.0)
#: Objects per page of a list; the API server cuts long lists into pages of this size (``continue`` tokens).
DEFAULT_PAGE_SIZE = 500
#: Threads making API calls at once; more passes than this wait for a free thread. A request mostly waits for the
#: API server (and etcd's disk), so with many passes under way a few threads left both the server and the operator
#: half idle: 250 new resources took 22-30 s with 8, about one of the two cores busy.
DEFAULT_WORKERS = 32
#: The field manager of every write, so ``managedFields`` (``kubectl get -o yaml --show-managed-fields``) name
#: this operator as the owner of what it wrote (the injected env, port and annotations; its children).
FIELD_MANAGER = c.OPERATOR_NAME
#: Statuses worth sending the same request again for: throttled (429) or the server failing for now (5xx).
RETRIABLE = frozenset({429, 500, 502, 503, 504})
#: Seconds a streaming read (a watch) may wait for its next bytes: longer than a watch the operator asks for lasts
#: (``childwatch.SERVER_TIMEOUT``), so that a connection that died without a word (a NAT entry or a load balancer's
#: flow dropped) is given up and the watch resumed within this, not after minutes of hearing nothing.
STREAM_READ_TIMEOUT = 90.0
#: Connections the pool keeps beyond one per worker thread, for the long-lived watches (six per watched namespace).
STREAM_CONNECTIONS = 32
#: The ``Accept`` header of a write whose answer is read for its metadata only (a child's ``resourceVersion``):
#: the API server then answers with the object's metadata (``PartialObjectMetadata``) instead of encoding the whole
#: object again (a dashboard ConfigMap is some 40 KB), and the client decodes that much less. A server that cannot
#: transform the answer picks the plain JSON listed after it.
METADATA_ONLY = "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1, application/json"
#: The content type of a JSON patch (RFC 6902), a list of operations.
JSON_PATCH = "application/json-patch+json"


class QuietConnectRetries(logging.Filter):
    """Drops urllib3's WARNING "Retrying (Retry(total=...)) after connection broken by ..." of each failed connect
    it tries again: with the API server away, the standby poll alone wrote three such lines every two seconds, and
    the failure itself said nothing of the server. The call that still fails after them raises an :class:`ApiError`
    naming the server and the error, which the caller reports once (see ``handlers._check_standby``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno == logging.WARNING and str(record.msg).startswith("Retrying ("))


def _quiet_connect_retries() -> None:
    """Install :class:`QuietConnectRetries` on urllib3's connection pool logger, once per process."""
    pool_logger = logging.getLogger("urllib3.connectionpool")
    if not any(isinstance(f, QuietConnectRetries) for f in pool_logger.filters):
        pool_logger.addFilter(QuietConnectRetries())


@dataclass(frozen=True)
class Retry:
    """How a request answered with a :data:`RETRIABLE` status is sent again.

    Args:
        attempts: requests in all, the first included (1: never again).
        base: seconds before the first retry; doubled on each one after, up to ``cap``, each wait drawn
            between half and all of it, so clients throttled together do not come back together.
        cap: the longest wait between two attempts; also the most of a ``Retry-After`` that is honoured.

    The server's ``Retry-After`` (seconds or an HTTP date), when it sends one, replaces the computed wait.
    """

    attempts: int = 6
    base: float = 0.5
    cap: float = 30.0

    def delay(self, attempt: int, retry_after: float | None) -> float:
        """Seconds to wait before attempt ``attempt + 1`` (``attempt`` counts from 1)."""
        if retry_after is not None:
            return min(max(retry_after, 0.0), self.cap)
        return float(random.uniform(0.5, 1.0) * min(self.cap, self.base * 2 ** (attempt - 1)))


DEFAULT_RETRY = Retry()


def retry_after_seconds(value: str | None) -> float | None:
    """A ``Retry-After`` header in seconds: delta-seconds or an HTTP date (RFC 9110, 10.2.3); None if absent."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _unreachable(method: str, path: str, server: str, exc: Exception) -> str:
    """What a request that got no answer says: the API server's URL and the cause (the last attempt's error, not
    urllib3's "Max retries exceeded" wrapper around it)."""
    cause = exc.reason if isinstance(exc, urllib3.exceptions.MaxRetryError) and exc.reason is not None else exc
    return f"{method} {path}: no answer from the API server {server.rstrip('/')}: {cause}"


def _check_declared(group: str, plural: str, verb: str, name: str | None = None, peering: str | None = None) -> None:
    """Refuse a request the chart's RBAC does not grant (so a missing permission fails every test, not a cluster):
    ``name`` is the object a request on one object names, ``peering`` the client's own ClusterKopfPeering (see
    :func:`rbac.is_declared`)."""
    if not rbac.is_declared(group, plural, verb, name, peering=peering):
        which = f" {name}" if name is not None else ""
        raise PermissionNotDeclaredError(f"{verb} {plural}.{group or 'core'}{which} is not in rbac.PERMISSIONS")


def _headers(api: k8s_client.ApiClient, accept: str) -> dict[str, str]:
    """A request's headers: the client's defaults, ``Accept``, and the bearer token, read per request (a refresh
    hook, an exec plugin or a rotated in-cluster token, renews it)."""
    headers = {**api.default_headers, "Accept": accept}
    for auth in api.configuration.auth_settings().values():
        if auth.get("in") == "header" and auth.get("value"):
            headers[str(auth["key"])] = str(auth["value"])
    return headers


def _sent(body: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None) -> Any:
    """A request body as the ``kubernetes`` package's REST client takes it (a dict, or a list of operations)."""
    if body is None:
        return None
    return dict(body) if isinstance(body, Mapping) else [dict(op) for op in body]


def _parse(data: bytes | str | None) -> tuple[str, Any]:
    """An answer's body as text and as parsed JSON (``{"message": text}`` when it is not JSON)."""
    if isinstance(data, str):
        data = data.encode()
    text = data.decode("utf-8", "replace") if data else ""
    try:
        return text, (json.loads(text) if text else {})
    except ValueError:
        return text, {"message": text}


def _api_error(status: int, text: str, parsed: Any, headers: Mapping[str, str] | None) -> ApiError:
    """The error for an answer of ``status`` >= 400: its reason, message and ``Retry-After``."""
    reason = str(parsed.get("reason", "")) if isinstance(parsed, dict) else ""
    message = str(parsed.get("message", "")) if isinstance(parsed, dict) else text
    error = {404: NotFoundError, 409: ConflictError}.get(status, ApiError)
    retry_after = retry_after_seconds((headers or {}).get("Retry-After"))
    return error(status, reason, message, body=parsed, retry_after=retry_after)


@dataclass(frozen=True)
class Resource:
    """An API resource: group, version and plural name."""

    group: str
    version: str
    plural: str

    def path(self, namespace: str | None, name: str | None = None, subresource: str | None = None) -> str:
        """The object's (or with ``name`` None, the collection's) URL path; ``namespace`` None: cluster-scoped."""
        prefix = f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"
        if namespace is not None:
            prefix += f"/namespaces/{quote(namespace, safe='')}"
        path = f"{prefix}/{self.plural}"
        if name is not None:
            path += f"/{quote(name, safe='')}"
            if subresource:
                path += f"/{subresource}"
        return path


LLMTELEMETRIES = Resource("llmtelemetry.dev", "v1alpha1", "llmtelemetries")
DEPLOYMENTS = Resource("apps", "v1", "deployments")
STATEFULSETS = Resource("apps", "v1", "statefulsets")
SERVICES = Resource("", "v1", "services")
CONFIGMAPS = Resource("", "v1", "configmaps")
SERVICEMONITORS = Resource("monitoring.coreos.com", "v1", "servicemonitors")
PROMETHEUSRULES = Resource("monitoring.coreos.com", "v1", "prometheusrules")
CLUSTERKOPFPEERINGS = Resource("kopf.dev", "v1", "clusterkopfpeerings")
NAMESPACES = Resource("", "v1", "namespaces")
CRDS = Resource("apiextensions.k8s.io", "v1", "customresourcedefinitions")
SELFSUBJECTACCESSREVIEWS = Resource("authorization.k8s.io", "v1", "selfsubjectaccessreviews")

#: Workload kinds whose pod templates get injected, by ``kind``.
WORKLOADS: dict[str, Resource] = {"Deployment": DEPLOYMENTS, "StatefulSet": STATEFULSETS}


def load_configuration(kubeconfig: str | None = None, context: str | None = None) -> k8s_client.Configuration:
    """Credentials as the ``kubernetes`` package loads them: in-cluster when running in a pod (and no
    ``kubeconfig`` is named), else the kubeconfig (``kubeconfig``, else ``$KUBECONFIG``, else ``~/.kube/config``).

    Blocking (it may run an exec plugin); raises ``kubernetes.config.ConfigException`` when neither works.
    """
    configuration = k8s_client.Configuration()
    if in_cluster(kubeconfig, context):
        # Also installs a hook that re-reads the projected token file as the kubelet rotates it.
        k8s_config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
        return configuration
    k8s_config.load_kube_config(  # type: ignore[no-untyped-call]
        config_file=_kubeconfig_path(kubeconfig), context=context, client_configuration=configuration
    )
    return configuration


def in_cluster(kubeconfig: str | None = None, context: str | None = None) -> bool:
    """Whether :func:`load_configuration` takes the in-cluster credentials (in a pod, no kubeconfig named)."""
    return kubeconfig is None and context is None and bool(os.environ.get("KUBERNETES_SERVICE_HOST"))


def _kubeconfig_path(kubeconfig: str | None) -> str:
    # $KUBECONFIG is read here, not through the package's default (which it fixes when first imported).
    return kubeconfig or os.environ.get("KUBECONFIG") or os.path.expanduser("~/.kube/config")


def credentials_source(kubeconfig: str | None = None, context: str | None = None) -> str:
    """Where :func:`load_configuration` takes the credentials from, as a message says it: the ServiceAccount token
    file in a pod, else the kubeconfig file (and context)."""
    if in_cluster(kubeconfig, context):
        return f"the ServiceAccount token file {incluster_config.SERVICE_TOKEN_FILENAME}"
    return f"kubeconfig {os.path.abspath(_kubeconfig_path(kubeconfig))}" + (f" (context {context})" if context else "")


def token_service_account(token: str | None) -> str | None:
    """``namespace/name`` of the ServiceAccount a ServiceAccount token (a JWT) names in its ``sub`` claim
    (``system:serviceaccount:<namespace>:<name>``), read without checking the signature (for a message only); None
    for any other token."""
    try:
        payload = str(token).split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        kind, namespace, name = str(claims["sub"]).rsplit(":", 2)
    except (IndexError, KeyError, TypeError, ValueError):
        return None
    return f"{namespace}/{name}" if kind == "system:serviceaccount" and namespace and name else None


def server_configuration(server: str, token: str | None = None) -> k8s_client.Configuration:
    """A configuration for a server URL and an optional bearer token (tests, benchmarks, ``kubectl proxy``)."""
    configuration = k8s_client.Configuration(host=server.rstrip("/"))
    if token:
        # "authorization" is the key every version of the package reads the bearer token from.
        configuration.api_key = {"authorization": token}
        configuration.api_key_prefix = {"authorization": "Bearer"}
    return configuration


def connection_info(configuration: k8s_client.Configuration) -> kopf.ConnectionInfo:
    """The same credentials for kopf's own watches and peering (kopf has a client of its own).

    The ``kubernetes`` package has already turned inline ``*-data`` fields into files (``ssl_ca_cert``,
    ``cert_file``, ``key_file``) that it removes at exit; the token is read through the configuration, so an
    exec plugin's or a rotated ServiceAccount token is current whenever kopf logs in again.
    """
    header = configuration.get_api_key_with_prefix("BearerToken") or configuration.get_api_key_with_prefix(
        "authorization"
    )
    scheme, _, token = (header or "").partition(" ")
    if not token:
        scheme, token = "", scheme
    return kopf.ConnectionInfo(
        server=str(configuration.host),
        ca_path=configuration.ssl_ca_cert,
        insecure=not configuration.verify_ssl,
        scheme=scheme or None,
        token=token or None,
        username=configuration.username or None,
        password=configuration.password or None,
        certificate_path=configuration.cert_file,
        private_key_path=configuration.key_file,
    )


class LabelQuery(Protocol):
    """A label selector a list can send (``to_query``) and check (``matches``): see ``spec.Selector``."""

    def to_query(self) -> str: ...

    def matches(self, labels: Mapping[str, str]) -> bool: ...


@dataclass(frozen=True)
class _Equality:
    labels: Mapping[str, str]

    def to_query(self) -> str:
        return ",".join(f"{k}={v}" for k, v in sorted(self.labels.items()))

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(labels.get(k) == v for k, v in self.labels.items())


def _field(obj: Mapping[str, Any], path: str) -> str | None:
    value: Any = obj
    for key in path.split("."):
        value = value.get(key) if isinstance(value, Mapping) else None
    return None if value is None else str(value)


class _Workers(Executor):
    """Up to ``workers`` threads that run the client's blocking calls, started as needed. Daemon threads, unlike
    ThreadPoolExecutor's, which the interpreter joins at exit: a call the API server leaves unanswered (a review
    behind a hung authorization webhook) would hold the operator's exit up until its read timeout, past the pod's
    grace period, after :meth:`KubeClient.close` had given it up."""

    def __init__(self, workers: int, name: str) -> None:
        self._most = workers
        self._name = name
        self._jobs: queue.SimpleQueue[tuple[Future[Any], Callable[..., Any], tuple[Any, ...], dict[str, Any]] | None]
        self._jobs = queue.SimpleQueue()
        self._idle = threading.Semaphore(0)
        self._lock = threading.Lock()
        self._started = 0
        self._shut = False

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        future: Future[Any] = Future()
        with self._lock:
            if self._shut:
                raise RuntimeError("cannot schedule new futures after shutdown")
            self._jobs.put((future, fn, args, kwargs))
            if not self._idle.acquire(blocking=False) and self._started < self._most:
                self._started += 1
                name = f"{self._name}_{self._started}"
                threading.Thread(target=self._work, name=name, daemon=True).start()
        return future

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            future, fn, args, kwargs = job
            del job
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args, **kwargs))
                except BaseException as exc:
                    future.set_exception(exc)
            del future, fn, args, kwargs
            self._idle.release()
        self._jobs.put(None)  # the next worker ends too

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """No new call; with ``cancel_futures``, the calls not yet begun are cancelled. Never waits for the calls
        under way (``wait`` is ignored): they end at their own read timeout, in threads the exit does not wait for."""
        with self._lock:
            self._shut = True
        if cancel_futures:
            with contextlib.suppress(queue.Empty):
                while (job := self._jobs.get_nowait()) is not None:
                    job[0].cancel()
        self._jobs.put(None)


class KubeClient:
    """Async Kubernetes client limited to the permissions in :data:`rbac.PERMISSIONS`.

    Args:
        configuration: a ``kubernetes.client.Configuration`` (see :func:`load_configuration`); without one, it
            is loaded on first use, or set later with :meth:`configure`.
        timeout: (connect, read) seconds for every request.
        page_size: objects per page of a list.
        workers: threads making API calls at once.
        loader: how to load the configuration when none is given (default: :func:`load_configuration`).
        retry: how requests answered 429 or 5xx are sent again (:class:`Retry`).
        stream_timeout: seconds a watch may wait for its next bytes (:data:`STREAM_READ_TIMEOUT`).
        peering: the name of this operator's ClusterKopfPeering, the one object of its kind it may write (the
            chart grants ``patch`` on that name only); None: it may write none.

    Example::

        client = KubeClient(server_configuration("http://127.0.0.1:8001"))
        services = await client.list(SERVICES, "llm", labels={"app": "chat"})
        await client.close()
    """

    def __init__(
        self,
        configuration: k8s_client.Configuration | None = None,
        *,
        timeout: tuple[float, float] = DEFAULT_TIMEOUT,
        page_size: int = DEFAULT_PAGE_SIZE,
        workers: int = DEFAULT_WORKERS,
        loader: Callable[[], k8s_client.Configuration] = load_configuration,
        retry: Retry = DEFAULT_RETRY,
        stream_timeout: float = STREAM_READ_TIMEOUT,
        peering: str | None = None,
    ) -> None:
        self._loader = loader
        self.peering = peering
        self.retry = retry
        self.stream_timeout = stream_timeout
        #: Requests answered 429 or 5xx and sent again, by status (for metrics and tests).
        self.retried: dict[int, int] = {}
        self.timeout = timeout
        self.page_size = page_size
        self._lock = threading.Lock()
        self._api: k8s_client.ApiClient | None = None
        self._configuration = configuration
        self._workers = workers
        self._executor = _Workers(workers, "kube-api")
        self._closed = False
        #: Asked before every write (create, patch, delete): False refuses it with :class:`WriteWithheld`. The
        #: operator says no while its replica stands by, so a pass that was under way when the replica stopped
        #: running (a freeze, another replica taking over) writes nothing of what it worked out before.
        self.writable: Callable[[], bool] | None = None
        #: Awaited before every write once ``writable`` said yes: it may read the API server, and refuse the write by
        #: raising :class:`WriteWithheld` (the operator confirms there that its claim on a resource still holds).
        self.confirm: Callable[[], Awaitable[None]] | None = None

    def configure(self, configuration: k8s_client.Configuration) -> None:
        """Use new credentials from the next request on (kopf logs in again when its credentials expire)."""
        with self._lock:
            old, self._api = self._api, None
            self._configuration = configuration
        if old is not None:
            old.close()  # type: ignore[no-untyped-call]

    async def close(self) -> None:
        """Release connections and threads; later calls fail at once with an :class:`ApiError` ("Closed"), so a
        pass still running while the operator exits ends quickly instead of hanging on a dead pool."""
        with self._lock:
            self._closed = True
            api, self._api = self._api, None
        if api is not None:
            api.close()  # type: ignore[no-untyped-call]
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def get(self, resource: Resource, namespace: str, name: str) -> dict[str, Any]:
        return await self._request("GET", resource, "get", resource.path(namespace, name), name=name)

    async def list(
        self,
        resource: Resource,
        namespace: str | None,
        labels: Mapping[str, str] | LabelQuery | None = None,
        *,
        fields: Mapping[str, str] | None = None,
        consistent: bool = False,
    ) -> list[dict[str, Any]]:
        """List objects, page by page, by equality labels or a full selector (sent, and also applied here, as
        not every server honours it) and equality ``fields`` (``metadata.name``); ``namespace`` None: cluster.

        The list is served from the API server's watch cache (``resourceVersion=0``, "any version"): a label
        selector is then matched against objects the server holds in memory, where a list without it reads and
        decodes every object of the kind in the namespace from etcd, the one that makes the server's cost grow
        with the square of the number of resources. The answer may lag the newest write by the cache's delay
        (milliseconds): every write made from it carries a precondition or is a create, so a stale read ends
        in a 409 and a fresh read, never in a lost update. Servers that serve such a list from the cache do it
        in one piece; pages follow only when one answers with a ``continue`` token.

        ``consistent``: the newest state instead (no ``resourceVersion``: a quorum read from etcd, or from a cache the
        server has first brought up to date), for the rare answer that must not come from a cache lagging behind.
        """
        query = _Equality(labels) if isinstance(labels, Mapping) else labels
        params: list[tuple[str, str]] = [("limit", str(self.page_size))]
        if not consistent:
            params.append(("resourceVersion", "0"))
        if query is not None and (text := query.to_query()):
            params.append(("labelSelector", text))
        if fields:
            params.append(("fieldSelector", ",".join(f"{k}={v}" for k, v in sorted(fields.items()))))
        items: list[dict[str, Any]] = []
        token = ""
        while True:
            # A continued list names its version in the token; the API server refuses both at once.
            page_query = [*(p for p in params if p[0] != "resourceVersion"), ("continue", token)] if token else params
            page = await self._request("GET", resource, "list", resource.path(namespace), query=page_query)
            items.extend(page.get("items") or [])
            token = str((page.get("metadata") or {}).get("continue") or "")
            if not token:
                break
        if fields:
            items = [item for item in items if all(_field(item, k) == v for k, v in fields.items())]
        if query is None:
            return items
        return [item for item in items if query.matches(item.get("metadata", {}).get("labels") or {})]

    async def create(
        self, resource: Resource, namespace: str, body: Mapping[str, Any], *, metadata_only: bool = False
    ) -> dict[str, Any]:
        """Create an object; the answer is the object as stored, or with ``metadata_only`` (see
        :data:`METADATA_ONLY`) possibly only its ``apiVersion``, ``kind`` and ``metadata``."""
        return await self._request(
            "POST", resource, "create", resource.path(namespace), body, accept=METADATA_ONLY if metadata_only else None
        )

    async def review(self, attributes: Mapping[str, str]) -> bool:
        """Whether the API server lets this client make the request ``attributes`` describes (a
        SelfSubjectAccessReview's ``resourceAttributes``: group, resource, subresource, verb, namespace, name).
        Stores nothing, so a replica that stands by may ask too."""
        body = {
            "apiVersion": "authorization.k8s.io/v1",
            "kind": "SelfSubjectAccessReview",
            "spec": {"resourceAttributes": dict(attributes)},
        }
        answer = await self._request(
            "POST", SELFSUBJECTACCESSREVIEWS, "create", SELFSUBJECTACCESSREVIEWS.path(None), body, writes=False
        )
        return bool((answer.get("status") or {}).get("allowed"))

    async def patch(
        self,
        resource: Resource,
        namespace: str | None,
        name: str,
        patch: Mapping[str, Any] | Sequence[Mapping[str, Any]],
        *,
        subresource: str | None = None,
        metadata_only: bool = False,
        dry_run: bool = False,
    ) -> dict[str, Any]:
        """Merge-patch an object, or with a list of operations, JSON-patch it; ``metadata_only`` as for
        :meth:`create`; ``dry_run``: checked by the API server (admission, validation) but not stored.

        A JSON patch an operation of which does not apply (a ``test`` not met: the object changed since it was
        read) is answered 422 ``Invalid`` with no details (the API server keeps the failed operation to itself),
        unlike a refused object, whose 422 names it and the fields: raised as a :class:`ConflictError`, as a stale
        ``resourceVersion``'s 409 is."""
        plural = f"{resource.plural}/{subresource}" if subresource else resource.plural
        try:
            return await self._request(
                "PATCH",
                resource,
                "patch",
                resource.path(namespace, name, subresource),
                patch,
                plural=plural,
                name=name,
                query=[("dryRun", "All")] if dry_run else None,
                accept=METADATA_ONLY if metadata_only else None,
            )
        except ApiError as exc:
            unmet = exc.status == 422 and isinstance(exc.body, dict) and not exc.body.get("details")
            if isinstance(patch, Mapping) or not unmet:
                raise
            message = f"{exc.message} (a test of the JSON patch failed: {name} changed since it was read)"
            raise ConflictError(exc.status, exc.reason, message, body=exc.body) from exc

    async def delete(
        self, resource: Resource, namespace: str, name: str, *, resource_version: str | None = None
    ) -> bool:
        """Delete an object; False if it was already gone (404 on delete is success). With ``resource_version``,
        only that version of it (a 409 :class:`ConflictError` if it changed since)."""
        body = None
        if resource_version:
            body = {"apiVersion": "v1", "kind": "DeleteOptions", "preconditions": {"resourceVersion": resource_version}}
        try:
            await self._request("DELETE", resource, "delete", resource.path(namespace, name), body, name=name)
        except NotFoundError:
            return False
        return True

    async def _request(
        self,
        method: str,
        resource: Resource,
        verb: str,
        path: str,
        body: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None,
        *,
        plural: str | None = None,
        name: str | None = None,
        query: Sequence[tuple[str, str]] | None = None,
        accept: str | None = None,
        writes: bool = True,
    ) -> dict[str, Any]:
        plural = plural or resource.plural
        _check_declared(resource.group, plural, verb, name, self.peering)
        if method in ("POST", "PATCH") and writes:
            query = [*(query or ()), ("fieldManager", FIELD_MANAGER)]
        loop = asyncio.get_running_loop()
        attempt = 1
        while True:
            if self._closed:
                raise ApiError(0, "Closed", f"{method} {path}: the client is closed (the operator is stopping)")
            if method != "GET" and writes and self.writable is not None and not self.writable():
                raise WriteWithheld(f"{method} {path}: this replica stands by")
            if method != "GET" and writes and self.confirm is not None:
                await self.confirm()
            try:
                return await loop.run_in_executor(self._executor, self._call, method, path, body, query, accept)
            except ApiError as exc:
                if exc.status not in RETRIABLE or attempt >= self.retry.attempts:
                    raise
                # A create answered 5xx may have been stored all the same: sent again, it gets a 409, which the
                # callers treat as "exists" and compare with what they wanted.
                self.retried[exc.status] = self.retried.get(exc.status, 0) + 1
                await asyncio.sleep(self.retry.delay(attempt, exc.retry_after))
                attempt += 1

    def open_stream(self, resource: Resource, verb: str, path: str, accept: str) -> Any:
        """Open a streaming GET (a watch) of ``path`` (with its query) and return its urllib3 response unread.
        Blocking: call it from a thread of the caller's own, not the event loop. The read timeout
        (``stream_timeout``) is longer than a watch the operator asks for; an error status raises an
        :class:`ApiError` (not retried)."""
        _check_declared(resource.group, resource.plural, verb)
        if self._closed:
            raise ApiError(0, "Closed", f"GET {path}: the client is closed (the operator is stopping)")
        api = self._client()
        headers = _headers(api, accept)
        url = str(api.configuration.host).rstrip("/") + path
        try:
            response = api.rest_client.request(  # type: ignore[no-untyped-call]
                "GET", url, headers=headers, _request_timeout=(self.timeout[0], self.stream_timeout)
            )
        except k8s_client.ApiException as exc:
            raise ApiError(int(exc.status or 0), str(exc.reason), str(exc.body or exc.reason)) from exc
        except urllib3.exceptions.HTTPError as exc:
            raise ApiError(0, "Unreachable", _unreachable("GET", path, str(api.configuration.host), exc)) from exc
        raw = response.response
        if int(response.status) >= 400:
            data = raw.data
            raw.release_conn()
            raise _api_error(int(response.status), *_parse(data), raw.headers)
        return raw

    def _client(self) -> k8s_client.ApiClient:
        with self._lock:
            if self._api is None:
                if self._configuration is None:
                    self._configuration = self._loader()
                # urllib3 on its own retries GET and DELETE (not POST or PATCH) answered 429/503 with a
                # Retry-After, up to its default three times: leave statuses to :class:`Retry`, which covers
                # every verb and every retriable status with one policy; urllib3 keeps retrying failed connects.
                self._configuration.retries = urllib3.Retry(total=3, respect_retry_after_header=False)
                _quiet_connect_retries()  # those retries are not a line each (the failure after them is one)
                # A kept connection per thread, and room for the watches' (:meth:`open_stream`): a smaller pool (the
                # package's default is five per CPU) closes the connections above it after each request, and every
                # new one costs a TLS handshake.
                self._configuration.connection_pool_maxsize = max(
                    self._workers + STREAM_CONNECTIONS, self._configuration.connection_pool_maxsize or 0
                )
                self._api = k8s_client.ApiClient(self._configuration)
            return self._api

    def _call(
        self,
        method: str,
        path: str,
        body: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None,
        query: Sequence[tuple[str, str]] | None,
        accept: str | None = None,
    ) -> dict[str, Any]:
        """One blocking request (in a worker thread): the parsed JSON body, or an :class:`ApiError`."""
        api = self._client()
        configuration = api.configuration
        headers = _headers(api, accept or "application/json")
        if body is not None:
            headers["Content-Type"] = "application/json"
            if method == "PATCH":
                headers["Content-Type"] = "application/merge-patch+json" if isinstance(body, Mapping) else JSON_PATCH
        url = str(configuration.host).rstrip("/") + path + ("?" + urlencode(query) if query else "")
        try:
            response = api.rest_client.request(  # type: ignore[no-untyped-call]
                method, url, headers=headers, body=_sent(body), _request_timeout=self.timeout
            )
            status = int(response.status)
            data = response.read() if response.data is None else response.data
            response_headers = response.headers
        except k8s_client.ApiException as exc:
            if not exc.status:  # a TLS failure, raised with status 0
                raise ApiError(0, "TLSError", str(exc.reason)) from exc
            status, data = int(exc.status), exc.body  # older package versions raise for every error status
            response_headers = exc.headers
        except urllib3.exceptions.HTTPError as exc:  # refused, reset, timed out, after urllib3's own retries
            raise ApiError(0, "Unreachable", _unreachable(method, path, str(configuration.host), exc)) from exc
        text, parsed = _parse(data)
        if status >= 400:
            raise _api_error(status, text, parsed, response_headers)
        return parsed if isinstance(parsed, dict) else {}
