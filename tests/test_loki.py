"""The dashboard's error log panel, run by a real Loki over the request-log lines the middleware sends it.

Two pods of the demo service (uvicorn processes), in namespaces ``llm`` and ``search``, take the same traffic
through the openai SDK: successes and failures of two models, streamed and not, each request with its own
``x-request-id`` and a sampled ``traceparent``. Their lines reach Loki both ways the operator's
``spec.logs.mode`` offers:

- ``otlp``: the middleware's OTLP log exporter posts to Loki's ``/otlp/v1/logs``, with the resource attributes
  the operator injects (``k8s.namespace.name`` and the rest);
- ``stdout``: each process's stdout goes to a file, as a container runtime writes it, and the test pushes the
  file's lines to Loki's push API labelled as Promtail and Grafana Alloy label a pod's streams (``namespace``,
  ``pod``, ``container``, ``job``): the test stands in for the log agent, not for Loki.

The panel's query for each mode, with the dashboard's variables replaced as Grafana replaces them (All, one
value, several), must return exactly the failed requests of the chosen namespaces and models, each line with the
trace id of its request.

Needs a Loki 3 binary: ``LOKI_BIN`` (a path) or ``loki`` on PATH; skipped otherwise. Without it,
``tests/middleware/test_dashboards.py`` still checks the queries' form against Loki's rules.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

LOKI = os.environ.get("LOKI_BIN") or shutil.which("loki")
if not LOKI or not os.access(LOKI, os.X_OK):
    pytest.skip("no Loki binary: set LOKI_BIN to a Loki 3 executable, or put `loki` on PATH", allow_module_level=True)
openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")

from llm_telemetry.monitoring.dashboards import LOGS_MODES, build_dashboard  # noqa: E402
from logql import interpolate  # noqa: E402
from otlp_receiver import OTLPReceiver, otlp_receiver  # noqa: E402
from support import LOOPBACK_SERVER_CONFIG, config_file_server, free_port, stop_process, wait_for  # noqa: E402

pytestmark = pytest.mark.slow

NAMESPACES = ("llm", "search")
#: (model, x-demo-fail, stream) of each request, sent by each pod.
TRAFFIC = (
    ("gpt-4o", None, False),
    ("gpt-4o", None, True),
    ("gpt-4.1-mini", None, False),
    ("gpt-4.1-mini", "rate_limit", False),
    ("gpt-4o", "server_error", False),
    ("gpt-4o", "stream_error", True),
    # A stream refused before its first token: its stdout line's ttft_ms is null, which `| json ttft_ms="ttft_ms"`
    # reads as "", and a numeric comparison of "" kept the line with an __error__ (the slow-first-token query).
    ("gpt-4o", "rate_limit", True),
    ("gpt-4.1-mini", "context_length", False),
)

#: Loki runs multi-tenant, as its Helm chart installs it: the pods name this tenant (``spec.logs.tenant``, injected as
#: ``OTEL_EXPORTER_OTLP_LOGS_HEADERS``) and the queries send it, as Grafana's Loki datasource would.
TENANT = "llm-platform"

LOKI_CONFIG = (
    """
auth_enabled: true
"""
    + LOOPBACK_SERVER_CONFIG
    + """common:
  instance_addr: 127.0.0.1
  path_prefix: {root}
  storage:
    filesystem:
      chunks_directory: {root}/chunks
      rules_directory: {root}/rules
  replication_factor: 1
  ring:
    kvstore:
      store: inmemory
ingester:
  lifecycler:
    min_ready_duration: 0s
schema_config:
  configs:
    - from: 2020-10-24
      store: tsdb
      object_store: filesystem
      schema: v13
      index:
        prefix: index_
        period: 24h
analytics:
  reporting_enabled: false
"""
)


@dataclass(frozen=True)
class Sent:
    namespace: str
    model: str
    fail: str | None
    request_id: str
    trace_id: str


class Loki:
    def __init__(self, base: str) -> None:
        self.base = base

    def get(self, path: str, **params: str) -> Any:
        url = f"{self.base}{path}?{urllib.parse.urlencode(params)}"
        request = urllib.request.Request(url, headers={"X-Scope-OrgID": TENANT})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            raise AssertionError(f"Loki answered {exc.code} to {params.get('query')!r}: {exc.read().decode()}") from exc

    def query(self, expr: str, start_ns: int) -> list[dict[str, Any]]:
        """Every line the query returns, as its stream's labels (structured metadata and parsed fields included)
        with the line under ``line``."""
        body = self.get(
            "/loki/api/v1/query_range",
            query=expr,
            start=str(start_ns),
            end=str(time.time_ns() + 60_000_000_000),
            limit="5000",
            direction="backward",
        )
        assert body["status"] == "success", body
        return [{**result["stream"], "line": line} for result in body["data"]["result"] for _, line in result["values"]]

    def push(self, labels: dict[str, str], lines: list[str]) -> None:
        now = time.time_ns()
        values = [[str(now - (len(lines) - i) * 1000), line] for i, line in enumerate(lines)]
        payload = json.dumps({"streams": [{"stream": labels, "values": values}]}).encode()
        request = urllib.request.Request(
            f"{self.base}/loki/api/v1/push",
            data=payload,
            headers={"Content-Type": "application/json", "X-Scope-OrgID": TENANT},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            assert response.status == 204


@pytest.fixture(scope="module")
def loki(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Loki]:
    root = tmp_path_factory.mktemp("loki")
    http = free_port()
    server = Loki(f"http://127.0.0.1:{http}")
    with config_file_server("Loki", str(LOKI), LOKI_CONFIG.format(http=http, grpc=free_port(), root=root), root,
                            server.base):  # fmt: skip
        yield server


def _pod_env(namespace: str, loki: Loki, receiver: OTLPReceiver) -> dict[str, str]:
    """The pod's environment as the operator injects it for ``logs.mode: otlp`` (the values resolved)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "LLM_TELEMETRY_"))}
    env.update(
        OTEL_SERVICE_NAME="chat",
        OTEL_RESOURCE_ATTRIBUTES=(
            f"k8s.namespace.name={namespace},k8s.deployment.name=chat,k8s.pod.name=chat-7d9f8-{namespace}"
        ),
        OTEL_TRACES_EXPORTER="otlp",
        OTEL_EXPORTER_OTLP_TRACES_ENDPOINT=f"{receiver.http_endpoint}/v1/traces",
        OTEL_EXPORTER_OTLP_TRACES_PROTOCOL="http/protobuf",
        OTEL_LOGS_EXPORTER="otlp",
        OTEL_EXPORTER_OTLP_LOGS_ENDPOINT=f"{loki.base}/otlp/v1/logs",
        OTEL_EXPORTER_OTLP_LOGS_PROTOCOL="http/protobuf",
        OTEL_EXPORTER_OTLP_LOGS_HEADERS=f"X-Scope-OrgID={TENANT}",
        OTEL_BLRP_SCHEDULE_DELAY="50",
        OTEL_BSP_SCHEDULE_DELAY="50",
        LLM_TELEMETRY_METRICS_PORT="0",
    )
    return env


def _send(base: str, namespace: str) -> list[Sent]:
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="sk-test", max_retries=0)
    sent = []
    for model, fail, stream in TRAFFIC:
        request_id, trace_id = secrets.token_hex(16), secrets.token_hex(16)
        headers = {"x-request-id": request_id, "traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-01"}
        if fail:
            headers["x-demo-fail"] = fail
        try:
            response = client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": "Which tenant is hurting us?"}],
                stream=stream,
                extra_headers=headers,
            )
            if stream:
                for _ in response:
                    pass
        except openai.APIError:
            assert fail, f"{model} {fail} {stream}"
        else:
            assert not fail, f"{model} {fail} {stream}"
        sent.append(Sent(namespace, model, fail, request_id, trace_id))
    return sent


def _lines_in_loki(loki: Loki, selector: str, start_ns: int) -> set[str]:
    return {line.get("request_id", "") for line in loki.query(selector, start_ns)}


def _run_pod(namespace: str, loki: Loki, receiver: OTLPReceiver, root: Path, start_ns: int) -> list[Sent]:
    """One pod's traffic, its OTLP records waited for in Loki, then its stdout lines shipped as an agent would."""
    port = free_port()
    stdout = root / f"{namespace}.log"  # the container's log file, as the runtime writes it
    with open(stdout, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--factory", "llm_telemetry.demo.app:create_app",
             "--host", "127.0.0.1", "--port", str(port)],
            env=_pod_env(namespace, loki, receiver), stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for("the demo service", lambda: urllib.request.urlopen(f"{base}/healthz", timeout=5).status == 200)
        sent = _send(base, namespace)
        ids = {s.request_id for s in sent}
        otlp = f'{{k8s_namespace_name="{namespace}"}}'
        wait_for(f"{namespace}'s OTLP records in Loki", lambda: _lines_in_loki(loki, otlp, start_ns) >= ids)
    finally:
        stop_process(process)
    # The container's whole log, as an agent ships it: uvicorn's own lines and access log among the request lines.
    lines = stdout.read_text().splitlines()
    assert sum(line.startswith('{"timestamp"') for line in lines) == len(sent), lines
    assert any('"POST /v1/chat/completions HTTP/1.1"' in line for line in lines), lines
    # (As Promtail's and Alloy's CRI stage label them: `stream` too, which the line's own `stream` field meets.)
    labels = {"namespace": namespace, "pod": f"chat-7d9f8-{namespace}", "container": "chat", "stream": "stdout"}
    loki.push({**labels, "job": f"{namespace}/chat"}, lines)
    shipped = f'{{namespace="{namespace}"}} | json'
    wait_for(f"{namespace}'s stdout lines in Loki", lambda: _lines_in_loki(loki, shipped, start_ns) >= ids)
    return sent


@pytest.fixture(scope="module")
def traffic(loki: Loki, tmp_path_factory: pytest.TempPathFactory) -> tuple[int, list[Sent]]:
    root = tmp_path_factory.mktemp("pods")
    start_ns = time.time_ns() - 60_000_000_000
    with otlp_receiver() as receiver:
        sent = [s for namespace in NAMESPACES for s in _run_pod(namespace, loki, receiver, root, start_ns)]
    return start_ns, sent


def test_this_loki_refuses_logs_that_name_no_tenant(loki: Loki) -> None:
    """Why the tenant matters: without it, a multi-tenant Loki answers 401 and the records are lost."""
    request = urllib.request.Request(
        f"{loki.base}/otlp/v1/logs", data=b"", headers={"Content-Type": "application/x-protobuf"}
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code == 401


CHOICES = (
    {},
    {"namespace": ["llm"]},
    {"namespace": ["llm"], "model": ["gpt-4.1-mini"]},
    {"namespace": ["llm", "search"], "model": ["gpt-4o"]},
    {"model": ["gpt-4o", "gpt-4.1-mini"]},
)


@pytest.mark.parametrize("mode", LOGS_MODES)
@pytest.mark.parametrize("chosen", CHOICES, ids=lambda c: ",".join(f"{k}={'|'.join(v)}" for k, v in c.items()) or "all")
def test_error_log_panel_shows_exactly_the_failed_requests(
    loki: Loki, traffic: tuple[int, list[Sent]], mode: str, chosen: dict[str, list[str]]
) -> None:
    start_ns, sent = traffic
    dashboard = build_dashboard(logs_mode=mode)
    (panel,) = [p for p in dashboard["panels"] if p["type"] == "logs"]
    expr = interpolate(panel["targets"][0]["expr"], dashboard, chosen, {"log_services": ["chat"]})
    lines = loki.query(expr, start_ns)
    expected = {
        s.request_id: s.trace_id
        for s in sent
        if s.fail
        and s.namespace in chosen.get("namespace", NAMESPACES)
        and s.model in chosen.get("model", {m for m, _, _ in TRAFFIC})
    }
    assert expected, "the choice selects some failures"
    found = {line["request_id"]: line["trace_id"] for line in lines}
    assert len(lines) == len(found), "one line per request"
    assert found == expected, expr
    assert all(line["error_type"] for line in lines)
    # The lines as this mode delivers them: OTLP records carry the resource's labels, the agent's streams its own.
    delivered_by = "k8s_namespace_name" if mode == "otlp" else "container"
    assert all(delivered_by in line for line in lines), lines


REPO = Path(__file__).resolve().parents[1]
#: Documented queries that find nothing in this traffic, and why.
FIND_NOTHING_HERE = {
    "ttft_ms > 2000": "the demo service's first tokens come in milliseconds",
    'request_id="3f2a9c0d4e5b4c6a8b7d9e0f1a2b3c4d"': "an example id",
}


def _documented_queries() -> list[str]:
    text = (REPO / "docs" / "logging.md").read_text()
    blocks = [block.split("```", 1)[0] for block in text.split("```logql\n")[1:]]
    return [line for block in blocks for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_the_documented_queries_are_both_kinds() -> None:
    queries = _documented_queries()
    assert len(queries) == 10
    assert sum("| json" in q for q in queries) == 5


@pytest.mark.parametrize("expr", _documented_queries())
def test_documented_query_runs_over_the_lines(loki: Loki, traffic: tuple[int, list[Sent]], expr: str) -> None:
    start_ns, _ = traffic
    body = loki.get("/loki/api/v1/query_range", query=expr, start=str(start_ns), end=str(time.time_ns()), limit="1000")
    assert body["status"] == "success", body
    results = body["data"]["result"]
    assert not [r for r in results if "__error__" in (r.get("stream") or r.get("metric") or {})], results[:3]
    if not any(marker in expr for marker in FIND_NOTHING_HERE):
        assert results, f"nothing found by {expr}"
