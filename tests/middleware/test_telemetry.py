"""Where the metrics go: a global SDK MeterProvider installed first, an explicit one, and OTEL_SDK_DISABLED."""

from __future__ import annotations

import logging
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
from typing import Any

import openai
import pytest
from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics

from llm_telemetry.config import Settings
from llm_telemetry.logs import REQUEST_LOGGER, OTLPLogHandler
from llm_telemetry.record import LLMCall
from llm_telemetry.telemetry import Telemetry
from support import Metrics, free_port, scrape, scrape_text, whole_after

#: Installs a global SDK MeterProvider first, as ``opentelemetry-instrument`` does, then serves the demo LLM
#: wrapped in the middleware under uvicorn. Run in its own interpreter: a global provider can be set only once.
GLOBAL_PROVIDER_APP = textwrap.dedent(
    """
    import logging, sys
    from opentelemetry import metrics
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    metrics.set_meter_provider(MeterProvider(metric_readers=[InMemoryMetricReader()]))
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)

    import uvicorn
    from llm_telemetry.demo.app import create_app

    app = create_app(metrics_port=int(sys.argv[1]), metrics_host="127.0.0.1")
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[2]), log_level="warning")
    """
)


def _wait_for_port(port: int, process: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 30
    while True:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"the app did not start: {process.communicate()[1]}")
        time.sleep(0.05)


def test_global_sdk_meter_provider_installed_first_still_leaves_our_metrics_on_the_port() -> None:
    metrics_port, app_port = free_port(), free_port()
    process = subprocess.Popen(
        [sys.executable, "-c", GLOBAL_PROVIDER_APP, str(metrics_port), str(app_port)],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    try:
        _wait_for_port(app_port, process)
        sdk = openai.OpenAI(base_url=f"http://127.0.0.1:{app_port}/v1", api_key="sk-test", max_retries=0)
        sdk.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "two words"}])
        deadline = time.monotonic() + 10
        metrics = Metrics("")
        while time.monotonic() < deadline:
            try:
                metrics = scrape(metrics_port)
            except urllib.error.URLError:
                pass
            if metrics.value("llm_requests_total", gen_ai_request_model="gpt-4o") == 1:
                break
            time.sleep(0.05)
        assert metrics.value("llm_requests_total", gen_ai_request_model="gpt-4o") == 1
        metrics = whole_after(metrics_port)
        assert metrics.value("llm_tokens_total", gen_ai_request_model="gpt-4o", gen_ai_token_type="input") == 2
    finally:
        process.terminate()
        _, stderr = process.communicate(timeout=20)
    # Said once, with why and how to route the metrics through the global provider instead.
    assert stderr.count("a global OpenTelemetry SDK MeterProvider is installed") == 1, stderr
    assert "LLM_TELEMETRY_METRICS_EXPORTER=prometheus,otlp" in stderr and "meter_provider=" in stderr


def test_otel_sdk_disabled_means_no_metrics_traces_or_otlp_logs(caplog: pytest.LogCaptureFixture) -> None:
    port = free_port()
    env = {
        "OTEL_SDK_DISABLED": "true",
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9",
        "OTEL_LOGS_EXPORTER": "otlp",
    }
    settings = Settings.resolve(env={}, metrics_port=port, metrics_host="127.0.0.1")
    with caplog.at_level(logging.WARNING, logger="llm_telemetry"):
        telemetry = Telemetry(settings, env=env)
        telemetry.start_server()
    try:
        assert telemetry.tracing is None
        handlers = logging.getLogger(REQUEST_LOGGER).handlers
        assert handlers and not any(isinstance(h, OTLPLogHandler) for h in handlers)  # stdout lines only
        assert telemetry.settings.metrics_exporters == ()
        with pytest.raises(urllib.error.URLError):
            scrape_text(port)  # nothing listens
        assert any("OTEL_SDK_DISABLED=true" in r.getMessage() for r in caplog.records)
    finally:
        telemetry.shutdown()


def test_explicit_meter_provider_gets_the_metrics_and_no_listener_is_bound() -> None:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    from llm_telemetry.record import LLMCall

    reader = InMemoryMetricReader()
    port = free_port()
    telemetry = Telemetry(
        Settings.resolve(env={}, metrics_port=port, metrics_host="127.0.0.1", request_logs=False),
        MeterProvider(metric_readers=[reader]),
        env={},
    )
    try:
        telemetry.start_server()
        call = LLMCall("chat", "openai", 0.0, request_model="m", input_tokens=3, output_tokens=2, end=0.5)
        telemetry.recorder.start(call)
        telemetry.recorder.end(call)
        data = reader.get_metrics_data()
        assert data is not None
        names = {m.name for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics}
        assert {"llm.requests", "llm.tokens", "gen_ai.server.request.duration"} <= names
        with pytest.raises(urllib.error.URLError):
            scrape_text(port)
    finally:
        telemetry.shutdown()


def test_a_scrape_on_the_apps_own_port_is_encoded_off_its_event_loop() -> None:
    """The exposition takes about a millisecond per label combination: on the event loop, every scrape of
    ``metrics_app_path`` would stop the app's requests and streams for that long. The registry is collected in
    another thread than the one the app's requests run on (benchmarks/scrape_stall.py measures the stall)."""
    import threading
    import urllib.request

    from prometheus_client.registry import Collector

    from llm_telemetry import LLMTelemetryMiddleware
    from support import serve

    threads: dict[str, int] = {}

    async def ping(scope: dict[str, object], receive: object, send: Any) -> None:
        threads["app"] = threading.get_ident()
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    class Probe(Collector):
        def collect(self) -> Any:
            threads["scrape"] = threading.get_ident()
            return []

    app = LLMTelemetryMiddleware(ping, metrics_port=0, metrics_app_path="/metrics", request_logs=False)
    try:
        with serve(app) as base:
            urllib.request.urlopen(base + "/ping", timeout=10).close()
            app.telemetry.registry.register(Probe())
            scrape_text(int(base.rsplit(":", 1)[1]))
    finally:
        app.telemetry.shutdown()
    assert threads["scrape"] != threads["app"]


@pytest.mark.parametrize(("env", "kept"), [({}, True), ({"OTEL_METRICS_EXEMPLAR_FILTER": "always_off"}, False)])
def test_the_exemplar_filter_comes_from_the_environment_given(env: dict[str, str], kept: bool) -> None:
    """OTEL_METRICS_EXEMPLAR_FILTER is read with the other OTEL_* variables, from the mapping the telemetry is
    built with (here, not the process environment): always_off leaves a sampled call's buckets without exemplars."""
    port = free_port()
    settings = Settings.resolve(env={}, metrics_port=port, metrics_host="127.0.0.1")
    telemetry = Telemetry(settings, env=env)
    telemetry.start_server()
    try:
        call = LLMCall("chat", "openai", 100.0, request_model="gpt-4o", response_model="gpt-4o")
        call.stream, call.end, call.first_token_at = True, 100.4, 100.1
        call.input_tokens, call.output_tokens = 5, 9
        span = NonRecordingSpan(SpanContext(0xABC, 0xDEF, is_remote=False, trace_flags=TraceFlags(TraceFlags.SAMPLED)))
        call.otel_context = trace.set_span_in_context(span)
        telemetry.recorder.start(call)
        telemetry.recorder.end(call)
        om = scrape_text(port, accept="application/openmetrics-text; version=1.0.0; charset=utf-8")
    finally:
        telemetry.shutdown()
    found = [
        s.exemplar
        for family in parse_openmetrics(om)
        for s in family.samples
        if s.name == "gen_ai_server_request_duration_seconds_bucket" and s.exemplar is not None
    ]
    assert "gen_ai_server_request_duration_seconds_bucket" in om
    assert [e.labels["trace_id"] for e in found] == (["00000000000000000000000000000abc"] if kept else [])
