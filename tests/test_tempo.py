"""Traces in a real Tempo: the spans the middleware exports, as a trace backend receives, keeps and finds them.

Three pods of the demo service (uvicorn processes) each run with the environment the operator injects for an
LLMTelemetry whose ``tracing.endpoint`` is Tempo, resolved as the kubelet resolves it: ``tracing.protocol``
``http/protobuf`` in namespace ``llm`` (spans written by the middleware's own OTLP encoder), ``grpc`` in
``search``, and in ``batch`` the two-span shape (``LLM_TELEMETRY_TRACING_HTTP_SPAN=true``). The official openai and
anthropic SDKs send them chat, streamed chat, a tool call, embeddings, an Anthropic stream and failures, each request
under its own sampled ``traceparent``; raw requests add model names no SDK sends (a lone surrogate, a NUL, 5,000
characters).

Tempo receives OTLP with the OpenTelemetry Collector's own receiver (the one Jaeger v2 is built on). Every request
must come back from Tempo's trace API as the trace shape docs/tracing.md describes, with its attributes typed as
the GenAI conventions type them, and the TraceQL queries docs/tracing.md gives must find exactly the traces they
say.

Needs a Tempo binary: ``TEMPO_BIN`` (a path) or ``tempo`` on PATH; skipped otherwise. Without it,
``tests/middleware/test_otlp_spans.py`` still checks the encoder's bytes against the protobuf library's.
"""

from __future__ import annotations

import base64
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
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

TEMPO = os.environ.get("TEMPO_BIN") or shutil.which("tempo")
if not TEMPO or not os.access(TEMPO, os.X_OK):
    pytest.skip("no Tempo binary: set TEMPO_BIN to a Tempo executable, or put `tempo` on PATH", allow_module_level=True)
openai = pytest.importorskip("openai")
anthropic = pytest.importorskip("anthropic")
pytest.importorskip("uvicorn")

from kubelet import container_env  # noqa: E402
from llm_telemetry.labels import MAX_FIELD_CHARS, MAX_LABEL_CHARS  # noqa: E402
from llm_telemetry_operator import resources as r  # noqa: E402
from llm_telemetry_operator.config import OperatorConfig  # noqa: E402
from llm_telemetry_operator.spec import parse_spec  # noqa: E402
from support import LOOPBACK_SERVER_CONFIG, config_file_server, free_port, stop_process, wait_for  # noqa: E402

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
#: The in-cluster endpoint the resources name; here it stands for the local Tempo.
TEMPO_SERVICE = "tempo.observability"

TEMPO_CONFIG = (
    """
stream_over_http_enabled: true
"""
    + LOOPBACK_SERVER_CONFIG
    + """distributor:
  receivers:
    otlp:
      protocols:
        grpc:
          endpoint: 127.0.0.1:{otlp_grpc}
        http:
          endpoint: 127.0.0.1:{otlp_http}
live_store:
  max_trace_idle: 1s
  flush_check_period: 1s
  shutdown_marker_dir: {root}/shutdown-marker
  wal:
    path: {root}/live-store
backend_scheduler:
  local_work_path: {root}/work
block_builder:
  wal:
    path: {root}/block-builder
storage:
  trace:
    backend: local
    wal:
      path: {root}/wal
    local:
      path: {root}/blocks
usage_report:
  reporting_enabled: false
"""
)


@dataclass(frozen=True)
class Pod:
    namespace: str
    protocol: str
    two_spans: bool = False


PODS = (Pod("llm", "http/protobuf"), Pod("search", "grpc"), Pod("batch", "http/protobuf", two_spans=True))


@dataclass(frozen=True)
class Sent:
    """One request and what the span must say about it."""

    pod: Pod
    what: str
    operation: str
    model: str
    trace_id: str
    parent_id: str
    error: str | None = None
    stream: bool = False
    tokens: tuple[int, int] | None = None
    tools: tuple[str, ...] = ()
    finish: tuple[str, ...] = ()
    provider: str = "openai"
    path: str = "/v1/chat/completions"
    #: The model as the span's name carries it: its bounded label value (see ``Traffic.label``).
    label: str = ""

    @property
    def name(self) -> str:
        return f"{self.operation} {self.label}"


@dataclass
class Span:
    """A span as Tempo's trace API returns it (OTLP JSON), its values unwrapped."""

    raw: dict[str, Any]
    resource: dict[str, Any]
    scope: str
    attributes: dict[str, Any] = field(init=False)

    def __post_init__(self) -> None:
        self.attributes = {a["key"]: _value(a["value"]) for a in self.raw.get("attributes", [])}

    @property
    def span_id(self) -> str:
        return base64.b64decode(self.raw["spanId"]).hex()

    @property
    def parent_id(self) -> str:
        return base64.b64decode(self.raw.get("parentSpanId", "")).hex()


def _value(value: dict[str, Any]) -> Any:
    """An OTLP JSON AnyValue as Python; ints stay ints (OTLP JSON writes them as strings)."""
    ((kind, inner),) = value.items()
    if kind == "intValue":
        return int(inner)
    if kind == "arrayValue":
        return [_value(v) for v in inner.get("values", [])]
    return inner


class Tempo:
    def __init__(self, base: str, otlp_http: int, otlp_grpc: int) -> None:
        self.base = base
        self.otlp = {"http/protobuf": otlp_http, "grpc": otlp_grpc}

    def get(self, path: str, **params: str) -> Any:
        url = f"{self.base}{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=30) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            raise AssertionError(f"Tempo answered {exc.code} to {path} {params}: {exc.read().decode()}") from exc

    def trace(self, trace_id: str) -> list[Span]:
        """Every span of the trace, or none while Tempo has not got it."""
        try:
            body = self.get(f"/api/v2/traces/{trace_id}")
        except AssertionError as exc:
            if "answered 404" in str(exc):
                return []
            raise
        spans = []
        for resource_spans in body.get("trace", {}).get("resourceSpans", []):
            resource = {a["key"]: _value(a["value"]) for a in resource_spans["resource"].get("attributes", [])}
            for scope_spans in resource_spans.get("scopeSpans", []):
                scope = scope_spans.get("scope", {}).get("name", "")
                spans += [Span(raw, resource, scope) for raw in scope_spans.get("spans", [])]
        return spans

    def search(self, query: str, since: int) -> set[str]:
        """The ids of the traces a TraceQL query finds (Tempo drops leading zeros; they are put back)."""
        body = self.get("/api/search", q=query, start=str(since), end=str(int(time.time()) + 60), limit="1000")
        return {t["traceID"].zfill(32) for t in body.get("traces", [])}


@pytest.fixture(scope="module")
def tempo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tempo]:
    root = tmp_path_factory.mktemp("tempo")
    http, otlp_http, otlp_grpc = free_port(), free_port(), free_port()
    config = TEMPO_CONFIG.format(http=http, grpc=free_port(), otlp_http=otlp_http, otlp_grpc=otlp_grpc, root=root)
    server = Tempo(f"http://127.0.0.1:{http}", otlp_http, otlp_grpc)
    with config_file_server("Tempo", str(TEMPO), config, root, server.base):
        yield server


def _pod_env(pod: Pod, tempo: Tempo) -> dict[str, str]:
    """The container's environment as the operator injects it and the kubelet resolves it, with the cluster's
    Tempo Service name pointed at the local Tempo."""
    port = 4317 if pod.protocol == "grpc" else 4318
    endpoint = f"http://{TEMPO_SERVICE}:{port}"
    spec = parse_spec(
        {
            "selector": {"matchLabels": {"app": "chat"}},
            "tracing": {"endpoint": endpoint, "protocol": pod.protocol, "samplingRatio": 1},
            "logs": {"enabled": False},
            "attribution": {"maxLabelValues": MAX_MODELS},
        }
    )
    labels = {"app": "chat", "app.kubernetes.io/name": "chat"}
    workload = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "chat", "namespace": pod.namespace, "labels": labels},
        "spec": {"template": {"metadata": {"labels": labels}, "spec": {"containers": [{"name": "chat"}]}}},
    }
    fields = {
        "metadata.name": f"chat-6d4b9c7f5-{pod.namespace}",
        "metadata.namespace": pod.namespace,
        "metadata.uid": secrets.token_hex(8),
    }
    injected = container_env({"env": r.build_env(spec, OperatorConfig(), workload, "chat")}, fields)
    path = "" if pod.protocol == "grpc" else "/v1/traces"  # (the traces' own endpoint: over HTTP, the full URL)
    assert injected["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"] == endpoint + path
    assert injected["OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"] == pod.protocol
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "LLM_TELEMETRY_"))}
    env.update(injected)
    env["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"] = f"http://127.0.0.1:{tempo.otlp[pod.protocol]}{path}"
    env["LLM_TELEMETRY_METRICS_PORT"] = "0"  # three pods on one host; the metrics are not what this tests
    env["OTEL_BSP_SCHEDULE_DELAY"] = "50"
    if pod.two_spans:
        env["LLM_TELEMETRY_TRACING_HTTP_SPAN"] = "true"
    return env


#: Distinct model names each pod's labels (and span names) keep (``spec.attribution.maxLabelValues``).
MAX_MODELS = 8
#: Fine-tuned model names, each its own: a client can send any number of them.
RANDOM_MODELS = 12

#: Model names a client can send that no SDK does (as JSON escapes them), what the span must carry instead, and the
#: error the request ends in (the demo app raises on the first: it cannot encode the model it echoes).
HOSTILE = (
    ('"gpt\\ud800\\u0000\\u2603x"', "gpt\ufffd\x00\u2603x", "app_exception"),  # U+FFFD for the lone surrogate
    (json.dumps("m" * 5000), "m" * MAX_FIELD_CHARS, None),  # cut to the bound of every recorded field
)


class Traffic:
    """Sends one pod its requests, each under a sampled traceparent of its own."""

    def __init__(self, pod: Pod, base: str) -> None:
        self.pod, self.base = pod, base
        self.sent: list[Sent] = []
        self.admitted: list[str] = []
        self.openai = openai.OpenAI(base_url=f"{base}/v1", api_key="sk-test", max_retries=0)
        self.anthropic = anthropic.Anthropic(base_url=base, api_key="sk-ant-test", max_retries=0)

    def _headers(self, what: str, **extra: str) -> tuple[dict[str, str], Callable[..., Sent]]:
        trace_id, parent_id = secrets.token_hex(16), secrets.token_hex(8)
        headers = {"traceparent": f"00-{trace_id}-{parent_id}-01", **extra}

        def sent(**fields: Any) -> Sent:
            label = self.label(fields["model"])
            record = Sent(self.pod, what, trace_id=trace_id, parent_id=parent_id, label=label, **fields)
            self.sent.append(record)
            return record

        return headers, sent

    def run(self) -> list[Sent]:
        messages: Any = [{"role": "user", "content": "What is our p95 time to first token?"}]

        headers, sent = self._headers("chat")
        reply = self.openai.chat.completions.create(model="gpt-4o", messages=messages, extra_headers=headers)
        assert reply.usage is not None
        sent(operation="chat", model="gpt-4o", tokens=(reply.usage.prompt_tokens, reply.usage.completion_tokens),
             finish=("stop",))  # fmt: skip

        headers, sent = self._headers("stream")
        chunks = list(
            self.openai.chat.completions.create(
                model="gpt-4o-mini", messages=messages, stream=True, stream_options={"include_usage": True},
                extra_headers=headers,
            )
        )  # fmt: skip
        usage = chunks[-1].usage
        assert usage is not None
        sent(operation="chat", model="gpt-4o-mini", stream=True, tokens=(usage.prompt_tokens, usage.completion_tokens),
             finish=("stop",))  # fmt: skip

        headers, sent = self._headers("long", **{"x-demo-words": "1024"})
        reply = self.openai.chat.completions.create(model="gpt-4o", messages=messages, extra_headers=headers)
        assert reply.usage is not None and reply.usage.completion_tokens == 1024
        sent(operation="chat", model="gpt-4o", tokens=(reply.usage.prompt_tokens, 1024), finish=("stop",))

        headers, sent = self._headers("tool")
        tools: Any = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
        reply = self.openai.chat.completions.create(model="gpt-4o", messages=messages, tools=tools,
                                                    extra_headers=headers)  # fmt: skip
        assert reply.choices[0].finish_reason == "tool_calls" and reply.usage is not None
        sent(operation="chat", model="gpt-4o", tools=("get_weather",), finish=("tool_calls",),
             tokens=(reply.usage.prompt_tokens, reply.usage.completion_tokens))  # fmt: skip

        headers, sent = self._headers("rate_limit", **{"x-demo-fail": "rate_limit"})
        with pytest.raises(openai.RateLimitError):
            self.openai.chat.completions.create(model="gpt-4o", messages=messages, extra_headers=headers)
        sent(operation="chat", model="gpt-4o", error="rate_limit")

        headers, sent = self._headers("stream_error", **{"x-demo-fail": "stream_error"})
        with pytest.raises(openai.APIError):
            for _ in self.openai.chat.completions.create(
                model="gpt-4o-mini", messages=messages, stream=True, extra_headers=headers
            ):
                pass
        sent(operation="chat", model="gpt-4o-mini", stream=True, error="server_error")

        headers, sent = self._headers("embeddings")
        self.openai.embeddings.create(model="text-embedding-3-small", input=["a tenant", "a tool"],
                                      extra_headers=headers)  # fmt: skip
        sent(operation="embeddings", model="text-embedding-3-small", path="/v1/embeddings")

        headers, sent = self._headers("anthropic")
        with self.anthropic.messages.stream(
            model="claude-sonnet-4", max_tokens=64, messages=messages, extra_headers=headers
        ) as stream:
            final = stream.get_final_message()
        sent(operation="chat", model="claude-sonnet-4", provider="anthropic", stream=True, path="/v1/messages",
             tokens=(final.usage.input_tokens, final.usage.output_tokens), finish=("end_turn",))  # fmt: skip

        for index, (model_json, model, error) in enumerate(HOSTILE):
            headers, sent = self._headers(f"hostile{index}", **{"content-type": "application/json"})
            body = f'{{"model": {model_json}, "messages": [{{"role": "user", "content": "hi"}}]}}'.encode()
            request = urllib.request.Request(f"{self.base}/v1/chat/completions", data=body, headers=headers)
            try:
                urllib.request.urlopen(request, timeout=30).close()
            except urllib.error.HTTPError as exc:
                assert (exc.code, error) == (500, "app_exception")
            sent(operation="chat", model=model, error=error)

        for _ in range(RANDOM_MODELS):
            model = f"ft:gpt-4o-mini:acme:{secrets.token_hex(4)}"
            headers, sent = self._headers("fine-tuned")
            reply = self.openai.chat.completions.create(model=model, messages=messages, extra_headers=headers)
            assert reply.usage is not None
            sent(operation="chat", model=model, tokens=(reply.usage.prompt_tokens, reply.usage.completion_tokens),
                 finish=("stop",))  # fmt: skip
        return self.sent

    def label(self, model: str) -> str:
        """The model's label value: the first MAX_MODELS distinct names as sent, then ``other`` (also for a name
        too long to be a label), as docs/metrics.md bounds every label."""
        if len(model) > MAX_LABEL_CHARS:
            return "other"
        if model not in self.admitted and len(self.admitted) < MAX_MODELS:
            self.admitted.append(model)
        return model if model in self.admitted else "other"


def _run_pod(pod: Pod, tempo: Tempo, root: Path) -> list[Sent]:
    port = free_port()
    with open(root / f"{pod.namespace}.log", "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--factory", "llm_telemetry.demo.app:create_app",
             "--host", "127.0.0.1", "--port", str(port)],
            env=_pod_env(pod, tempo), stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for("the demo service", lambda: urllib.request.urlopen(f"{base}/healthz", timeout=5).status == 200)
        return Traffic(pod, base).run()
    finally:
        stop_process(process)  # a clean stop flushes the batch processor's last spans


@pytest.fixture(scope="module")
def traffic(tempo: Tempo, tmp_path_factory: pytest.TempPathFactory) -> tuple[int, list[Sent]]:
    root = tmp_path_factory.mktemp("pods")
    since = int(time.time()) - 60
    sent = [s for pod in PODS for s in _run_pod(pod, tempo, root)]
    for s in sent:  # every span of the request's trace: one, or the HTTP span and ours
        spans = 2 if s.pod.two_spans else 1
        wait_for(f"{s.pod.namespace} {s.what} in Tempo", lambda s=s, n=spans: len(tempo.trace(s.trace_id)) >= n)
    return since, sent


@pytest.fixture(scope="module")
def searchable(tempo: Tempo, traffic: tuple[int, list[Sent]]) -> tuple[int, list[Sent]]:
    """The traffic, once Tempo's search sees all of it (a trace is searchable once Tempo has closed it, idle for
    ``live_store.max_trace_idle``)."""
    since, sent = traffic
    everything = {s.trace_id for s in sent}
    wait_for("every trace to be searchable", lambda: tempo.search("{}", since) >= everything)
    return traffic


def _ours(spans: list[Span]) -> list[Span]:
    return [span for span in spans if span.scope == "llm_telemetry"]


@pytest.fixture(scope="module")
def traces(tempo: Tempo, traffic: tuple[int, list[Sent]]) -> dict[str, list[Span]]:
    return {s.trace_id: tempo.trace(s.trace_id) for s in traffic[1]}


def test_every_request_is_one_genai_span_continuing_its_caller(
    traffic: tuple[int, list[Sent]], traces: dict[str, list[Span]]
) -> None:
    _, sent = traffic
    assert {s.pod for s in sent} == set(PODS)
    for s in sent:
        spans = traces[s.trace_id]
        [span] = _ours(spans)
        assert base64.b64decode(span.raw["traceId"]).hex() == s.trace_id
        assert span.resource["service.name"] == "chat"
        assert span.resource["k8s.namespace.name"] == s.pod.namespace
        assert span.resource["k8s.pod.name"] == f"chat-6d4b9c7f5-{s.pod.namespace}"
        assert span.resource["k8s.deployment.name"] == "chat"
        assert span.raw["name"] == s.name
        if s.pod.two_spans:
            # docs/tracing.md: the HTTP server span continues the caller; the GenAI span is its INTERNAL child.
            [http] = [span for span in spans if span.scope != "llm_telemetry"]
            assert (http.raw["kind"], http.raw["name"]) == ("SPAN_KIND_SERVER", f"POST {s.path}"), s
            assert http.parent_id == s.parent_id
            assert (span.raw["kind"], span.parent_id) == ("SPAN_KIND_INTERNAL", http.span_id)
        else:
            assert len(spans) == 1
            assert span.raw["kind"] == "SPAN_KIND_SERVER"
            assert span.parent_id == s.parent_id


def test_span_attributes_as_tempo_keeps_them(traffic: tuple[int, list[Sent]], traces: dict[str, list[Span]]) -> None:
    """The GenAI conventions' types: token counts are integers, finish reasons and tool names string arrays, the
    time to first chunk a double; a failure has its error.type, and status ERROR unless the answer was a 4xx."""
    _, sent = traffic
    for s in sent:
        [span] = _ours(traces[s.trace_id])
        attributes = span.attributes
        assert attributes["gen_ai.operation.name"] == s.operation
        assert attributes["gen_ai.provider.name"] == s.provider
        assert attributes.get("gen_ai.request.stream", False) is s.stream  # set only when streaming
        assert attributes["gen_ai.request.model"] == s.model
        if s.tokens is not None:
            counts = (attributes["gen_ai.usage.input_tokens"], attributes["gen_ai.usage.output_tokens"])
            assert counts == s.tokens and all(type(count) is int for count in counts), (s, counts)
        if s.finish:
            assert attributes["gen_ai.response.finish_reasons"] == list(s.finish)
        if s.tools:
            assert attributes["llm.tool_calls.names"] == list(s.tools)
            assert attributes["llm.tool_calls.count"] == len(s.tools)
        if s.error:
            # A SERVER span's status is left unset for a 4xx answer (the HTTP conventions); error.type names it. The
            # LLM span inside another server span (two spans) is an error all the same.
            client_error = 400 <= attributes["http.response.status_code"] < 500 and not s.pod.two_spans
            assert (span.raw.get("status", {}).get("code") == "STATUS_CODE_ERROR") is not client_error, s
            assert attributes["error.type"] == s.error
        else:
            assert span.raw.get("status", {}).get("code") != "STATUS_CODE_ERROR", s
            assert "error.type" not in attributes
            assert attributes["http.response.status_code"] == 200
            assert attributes["gen_ai.response.model"] == s.model
        if s.stream and not s.error:
            ttft = attributes["gen_ai.response.time_to_first_chunk"]
            assert isinstance(ttft, float) and ttft > 0
            [event] = span.raw["events"]
            assert event["name"] == "gen_ai.first_token"


def test_span_names_stay_as_bounded_as_metric_labels(
    tempo: Tempo, searchable: tuple[int, list[Sent]], traces: dict[str, list[Span]]
) -> None:
    """A span is named by its operation and model, and backends index span names (Tempo's tag values and span
    metrics, Jaeger's operations): past MAX_MODELS distinct models, or a name too long for a label, the name says
    ``other``. The attribute keeps the model sent (cut to the field bound)."""
    _, sent = searchable
    assert sum(s.label == "other" for s in sent) > len(PODS) * (RANDOM_MODELS - MAX_MODELS)  # the bound was reached
    for s in sent:
        [span] = _ours(traces[s.trace_id])
        assert span.raw["name"] == s.name  # "chat other" past the bound
        assert span.attributes["gen_ai.request.model"] == s.model
    for pod in PODS:  # each model kept has one operation here; the rest are "chat other"
        assert len({s.name for s in sent if s.pod == pod}) <= MAX_MODELS + 1
    # What Tempo indexes: exactly these names (and the HTTP spans' of the two-span shape).
    body = tempo.get("/api/v2/search/tag/name/values")
    names = {value["value"] for value in body["tagValues"]}
    http = {f"POST {s.path}" for s in sent if s.pod.two_spans}
    assert names - http == {s.name for s in sent}


def _documented_queries() -> list[tuple[str, str]]:
    """docs/tracing.md's TraceQL examples, each with the comment above it."""
    text = (REPO / "docs" / "tracing.md").read_text()
    queries = []
    for block in text.split("```traceql\n")[1:]:
        comment = ""
        for line in block.split("```", 1)[0].splitlines():
            if line.startswith("#"):
                comment = line.lstrip("# ")
            elif line.strip():
                queries.append((comment, line))
    return queries


#: What each documented query must find in this traffic, by its comment in docs/tracing.md.
EXPECTED: dict[str, Callable[[Sent], bool]] = {
    "every rate-limited request of one service": lambda s: s.error == "rate_limit" and s.pod.namespace == "llm",
    "failed requests of one model": lambda s: s.error is not None and s.model == "gpt-4o-mini",
    "requests in which the model called a tool": lambda s: "get_weather" in s.tools,
    "streams whose first token took over 2 seconds": lambda s: False,  # the demo's come in milliseconds
    "one request a user reported, by its x-request-id": lambda s: False,  # an example id
    "long answers": lambda s: s.tokens is not None and s.tokens[1] > 1000,
}


def test_the_documented_queries_are_all_expected() -> None:
    assert sorted(comment for comment, _ in _documented_queries()) == sorted(EXPECTED)


@pytest.mark.parametrize("comment,query", _documented_queries(), ids=[c for c, _ in _documented_queries()])
def test_documented_traceql_finds_exactly_its_traces(
    tempo: Tempo, searchable: tuple[int, list[Sent]], comment: str, query: str
) -> None:
    since, sent = searchable
    expected = {s.trace_id for s in sent if EXPECTED[comment](s)}
    assert tempo.search(query, since) == expected, query
