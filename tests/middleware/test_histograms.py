"""The latency histograms aggregated by the middleware itself export exactly what the SDK's histograms did.

The same calls go through two pipelines: the SDK's synchronous histograms, and :class:`Histograms` fed to the
same Prometheus reader and OTLP exporter path. The scrapes (text and OpenMetrics, exemplars included) and the
OTLP data points must be the same.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from opentelemetry import context, trace
from opentelemetry.context import Context
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    Histogram,
    MetricExporter,
    MetricExportResult,
    MetricsData,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags
from opentelemetry.trace.propagation import _SPAN_KEY
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics

from llm_telemetry import instruments
from llm_telemetry.exemplars import prometheus_reader
from llm_telemetry.instruments import CARDINALITY_LIMIT, Histograms, create_instruments
from llm_telemetry.labels import LabelLimiter
from llm_telemetry.pricing import PricingTable
from llm_telemetry.record import LLMCall
from llm_telemetry.recorder import MetricsRecorder
from llm_telemetry.telemetry import METER_NAME, HistogramExporter
from llm_telemetry.version import __version__

RESOURCE = Resource({"service.name": "histogram-test"})


class CaptureExporter(MetricExporter):
    def __init__(self) -> None:
        super().__init__()
        self.exported: list[MetricsData] = []

    def export(self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any) -> MetricExportResult:
        self.exported.append(metrics_data)
        return MetricExportResult.SUCCESS

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return True

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        pass


@dataclass
class Pipeline:
    provider: MeterProvider
    registry: CollectorRegistry
    exporter: CaptureExporter
    recorder: MetricsRecorder

    def otlp(self) -> MetricsData:
        self.provider.force_flush()
        return self.exporter.exported[-1]


def pipeline(ours: bool) -> Pipeline:
    registry = CollectorRegistry(auto_describe=True)
    histograms = Histograms(InstrumentationScope(METER_NAME, __version__), RESOURCE) if ours else None
    capture = CaptureExporter()
    exporter: MetricExporter = HistogramExporter(capture, histograms) if histograms is not None else capture
    otlp = PeriodicExportingMetricReader(exporter, export_interval_millis=math.inf)
    provider = MeterProvider(metric_readers=[prometheus_reader(registry, histograms), otlp], resource=RESOURCE)
    meter = provider.get_meter(METER_NAME, __version__)
    ins = create_instruments(meter, summed=True, histograms=histograms)
    return Pipeline(provider, registry, capture, MetricsRecorder(ins, PricingTable(), LabelLimiter(100)))


@pytest.fixture
def pair() -> Iterator[tuple[Pipeline, Pipeline]]:
    sdk, ours = pipeline(False), pipeline(True)
    yield sdk, ours
    sdk.provider.shutdown()
    ours.provider.shutdown()


def sampled(trace_id: int, span_id: int, flags: int = TraceFlags.SAMPLED) -> Any:
    context = SpanContext(trace_id, span_id, is_remote=False, trace_flags=TraceFlags(flags))
    return trace.set_span_in_context(NonRecordingSpan(context))


def calls(seed: int) -> list[LLMCall]:
    """Varied calls: streams and not, failures, attribution, values on and past bucket bounds, spans or not."""
    out = []
    for i, (duration, ttft, output_tokens) in enumerate(
        [(0.3, 0.05, 12), (0.01, 0.001, 2), (5.12, 0.25, 64), (900.0, 11.0, 3), (0.0, 0.0, 1), (0.7, None, None)]
    ):
        call = LLMCall("chat", "openai", 100.0, request_model=f"m{(i + seed) % 3}", response_model="r")
        call.stream = i % 2 == 0
        call.end = 100.0 + duration
        call.first_token_at = None if ttft is None else 100.0 + ttft
        call.input_tokens, call.output_tokens = 5, output_tokens
        if i == 3:
            call.error_type, call.status_code = "rate_limit", 429
        if i % 3 == 0:
            call.attribution = {"tenant": "acme"}
        if i != 1:  # one call records with no span at all; one with a span that is not sampled
            call.otel_context = sampled(
                1000 + i + seed * 10, 7 + i, TraceFlags.DEFAULT if i == 4 else TraceFlags.SAMPLED
            )
        out.append(call)
    return out


def record(pair: tuple[Pipeline, Pipeline], batch: list[LLMCall]) -> None:
    for p in pair:
        for call in batch:
            p.recorder.start(call)
            p.recorder.end(call)


def openmetrics(registry: CollectorRegistry) -> list[tuple[str, dict[str, str], float, Any]]:
    """Every sample with its exemplar's labels and value (exemplar timestamps are each pipeline's own clock)."""
    return [
        (s.name, s.labels, s.value, (s.exemplar.labels, s.exemplar.value) if s.exemplar else None)
        for f in parse_openmetrics(generate_openmetrics(registry).decode())
        for s in f.samples
    ]


def histogram_points(data: MetricsData) -> dict[str, Any]:
    found = {}
    for rm in data.resource_metrics:
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                if isinstance(m.data, Histogram):
                    found[m.name] = (
                        sm.scope,
                        m.unit,
                        m.description,
                        m.data.aggregation_temporality,
                        [
                            (
                                dict(p.attributes or {}),
                                p.count,
                                p.sum,
                                list(p.bucket_counts),
                                list(p.explicit_bounds),
                                p.min,
                                p.max,
                                [(e.value, e.trace_id, e.span_id, e.filtered_attributes) for e in p.exemplars],
                            )
                            for p in m.data.data_points
                        ],
                    )
    return found


def test_scrapes_and_otlp_points_are_those_of_the_sdk_histograms(pair: tuple[Pipeline, Pipeline]) -> None:
    sdk, ours = pair
    record(pair, calls(0))
    text = generate_latest(ours.registry)
    assert text == generate_latest(sdk.registry)
    assert b"gen_ai_server_time_per_output_token_seconds_bucket" in text and b'error_type="rate_limit"' in text
    om = openmetrics(ours.registry)
    assert om == openmetrics(sdk.registry)
    with_exemplars = {name for name, _, _, exemplar in om if exemplar}
    assert {f"{spec.prometheus_name}_bucket" for spec in instruments.LATENCY_HISTOGRAMS} <= with_exemplars
    first = histogram_points(ours.otlp())
    assert first == histogram_points(sdk.otlp())
    assert any(e for *_, exemplars in first[instruments.GEN_AI_SERVER_REQUEST_DURATION][4] for e in exemplars)

    # A second collection: the counts go on, each exemplar is handed to an exporter once (as an SDK reservoir).
    record(pair, calls(1)[:2])
    assert generate_latest(ours.registry) == generate_latest(sdk.registry)
    assert openmetrics(ours.registry) == openmetrics(sdk.registry)
    assert histogram_points(ours.otlp()) == histogram_points(sdk.otlp())


def test_attribute_sets_past_the_limit_go_to_the_overflow_series_like_the_sdk(pair: tuple[Pipeline, Pipeline]) -> None:
    sdk, ours = pair
    for p in pair:
        p.recorder.instruments.requests.add(1)  # the SDK hands a reader nothing at all when it holds no metric
        histogram = p.recorder.instruments.request_duration
        for i in range(CARDINALITY_LIMIT + 5):
            histogram.record(0.1 * (i % 7), {"gen_ai.request.model": f"m{i}"})
    text = generate_latest(ours.registry)
    assert text == generate_latest(sdk.registry)
    assert text.count(b'otel_metric_overflow="true"') == len(instruments.REQUEST_DURATION_BUCKETS) + 3


def test_negative_and_non_finite_values_are_dropped_like_the_sdk(pair: tuple[Pipeline, Pipeline]) -> None:
    sdk, ours = pair
    for p in pair:
        p.recorder.instruments.requests.add(1)
        histogram = p.recorder.instruments.time_to_first_token
        for value in (-1.0, math.nan, math.inf, 0.5):
            histogram.record(value, {"gen_ai.request.model": "m"})
    assert generate_latest(ours.registry) == generate_latest(sdk.registry)
    assert b'gen_ai_server_time_to_first_token_seconds_count{gen_ai_request_model="m"' in generate_latest(ours.registry)


@pytest.mark.parametrize(("preference", "own"), [("cumulative", True), ("delta", False), ("lowmemory", False)])
def test_an_otlp_exporter_that_wants_delta_histograms_keeps_the_sdk_ones(
    monkeypatch: pytest.MonkeyPatch, preference: str, own: bool
) -> None:
    """Delta temporality is the SDK's to compute: then the histograms stay the SDK's own, for both exporters."""
    from llm_telemetry.config import Settings
    from llm_telemetry.instruments import BucketHistogram
    from llm_telemetry.telemetry import Telemetry

    monkeypatch.setenv("OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE", preference)
    monkeypatch.setenv("OTEL_METRIC_EXPORT_INTERVAL", "3600000")
    settings = Settings.resolve(metrics_port=0, metrics_exporters=("prometheus", "otlp"), multiproc_dir="off")
    telemetry = Telemetry(settings)
    try:
        assert (telemetry.histograms is not None) == own
        assert isinstance(telemetry.instruments.request_duration, BucketHistogram) == own
    finally:
        telemetry.shutdown()


def test_exponential_histograms_for_otlp_keep_the_sdk_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    from llm_telemetry.config import Settings
    from llm_telemetry.telemetry import Telemetry

    monkeypatch.setenv("OTEL_EXPORTER_OTLP_METRICS_DEFAULT_HISTOGRAM_AGGREGATION", "base2_exponential_bucket_histogram")
    monkeypatch.setenv("OTEL_METRIC_EXPORT_INTERVAL", "3600000")
    telemetry = Telemetry(Settings.resolve(metrics_port=0, metrics_exporters=("otlp",), multiproc_dir="off"))
    try:
        assert telemetry.histograms is None
    finally:
        telemetry.shutdown()


class _OwnSpanContext(SpanContext):
    """A SpanContext of a type of its own (read through its properties, not as the SDK's tuple)."""


def test_exemplars_follow_the_span_of_any_record_context_like_the_sdk(pair: tuple[Pipeline, Pipeline]) -> None:
    """Whatever the record's context holds, an exemplar is left (with the span's ids) exactly when the SDK's
    trace_based filter leaves one: no context (the current one's span then), an empty one, a value under the span
    key that is not a span, flags with other bits set or only those, a span context of another type."""
    own = _OwnSpanContext(4001, 41, is_remote=False, trace_flags=TraceFlags(TraceFlags.SAMPLED))
    contexts = [
        None,
        Context(),
        Context({_SPAN_KEY: "not a span"}),
        sampled(4002, 42, 0x03),
        sampled(4003, 43, 0x02),
        trace.set_span_in_context(NonRecordingSpan(own)),
        sampled(4004, 44),
    ]
    batch = calls(0)[: len(contexts)] + calls(1)[: len(contexts)]
    for i, call in enumerate(batch):
        call.otel_context = contexts[i % len(contexts)]
    current = context.attach(sampled(4005, 45))  # what a record with no context of its own links to
    try:
        record(pair, batch)
    finally:
        context.detach(current)
    sdk, ours = pair
    om = openmetrics(ours.registry)
    assert om == openmetrics(sdk.registry)
    linked = {e[0]["trace_id"] for *_, e in om if e}
    assert {f"{t:032x}" for t in (4001, 4002, 4004, 4005)} <= linked
    assert not {f"{t:032x}" for t in (4003,)} & linked
    assert histogram_points(ours.otlp()) == histogram_points(sdk.otlp())


@pytest.mark.parametrize("exemplar_filter", ["trace_based", "always_on"])
def test_a_record_with_an_empty_context_links_the_current_span_like_the_sdk(
    monkeypatch: pytest.MonkeyPatch, exemplar_filter: str
) -> None:
    monkeypatch.setenv("OTEL_METRICS_EXEMPLAR_FILTER", exemplar_filter)
    sdk, ours = pipeline(False), pipeline(True)
    call = calls(0)[0]
    call.otel_context = Context()
    current = context.attach(sampled(4006, 46))
    try:
        for p in (sdk, ours):
            p.recorder.start(call)
            p.recorder.end(call)
            p.recorder.instruments.request_duration.record(0.5, {"gen_ai.request.model": "m"}, context=Context())
    finally:
        context.detach(current)
    try:
        om = openmetrics(ours.registry)
        assert om == openmetrics(sdk.registry)
        assert sum(1 for *_, e in om if e and e[0]["trace_id"] == f"{4006:032x}") >= 4
    finally:
        sdk.provider.shutdown()
        ours.provider.shutdown()
