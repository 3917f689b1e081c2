"""Exemplars: latency histogram buckets carry the LLM span's trace id in a real OpenMetrics scrape."""

from __future__ import annotations

import json
import math
import pathlib
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from typing import Any

import openai
import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics

from llm_telemetry.monitoring.dashboards import build_dashboard
from otlp_receiver import OTLPReceiver, demo_server, otlp_receiver, tracing_env, wait_span
from support import FRESH, RECORDED_WITHIN, Metrics, free_port, scrape_text, settled, stop_process, wait_for

OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"
DURATION = "gen_ai_server_request_duration_seconds_bucket"
TTFT = "gen_ai_server_time_to_first_token_seconds_bucket"
TPOT = "gen_ai_server_time_per_output_token_seconds_bucket"


def exemplars(text: str, sample_name: str) -> list[tuple[dict[str, str], Any]]:
    """(bucket labels, exemplar) for every bucket sample of ``sample_name`` that has one."""
    return [
        (dict(s.labels), s.exemplar)
        for family in parse_openmetrics(text)
        for s in family.samples
        if s.name == sample_name and s.exemplar is not None
    ]


def bucket_bounds(text: str, sample_name: str, labels: dict[str, str]) -> list[float]:
    rest = {k: v for k, v in labels.items() if k != "le"}
    return sorted(
        float(s.labels["le"])
        for family in parse_openmetrics(text)
        for s in family.samples
        if s.name == sample_name and {k: v for k, v in s.labels.items() if k != "le"} == rest
    )


def stream_chat(base: str, model: str, request_id: str, **headers: str) -> None:
    sdk = openai.OpenAI(base_url=base + "/v1", api_key="sk-test", max_retries=0)
    for _ in sdk.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        extra_headers={"x-request-id": request_id, **headers},
    ):
        pass


@pytest.fixture(scope="module")
def receiver() -> Iterator[OTLPReceiver]:
    with otlp_receiver() as r:
        yield r


def test_latency_buckets_carry_the_trace_id_in_openmetrics(receiver: OTLPReceiver) -> None:
    port = free_port()
    env = tracing_env(receiver, OTEL_SERVICE_NAME="llm-exemplars")
    with demo_server(env, metrics_port=port, metrics_host="127.0.0.1", token_delay=0.001) as (_, base):
        started = time.time()
        stream_chat(base, "gpt-4o", "ex-1")
        stream_chat(base, "gpt-4o-mini", "ex-2")
        # A failed request: its duration series carries error_type, the others don't, so the exporter pads
        # their label lists with error_type="". Every series must keep its exemplars all the same.
        with pytest.raises(openai.RateLimitError):
            stream_chat(base, "gpt-4o-limited", "ex-3", **{"x-demo-fail": "rate_limit"})
        # A call is recorded just after its response went out: wait for the third.
        deadline = time.monotonic() + 10
        while Metrics(scrape_text(port, FRESH)).value("llm_requests_total") < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        # A text-format scrape first: it resets the SDK's reservoirs, yet the exemplars must survive it.
        text = scrape_text(port, FRESH)
        assert "trace_id" not in text  # the classic text format has no exemplars
        om = scrape_text(port, accept=OPENMETRICS)
        again = scrape_text(port, "/metrics?again", accept=OPENMETRICS)  # rendered afresh, not the one just made
        scraped = time.time()

    assert 'error_type=""' in om, "the scrape should mix label sets (padded error_type) to test the matching"
    spans = {rid: wait_span(receiver, **{"llm.request_id": rid}) for rid in ("ex-1", "ex-2", "ex-3")}
    expected = {
        DURATION: {"gpt-4o": "ex-1", "gpt-4o-mini": "ex-2", "gpt-4o-limited": "ex-3"},
        TTFT: {"gpt-4o": "ex-1", "gpt-4o-mini": "ex-2"},
        TPOT: {"gpt-4o": "ex-1", "gpt-4o-mini": "ex-2"},
    }
    for name, request_ids in expected.items():
        found = exemplars(om, name)
        by_model = {labels["gen_ai_request_model"]: (labels, ex) for labels, ex in found}
        assert set(by_model) == set(request_ids), (name, found)
        for model, rid in request_ids.items():
            labels, exemplar = by_model[model]
            span = spans[rid]
            assert exemplar.labels == {"trace_id": span.trace_id, "span_id": span.span_id}
            # The exemplar sits in the bucket its value falls in: above the previous bound, at most this one.
            bounds = bucket_bounds(om, name, labels)
            upper = float(labels["le"])
            lower = max((b for b in bounds if b < upper), default=-math.inf)
            assert lower < exemplar.value <= upper
            # Stamped when the call was recorded (whole seconds of slack: a bound on the wall clock, not a timing).
            assert exemplar.timestamp is not None and int(started) <= float(exemplar.timestamp) <= scraped + 1
    assert by_model_error_type(om, "gpt-4o-limited") == "rate_limit"
    # Kept until a newer measurement replaces them: a second scrape shows the same ones.
    assert exemplars(again, DURATION) == exemplars(om, DURATION)
    # Only the latency histograms carry them.
    assert all(s.exemplar is None for f in parse_openmetrics(om) if f.type != "histogram" for s in f.samples)


def by_model_error_type(text: str, model: str) -> str:
    (labels, _), *_ = [(lb, ex) for lb, ex in exemplars(text, DURATION) if lb["gen_ai_request_model"] == model]
    return labels["error_type"]


def test_no_exemplars_without_a_sampled_span(receiver: OTLPReceiver) -> None:
    port = free_port()
    for env in ({}, tracing_env(receiver, OTEL_TRACES_SAMPLER="always_off")):
        with demo_server(env, metrics_port=port, metrics_host="127.0.0.1") as (_, base):
            stream_chat(base, "gpt-4o", "ex-none")
            # The call is recorded just after its response went out: wait for it.
            deadline = time.monotonic() + 10
            while Metrics(scrape_text(port, FRESH)).value("llm_requests_total") < 1 and time.monotonic() < deadline:
                time.sleep(0.02)
            om = scrape_text(port, accept=OPENMETRICS)
        assert "gen_ai_server_request_duration_seconds_bucket" in om
        assert exemplars(om, DURATION) == [] and exemplars(om, TTFT) == []


def recorded_once(metrics: Metrics) -> None:
    assert metrics.value("gen_ai_server_time_per_output_token_seconds_count") == 1


@pytest.mark.parametrize(("exemplar_filter", "kept"), [("trace_based", False), ("always_on", True)])
def test_always_on_leaves_exemplars_of_a_trace_not_sampled(
    receiver: OTLPReceiver, exemplar_filter: str, kept: bool
) -> None:
    """OTEL_METRICS_EXEMPLAR_FILTER=always_on: a call in a trace its caller did not sample (traceparent flags 00)
    leaves an exemplar in each latency histogram, with that trace's id and the call's own span id; the default
    trace_based filter leaves none."""
    trace_id, parent = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    port = free_port()
    env = tracing_env(receiver, OTEL_METRICS_EXEMPLAR_FILTER=exemplar_filter)
    with demo_server(env, metrics_port=port, metrics_host="127.0.0.1", token_delay=0.001) as (_, base):
        stream_chat(base, "gpt-4o", "ex-unsampled", traceparent=f"00-{trace_id}-{parent}-00")
        settled(port, recorded_once, seconds=RECORDED_WITHIN)
        om = scrape_text(port, "/metrics?fresh", accept=OPENMETRICS)
    found = {name: exemplars(om, name) for name in (DURATION, TTFT, TPOT)}
    assert all(f"{name}{{" in om for name in found)
    if not kept:
        assert found == {DURATION: [], TTFT: [], TPOT: []}
        return
    for name, buckets in found.items():
        assert len(buckets) == 1, (name, buckets)
        ((labels, exemplar),) = buckets
        assert labels["gen_ai_request_model"] == "gpt-4o"
        assert exemplar.labels["trace_id"] == trace_id
        assert re.fullmatch(r"[0-9a-f]{16}", exemplar.labels["span_id"]) and exemplar.labels["span_id"] != parent


PROMETHEUS = shutil.which("prometheus")


@pytest.mark.skipif(
    PROMETHEUS is None, reason="the prometheus server binary is not installed (Debian package prometheus)"
)
def test_a_real_prometheus_keeps_them_for_the_dashboards_latency_panels(
    receiver: OTLPReceiver, tmp_path: pathlib.Path
) -> None:
    """Prometheus with exemplar storage scrapes the middleware (negotiating OpenMetrics itself) and answers the
    exemplar queries Grafana sends for each latency panel that shows them: every dot is one of our spans."""
    assert PROMETHEUS is not None
    metrics_port, web_port = free_port(), free_port()
    (tmp_path / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s}\n"
        f"scrape_configs: [{{job_name: llm, static_configs: [{{targets: ['127.0.0.1:{metrics_port}']}}]}}]\n"
    )
    command = [
        PROMETHEUS, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'data'}",
        f"--web.listen-address=127.0.0.1:{web_port}", "--enable-feature=exemplar-storage",
    ]  # fmt: skip
    env = tracing_env(receiver, OTEL_SERVICE_NAME="llm-exemplars-prometheus")
    start = time.time() - 60
    with open(tmp_path / "prometheus.log", "wb") as log:
        prometheus = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        with demo_server(env, metrics_port=metrics_port, metrics_host="127.0.0.1", token_delay=0.001) as (_, base):
            request_ids = {"gpt-4o": ["pe-1", "pe-2"], "gpt-4o-mini": ["pe-3"]}
            for model, ids in request_ids.items():
                for rid in ids:
                    stream_chat(base, model, rid)
            spans = {rid: wait_span(receiver, **{"llm.request_id": rid}) for ids in request_ids.values() for rid in ids}
            trace_ids = {model: {spans[rid].trace_id for rid in ids} for model, ids in request_ids.items()}

            def exemplars_of(expr: str) -> list[dict[str, Any]]:
                query = urllib.parse.urlencode({"query": expr, "start": start, "end": time.time() + 60})
                url = f"http://127.0.0.1:{web_port}/api/v1/query_exemplars?{query}"
                with urllib.request.urlopen(url, timeout=10) as response:
                    body = json.loads(response.read())
                assert body["status"] == "success", body
                return [
                    dict(series["seriesLabels"], **e["labels"]) for series in body["data"] for e in series["exemplars"]
                ]

            dashboard = build_dashboard()
            targets = [
                (panel["title"], target["expr"].replace("$__rate_interval", "1m"))
                for panel in dashboard["panels"]
                for target in panel.get("targets", [])
                if target.get("exemplar")
            ]
            assert len(targets) == 3 * 3 + 2  # three quantiles on three panels, and two heatmaps
            for title, expr in targets:
                expr = re.sub(r"\$\w+", ".*", expr)  # every variable at All
                found = wait_for(f"exemplars for {title}", lambda: exemplars_of(expr))  # noqa: B023
                for exemplar in found:
                    assert exemplar["job"] == "llm"
                    assert exemplar["trace_id"] in trace_ids[exemplar["gen_ai_request_model"]], (title, exemplar)
                    assert len(exemplar["span_id"]) == 16
    finally:
        stop_process(prometheus)


@pytest.mark.parametrize("exemplar_filter", ["trace_based", "always_on"])
def test_the_exemplar_is_the_calls_span_when_another_span_is_current_as_it_is_recorded(
    receiver: OTLPReceiver, exemplar_filter: str
) -> None:
    """A call is recorded as its answer's last message goes out, inside the app's ``send``. OpenTelemetry's ASGI
    middleware placed inside ours makes a span of its own current around each ``send`` it passes on: the exemplar
    still names the call's LLM span, with either filter, not that ``http send`` span (its child)."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from llm_telemetry import LLMTelemetryMiddleware
    from otlp_receiver import isolated_env
    from support import serve

    async def chat(request: Request) -> JSONResponse:
        choice = {"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}
        usage = {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}
        answer = {"id": "c", "object": "chat.completion", "created": 0, "model": "gpt-4o", "choices": [choice]}
        return JSONResponse({**answer, "usage": usage})

    provider = TracerProvider(resource=Resource.create({"service.name": f"llm-exemplar-inner-{exemplar_filter}"}))
    provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=receiver.http_endpoint + "/v1/traces")))
    inner = OpenTelemetryMiddleware(
        Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])]), tracer_provider=provider
    )
    with isolated_env({"OTEL_METRICS_EXEMPLAR_FILTER": exemplar_filter}):
        app = LLMTelemetryMiddleware(
            inner, metrics_port=0, metrics_app_path="/metrics", tracer_provider=provider, request_logs=False
        )
        app.telemetry  # noqa: B018 - built while the environment is in place
    rid = f"ex-inner-{exemplar_filter}"

    def recorded(metrics: Metrics) -> None:
        assert metrics.value("llm_requests_total") == 1

    try:
        with serve(app) as base:
            sdk = openai.OpenAI(base_url=base + "/v1", api_key="sk-test", max_retries=0)
            sdk.chat.completions.create(
                model="gpt-4o", messages=[{"role": "user", "content": "hi"}], extra_headers={"x-request-id": rid}
            )
            port = int(base.rsplit(":", 1)[1])
            settled(port, recorded, seconds=RECORDED_WITHIN)
            om = scrape_text(port, "/metrics?fresh", accept=OPENMETRICS)
    finally:
        app.telemetry.shutdown()
        provider.shutdown()
    span = wait_span(receiver, **{"llm.request_id": rid})
    # The app's own spans were current as the answer went out: they are children of the LLM span.
    assert any(s.parent_span_id == span.span_id for s in receiver.spans)
    ((labels, exemplar),) = exemplars(om, DURATION)
    assert labels["gen_ai_request_model"] == "gpt-4o"
    assert exemplar.labels == {"trace_id": span.trace_id, "span_id": span.span_id}
