"""The operator's API client against a real TLS server: inline kubeconfig credentials, pages, timeouts, RBAC guard."""

from __future__ import annotations

import base64
import datetime
import http.server
import json
import pathlib
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import types
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml

from llm_telemetry_operator import kube
from llm_telemetry_operator.errors import ApiError, NotFoundError, PermissionNotDeclaredError, WriteWithheld

TOKEN = "token-for-the-test"
SERVICES = [{"metadata": {"name": f"svc-{i}", "namespace": "llm", "labels": {"app": "chat"}}} for i in range(5)]


def openssl(*args: str, cwd: pathlib.Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def issue(pki: pathlib.Path, name: str, subject: str, ca: str, ext: str) -> None:
    """A key and a certificate for ``subject``, signed by the CA named ``ca``."""
    (pki / f"{name}.ext").write_text(ext)
    openssl("req", "-new", "-nodes", "-newkey", "rsa:2048", "-keyout", f"{name}.key", "-out", f"{name}.csr",
            "-subj", subject, cwd=pki)  # fmt: skip
    openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key", "-CAcreateserial",
            "-out", f"{name}.crt", "-days", "2", "-extfile", f"{name}.ext", cwd=pki)  # fmt: skip


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """A throwaway CA, a server certificate for 127.0.0.1, a client certificate, and a stranger's CA and cert."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not on PATH: cannot make the test's certificates")
    pki = tmp_path_factory.mktemp("pki")
    for ca in ("ca", "stranger-ca"):
        new_key = ("-new", "-nodes", "-newkey", "rsa:2048", "-keyout", f"{ca}.key", "-out", f"{ca}.crt")
        # With the key usages a cluster's CA has (kubeadm's): Python 3.13's default verification requires them.
        openssl("req", "-x509", *new_key, "-days", "2", "-subj", f"/CN={ca}",
                "-addext", "basicConstraints=critical,CA:TRUE",
                "-addext", "keyUsage=critical,digitalSignature,keyEncipherment,keyCertSign", cwd=pki)  # fmt: skip
    leaf = "keyUsage = critical, digitalSignature, keyEncipherment\nauthorityKeyIdentifier = keyid\n"
    issue(pki, "server", "/CN=127.0.0.1", "ca", leaf + "subjectAltName = IP:127.0.0.1\nextendedKeyUsage = serverAuth\n")
    issue(pki, "client", "/CN=llm-telemetry-operator", "ca", leaf + "extendedKeyUsage = clientAuth\n")
    issue(pki, "stranger", "/CN=stranger", "stranger-ca", leaf + "extendedKeyUsage = clientAuth\n")
    return pki


class ApiHandler(http.server.BaseHTTPRequestHandler):
    """A sliver of the API server: Services of namespace ``llm``, listed two to a page."""

    server: ApiServer

    def do_GET(self) -> None:
        if self.server.revoked:
            return self.unauthorized()
        url = urlsplit(self.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        peer = self.connection.getpeercert() if isinstance(self.connection, ssl.SSLSocket) else None
        rdns: Any = (peer or {}).get("subject", ())
        subject = {str(key): str(value) for ((key, value),) in rdns}
        auth = self.headers.get("Authorization")
        self.server.seen.append({"path": url.path, "query": query, "auth": auth, "cn": subject.get("commonName")})
        if url.path == "/api/v1/namespaces/llm/services":
            limit = int(query.get("limit", len(SERVICES)))
            start = int(query.get("continue") or 0)
            more = start + limit < len(SERVICES)
            body: dict[str, Any] = {
                "kind": "ServiceList",
                "metadata": {"continue": str(start + limit)} if more else {},
                "items": SERVICES[start : start + limit],
            }
            self.answer(200, body)
        else:
            self.answer(404, {"kind": "Status", "reason": "NotFound", "message": f"{url.path} not found"})

    def unauthorized(self) -> None:
        """What the API server answers a revoked token (a deleted ServiceAccount's, say), whatever the request."""
        self.server.seen.append({"path": urlsplit(self.path).path, "auth": self.headers.get("Authorization")})
        self.answer(401, {"kind": "Status", "status": "Failure", "reason": "Unauthorized", "code": 401})

    do_POST = do_PATCH = do_PUT = do_DELETE = unauthorized

    def answer(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class ApiServer(http.server.ThreadingHTTPServer):
    seen: list[dict[str, Any]]
    #: Every request answered 401 (the token revoked); writes always are, this sliver serves none.
    revoked: bool = False


@pytest.fixture
def api_server(pki: pathlib.Path) -> Iterator[ApiServer]:
    """HTTPS on 127.0.0.1 that refuses any client without a certificate from the test's CA."""
    yield from _serve(pki, ssl.CERT_REQUIRED)


@pytest.fixture
def token_api_server(pki: pathlib.Path) -> Iterator[ApiServer]:
    """HTTPS on 127.0.0.1 for clients with a bearer token only (as a pod's ServiceAccount is)."""
    yield from _serve(pki, ssl.CERT_NONE)


def _serve(pki: pathlib.Path, verify_mode: ssl.VerifyMode) -> Iterator[ApiServer]:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki / "server.crt", pki / "server.key")
    context.load_verify_locations(pki / "ca.crt")
    context.verify_mode = verify_mode
    server = ApiServer(("127.0.0.1", 0), ApiHandler)
    server.seen = []
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join()


def b64(path: pathlib.Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def inline_kubeconfig(tmp_path: pathlib.Path, server: str, pki: pathlib.Path, client: str = "client") -> pathlib.Path:
    """A kubeconfig as kind, minikube and cloud CLIs write it: every credential inline, base64-encoded."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "current-context": "test",
        "clusters": [
            {"name": "test", "cluster": {"server": server, "certificate-authority-data": b64(pki / "ca.crt")}}
        ],
        "users": [
            {
                "name": "test",
                "user": {
                    "client-certificate-data": b64(pki / f"{client}.crt"),
                    "client-key-data": b64(pki / f"{client}.key"),
                    "token": TOKEN,
                },
            }
        ],
        "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test"}}],
    }
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump(config))
    return path


def url_of(server: ApiServer) -> str:
    return f"https://127.0.0.1:{server.server_address[1]}"


async def test_inline_credentials_reach_a_tls_server_that_requires_client_certificates(
    api_server: ApiServer, pki: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    path = inline_kubeconfig(tmp_path, url_of(api_server), pki)
    client = kube.KubeClient(kube.load_configuration(str(path)), page_size=2)
    try:
        services = await client.list(kube.SERVICES, "llm", labels={"app": "chat"})
        with pytest.raises(NotFoundError):
            await client.get(kube.CONFIGMAPS, "llm", "absent")
    finally:
        await client.close()
    # All five Services, read in three pages of at most two, each request verified both ways and authorised.
    assert [s["metadata"]["name"] for s in services] == [s["metadata"]["name"] for s in SERVICES]
    lists = [seen for seen in api_server.seen if seen["path"].endswith("/services")]
    assert [(seen["query"]["limit"], seen["query"].get("continue")) for seen in lists] == [
        ("2", None),
        ("2", "2"),
        ("2", "4"),
    ]
    assert all(seen["query"]["labelSelector"] == "app=chat" for seen in lists)
    assert {seen["cn"] for seen in api_server.seen} == {"llm-telemetry-operator"}
    assert {seen["auth"] for seen in api_server.seen} == {f"Bearer {TOKEN}"}


def test_inline_credentials_become_kopf_connection_info(pki: pathlib.Path, tmp_path: pathlib.Path) -> None:
    """kopf gets the same credentials, as PEM files (the base64 text itself is not PEM)."""
    path = inline_kubeconfig(tmp_path, "https://127.0.0.1:6443", pki)
    info = kube.connection_info(kube.load_configuration(str(path)))
    assert info.server == "https://127.0.0.1:6443"
    assert (info.scheme, info.token) == ("Bearer", TOKEN)
    assert info.ca_path and info.certificate_path and info.private_key_path
    for written, original in ((info.ca_path, "ca.crt"), (info.certificate_path, "client.crt"),
                              (info.private_key_path, "client.key")):  # fmt: skip
        assert pathlib.Path(str(written)).read_bytes() == (pki / original).read_bytes()
    # ... and an SSL context from them is accepted by Python's ssl module.
    context = ssl.create_default_context(cafile=info.ca_path)
    context.load_cert_chain(info.certificate_path, info.private_key_path)


async def test_certificate_from_another_ca_is_refused(
    api_server: ApiServer, pki: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    """The server really checks client certificates: one the cluster's CA did not sign gets no answer."""
    path = inline_kubeconfig(tmp_path, url_of(api_server), pki, client="stranger")
    client = kube.KubeClient(kube.load_configuration(str(path)), timeout=(2, 2))
    try:
        with pytest.raises(ApiError) as raised:
            await client.list(kube.SERVICES, "llm")
    finally:
        await client.close()
    assert raised.value.status == 0
    assert not [seen for seen in api_server.seen if seen["cn"] == "stranger"]


async def test_server_that_never_answers_times_out() -> None:
    """A connection the server accepts and never answers fails the call within the timeout, not never."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        client = kube.KubeClient(kube.server_configuration(url), timeout=(1, 0.2))
        try:
            with pytest.raises(ApiError) as raised:
                await client.get(kube.SERVICES, "llm", "chat")
        finally:
            await client.close()
    assert raised.value.reason == "Unreachable"


async def test_an_api_server_away_is_one_line_naming_it_not_a_line_per_retry(caplog: pytest.LogCaptureFixture) -> None:
    """The API server down (an upgrade, an outage): the standby poll reads the peering object every two seconds and
    urllib3 tries each connect again three times, each with a WARNING of its own ("Retrying (Retry(total=2...")),
    some 700 lines in three minutes that never said which server failed. Now the retries write nothing, and the
    failed poll is one line naming the server and the error; the polls after it within a minute write none."""
    import logging

    from llm_telemetry_operator.config import OperatorConfig
    from llm_telemetry_operator.handlers import OperatorState, _check_standby

    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))  # bound, never listening: every connect is refused
        url = f"http://127.0.0.1:{unused.getsockname()[1]}"
        client = kube.KubeClient(kube.server_configuration(url))
        config, state, log = OperatorConfig(peering="llm-telemetry-operator"), OperatorState(), logging.getLogger("t.o")
        try:
            with caplog.at_level(logging.DEBUG, logger="t.o"), caplog.at_level(logging.INFO):
                for _ in range(3):
                    await _check_standby(client, config, state, "me", log)
        finally:
            await client.close()
    assert [record.getMessage() for record in caplog.records if record.name.startswith("urllib3")] == []
    (line,) = [record for record in caplog.records if record.name == "t.o"]
    assert line.levelname == "WARNING"
    message = line.getMessage()
    assert "cannot read ClusterKopfPeering 'llm-telemetry-operator'" in message, message
    assert f"no answer from the API server {url}: " in message and "Connection refused" in message, message


async def test_undeclared_call_is_refused_before_any_request() -> None:
    client = kube.KubeClient(kube.server_configuration("http://127.0.0.1:9"))
    try:
        with pytest.raises(PermissionNotDeclaredError):
            await client.delete(kube.DEPLOYMENTS, "llm", "chat")
        with pytest.raises(PermissionNotDeclaredError):
            await client.create(kube.LLMTELEMETRIES, "llm", {"metadata": {"name": "x"}})
    finally:
        await client.close()


async def test_only_its_own_peering_object_is_written(
    api_server: ApiServer, pki: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    """The chart lets the operator patch its own ClusterKopfPeering only (another release's, patched, could be made
    to keep that release's operator standing by): a patch of another one is refused before any request leaves, one
    of its own goes out (this sliver of a server answers every write 401), and any of them can be read."""
    path = inline_kubeconfig(tmp_path, url_of(api_server), pki)
    client = kube.KubeClient(kube.load_configuration(str(path)), peering="team-a-peering")
    annotation = {"metadata": {"annotations": {"example.com/x": "1"}}}
    try:
        with pytest.raises(PermissionNotDeclaredError, match="team-b-peering"):
            await client.patch(kube.CLUSTERKOPFPEERINGS, None, "team-b-peering", annotation)
        assert api_server.seen == []
        with pytest.raises(ApiError) as refused:
            await client.patch(kube.CLUSTERKOPFPEERINGS, None, "team-a-peering", annotation)
        assert refused.value.status == 401
        assert [seen["path"] for seen in api_server.seen] == ["/apis/kopf.dev/v1/clusterkopfpeerings/team-a-peering"]
        # Reading another one is allowed (it reaches the server, which here knows no such path).
        with pytest.raises(NotFoundError):
            await client.list(kube.CLUSTERKOPFPEERINGS, None, fields={"metadata.name": "team-b-peering"})
        assert api_server.seen[-1]["query"]["fieldSelector"] == "metadata.name=team-b-peering"
    finally:
        await client.close()
    # Without a peering object of its own (standalone), none.
    alone = kube.KubeClient(kube.load_configuration(str(path)))
    try:
        with pytest.raises(PermissionNotDeclaredError):
            await alone.patch(kube.CLUSTERKOPFPEERINGS, None, "team-a-peering", annotation)
    finally:
        await alone.close()


async def test_writes_are_withheld_while_the_operator_says_no() -> None:
    """While ``writable`` says no (the replica stands by), a create, patch or delete fails before any request leaves,
    so a pass under way when the replica stopped running writes nothing it worked out before; once it says yes,
    writes go out again."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        listener.setblocking(False)
        client = kube.KubeClient(kube.server_configuration(f"http://127.0.0.1:{listener.getsockname()[1]}"))
        client.timeout = (1, 0.2)
        allowed = False
        client.writable = lambda: allowed
        try:
            body = {"metadata": {"name": "chat-llm-metrics"}}
            for write in (
                client.create(kube.SERVICES, "llm", body),
                client.patch(kube.SERVICES, "llm", "chat-llm-metrics", body),
                client.delete(kube.SERVICES, "llm", "chat-llm-metrics"),
            ):
                with pytest.raises(WriteWithheld):
                    await write
            with pytest.raises(BlockingIOError):
                listener.accept()  # no connection was made
            allowed = True
            with pytest.raises(ApiError) as raised:
                await client.patch(kube.SERVICES, "llm", "chat-llm-metrics", body)  # sent; the listener never answers
            listener.accept()[0].close()
        finally:
            await client.close()
    assert raised.value.reason == "Unreachable"


async def test_closed_client_fails_fast() -> None:
    """Once closed (the operator is stopping), a call is an ApiError at once, not a hang on a dead pool."""
    client = kube.KubeClient(kube.server_configuration("http://127.0.0.1:9"))
    await client.close()
    with pytest.raises(ApiError) as raised:
        await client.get(kube.SERVICES, "llm", "chat")
    assert raised.value.reason == "Closed"


async def test_exec_plugin_credentials_reach_the_server(
    api_server: ApiServer, pki: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    """A kubeconfig whose user runs an exec plugin for its token (as EKS, GKE and OIDC logins write them): the
    plugin's token is what the server sees, next to the inline client certificate."""
    credential = {
        "apiVersion": "client.authentication.k8s.io/v1",
        "kind": "ExecCredential",
        "status": {"token": "token-from-the-plugin"},
    }
    plugin = tmp_path / "credential.json"
    plugin.write_text(json.dumps(credential))
    config = yaml.safe_load(inline_kubeconfig(tmp_path, url_of(api_server), pki).read_text())
    user = config["users"][0]["user"]
    del user["token"]  # the client certificate stays inline; the token comes from the plugin
    user["exec"] = {
        "apiVersion": "client.authentication.k8s.io/v1",
        "command": sys.executable,
        "args": ["-c", f"import sys; sys.stdout.write(open({str(plugin)!r}).read())"],
        "interactiveMode": "Never",
    }
    path = tmp_path / "exec-kubeconfig"
    path.write_text(yaml.safe_dump(config))
    client = kube.KubeClient(kube.load_configuration(str(path)))
    try:
        services = await client.list(kube.SERVICES, "llm")
    finally:
        await client.close()
    assert len(services) == len(SERVICES)
    assert {seen["auth"] for seen in api_server.seen} == {"Bearer token-from-the-plugin"}
    assert {seen["cn"] for seen in api_server.seen} == {"llm-telemetry-operator"}


async def test_in_cluster_token_is_read_again_as_the_kubelet_rotates_it(
    token_api_server: ApiServer, pki: pathlib.Path, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In a pod (``KUBERNETES_SERVICE_HOST`` set, no kubeconfig named) the credentials are the mounted
    ServiceAccount token and CA. The kubelet replaces a projected token before it expires (hourly by default):
    once the client's refresh period has passed, the next request carries the new token, not the one read at
    startup. The package's clock is moved on instead of waiting its minute."""
    from kubernetes.config import incluster_config

    token = tmp_path / "token"
    token.write_text("token-at-start")
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", str(token_api_server.server_address[1]))
    monkeypatch.setattr(incluster_config, "SERVICE_TOKEN_FILENAME", str(token))
    monkeypatch.setattr(incluster_config, "SERVICE_CERT_FILENAME", str(pki / "ca.crt"))
    now = [datetime.datetime(2030, 1, 1)]

    class Clock(datetime.datetime):
        @classmethod
        def now(cls, tz: Any = None) -> Any:
            return now[0]

    monkeypatch.setattr(
        incluster_config, "datetime", types.SimpleNamespace(datetime=Clock, timedelta=datetime.timedelta)
    )
    client = kube.KubeClient(kube.load_configuration())
    try:
        await client.list(kube.SERVICES, "llm")
        token.write_text("token-after-rotation")  # the kubelet's new token, same path
        await client.list(kube.SERVICES, "llm")  # within the refresh period: still the one read
        now[0] += datetime.timedelta(minutes=2)
        await client.list(kube.SERVICES, "llm")
    finally:
        await client.close()
    tokens = [seen["auth"].lower() for seen in token_api_server.seen]  # the scheme's case is free (RFC 9110)
    assert tokens[0] == tokens[-2] == "bearer token-at-start"
    assert tokens[-1] == "bearer token-after-rotation"


async def test_a_revoked_token_is_said_to_be_with_what_to_do(
    token_api_server: ApiServer,
    pki: pathlib.Path,
    tmp_path: pathlib.Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The ServiceAccount's token revoked (the ServiceAccount deleted, say): the API server answers 401 to all, kopf
    logs in again, and the token file holds the same token. kopf then stops the operator with "Ran out of valid
    credentials. Consider installing an API client library or adding a login handler", the 401 only in tracebacks;
    before that, one ERROR line says the server refused the credentials, where they came from, and what to do."""
    import logging

    import kopf
    from kopf_testing import eventually, running_operator
    from kubernetes.config import incluster_config

    from llm_telemetry_operator.config import OperatorConfig

    token_api_server.revoked = True
    token = tmp_path / "token"
    claims = {"sub": "system:serviceaccount:llm-telemetry:llm-telemetry-operator"}  # as a ServiceAccount token's
    payload = base64.urlsafe_b64encode(json.dumps(claims).encode()).decode().rstrip("=")
    token.write_text(f"eyJhbGciOiJSUzI1NiJ9.{payload}.c2lnbmF0dXJl")
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", str(token_api_server.server_address[1]))
    monkeypatch.setattr(incluster_config, "SERVICE_TOKEN_FILENAME", str(token))
    monkeypatch.setattr(incluster_config, "SERVICE_CERT_FILENAME", str(pki / "ca.crt"))

    def refused() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.levelname == "ERROR" and "refused" in r.getMessage()]

    with caplog.at_level(logging.INFO), pytest.raises(kopf.LoginError):  # kopf stops the operator
        async with running_operator(OperatorConfig(standalone=True, metrics_port=0, health="")):
            await eventually(refused, "the refusal said", attempts=100)
    # The scheme's case is free (RFC 9110).
    assert {seen["auth"].lower() for seen in token_api_server.seen} == {f"bearer {token.read_text()}".lower()}
    (line,) = refused()
    server = f"https://127.0.0.1:{token_api_server.server_address[1]}"
    assert line.startswith(f"the API server {server} refused this operator's credentials (401 Unauthorized)"), line
    assert f"the ServiceAccount token file {token} holds no new ones" in line, line
    assert "ServiceAccount llm-telemetry/llm-telemetry-operator" in line, line
    assert "kubectl get serviceaccount -n llm-telemetry llm-telemetry-operator" in line, line


async def test_fresh_credentials_refused_again_and_again_are_waited_between(
    token_api_server: ApiServer, pki: pathlib.Path, tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A kubeconfig whose exec plugin gives a fresh token at each call (``aws eks get-token``), for an identity the
    cluster refuses: each new token is refused, kopf logs in again, and the plugin ran about 40 times a second for
    as long as it lasted. The logins are spaced out, doubling up to a minute, and an ERROR line says why."""
    import asyncio
    import logging
    import sys

    from kopf_testing import running_operator

    from llm_telemetry_operator.config import OperatorConfig

    token_api_server.revoked = True
    calls = tmp_path / "calls"
    plugin = tmp_path / "plugin.py"
    plugin.write_text(
        "import json, pathlib, uuid\n"
        f"with open({str(calls)!r}, 'a') as f: f.write('x')\n"
        "print(json.dumps({'apiVersion': 'client.authentication.k8s.io/v1beta1', 'kind': 'ExecCredential',"
        " 'status': {'token': uuid.uuid4().hex}}))\n"
    )
    config = yaml.safe_load(inline_kubeconfig(tmp_path, url_of(token_api_server), pki).read_text())
    exec_ = {"apiVersion": "client.authentication.k8s.io/v1beta1", "command": sys.executable, "args": [str(plugin)]}
    config["users"][0]["user"] = {"exec": exec_}
    path = tmp_path / "exec-kubeconfig"
    path.write_text(yaml.safe_dump(config))
    settings = OperatorConfig(standalone=True, metrics_port=0, health="", kubeconfig=str(path))
    with caplog.at_level(logging.INFO):
        async with running_operator(settings):
            await asyncio.sleep(6)
    # Three logins at once, then 1 s, 2 s and 4 s apart: five or six in 6 s (the tight loop made hundreds).
    assert 3 <= len(calls.read_text()) <= 9, len(calls.read_text())
    said = [r.getMessage() for r in caplog.records if r.levelname == "ERROR" and "keeps asking" in r.getMessage()]
    assert len(said) == 1 and f"kubeconfig {path}" in said[0], said


def test_logins_in_a_loop_wait_doubling_to_a_minute_and_a_quiet_spell_starts_over() -> None:
    """The waits between logins a refusing cluster keeps asking for, as a loop of logins meets them: none for the
    first two, then 1 s doubling up to the one-minute cap, where it stays; after a quiet spell the count starts over,
    and two logins close together (connections the API server closed) never wait."""
    from llm_telemetry_operator.handlers import RELOGIN_MOST_SECONDS, RELOGIN_SECONDS, relogin_wait

    def loop(start: float, count: int, gap: float) -> tuple[list[float], list[float], float]:
        logins: list[float] = []
        waits: list[float] = []
        now, last_wait = start, 0.0
        for _ in range(count):
            last_wait = relogin_wait(logins, logins[-1] if logins else None, last_wait, now)
            waits.append(last_wait)
            now += last_wait
            logins.append(now)  # the login happens after its wait
            now += gap  # kopf's next request, refused at once
        return logins, waits, now

    logins, waits, now = loop(1000.0, 12, 0.025)
    assert waits == [0, 0, 1, 2, 4, 8, 16, 32, *[RELOGIN_MOST_SECONDS] * 4]
    quiet = now + RELOGIN_SECONDS
    assert relogin_wait(logins, logins[-1], waits[-1], quiet) == 0
    _, waits, _ = loop(quiet, 4, 0.025)
    assert waits == [0, 0, 1, 2]
    _, waits, _ = loop(5000.0, 2, 0.1)
    assert waits == [0, 0]


async def test_peering_crd_missing_is_reported_not_waited_for(
    api_server: ApiServer, pki: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    """The developer's path: only our CRD applied (``kubectl apply -f crds/``), none of kopf's peering CRDs. The
    API server answers 404 to the list of peering objects; the startup check says the CRD is missing, with the
    remedy, instead of letting kopf wait for an object that cannot exist."""
    from llm_telemetry_operator.config import OperatorConfig
    from llm_telemetry_operator.handlers import missing_peering

    client = kube.KubeClient(kube.load_configuration(str(inline_kubeconfig(tmp_path, url_of(api_server), pki))))
    try:
        warnings = await missing_peering(client, OperatorConfig(peering="llm-telemetry-operator"))
    finally:
        await client.close()
    assert [seen["path"] for seen in api_server.seen] == ["/apis/kopf.dev/v1/clusterkopfpeerings"]
    (warning,) = warnings
    assert "clusterkopfpeerings.kopf.dev CRD is not installed" in warning and "--standalone" in warning


async def test_our_crd_missing_is_named_at_startup(
    api_server: ApiServer, pki: pathlib.Path, tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The chart installed with --skip-crds, or the CRD deleted: the API server answers 404 to the list of
    LLMTelemetry resources, and the startup says which CRD is missing and how to install it."""
    import logging

    from llm_telemetry_operator.config import OperatorConfig
    from llm_telemetry_operator.handlers import OperatorState, _track_existing

    client = kube.KubeClient(kube.load_configuration(str(inline_kubeconfig(tmp_path, url_of(api_server), pki))))
    log = logging.getLogger("test.startup")
    try:
        with caplog.at_level(logging.WARNING, logger="test.startup"):
            await _track_existing(client, OperatorConfig(), OperatorState(), log)
    finally:
        await client.close()
    assert [seen["path"] for seen in api_server.seen] == ["/apis/llmtelemetry.dev/v1alpha1/llmtelemetries"]
    (warning,) = [record.getMessage() for record in caplog.records]
    assert warning.startswith("the llmtelemetries.llmtelemetry.dev CRD is not installed: apply crds/")
