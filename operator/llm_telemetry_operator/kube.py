"""The one small Kubernetes API client the handlers use.

Every call names its ``(api_group, resource, verb)`` and is refused unless :data:`rbac.PERMISSIONS`
declares it, so the chart's RBAC (rendered from the same list) always covers what the code does.
Patches are JSON merge patches (``application/merge-patch+json``): dicts merge, lists are replaced
whole, which is why callers always send complete lists (env, ports, volumes).
"""

from __future__ import annotations

import base64
import json
import ssl
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import quote, urlencode

import aiohttp

from llm_telemetry_operator import rbac
from llm_telemetry_operator.errors import ApiError, ConflictError, NotFoundError, PermissionNotDeclaredError


@dataclass(frozen=True)
class Resource:
    """A namespaced API resource: group, version and plural name."""

    group: str
    version: str
    plural: str

    def path(self, namespace: str, name: str | None = None, subresource: str | None = None) -> str:
        prefix = f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"
        path = f"{prefix}/namespaces/{quote(namespace, safe='')}/{self.plural}"
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

#: Workload kinds whose pod templates get injected, by ``kind``.
WORKLOADS: dict[str, Resource] = {"Deployment": DEPLOYMENTS, "StatefulSet": STATEFULSETS}


@dataclass(frozen=True)
class Connection:
    """Where and how to reach the API server (filled from kopf's ``ConnectionInfo`` at login).

    Args:
        server: base URL, e.g. ``https://kubernetes.default.svc``.
        token: bearer token, if any.
        ca_data: PEM of the CA to trust (``ca_path`` for a file instead).
        insecure: skip TLS verification.
    """

    server: str
    token: str | None = None
    scheme: str | None = None
    username: str | None = None
    password: str | None = None
    ca_path: str | None = None
    ca_data: str | None = None
    insecure: bool = False
    certificate_path: str | None = None
    certificate_data: str | None = None
    private_key_path: str | None = None
    private_key_data: str | None = None

    @classmethod
    def from_kopf(cls, info: Any) -> Connection:
        def text(value: Any) -> str | None:
            if value is None:
                return None
            return value.decode() if isinstance(value, bytes) else str(value)

        return cls(
            server=str(info.server),
            token=text(info.token),
            scheme=text(info.scheme),
            username=text(info.username),
            password=text(info.password),
            ca_path=text(info.ca_path),
            ca_data=text(info.ca_data),
            insecure=bool(info.insecure),
            certificate_path=text(info.certificate_path),
            certificate_data=text(info.certificate_data),
            private_key_path=text(info.private_key_path),
            private_key_data=text(info.private_key_data),
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


class KubeClient:
    """Async Kubernetes client limited to the permissions in :data:`rbac.PERMISSIONS`.

    Args:
        connection: server and credentials; may be set later with :meth:`connect`.

    Example::

        client = KubeClient(Connection(server="http://127.0.0.1:8001"))
        services = await client.list(SERVICES, "llm", labels={"app": "chat"})
        await client.close()
    """

    def __init__(self, connection: Connection | None = None) -> None:
        self._connection = connection
        self._session: aiohttp.ClientSession | None = None

    def connect(self, connection: Connection) -> None:
        """Use new credentials from the next request on (kopf re-logs in when tokens expire)."""
        if connection != self._connection:
            self._connection = connection
            if self._session is not None and not self._session.closed:
                # The old session is closed lazily; requests in flight keep their own reference.
                old, self._session = self._session, None
                self._closing = old

    async def close(self) -> None:
        for session in (self._session, getattr(self, "_closing", None)):
            if session is not None and not session.closed:
                await session.close()
        self._session = None

    async def get(self, resource: Resource, namespace: str, name: str) -> dict[str, Any]:
        return await self._request("GET", resource, "get", resource.path(namespace, name))

    async def list(
        self, resource: Resource, namespace: str, labels: Mapping[str, str] | LabelQuery | None = None
    ) -> list[dict[str, Any]]:
        """List objects, by equality labels or a full selector; the selector is sent and also applied here,
        as not every server honours it."""
        path = resource.path(namespace)
        query = _Equality(labels) if isinstance(labels, Mapping) else labels
        if query is not None and (text := query.to_query()):
            path += "?" + urlencode({"labelSelector": text})
        result = await self._request("GET", resource, "list", path)
        items: list[dict[str, Any]] = list(result.get("items") or [])
        if query is None:
            return items
        return [item for item in items if query.matches(item.get("metadata", {}).get("labels") or {})]

    async def create(self, resource: Resource, namespace: str, body: Mapping[str, Any]) -> dict[str, Any]:
        return await self._request("POST", resource, "create", resource.path(namespace), body)

    async def patch(
        self,
        resource: Resource,
        namespace: str,
        name: str,
        patch: Mapping[str, Any],
        *,
        subresource: str | None = None,
    ) -> dict[str, Any]:
        plural = f"{resource.plural}/{subresource}" if subresource else resource.plural
        return await self._request(
            "PATCH", resource, "patch", resource.path(namespace, name, subresource), patch, plural=plural
        )

    async def delete(self, resource: Resource, namespace: str, name: str) -> bool:
        """Delete an object; False if it was already gone (404 on delete is success)."""
        try:
            await self._request("DELETE", resource, "delete", resource.path(namespace, name))
        except NotFoundError:
            return False
        return True

    async def _request(
        self,
        method: str,
        resource: Resource,
        verb: str,
        path: str,
        body: Mapping[str, Any] | None = None,
        *,
        plural: str | None = None,
    ) -> dict[str, Any]:
        plural = plural or resource.plural
        if not rbac.is_declared(resource.group, plural, verb):
            raise PermissionNotDeclaredError(f"{verb} {plural}.{resource.group or 'core'} is not in rbac.PERMISSIONS")
        session = self._get_session()
        assert self._connection is not None
        headers = {"Accept": "application/json"}
        if method == "PATCH":
            headers["Content-Type"] = "application/merge-patch+json"
        async with session.request(
            method,
            self._connection.server.rstrip("/") + path,
            data=None if body is None else json.dumps(body),
            headers=headers if body is None or method == "PATCH" else {**headers, "Content-Type": "application/json"},
        ) as response:
            text = await response.text()
            try:
                data = json.loads(text) if text else {}
            except ValueError:
                data = {"message": text}
            if response.status >= 400:
                reason = str(data.get("reason", "")) if isinstance(data, dict) else ""
                message = str(data.get("message", "")) if isinstance(data, dict) else text
                error = {404: NotFoundError, 409: ConflictError}.get(response.status, ApiError)
                raise error(response.status, reason, message, body=data)
            return data if isinstance(data, dict) else {}

    def _get_session(self) -> aiohttp.ClientSession:
        if self._connection is None:
            raise RuntimeError("KubeClient used before kopf logged in")
        if self._session is None or self._session.closed:
            conn = self._connection
            headers: dict[str, str] = {}
            if conn.token:
                headers["Authorization"] = f"{conn.scheme or 'Bearer'} {conn.token}"
            elif conn.username and conn.password:
                pair = base64.b64encode(f"{conn.username}:{conn.password}".encode()).decode()
                headers["Authorization"] = f"Basic {pair}"
            self._session = aiohttp.ClientSession(
                headers=headers, connector=aiohttp.TCPConnector(ssl=_ssl_context(conn))
            )
        return self._session


def _ssl_context(conn: Connection) -> ssl.SSLContext | bool:
    if not conn.server.startswith("https"):
        return False
    if conn.insecure:
        return False
    context = ssl.create_default_context(cafile=conn.ca_path, cadata=conn.ca_data)
    cert, key = conn.certificate_path, conn.private_key_path
    if conn.certificate_data or conn.private_key_data:
        # ssl only loads client certificates from files.
        files: list[str | None] = []
        for data in (conn.certificate_data, conn.private_key_data):
            if data is None:
                files.append(None)
                continue
            handle = tempfile.NamedTemporaryFile("w", suffix=".pem", delete=False)
            with handle:
                handle.write(data)
            files.append(handle.name)
        cert = files[0] or cert
        key = files[1] or key
    if cert:
        context.load_cert_chain(cert, key)
    return context
