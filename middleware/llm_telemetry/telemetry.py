"""The one place that creates the meter provider, its readers and the Prometheus listener.

A :class:`Telemetry` is built lazily by the middleware on its first ASGI call (so nothing starts threads or
binds ports at import time, which matters for servers that fork workers after importing the app).
"""

from __future__ import annotations

import atexit
import collections
import dataclasses
import errno
import logging
import threading
import weakref
from collections.abc import Mapping
from typing import Any

import anyio
import anyio.to_thread
from opentelemetry.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricExporter, MetricExportResult, MetricsData
from opentelemetry.trace import TracerProvider
from prometheus_client import CollectorRegistry

from . import multiproc
from .config import OTEL_SDK_DISABLED, OTelEnvironment, Settings
from .exposition import (
    BUSY_BODY,
    MAX_ANSWERS,
    MAX_CONNECTIONS,
    QUEUE_SECONDS,
    answer,
    exposition_app,
    listener_url,
    serve_metrics,
)
from .instruments import Histograms, Instruments, create_instruments, exemplar_filter, observed_cardinality_limits
from .labels import LabelLimiter
from .logs import RequestLogs
from .pricing import PricingTable
from .recorder import MetricsRecorder
from .tracing import Tracing
from .types import Receive, Scope, Send
from .version import __version__

logger = logging.getLogger("llm_telemetry")

METER_NAME = "llm_telemetry"
#: How often a metrics port found busy at startup is tried again.
BIND_RETRY_SECONDS = 1.0


class Telemetry:
    """Meter provider, instruments, exposition and the metrics recorder, for one middleware instance.

    Args:
        settings: resolved settings.
        meter_provider: record into this provider instead of creating one; its readers are the application's,
            so the Prometheus listener is not started (``metrics_app_path`` still answers, empty).
        tracer_provider: trace with this provider; by default tracing follows the OTEL_* variables
            (see :meth:`~llm_telemetry.tracing.Tracing.create`).
        env: where the ``OTEL_*`` variables are read (:class:`~llm_telemetry.config.OTelEnvironment`);
            default ``os.environ``.

    A global SDK ``MeterProvider`` installed before the middleware (``opentelemetry-instrument``, the
    OpenTelemetry Operator's auto-instrumentation, the application's own setup) is left alone: the middleware
    records into a provider of its own, so the Prometheus endpoint serves its metrics, and says so in a warning
    naming the two ways to route them through the global provider's pipeline instead.
    """

    def __init__(
        self,
        settings: Settings,
        meter_provider: MeterProvider | None = None,
        tracer_provider: TracerProvider | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.otel = OTelEnvironment.resolve(env)
        if self.otel.sdk_disabled and settings.metrics_exporters:
            logger.warning(
                "llm-telemetry: %s=true: no metrics (the Prometheus endpoint is not started), traces or OTLP logs; "
                "unset it to get them back, or set LLM_TELEMETRY_ENABLED=false to make the middleware a pass-through",
                OTEL_SDK_DISABLED,
            )
            settings = dataclasses.replace(settings, metrics_exporters=())
        self.settings = settings
        self.registry = CollectorRegistry(auto_describe=True)
        #: The exposition app answering scrapes on the application's own port (made on the first).
        self._exposition: Any = None
        #: Scrapes on the application's own path being answered now (at most MAX_ANSWERS).
        self._answering = 0
        #: Scrapes of that path waiting for a place, first come first served (see :meth:`_take_place`).
        self._waiting: collections.deque[anyio.Event] = collections.deque()
        self._external_provider = meter_provider is not None
        if meter_provider is None and settings.metrics_exporters:
            _warn_about_global_meter_provider(settings)
        self._owns_provider = meter_provider is None
        #: The latency histograms' own aggregation, when every reader of the provider is ours to feed it to.
        self.histograms: Histograms | None = None
        #: Set when this process is one of several workers (uvicorn --workers, gunicorn); see multiproc.py.
        self.workers = multiproc.activate(settings) if meter_provider is None else None
        #: None when tracing is off (no endpoint, no provider): then no span work happens per request. Made before
        #: the meter provider, whose resource names the service its spans name.
        self.tracing: Tracing | None = Tracing.create(settings, tracer_provider, env, self.otel)
        self.meter_provider = meter_provider if meter_provider is not None else self._create_meter_provider()
        meter = self.meter_provider.get_meter(METER_NAME, __version__)
        self.instruments: Instruments
        if self.workers is not None and self.workers.state is not None:
            # Prometheus numbers go to the workers' shared files; OTLP (if on) still gets this worker's own.
            otlp = meter if "otlp" in settings.metrics_exporters else None
            self.instruments = self.workers.create_instruments(METER_NAME, __version__, otlp, self.histograms)
        else:
            # Sums kept by the middleware go to the readers as observable counters: faithful only where every reader
            # is cumulative, which is when the histograms are kept here too. A delta OTLP exporter, or a provider
            # passed in (whose readers are not ours to know), gets the SDK's synchronous instruments.
            summed = self.histograms is not None
            self.instruments = create_instruments(meter, summed=summed, histograms=self.histograms)
        self.limit = LabelLimiter(settings.max_label_values)
        self.pricing = PricingTable(settings.pricing)
        self.recorder = MetricsRecorder(self.instruments, self.pricing, self.limit)
        self._tracing_given = tracer_provider is not None
        self._env = env
        #: None when request logs are off.
        self.request_logs: RequestLogs | None = self._request_logs() if settings.request_logs else None
        self._server: Any = None
        self._server_lock = threading.Lock()
        #: Set at shutdown: a listener still waiting for its port stops trying.
        self._stopping = threading.Event()
        self._shut_down = False
        #: LLM requests being observed now (counted by the middleware; its lifespan shutdown waits for them).
        self.in_flight = 0
        # The exporters are flushed at exit by this handler, bounded by SHUTDOWN_SECONDS: the SDK's own handlers
        # are off (shutdown_on_exit=False), as each would wait its exporters' whole timeouts (30 s and more) on a
        # collector that does not answer.
        atexit.register(_shutdown_at_exit, weakref.ref(self))

    def adopt_global_tracing(self) -> bool:
        """Turn tracing on for a global SDK ``TracerProvider`` installed since this was made (an app sets one up in
        its lifespan startup, which runs after this); True if it did. The request logs take up a global SDK
        ``LoggerProvider`` installed since, likewise."""
        adopted = self._adopt_tracing()
        logs = self.request_logs
        if logs is not None and (adopted or logs.global_provider_installed()):
            # They were set up for the environment's service; the app's tracer provider may name another in code, and
            # the spans now carry it; or the app installed a logger provider of its own, which the records go through
            # (as one installed at import is). Set up again (no request has been logged: the server takes none before
            # this).
            logs.shutdown()
            self.request_logs = self._request_logs()
        return adopted

    def _adopt_tracing(self) -> bool:
        if self.tracing is not None or self._tracing_given:
            return False
        self.tracing = Tracing.create(self.settings, None, self._env, self.otel)
        return self.tracing is not None

    def _create_meter_provider(self) -> MeterProvider:
        if not self.settings.metrics_exporters:
            from opentelemetry.metrics import NoOpMeterProvider

            return NoOpMeterProvider()  # nothing reads the numbers: don't aggregate them
        from opentelemetry.sdk.metrics import MeterProvider as SDKMeterProvider
        from opentelemetry.sdk.resources import Resource

        readers: list[Any] = []
        # Resource.create() reads OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES; the spans' provider's attributes
        # (a service.name set in code) go over it, as for the request logs: the numbers name the service the spans
        # and lines name, and keep the k8s.* attributes the operator sets in the environment.
        resource = Resource.create()
        traced = self.tracing.resource if self.tracing is not None else None
        if traced is not None:
            resource = resource.merge(traced)
        workers = self.workers
        if workers is not None:
            resource = workers.worker_resource(resource)
        shared = workers is not None and workers.state is not None
        otlp = _otlp_metric_exporter(self.otel.metrics_protocol) if "otlp" in self.settings.metrics_exporters else None
        exemplars = exemplar_filter(self.otel.metrics_exemplar_filter)
        if otlp is None or _cumulative_explicit_histograms(otlp):
            # Histograms aggregate on their own and reach the readers below at collection time (instruments.py);
            # under several workers, the Prometheus numbers come from the workers' files instead (multiproc.py).
            from opentelemetry.sdk.util.instrumentation import InstrumentationScope

            self.histograms = Histograms(InstrumentationScope(METER_NAME, __version__), resource, exemplars)
        if "prometheus" in self.settings.metrics_exporters and shared:
            assert workers is not None
            workers.expose(self.registry, resource)  # scrapes merge every worker's share
        elif "prometheus" in self.settings.metrics_exporters:
            from .exemplars import prometheus_reader

            # The OpenTelemetry Prometheus reader, plus the exemplars it would drop (OpenMetrics scrapes only).
            readers.append(prometheus_reader(self.registry, self.histograms))
        if otlp is not None:
            from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

            limits = None
            if self.histograms is not None:
                otlp = HistogramExporter(otlp, self.histograms)
                limits = observed_cardinality_limits()  # the counters are summed here too, with their own limit
            readers.append(PeriodicExportingMetricReader(otlp, cardinality_limits=limits))
        return SDKMeterProvider(
            metric_readers=readers, resource=resource, exemplar_filter=exemplars, shutdown_on_exit=False
        )

    def _request_logs(self) -> RequestLogs:
        """Request logs naming the service the spans name: an app that sets ``service.name`` in code, on its tracer
        provider's resource, gets it in the lines' ``service`` field and on the resource of the OTLP records (Loki
        labels them ``service_name``), not the environment's ``unknown_service:python``."""
        from opentelemetry.sdk.resources import Resource

        # Resource.create() reads OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES. The provider's attributes go over
        # it rather than replace it: the k8s.* ones the operator sets there, which Loki's labels come from, stay.
        resource = Resource.create()
        traced = self.tracing.resource if self.tracing is not None else None
        if traced is not None:
            resource = resource.merge(traced)
        service = str(resource.attributes.get("service.name", "unknown_service"))
        return RequestLogs(service, self._env, resource, self.otel)

    def shutdown_in_background(self) -> threading.Event:
        """Run :meth:`shutdown` in a daemon thread; the event is set once it is done. A daemon thread: one still
        flushing to a collector that does not answer is left behind at exit, not waited for."""
        done = threading.Event()

        def run() -> None:
            try:
                _logged(self.shutdown)
            finally:
                done.set()

        threading.Thread(target=run, name="llm-telemetry-shutdown", daemon=True).start()
        return done

    @property
    def closed(self) -> bool:
        """Whether :meth:`shutdown` has run."""
        return self._shut_down

    def without_listener(self) -> Telemetry:
        """This telemetry, with no metrics listener started for it (another one in this process holds its port):
        :meth:`start_server` then does nothing. Returns itself."""
        self._server = False
        return self

    def start_server(self) -> None:
        """Serve the Prometheus endpoint on its own port, once; a busy port is logged, never raised."""
        settings = self.settings
        if settings.metrics_port == 0 or "prometheus" not in settings.metrics_exporters or self._server is not None:
            return
        if self._external_provider:
            logger.info(
                "llm-telemetry: metrics go to the MeterProvider passed to the middleware; no listener on port %s",
                settings.metrics_port,
            )
            self._server = False
            return
        if self.workers is not None and self.workers.state is not None:
            # One worker binds the port and serves everyone's merged numbers; the others retry quietly.
            self.workers.serve(settings.metrics_host, settings.metrics_port, self.registry)
            return
        with self._server_lock:
            if self._server is not None:
                return
            try:
                self._server = serve_metrics(settings.metrics_port, settings.metrics_host, self.registry)
            except OSError as exc:
                self._server = False
                busy = exc.errno == errno.EADDRINUSE
                if not busy:
                    hint = ""
                elif self.workers is not None:  # a worker without shared state (off, or unusable: logged before)
                    hint = "; trying again every second. This worker keeps its own numbers (docs/workers.md)"
                else:
                    hint = (
                        "; trying again every second. If this process is one of several workers of one server"
                        " (Granian's or Hypercorn's --workers, which are not detected), each keeps its own numbers"
                        " and one port shows only its own: set LLM_TELEMETRY_MULTIPROC_DIR to merge them"
                        " (docs/workers.md)"
                    )
                logger.warning(
                    "llm-telemetry: metrics listener not started on %s: %s%s",
                    listener_url(settings.metrics_host, settings.metrics_port, ""),
                    exc,
                    hint,
                )
                if busy:
                    # The process before this one (a restart, a reload) may still be letting go of the port.
                    threading.Thread(target=self._bind_when_free, name="llm-telemetry-bind", daemon=True).start()
            else:
                logger.info("llm-telemetry: metrics on %s", listener_url(settings.metrics_host, settings.metrics_port))

    def _bind_when_free(self) -> None:
        """Try the busy metrics port again every second until it is bound, or shutdown."""
        settings = self.settings
        while not self._stopping.wait(BIND_RETRY_SECONDS):
            with self._server_lock:
                if self._shut_down:
                    return
                try:
                    self._server = serve_metrics(settings.metrics_port, settings.metrics_host, self.registry)
                except OSError as exc:
                    if exc.errno == errno.EADDRINUSE:
                        continue
                    logger.warning("llm-telemetry: metrics listener not started: %s", exc)
                    return
            logger.info("llm-telemetry: metrics on %s", listener_url(settings.metrics_host, settings.metrics_port))
            return

    def shutdown(self) -> None:
        """Stop the listener and flush and stop the exporters; once (later calls do nothing).

        Spans, log records and metrics are flushed side by side, each in a daemon thread: a collector that takes
        one signal's connection and never answers (the traces endpoint, say) holds up that signal alone, not the
        final metrics push or the log records behind it. The callers bound the whole by SHUTDOWN_SECONDS."""
        if self._shut_down:
            return
        self._shut_down = True
        self._stopping.set()
        steps = [self._stop_metrics]
        if self.tracing is not None:
            steps.append(self._stop_tracing)
        if self.request_logs is not None:
            steps.append(self.request_logs.shutdown)
        threads = []
        for step in steps:
            thread = threading.Thread(target=_logged, args=(step,), name="llm-telemetry-flush", daemon=True)
            try:
                thread.start()
            except RuntimeError:  # (CPython 3.12.0-3.12.2 start no thread from an exit handler: in this one, then)
                _logged(step)
            else:
                threads.append(thread)
        for thread in threads:
            thread.join()

    def _stop_tracing(self) -> None:
        assert self.tracing is not None
        self.tracing.force_flush()
        self.tracing.shutdown()

    def _stop_metrics(self) -> None:
        """Close the metrics listener (it may wait for the scrapes it is answering, exposition.CLOSE_SECONDS), then
        push the metrics a last time and stop the meter provider."""
        with self._server_lock:
            listening, self._server = self._server, None
        if listening:
            server, thread = listening
            server.shutdown()
            server.server_close()
            thread.join(timeout=5)
        if self.workers is not None:
            self.workers.close()
        shutdown = getattr(self.meter_provider, "shutdown", None)  # the no-op provider has none
        if self._owns_provider and shutdown is not None:
            shutdown()

    async def metrics_app(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Answer a scrape on the application's own port as the metrics port does (text format, or OpenMetrics when
        asked; gzip when accepted; the ``name[]`` filter), at most MAX_ANSWERS at once, as there: that port is the
        one every API client reaches, and each answer holds its own copy of the exposition. One more waits its turn
        for up to QUEUE_SECONDS (at most MAX_CONNECTIONS wait, holding no copy), then is answered 503."""
        if not await self._take_place():
            await send(
                {
                    "type": "http.response.start",
                    "status": 503,
                    "headers": [
                        (b"content-type", b"text/plain"),
                        (b"retry-after", b"1"),
                        (b"content-length", str(len(BUSY_BODY)).encode()),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": BUSY_BODY})
            return
        try:
            await self._answer_scrape(scope, send)
        finally:
            self._give_place()

    async def _take_place(self) -> bool:
        """One of the MAX_ANSWERS places of the app's path: a free one at once, else in turn, first come first
        served, for up to QUEUE_SECONDS; False when none came."""
        if self._answering < MAX_ANSWERS and not self._waiting:
            self._answering += 1
            return True
        if len(self._waiting) >= MAX_CONNECTIONS:
            return False
        turn = anyio.Event()
        self._waiting.append(turn)
        handed = False
        try:
            with anyio.move_on_after(QUEUE_SECONDS):
                await turn.wait()
            handed = turn.is_set()
            return handed
        finally:
            if not handed:
                if turn.is_set():  # handed over as the wait ended (or the scrape was cancelled): given on
                    self._give_place()
                else:
                    self._waiting.remove(turn)

    def _give_place(self) -> None:
        """A place of the app's path given back: to the first scrape waiting, if any."""
        if self._waiting:
            self._waiting.popleft().set()
        else:
            self._answering -= 1

    async def _answer_scrape(self, scope: Scope, send: Send) -> None:
        accept = accept_encoding = ""
        for key, value in scope.get("headers", ()):
            if key == b"accept":
                accept = value.decode("latin-1")
            elif key == b"accept-encoding":
                accept_encoding = value.decode("latin-1")
        if self._exposition is None:
            # Under several workers any of them answers this path: a rendering one keeps is shared only while no
            # other worker has shown newer numbers (the metrics port has one worker behind it at a time).
            shared = self.workers.state if self.workers is not None else None
            self._exposition = exposition_app(self.registry, shared)
        query = bytes(scope.get("query_string") or b"").decode("latin-1")
        # In a worker thread: the exposition takes ~1 ms per label combination (tens of ms for a few dozen models
        # and tenants), time the event loop would otherwise stop serving every request and stream it holds.
        # Any method gets what a GET gets (prometheus_client's app answers only GET); a HEAD, without the body.
        status, headers, body = await anyio.to_thread.run_sync(
            answer, self._exposition, "GET", query, accept, accept_encoding
        )
        length = str(len(body)).encode()
        if scope.get("method") == "HEAD":
            body = b""
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    *((name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in headers),
                    (b"content-length", length),
                ],
            }
        )
        # In pieces: a server waits for the client to take what it was given only between sends, so a client that
        # does not read holds its place here and its answer (the plain scrapes' rendering is shared), and about one
        # piece in the server's buffers rather than another copy of the whole answer there.
        for start in range(0, len(body), ANSWER_PIECE):
            end = start + ANSWER_PIECE
            await send({"type": "http.response.body", "body": body[start:end], "more_body": end < len(body)})
        if not body:
            await send({"type": "http.response.body", "body": b""})


#: Bytes of an answer on the application's own path handed to the server at a time (see ``metrics_app``).
ANSWER_PIECE = 64 * 1024

#: Seconds a server's shutdown, and the interpreter's exit, wait for the last spans, log records and metrics to be
#: exported.
SHUTDOWN_SECONDS = 10.0
#: Of those, the seconds the lifespan shutdown waits for the requests still in flight (streams the server has just
#: cancelled, as uvicorn's ``--timeout-graceful-shutdown`` does, unwinding) to be recorded before the exporters stop.
DRAIN_SECONDS = 2.0


def _logged(step: Any) -> None:
    """Run one step of the shutdown; a failure is logged (the other steps go on)."""
    try:
        step()
    except Exception:
        logger.warning("llm-telemetry: flushing the exporters at shutdown failed", exc_info=True)


def _shutdown_at_exit(ref: weakref.ref[Telemetry]) -> None:
    telemetry = ref()
    if telemetry is not None and not telemetry.closed:
        try:
            done = telemetry.shutdown_in_background()
        except RuntimeError:
            # CPython 3.12.0-3.12.2 start no thread from an exit handler (cpython#113964): flushed in this one, then,
            # unbounded by SHUTDOWN_SECONDS (the exporters' own timeouts bound it). Before, nothing was exported.
            telemetry.shutdown()
        else:
            done.wait(SHUTDOWN_SECONDS)


_warned_global_provider = False


def _warn_about_global_meter_provider(settings: Settings) -> None:
    """Once per process: say that a global SDK MeterProvider exists and that we keep our own."""
    global _warned_global_provider
    from opentelemetry import metrics
    from opentelemetry.sdk.metrics import MeterProvider as SDKMeterProvider

    if _warned_global_provider or not isinstance(metrics.get_meter_provider(), SDKMeterProvider):
        return
    _warned_global_provider = True
    where = (
        f"the Prometheus endpoint on port {settings.metrics_port}"
        if "prometheus" in settings.metrics_exporters and settings.metrics_port
        else "the exporters of LLM_TELEMETRY_METRICS_EXPORTER"
    )
    logger.warning(
        "llm-telemetry: a global OpenTelemetry SDK MeterProvider is installed (opentelemetry-instrument or the "
        "application's own setup); llm-telemetry records into a MeterProvider of its own so that %s serves its "
        "metrics, and they do not reach the global provider's readers. To export them over OTLP as well, set "
        "LLM_TELEMETRY_METRICS_EXPORTER=prometheus,otlp; to record only into the global provider, pass it as "
        "LLMTelemetryMiddleware(app, meter_provider=opentelemetry.metrics.get_meter_provider()).",
        where,
    )


def _otlp_metric_exporter(protocol: str) -> Any:
    """An OTLP metric exporter; it reads the endpoint, headers and temporality from OTEL_EXPORTER_OTLP_*."""
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter as GrpcExporter

        return GrpcExporter()
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter as HttpExporter

    from .otlp_spans import bounded_answers

    return bounded_answers(HttpExporter())


def _cumulative_explicit_histograms(exporter: Any) -> bool:
    """Whether ``exporter`` takes histograms as the SDK makes them by default, cumulative with explicit buckets
    (what :class:`~llm_telemetry.instruments.Histograms` gives). Delta temporality
    (``OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE``) or exponential histograms
    (``OTEL_EXPORTER_OTLP_METRICS_DEFAULT_HISTOGRAM_AGGREGATION``) keep the SDK's own histograms."""
    from opentelemetry.sdk.metrics import Histogram
    from opentelemetry.sdk.metrics.export import AggregationTemporality
    from opentelemetry.sdk.metrics.view import DefaultAggregation, ExplicitBucketHistogramAggregation

    # The preferences the SDK's PeriodicExportingMetricReader reads from its exporter.
    temporality = (getattr(exporter, "_preferred_temporality", None) or {}).get(Histogram)
    aggregation = (getattr(exporter, "_preferred_aggregation", None) or {}).get(Histogram)
    explicit = type(aggregation) is ExplicitBucketHistogramAggregation and (
        # Without boundaries of its own it takes the instrument's advisory ones, as ours do.
        getattr(aggregation, "_boundaries", None) is None and getattr(aggregation, "_record_min_max", True)
    )
    return temporality in (None, AggregationTemporality.CUMULATIVE) and (
        aggregation is None or type(aggregation) is DefaultAggregation or explicit
    )


class HistogramExporter(MetricExporter):
    """An SDK metric exporter that hands ``inner`` each collection with the histograms of ``histograms`` added.

    Args:
        inner: the exporter that sends the metrics (OTLP).
        histograms: the histograms the middleware aggregates itself.
    """

    def __init__(self, inner: MetricExporter, histograms: Histograms) -> None:
        super().__init__(
            preferred_temporality=getattr(inner, "_preferred_temporality", None),
            preferred_aggregation=getattr(inner, "_preferred_aggregation", None),
        )
        self.inner = inner
        self._feed = histograms.feed()

    def export(self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any) -> MetricExportResult:
        return self.inner.export(self._feed.merge(metrics_data), timeout_millis=timeout_millis, **kwargs)

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return self.inner.force_flush(timeout_millis=timeout_millis)

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        self.inner.shutdown(timeout_millis=timeout_millis, **kwargs)
