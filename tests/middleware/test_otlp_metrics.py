"""Metrics pushed over OTLP, as a receiver decodes them: the temporality the standard variable asks for, start times
that cover what the points count, and in delta temporality no points for series that did not change.

The middleware aggregates its sums itself on the default path (a dict update per point, see instruments.py); over
OTLP they must still look like the SDK's synchronous counters: what a collector, or a backend that takes delta sums
only, computes rates from.
"""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from otlp_receiver import MetricPoint, OTLPReceiver, demo_server, otlp_receiver, tracing_env
from support import FRESH, Metrics, free_port, scrape, scrape_text

DELTA, CUMULATIVE = 1, 2
#: OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE -> what the SDK gives its synchronous counters (the OTLP
#: exporter specification: ``lowmemory`` is delta for counters and histograms, cumulative for up-down counters).
COUNTER_TEMPORALITY = {"cumulative": CUMULATIVE, "delta": DELTA, "lowmemory": DELTA}
COUNTERS = ("llm.requests", "llm.tokens")


def chat(base: str, stream: bool) -> None:
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "stream": stream}
    response = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=10)
    assert response.status_code == 200


def points(receiver: OTLPReceiver, name: str, export: int) -> list[MetricPoint]:
    return [p for p in receiver.metrics if p.name == name and p.export == export]


@pytest.mark.parametrize(
    ("preference", "protocol"),
    [("cumulative", "http/protobuf"), ("delta", "http/protobuf"), ("lowmemory", "http/protobuf"), ("delta", "grpc")],
)
def test_counters_over_otlp_are_what_the_sdk_counters_give(preference: str, protocol: str) -> None:
    port = free_port()
    with otlp_receiver() as receiver:
        env = tracing_env(
            receiver,
            protocol,
            LLM_TELEMETRY_METRICS_EXPORTER="prometheus,otlp",
            OTEL_METRIC_EXPORT_INTERVAL="3600000",  # exports only when flushed below
            OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE=preference,
        )
        created = time.time_ns()
        with demo_server(env, metrics_port=port, metrics_host="127.0.0.1") as (app, base):
            chat(base, stream=False)
            chat(base, stream=True)
            chat(base, stream=False)
            # A call is recorded just after its response went out: wait until the third is counted.
            deadline = time.monotonic() + 10
            while Metrics(scrape_text(port, FRESH)).value("llm_requests_total") < 3 and time.monotonic() < deadline:
                time.sleep(0.02)
            counted = time.time_ns()
            provider = app.telemetry.meter_provider
            assert provider.force_flush()  # export 0: the three requests
            assert receiver.wait_for(lambda r: r.metric_exports >= 1)
            assert provider.force_flush()  # export 1: nothing new happened in between
            assert receiver.wait_for(lambda r: r.metric_exports >= 2)

    expected = COUNTER_TEMPORALITY[preference]
    for name in COUNTERS:
        first = points(receiver, name, 0)
        assert first, (name, receiver.metrics)
        for point in first:
            assert point.temporality == expected, (name, point)
            # The interval holds what it counts: it starts before the requests were counted, after the app started.
            assert created <= point.start_ns <= counted < point.time_ns, (name, point, created, counted)
            assert point.value > 0
        later = points(receiver, name, 1)
        if expected == DELTA:
            assert later == [], f"{name}: a delta export repeats series that did not change: {later}"
        else:
            assert [(p.attributes, p.value, p.start_ns) for p in later] == [
                (p.attributes, p.value, p.start_ns) for p in first
            ]
    requests = points(receiver, "llm.requests", 0)
    assert sum(p.value for p in requests) == 3
    # The histograms follow the same preference (the SDK's own under delta, ours under cumulative).
    durations = points(receiver, "gen_ai.server.request.duration", 0)
    assert durations and {p.temporality for p in durations} == {expected}
    assert sum(p.value for p in durations) == 3


def test_a_meter_provider_passed_in_gets_what_its_delta_reader_asks_for() -> None:
    """A provider of the application's own, whose reader wants delta sums: each collection holds what changed since
    the last one, and nothing for a series that did not change."""
    from opentelemetry.sdk.metrics import Counter, Histogram, MeterProvider, ObservableCounter
    from opentelemetry.sdk.metrics.export import AggregationTemporality, InMemoryMetricReader

    from llm_telemetry.demo.app import create_app
    from support import serve

    delta = AggregationTemporality.DELTA
    reader = InMemoryMetricReader(preferred_temporality={Counter: delta, ObservableCounter: delta, Histogram: delta})
    provider = MeterProvider(metric_readers=[reader])
    app = create_app(meter_provider=provider)

    def requests_in(data: object) -> list[tuple[int, float]]:
        found = []
        for resource_metrics in getattr(data, "resource_metrics", None) or ():
            for scope_metrics in resource_metrics.scope_metrics:
                for metric in scope_metrics.metrics:
                    if metric.name == "llm.requests":
                        found += [(metric.data.aggregation_temporality, p.value) for p in metric.data.data_points]
        return found

    counted = 0.0
    try:
        with serve(app) as base:
            for stream in (False, True, False):
                chat(base, stream)
            deadline = time.monotonic() + 10
            while counted < 3 and time.monotonic() < deadline:
                points = requests_in(reader.get_metrics_data())
                assert all(temporality == delta for temporality, _ in points), points
                counted += sum(value for _, value in points)
                time.sleep(0.02)
            assert counted == 3
            assert requests_in(reader.get_metrics_data()) == []
    finally:
        app.telemetry.shutdown()
        provider.shutdown()


def test_a_server_shutting_down_pushes_what_it_counted_since_its_last_export() -> None:
    """A pull scrape misses what a pod counted after its last scrape; an OTLP push does not: the server's lifespan
    shutdown (a rollout's SIGTERM) exports the counts once more before the process exits."""
    from llm_telemetry.demo.app import create_app
    from otlp_receiver import isolated_env
    from support import serve

    with otlp_receiver() as receiver:
        env = tracing_env(receiver, LLM_TELEMETRY_METRICS_EXPORTER="otlp", OTEL_METRIC_EXPORT_INTERVAL="3600000")
        with isolated_env(env):
            app = create_app(metrics_port=0)
            app.telemetry  # noqa: B018 - built while the environment is in place
        try:
            with serve(app) as base:
                for stream in (False, True, False):
                    chat(base, stream)
            # uvicorn has stopped, its lifespan shut down: no flush by the test, no export interval elapsed.
            assert receiver.wait_for(lambda r: any(p.name == "llm.requests" for p in r.metrics), timeout=5)
            assert sum(p.value for p in receiver.metrics if p.name == "llm.requests") == 3
        finally:
            app.telemetry.shutdown()


@pytest.mark.parametrize(
    ("protocol", "refused"),
    [
        ("http/protobuf", {"OTEL_METRIC_EXPORT_INTERVAL": "0"}),  # the SDK's reader refuses an interval of 0
        ("grpc", {"OTEL_EXPORTER_OTLP_METRICS_COMPRESSION": "zip"}),  # its gRPC exporter, a compression it lacks
    ],
    ids=["interval-0", "grpc-compression"],
)
def test_an_otlp_metric_exporter_the_sdk_refuses_leaves_the_setup_failure_counted(
    protocol: str, refused: dict[str, str]
) -> None:
    """docs/metrics.md ("Setup"): a failed setup is shown as ``llm_telemetry_internal_errors_total{...="setup"}``
    where a plain exposition can still be made. With ``prometheus,otlp``, an OTLP metric exporter or reader the SDK
    refuses failed that plain setup too, which asked for the same OTLP push again: the metrics port was not even
    bound, and the alert on the setup failure had nothing to read."""
    port = free_port()
    with otlp_receiver() as receiver:
        env = tracing_env(receiver, protocol, LLM_TELEMETRY_METRICS_EXPORTER="prometheus,otlp", **refused)
        with demo_server(env, metrics_port=port, metrics_host="127.0.0.1") as (_, base):
            client = openai.OpenAI(base_url=f"{base}/v1", api_key="sk-test", max_retries=0)
            answer = client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
            assert answer.choices[0].message.content  # served, unobserved
            metrics = scrape(port)
            assert metrics.value("llm_telemetry_internal_errors_total", llm_telemetry_component="setup") == 1
            assert metrics.value("llm_requests_total") == 0
