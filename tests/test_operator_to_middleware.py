"""The two parts together: what the operator injects into a workload for an LLMTelemetry, resolved as the kubelet
resolves it (field references, ``$(VAR)`` expansion, the pricing ConfigMap mounted as files), configures the
middleware in that workload's app as the resource says. The app is the demo service under uvicorn, driven by the
official openai SDK; its metrics are scraped where the operator's Service and ServiceMonitor point, and its traces
and request logs arrive at an OTLP receiver standing in for the resource's collectors."""

from __future__ import annotations

import logging
import pathlib
import secrets
from collections.abc import Iterator, Mapping
from typing import Any

import openai
import pytest
import yaml
from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

from kube_schema import merge_patch
from kubelet import container_env, expand
from llm_telemetry_operator import resources as r
from llm_telemetry_operator.config import OperatorConfig
from llm_telemetry_operator.spec import parse_spec
from otlp_receiver import OTLPReceiver, demo_server, isolated_env, otlp_receiver, wait_span
from support import Metrics, free_port, serve, settled

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "llmtelemetry-full.yaml"
CONFIG = OperatorConfig()
#: The pod the kubelet starts from the injected template: what its field references resolve to.
POD = {"metadata.name": "chat-api-6d4b9c7f5-x2x8q", "metadata.namespace": "llm", "metadata.uid": "0c9e5c1e-pod-uid"}


def workload() -> dict[str, Any]:
    """A Deployment the example selects: the app's container ``api`` (the example's ``containers``) and a sidecar."""
    labels = {"app.kubernetes.io/part-of": "assistant", "tier": "api"}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "chat-api", "namespace": "llm", "labels": labels, "uid": "deployment-uid"},
        "spec": {
            "selector": {"matchLabels": {"app": "chat-api"}},
            "template": {
                "metadata": {"labels": {"app": "chat-api", "app.kubernetes.io/name": "chat"}},
                "spec": {
                    "containers": [
                        {"name": "proxy", "image": "envoy:1", "env": [{"name": "MODE", "value": "edge"}]},
                        {"name": "api", "image": "chat:1", "env": [{"name": "LOG_LEVEL", "value": "info"}]},
                    ]
                },
            },
        },
    }


def mount(
    pod_spec: Mapping[str, Any], container: Mapping[str, Any], configmaps: Mapping[str, Any], root: pathlib.Path
) -> None:
    """The container's ConfigMap volumes as the kubelet lays them out, under ``root``."""
    volumes = {v["name"]: v for v in pod_spec.get("volumes") or []}
    for volume_mount in container.get("volumeMounts") or []:
        source = volumes[volume_mount["name"]]["configMap"]
        data = configmaps[source["name"]]["data"]
        items = source.get("items") or [{"key": k, "path": k} for k in data]
        for item in items:
            path = root / volume_mount["mountPath"].lstrip("/") / item["path"]
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(data[item["key"]])


class Deployed:
    """The example resource reconciled into the workload, the app started in the injected container's place."""

    def __init__(self, receiver: OTLPReceiver, root: pathlib.Path) -> None:
        resource = yaml.safe_load(EXAMPLE.read_text())
        resource["metadata"]["uid"] = "llmtelemetry-uid"
        self.spec = parse_spec(resource["spec"])
        self.workload = workload()
        injection = r.build_injection(self.spec, CONFIG, self.workload, resource["metadata"]["name"])
        patch = r.build_workload_patch(self.workload, injection, resource["metadata"]["name"])
        assert patch is not None
        self.injected = dict(merge_patch(self.workload, patch))
        pod_spec = self.injected["spec"]["template"]["spec"]
        self.containers = {ct["name"]: ct for ct in pod_spec["containers"]}
        self.service = r.build_metrics_service(resource, self.spec, self.injected)
        self.monitor = r.build_service_monitor(resource, self.spec, CONFIG)
        pricing = r.build_pricing_configmap(resource, self.spec)
        mount(pod_spec, self.containers["api"], {pricing["metadata"]["name"]: pricing}, root)
        self.env = container_env(self.containers["api"], POD)
        # What differs on this machine: the files sit under ``root``, the collectors' cluster names stand for the
        # receiver, and the metrics port is a free one (the test compares the injected one with the Service's).
        self.metrics_port = free_port()
        self.local_env = dict(self.env)
        self.local_env["LLM_TELEMETRY_PRICING"] = str(root / self.env["LLM_TELEMETRY_PRICING"].lstrip("/"))
        self.local_env["LLM_TELEMETRY_METRICS_PORT"] = str(self.metrics_port)
        self.local_env["LLM_TELEMETRY_METRICS_HOST"] = "127.0.0.1"
        assert (
            self.env["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"] == "http://jaeger.observability.svc:4317"
        )  # (gRPC: no path)
        self.local_env["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"] = receiver.grpc_endpoint
        self.local_env["OTEL_EXPORTER_OTLP_LOGS_ENDPOINT"] = receiver.http_endpoint + "/v1/logs"
        self.local_env["OTEL_BSP_SCHEDULE_DELAY"] = "20"
        self.local_env["OTEL_BLRP_SCHEDULE_DELAY"] = "20"


@pytest.fixture(scope="module")
def receiver() -> Iterator[OTLPReceiver]:
    with otlp_receiver() as running:
        yield running


@pytest.fixture(scope="module")
def deployed(receiver: OTLPReceiver, tmp_path_factory: pytest.TempPathFactory) -> Deployed:
    return Deployed(receiver, tmp_path_factory.mktemp("pod"))


@pytest.fixture(scope="module")
def traffic(deployed: Deployed) -> Iterator[dict[str, Any]]:
    """One stream through the app, from tenant ``acme``, continuing a sampled caller's trace."""
    from llm_telemetry.demo.app import create_app

    with isolated_env(deployed.local_env):
        app = create_app()  # configured by the environment alone, as in the pod
        app.telemetry  # noqa: B018 - built while the environment is in place
    trace_id = secrets.token_hex(16)
    try:
        with serve(app) as base:
            client = openai.OpenAI(
                base_url=f"{base}/v1",
                api_key="sk-test",
                default_headers={"x-tenant-id": "acme", "traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-01"},
            )
            stream = client.chat.completions.create(
                model="gpt-4o",
                messages=[{"role": "user", "content": "What is our p95 time to first token?"}],
                stream=True,
                stream_options={"include_usage": True},
            )
            usage = [chunk.usage for chunk in stream if chunk.usage is not None]
            path = deployed.monitor["spec"]["endpoints"][0]["path"]

            def whole(metrics: Metrics) -> None:  # the call recorded (just after its last byte), all of its points
                assert metrics.value("llm_requests_total", llm_metadata_tenant="acme") == 1
                assert metrics.value("llm_tokens_total", gen_ai_token_type="output", llm_metadata_tenant="acme") > 0
                assert metrics.value("llm_cost_usd_total", llm_metadata_tenant="acme") > 0

            yield {"trace_id": trace_id, "usage": usage[-1], "scrape": settled(deployed.metrics_port, whole, path)}
    finally:
        app.telemetry.shutdown()


def test_only_the_named_container_is_configured(deployed: Deployed) -> None:
    assert deployed.containers["proxy"]["env"] == [{"name": "MODE", "value": "edge"}]
    assert "volumeMounts" not in deployed.containers["proxy"]
    assert deployed.env["LOG_LEVEL"] == "info"  # the app's own variables stay


def test_the_service_and_servicemonitor_reach_the_port_the_middleware_listens_on(deployed: Deployed) -> None:
    container_ports = deployed.containers["api"]["ports"]
    [service_port] = deployed.service["spec"]["ports"]
    target = service_port["targetPort"]  # a container port's number, or its name
    [port] = [p for p in container_ports if target in (p["containerPort"], p.get("name"))]
    assert port["containerPort"] == int(deployed.env["LLM_TELEMETRY_METRICS_PORT"])
    assert int(deployed.env["LLM_TELEMETRY_METRICS_PORT"]) == deployed.spec.metrics.port
    assert deployed.monitor["spec"]["endpoints"][0]["port"] == service_port["name"]


def test_metrics_carry_the_resources_prices_and_attribution(traffic: dict[str, Any]) -> None:
    metrics, usage = traffic["scrape"], traffic["usage"]
    assert metrics.value("llm_requests_total", llm_metadata_tenant="acme", gen_ai_request_model="gpt-4o") == 1
    tokens_in = metrics.value("llm_tokens_total", gen_ai_token_type="input", llm_metadata_tenant="acme")
    tokens_out = metrics.value("llm_tokens_total", gen_ai_token_type="output", llm_metadata_tenant="acme")
    assert (tokens_in, tokens_out) == (usage.prompt_tokens, usage.completion_tokens)
    # examples/llmtelemetry-full.yaml: gpt-4o at 2.5 USD per million input tokens and 10 per million output.
    expected = (tokens_in * 2.5 + tokens_out * 10) / 1e6
    assert metrics.value("llm_cost_usd_total", llm_metadata_tenant="acme") == pytest.approx(expected, rel=1e-9)
    assert metrics.value("llm_cost_unpriced_tokens_total") == 0


def test_traces_reach_the_collector_with_the_pods_identity(
    deployed: Deployed, traffic: dict[str, Any], receiver: OTLPReceiver
) -> None:
    span = wait_span(receiver, **{"gen_ai.request.model": "gpt-4o"})
    assert span.trace_id == traffic["trace_id"]  # the caller's sampled trace is continued
    assert span.protocol == "grpc"  # the resource's tracing.protocol
    assert span.resource["service.name"] == "chat"  # the pods' app.kubernetes.io/name
    assert span.resource["k8s.pod.name"] == POD["metadata.name"]
    assert span.resource["k8s.pod.uid"] == POD["metadata.uid"]
    assert span.resource["k8s.namespace.name"] == "llm"
    assert span.resource["k8s.deployment.name"] == "chat-api"


def test_request_logs_reach_loki_correlated_with_the_trace(
    deployed: Deployed, traffic: dict[str, Any], receiver: OTLPReceiver
) -> None:
    assert deployed.env["OTEL_EXPORTER_OTLP_LOGS_ENDPOINT"].endswith("/otlp/v1/logs")  # Loki's OTLP path
    trace_id = traffic["trace_id"]
    assert receiver.wait_for(lambda got: any(record.trace_id == trace_id for record in got.logs))
    [record] = [record for record in receiver.logs if record.trace_id == trace_id]
    assert record.protocol == "http"  # Loki takes OTLP over HTTP only
    assert record.resource["k8s.pod.name"] == POD["metadata.name"]
    assert record.resource["service.name"] == "chat"


def test_kubelet_expansion_as_documented() -> None:
    # The expansion this test relies on, as the Kubernetes docs define it.
    assert expand("a=$(A),b=$(B),$$(A)", {"A": "1"}) == "a=1,b=$(B),$(A)"


@pytest.mark.parametrize("own_endpoint", [None, "envFrom", "env"], ids=["headers", "envFrom endpoint", "env endpoint"])
def test_the_apps_own_otlp_credential_is_not_sent_where_the_operator_points(own_endpoint: str | None) -> None:
    """An app that sends its own telemetry to a vendor sets OTEL_EXPORTER_OTLP_HEADERS (the vendor's key), which the
    SDK sends to every signal without headers of its own: the collectors the operator injects must not get it. The
    vendor's endpoint, the generic one, comes from a ConfigMap through ``envFrom`` or is in the container's ``env``:
    the app's own metrics keep going there with the key (nothing generic is injected, which an ``env`` of the
    operator's would make win over ``envFrom``), and so do its traces when the endpoint is in ``env``, where the
    operator sees it."""
    key = "Bearer vendor-key-" + secrets.token_hex(4)
    with otlp_receiver() as collectors, otlp_receiver() as vendor:
        deployment = workload()
        api = deployment["spec"]["template"]["spec"]["containers"][1]
        api["env"].append({"name": "OTEL_EXPORTER_OTLP_HEADERS", "value": f"authorization={key}"})
        if own_endpoint == "env":
            api["env"].append({"name": "OTEL_EXPORTER_OTLP_ENDPOINT", "value": vendor.http_endpoint})
        elif own_endpoint == "envFrom":
            api["envFrom"] = [{"configMapRef": {"name": "otel"}}]
        spec = parse_spec({"selector": {"matchLabels": {"tier": "api"}}, "containers": ["api"]})
        injection = r.build_injection(spec, CONFIG, deployment, "chat")
        patch = r.build_workload_patch(deployment, injection, "chat")
        assert patch is not None
        pod_spec = merge_patch(deployment, patch)["spec"]["template"]["spec"]
        otel = {"OTEL_EXPORTER_OTLP_ENDPOINT": vendor.http_endpoint}
        env = container_env({c["name"]: c for c in pod_spec["containers"]}["api"], POD, configmaps={"otel": otel})
        # The cluster's collectors, here the receiver: where the operator's endpoints point.
        if own_endpoint != "env":
            assert env["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"] == CONFIG.traces_endpoint + "/v1/traces"
            env["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"] = collectors.http_endpoint + "/v1/traces"
        env["OTEL_EXPORTER_OTLP_LOGS_ENDPOINT"] = collectors.http_endpoint + "/v1/logs"
        env.update(OTEL_BSP_SCHEDULE_DELAY="20", OTEL_BLRP_SCHEDULE_DELAY="20", LLM_TELEMETRY_METRICS_PORT="0")
        with demo_server(env) as (_, base):
            openai.OpenAI(base_url=f"{base}/v1", api_key="sk-test").chat.completions.create(
                model="gpt-4o", messages=[{"role": "user", "content": "hi"}]
            )
            traces = vendor if own_endpoint == "env" else collectors
            assert traces.wait_for(lambda got: bool(got.spans)) and collectors.wait_for(lambda got: bool(got.logs))
        if own_endpoint is not None:
            # The app's own OpenTelemetry SDK exporting metrics over OTLP (opentelemetry-instrument's default)
            # follows its generic endpoint, wherever that is set.
            with isolated_env(env):
                meters = MeterProvider(metric_readers=[PeriodicExportingMetricReader(OTLPMetricExporter())])
            meters.get_meter("app").create_counter("app.requests").add(1)
            meters.shutdown()
            assert (vendor.metric_exports, collectors.metric_exports) == (1, 0)
            assert vendor.headers and all(h.get("authorization") == key for h in vendor.headers)  # with its key
        assert collectors.headers and not [h for h in collectors.headers if "authorization" in h]


@pytest.mark.parametrize("logs", [{"enabled": False}, {"mode": "stdout"}], ids=["logs off", "logs to stdout"])
@pytest.mark.parametrize(
    "own_endpoint",
    ["OTEL_EXPORTER_OTLP_ENDPOINT from envFrom", "OTEL_EXPORTER_OTLP_LOGS_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT"],
)
def test_an_apps_own_log_pipeline_takes_its_credential_nowhere_the_operator_points(
    logs: dict[str, Any], own_endpoint: str
) -> None:
    """A resource that ships no logs itself (``spec.logs`` off, or to stdout) routes only its traces, with their own
    variables. An app that ships its own logs over OTLP (its log pipeline set up in its code, as Python apps do) with
    OTEL_EXPORTER_OTLP_HEADERS (a vendor's key, which whoever writes the resource may not be allowed to read) keeps
    sending them to its own endpoint with its key, also one it gets through ``envFrom``, which an injected generic
    endpoint would beat: the collectors the resource names get nothing of them."""
    from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter
    from opentelemetry.sdk._logs import LoggerProvider, LoggingHandler
    from opentelemetry.sdk._logs.export import SimpleLogRecordProcessor

    key = "Bearer vendor-key-" + secrets.token_hex(4)
    with otlp_receiver() as collectors, otlp_receiver() as vendor:
        own = [{"name": "OTEL_EXPORTER_OTLP_HEADERS", "value": f"authorization={key}"}]
        deployment = workload()
        api = deployment["spec"]["template"]["spec"]["containers"][1]
        if own_endpoint.endswith("envFrom"):
            api["envFrom"] = [{"configMapRef": {"name": "otel"}}]
        else:
            path = "/v1/logs" if own_endpoint == "OTEL_EXPORTER_OTLP_LOGS_ENDPOINT" else ""
            own.append({"name": own_endpoint, "value": vendor.http_endpoint + path})
        api["env"] += own
        spec = parse_spec({"selector": {"matchLabels": {"tier": "api"}}, "containers": ["api"], "logs": logs})
        patch = r.build_workload_patch(deployment, r.build_injection(spec, CONFIG, deployment, "chat"), "chat")
        assert patch is not None
        pod_spec = merge_patch(deployment, patch)["spec"]["template"]["spec"]
        otel = {"OTEL_EXPORTER_OTLP_ENDPOINT": vendor.http_endpoint}
        env = container_env({c["name"]: c for c in pod_spec["containers"]}["api"], POD, configmaps={"otel": otel})
        # The resource's traces collector, here the receiver.
        traces = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        assert traces == (
            None if own_endpoint == "OTEL_EXPORTER_OTLP_ENDPOINT" else CONFIG.traces_endpoint + "/v1/traces"
        )
        if traces:
            env["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"] = collectors.http_endpoint + "/v1/traces"
        with isolated_env(env):
            provider = LoggerProvider()
            provider.add_log_record_processor(SimpleLogRecordProcessor(OTLPLogExporter()))
        logger = logging.getLogger(f"app-{secrets.token_hex(4)}")
        logger.propagate = False
        logger.addHandler(LoggingHandler(logger_provider=provider))
        logger.warning("the app's own log line")
        provider.shutdown()
        assert [record.body for record in vendor.logs] == ["the app's own log line"]
        assert not collectors.headers, collectors.headers
        assert vendor.headers and all(h.get("authorization") == key for h in vendor.headers)  # with its key


@pytest.mark.parametrize(
    ("signal", "logs"),
    [("traces", {}), ("metrics", {}), ("logs", {}), ("logs", {"enabled": False})],
    ids=["traces", "metrics", "logs to Loki", "logs off"],
)
def test_a_signals_own_headers_keep_it_on_the_apps_own_pipeline(signal: str, logs: dict[str, Any]) -> None:
    """An app that sends a signal to a vendor with the vendor's key in that signal's own headers variable, set in
    its ``env`` from a Secret, while the endpoint comes from ``envFrom`` (a ConfigMap the operator does not read):
    the endpoint the operator would inject wins over the ConfigMap's (``env`` beats ``envFrom``), and would take the
    signal, and the key with it, to the collector the resource names. The headers mark the signal as the app's own:
    it keeps going to the vendor, with its key, and the collectors get nothing of it."""
    from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk._logs import LoggerProvider, LoggingHandler
    from opentelemetry.sdk._logs.export import SimpleLogRecordProcessor
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor

    key = "Bearer vendor-key-" + secrets.token_hex(4)
    with otlp_receiver() as collectors, otlp_receiver() as vendor:
        deployment = workload()
        api = deployment["spec"]["template"]["spec"]["containers"][1]
        api["envFrom"] = [{"configMapRef": {"name": "otel"}}]
        headers = f"OTEL_EXPORTER_OTLP_{signal.upper()}_HEADERS"
        api["env"].append({"name": headers, "valueFrom": {"secretKeyRef": {"name": "vendor", "key": "headers"}}})
        spec = parse_spec({"selector": {"matchLabels": {"tier": "api"}}, "containers": ["api"], "logs": logs})
        patch = r.build_workload_patch(deployment, r.build_injection(spec, CONFIG, deployment, "chat"), "chat")
        assert patch is not None
        pod_spec = merge_patch(deployment, patch)["spec"]["template"]["spec"]
        env = container_env(
            {c["name"]: c for c in pod_spec["containers"]}["api"],
            POD,
            configmaps={"otel": {"OTEL_EXPORTER_OTLP_ENDPOINT": vendor.http_endpoint}},
            secrets={"vendor": {"headers": f"authorization={key}"}},
        )
        # The resource's collectors, where the operator's endpoints point: here the receiver.
        local = {
            CONFIG.traces_endpoint + "/v1/traces": collectors.http_endpoint + "/v1/traces",
            CONFIG.logs_endpoint.rstrip("/") + "/v1/logs": collectors.http_endpoint + "/v1/logs",
        }
        env = {name: local.get(val, val) for name, val in env.items()}
        with isolated_env(env):
            if signal == "traces":
                tracers = TracerProvider()
                tracers.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter()))
            elif signal == "metrics":
                meters = MeterProvider(metric_readers=[PeriodicExportingMetricReader(OTLPMetricExporter())])
            else:
                loggers = LoggerProvider()
                loggers.add_log_record_processor(SimpleLogRecordProcessor(OTLPLogExporter()))
        if signal == "traces":
            tracers.get_tracer("app").start_span("the app's own span").end()
            tracers.shutdown()
        elif signal == "metrics":
            meters.get_meter("app").create_counter("app.requests").add(1)
            meters.shutdown()
        else:
            logger = logging.getLogger(f"app-{secrets.token_hex(4)}")
            logger.propagate = False
            logger.addHandler(LoggingHandler(logger_provider=loggers))
            logger.warning("the app's own log line")
            loggers.shutdown()
        assert not [h for h in collectors.headers if "authorization" in h], collectors.headers  # the key stays
        assert not collectors.headers  # and nothing of the app's signal goes there: it goes to the vendor
        assert [span.name for span in vendor.spans] == (["the app's own span"] if signal == "traces" else [])
        assert vendor.metric_exports == (1 if signal == "metrics" else 0)
        assert [record.body for record in vendor.logs] == (["the app's own log line"] if signal == "logs" else [])
        assert vendor.headers and all(h.get("authorization") == key for h in vendor.headers)


def test_an_own_endpoint_empty_in_the_pod_takes_the_apps_credential_nowhere_the_operator_points() -> None:
    """An app whose OTLP settings come from ConfigMaps: the vendor's endpoint through ``envFrom``, a per-signal
    override of it from a key that is empty in this cluster (``configMapKeyRef``), or missing (``optional``), and the
    vendor's key in OTEL_EXPORTER_OTLP_HEADERS. The operator sees a ``valueFrom`` and leaves the signal to the app; the
    SDK reads the empty variable as unset and falls back to the generic endpoint. Were one injected, it would win over
    ``envFrom``, and the spans and the app's own metrics would go to the resource's collector with the vendor's key:
    none is, so they go to the vendor with it, and the middleware's request logs, which the resource routes, go to
    Loki without it."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor

    key = "Bearer vendor-key-" + secrets.token_hex(4)
    with otlp_receiver() as collectors, otlp_receiver() as vendor:
        deployment = workload()
        api = deployment["spec"]["template"]["spec"]["containers"][1]
        api["envFrom"] = [{"configMapRef": {"name": "otel"}}]
        for signal, optional in (("TRACES", False), ("METRICS", True)):
            selector = {"name": "otel-overrides", "key": signal.lower(), "optional": optional}
            api["env"].append(
                {"name": f"OTEL_EXPORTER_OTLP_{signal}_ENDPOINT", "valueFrom": {"configMapKeyRef": selector}}
            )
        api["env"].append({"name": "OTEL_EXPORTER_OTLP_HEADERS", "value": f"authorization={key}"})
        spec = parse_spec({"selector": {"matchLabels": {"tier": "api"}}, "containers": ["api"]})
        patch = r.build_workload_patch(deployment, r.build_injection(spec, CONFIG, deployment, "chat"), "chat")
        assert patch is not None
        pod_spec = merge_patch(deployment, patch)["spec"]["template"]["spec"]
        configmaps = {"otel": {"OTEL_EXPORTER_OTLP_ENDPOINT": vendor.http_endpoint}, "otel-overrides": {"traces": ""}}
        env = container_env({c["name"]: c for c in pod_spec["containers"]}["api"], POD, configmaps=configmaps)
        assert env["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"] == "" and "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT" not in env
        # The resource's collectors, where any endpoint the operator injects points: here the receiver.
        local = {
            CONFIG.traces_endpoint: collectors.http_endpoint,
            CONFIG.traces_endpoint + "/v1/traces": collectors.http_endpoint + "/v1/traces",
            CONFIG.logs_endpoint.rstrip("/") + "/v1/logs": collectors.http_endpoint + "/v1/logs",
        }
        env = {name: local.get(val, val) for name, val in env.items()}
        env.update(OTEL_BSP_SCHEDULE_DELAY="20", OTEL_BLRP_SCHEDULE_DELAY="20", LLM_TELEMETRY_METRICS_PORT="0")
        with demo_server(env) as (_, base):  # the middleware: its spans and request logs
            openai.OpenAI(base_url=f"{base}/v1", api_key="sk-test").chat.completions.create(
                model="gpt-4o", messages=[{"role": "user", "content": "hi"}]
            )
            assert collectors.wait_for(lambda got: bool(got.logs))
            assert vendor.wait_for(lambda got: bool(got.spans)) or collectors.spans
        with isolated_env(env):  # the app's own SDK: its spans and metrics
            tracers = TracerProvider()
            tracers.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter()))
            meters = MeterProvider(metric_readers=[PeriodicExportingMetricReader(OTLPMetricExporter())])
        tracers.get_tracer("app").start_span("the app's own span").end()
        tracers.shutdown()
        meters.get_meter("app").create_counter("app.requests").add(1)
        meters.shutdown()
        assert collectors.headers and not [h for h in collectors.headers if "authorization" in h], collectors.headers
        assert (collectors.spans, collectors.metric_exports) == ([], 0)
        assert "the app's own span" in [span.name for span in vendor.spans] and vendor.metric_exports == 1
        assert vendor.headers and all(h.get("authorization") == key for h in vendor.headers)
