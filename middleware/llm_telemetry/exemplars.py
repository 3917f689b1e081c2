"""Exemplars on the Prometheus endpoint: the trace id of a recent request in each latency histogram bucket.

The histograms sample exemplars as the OpenTelemetry SDK does (with the default ``trace_based`` filter, one per
bucket from measurements recorded inside a sampled span; the recorder passes the LLM span's context), whether
they are the SDK's own or the middleware's :class:`~llm_telemetry.instruments.BucketHistogram`. The
OpenTelemetry Prometheus exporter drops them when it translates to Prometheus families (opentelemetry-python
#4178 is open). This module closes the gap for the single-process endpoint:

- :class:`ExemplarPrometheusReader` is the exporter's reader that also keeps, from each collection, the newest
  exemplar per (histogram, label set, bucket). Keeping them across collections matters: a collection hands out
  only the exemplars sampled since the previous one (as the SDK's reservoirs, which reset), so a text-format
  scrape would otherwise steal the exemplars of the next OpenMetrics scrape. It also adds the middleware's own
  histograms to each collection (:class:`~llm_telemetry.instruments.HistogramFeed`).
- :class:`ExemplarCollector` wraps the exporter's collector and attaches those exemplars to the ``_bucket``
  samples, which prometheus_client writes only in the OpenMetrics format (``Accept: application/openmetrics-text``).

Exemplar labels are ``trace_id`` (32 hex digits) and ``span_id`` (16), the names Grafana's exemplar links use.
Only :data:`EXEMPLAR_HISTOGRAMS` (the latency histograms) carry them, whatever labels their neighbours have.
Multi-worker (merged) exposition is not covered here.
"""

from __future__ import annotations

import re
import threading
from bisect import bisect_left
from collections.abc import Iterable, Iterator
from typing import Any, Final

from opentelemetry.exporter.prometheus import PrometheusMetricReader
from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric
from prometheus_client.samples import Exemplar

from . import instruments as names
from .instruments import Histograms, observed_cardinality_limits

#: OpenTelemetry names of the histograms whose buckets carry exemplars: every latency histogram of the contract.
EXEMPLAR_HISTOGRAMS: Final = tuple(spec.name for spec in names.LATENCY_HISTOGRAMS)

_INVALID: Final = re.compile(r"[^a-zA-Z0-9_]")
_LabelKey = tuple[tuple[str, str], ...]


def _sanitize(name: str) -> str:
    return _INVALID.sub("_", name)


def _series_key(labels: Iterable[tuple[str, str]]) -> _LabelKey:
    """A series' identity as Prometheus sees it: sorted labels, empty values left out.

    The OpenTelemetry exporter writes one label list per metric family, the union over its points, and pads
    the labels a point lacks with "" (a successful request has no ``error_type`` while a failed one has). For
    Prometheus an empty label is an absent one, so both sides of the match drop them; matching the padded
    sample labels against the point's own attributes is what lost every exemplar once one request failed.
    """
    return tuple(sorted((k, v) for k, v in labels if v != "" and k != "le" and not k.startswith("otel_scope_")))


class ExemplarStore:
    """The newest exemplar per (histogram, label set, bucket upper bound), kept across collections.

    Args:
        histograms: OpenTelemetry names of the histograms to keep exemplars for.

    Its size is bounded by the series the histograms have (label values are bounded) times their buckets.
    """

    def __init__(self, histograms: Iterable[str] = EXEMPLAR_HISTOGRAMS) -> None:
        self._names = {name: _sanitize(name) for name in histograms}
        self._latest: dict[tuple[str, _LabelKey, float], Exemplar] = {}
        self._lock = threading.Lock()

    def update(self, metrics_data: Any) -> None:
        """Take the exemplars of one OpenTelemetry collection (``MetricsData``)."""
        from opentelemetry.sdk.metrics.export import Histogram

        found: dict[tuple[str, _LabelKey, float], Exemplar] = {}
        for resource_metrics in metrics_data.resource_metrics:
            for scope_metrics in resource_metrics.scope_metrics:
                for metric in scope_metrics.metrics:
                    family = self._names.get(metric.name)
                    if family is None or not isinstance(metric.data, Histogram):
                        continue
                    for point in metric.data.data_points:
                        if not point.exemplars:
                            continue
                        labels = _series_key((_sanitize(k), str(v)) for k, v in (point.attributes or {}).items())
                        bounds = point.explicit_bounds
                        for exemplar in point.exemplars:
                            if not exemplar.trace_id or not exemplar.span_id:
                                continue
                            index = bisect_left(bounds, exemplar.value)
                            upper = float(bounds[index]) if index < len(bounds) else float("inf")
                            found[(family, labels, upper)] = Exemplar(
                                {"trace_id": f"{exemplar.trace_id:032x}", "span_id": f"{exemplar.span_id:016x}"},
                                exemplar.value,
                                exemplar.time_unix_nano / 1e9,
                            )
        if found:
            with self._lock:
                self._latest.update(found)

    def annotate(self, families: Iterable[Metric]) -> Iterator[Metric]:
        """Attach kept exemplars to the ``_bucket`` samples of matching histogram families."""
        with self._lock:
            latest = dict(self._latest)
        for family in families:
            if latest and family.type == "histogram":
                target = next(
                    (s for s in self._names.values() if family.name == s or family.name.startswith(s + "_")), None
                )
                if target is not None:
                    self._attach(family, target, latest)
            yield family

    @staticmethod
    def _attach(family: Metric, target: str, latest: dict[tuple[str, _LabelKey, float], Exemplar]) -> None:
        for i, sample in enumerate(family.samples):
            if not sample.name.endswith("_bucket") or sample.exemplar is not None:
                continue
            labels = _series_key(sample.labels.items())
            exemplar = latest.get((target, labels, float(sample.labels["le"])))
            if exemplar is not None:
                family.samples[i] = sample._replace(exemplar=exemplar)


class ExemplarCollector:
    """A prometheus_client collector: the families of ``inner`` with exemplars from ``store`` attached.

    Args:
        inner: the registry the OpenTelemetry Prometheus reader writes to.
        store: the exemplars the reader kept.
    """

    def __init__(self, inner: CollectorRegistry, store: ExemplarStore) -> None:
        self.inner = inner
        self.store = store
        self._lock = threading.Lock()

    def describe(self) -> list[Metric]:
        # Without describe(), an auto-describing registry would collect at registration time, before the
        # reader is attached to a meter provider.
        return []

    def collect(self) -> Iterator[Metric]:
        # One collection at a time: the reader's collection and the store's update must pair up.
        with self._lock:
            families = list(self.inner.collect())
        yield from self.store.annotate(families)


class ExemplarPrometheusReader(PrometheusMetricReader):  # type: ignore[misc]
    """OpenTelemetry's Prometheus reader that also hands each collection's exemplars to a store.

    Args:
        store: where the exemplars go.
        registry: the (private) registry the reader's own collector is registered in.
        histograms: histograms aggregated outside the SDK, added to every collection (see instruments.py); the
            counters are then summed outside it too, and their own limit on series applies, not the SDK's.
    """

    def __init__(self, store: ExemplarStore, registry: CollectorRegistry, histograms: Histograms | None = None) -> None:
        limits = observed_cardinality_limits() if histograms is not None else None
        super().__init__(registry=registry, cardinality_limits=limits)
        self.store = store
        self._feed = histograms.feed() if histograms is not None else None

    def _receive_metrics(self, metrics_data: Any, timeout_millis: float = 10_000, **kwargs: Any) -> None:
        if self._feed is not None:
            metrics_data = self._feed.merge(metrics_data)
        if metrics_data is not None:
            try:
                self.store.update(metrics_data)
            except Exception:  # exemplars are a bonus: never lose the metrics over them
                pass
        super()._receive_metrics(metrics_data, timeout_millis, **kwargs)


def prometheus_reader(registry: CollectorRegistry, histograms: Histograms | None = None) -> ExemplarPrometheusReader:
    """A Prometheus metric reader whose families, registered in ``registry``, carry exemplars.

    Use it where ``PrometheusMetricReader(registry=registry)`` would be used; the scrape output is identical
    except for the exemplars in the OpenMetrics format. ``histograms`` are exported along with the SDK's metrics.
    """
    store = ExemplarStore()
    inner = CollectorRegistry(auto_describe=False)
    reader = ExemplarPrometheusReader(store, inner, histograms)
    registry.register(ExemplarCollector(inner, store))
    return reader
