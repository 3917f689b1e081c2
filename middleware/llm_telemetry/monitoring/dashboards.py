"""The Grafana dashboard for the middleware's metrics, built as plain data (a Grafana dashboard JSON model).

Panels query the raw metrics through the dashboard's variables rather than the recording rules of
:mod:`llm_telemetry.monitoring.rules`: the dashboard then works against any Prometheus that scrapes the middleware,
whether or not the rules are loaded, and every variable filters every panel. The rate queries use
``$__rate_interval``, which keeps them cheap enough for the time ranges a dashboard is looked at.

Usage::

    from llm_telemetry.monitoring.dashboards import render_dashboard_json

    Path("llm.json").write_text(render_dashboard_json(attribution_labels=("tenant", "team")))
"""

from __future__ import annotations

import json
import re
import urllib.parse
from collections.abc import Sequence
from typing import Any, Final

from llm_telemetry import instruments as inst
from llm_telemetry.monitoring.rules import (
    COST,
    ERROR_TYPE,
    ERRORS,
    FINISH_REASON,
    FINISH_REASONS,
    METADATA_PREFIX,
    METRICS,
    NOT_LEFT,
    REQUEST_DURATION,
    REQUEST_MODEL,
    REQUESTS,
    REQUESTS_ACTIVE,
    TIME_PER_OUTPUT_TOKEN,
    TIME_TO_ABANDONMENT,
    TIME_TO_FIRST_TOKEN,
    TOKEN_DETAIL,
    TOKEN_DETAILS,
    TOKEN_TYPE,
    TOKENS,
    TOOL_CALLS,
    TOOL_NAME,
    TOOL_RESULTS,
    TOOL_STATUS,
    TRUNCATED_FINISH_REASONS,
    UNPRICED_TOKENS,
    USAGE_SOURCE,
    AlertThresholds,
)

#: The unit of the tokens-per-minute panels. Grafana puts a space before a custom suffix itself; one written after
#: the colon too showed "1036  tok/min".
TOKENS_PER_MINUTE: Final = "suffix:tok/min"

#: Grafana 11.0's dashboard schema version; Grafana 11 and 12 import it and migrate it forward on save.
SCHEMA_VERSION: Final = 39
RATE: Final = "$__rate_interval"
PROMETHEUS: Final = {"type": "prometheus", "uid": "${datasource}"}

_ATTRIBUTION_LABEL = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
_LEGEND_LABEL = re.compile(r"\{\{\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*\}\}")
#: The legend of a metric's overflow series (``otel_metric_overflow="true"``, past the series limit of
#: ``instruments.CARDINALITY_LIMIT``), whose other labels are empty.
OVERFLOW_LEGEND: Final = "(overflow)"
#: The legend of the series with no attribution label at all: the middleware records none where its attribution
#: does not name that label (``LLM_TELEMETRY_ATTRIBUTION_HEADERS``), which is not an overflow.
UNATTRIBUTED_LEGEND: Final = "(not attributed)"
#: The Prometheus label of the overflow series (``otel.metric.overflow``).
OVERFLOW_LABEL: Final = "otel_metric_overflow"

#: The Loki query of the error log panel, by how the request-log lines reach Loki (an LLMTelemetry's
#: ``spec.logs.mode``). Loki refuses a stream selector whose every matcher matches the empty string, as
#: ``namespace=~".*"`` does with the namespace variable at All, so each selector also asks for the label to be set.
#: Each keeps the lines of the selected jobs' services (``log_services``): by namespace alone, the dashboard of one
#: LLMTelemetry listed the failures of every other LLM service of its namespace.
ERROR_LOG_QUERIES: Final = {
    # OTLP, to Loki's /otlp endpoint: Loki makes the resource attribute k8s.namespace.name the stream label
    # k8s_namespace_name, the record's body (the line's message) the log line, and its attributes (the line's
    # non-null fields) structured metadata, which a label filter reads without a parser.
    "otlp": '{k8s_namespace_name=~"$namespace", k8s_namespace_name!="", service_name=~"$log_services"}'
    ' | error_type != "" | model =~ "$model"',
    # stdout, shipped by the cluster's log agent (Promtail, Grafana Alloy), which labels each stream with its pod's
    # namespace as `namespace`; the line is the JSON object.
    "stdout": '{namespace=~"$namespace", namespace!=""} | json | service =~ "$log_services" | error_type != ""'
    ' | model =~ "$model"',
}
LOGS_MODES: Final = tuple(ERROR_LOG_QUERIES)


def _share(by: str, part: str, whole: str) -> str:
    """``part`` over ``whole`` (two rates) per value of ``by``; "or ... * 0": a value with no ``part`` (a model
    without errors) shows 0 rather than no line at all."""
    return f"(sum by ({by}) ({part}) or sum by ({by}) ({whole}) * 0)\n/\nsum by ({by}) ({whole})"


def _by_attribution(label: str, increase: str) -> str:
    """The 10 values of attribution ``label`` with the most ``increase``, the overflow series named by its own
    label: a series without ``label`` is also one the middleware recorded without attribution, not an overflow."""
    top = f"topk(10, sum by ({label}, {OVERFLOW_LABEL}) ({increase}))"
    return f'label_replace({top}, "{label}", "{OVERFLOW_LEGEND}", "{OVERFLOW_LABEL}", "true")'


class _Builder:
    """Accumulates panels, assigning ids and grid positions row by row."""

    def __init__(self, attribution_labels: Sequence[str], jaeger_uid: str, loki_uid: str) -> None:
        self.attribution = [f"{METADATA_PREFIX}{name}" for name in attribution_labels]
        self.jaeger_uid = jaeger_uid
        self.loki_uid = loki_uid
        self.panels: list[dict[str, Any]] = []
        self._next_id = 1
        self._x = 0
        self._y = 0
        self._row_height = 0

    # --- selectors ----------------------------------------------------------------------------

    def sel(self, metric: str, *extra: str) -> str:
        """``metric{...}`` filtered by every dashboard variable that applies to the metric's labels."""
        base = metric
        for suffix in ("_bucket", "_count", "_sum"):
            if metric.endswith(suffix) and metric[: -len(suffix)] in METRICS:
                base = metric[: -len(suffix)]
        spec = METRICS[base]
        matchers = ['namespace=~"$namespace"', 'job=~"$job"', 'endpoint=~"$endpoint"']
        if REQUEST_MODEL in spec.labels:
            matchers.append(f'{REQUEST_MODEL}=~"$model"')
        if spec.attributed:
            matchers += [f'{name}=~"${name}"' for name in self.attribution]
        return f"{metric}{{{','.join([*matchers, *extra])}}}"

    def rate(self, metric: str, *extra: str) -> str:
        return f"rate({self.sel(metric, *extra)}[{RATE}])"

    # --- layout -------------------------------------------------------------------------------

    def _id(self) -> int:
        panel_id = self._next_id
        self._next_id += 1
        return panel_id

    def row(self, title: str) -> None:
        if self._x:
            self._y += self._row_height
        self._x = 0
        self._row_height = 0
        self.panels.append(
            {
                "id": self._id(),
                "type": "row",
                "title": title,
                "collapsed": False,
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": self._y},
                "panels": [],
            }
        )
        self._y += 1

    def _place(self, width: int, height: int) -> dict[str, int]:
        if self._x + width > 24:
            self._y += self._row_height
            self._x = 0
            self._row_height = 0
        pos = {"h": height, "w": width, "x": self._x, "y": self._y}
        self._x += width
        self._row_height = max(self._row_height, height)
        return pos

    def add(self, panel: dict[str, Any], width: int, height: int) -> None:
        self.panels.append({"id": self._id(), **panel, "gridPos": self._place(width, height)})

    # --- panels -------------------------------------------------------------------------------

    @staticmethod
    def target(
        expr: str,
        legend: str,
        ref: str = "A",
        *,
        instant: bool = False,
        exemplar: bool = False,
        fmt: str = "",
        unlabelled: str = OVERFLOW_LEGEND,
    ) -> dict[str, Any]:
        # A series without a label its legend names is an overflow series (or, ``unlabelled`` says, one recorded
        # without that label): Grafana would show a blank legend for it, or the whole query when it has no label
        # left, so it is named (le: a heatmap's buckets, never empty).
        for label in dict.fromkeys(_LEGEND_LABEL.findall(legend)):
            if label != "le":
                expr = f'label_replace({expr}, "{label}", "{unlabelled}", "{label}", "")'
        target: dict[str, Any] = {
            "refId": ref,
            "datasource": PROMETHEUS,
            "editorMode": "code",
            "expr": expr,
            "legendFormat": legend,
            "range": not instant,
            "instant": instant,
        }
        if exemplar:
            target["exemplar"] = True
        if fmt:
            target["format"] = fmt
        return target

    def stat(
        self,
        title: str,
        description: str,
        expr: str,
        legend: str,
        unit: str,
        steps: list[dict[str, Any]],
        decimals: int = 2,
    ) -> None:
        self.add(
            {
                "type": "stat",
                "title": title,
                "description": description,
                "datasource": PROMETHEUS,
                "fieldConfig": {
                    "defaults": {
                        "unit": unit,
                        "decimals": decimals,
                        "color": {"mode": "thresholds"},
                        "thresholds": {"mode": "absolute", "steps": steps},
                        # A ratio or a quantile of no requests is NaN: said so, rather than the last value before.
                        "mappings": [
                            {"type": "special", "options": {"match": "null+nan", "result": {"text": "no traffic"}}}
                        ],
                    },
                    "overrides": [],
                },
                "options": {
                    "colorMode": "value",
                    "graphMode": "area",
                    "justifyMode": "auto",
                    "orientation": "auto",
                    "textMode": "auto",
                    # The latest value, NaN included: "lastNotNull" skips a NaN and showed the last ratio or quantile
                    # from before the traffic stopped, for as long as the time range held one (hours, red).
                    "reduceOptions": {"calcs": ["last"], "fields": "", "values": False},
                },
                "targets": [self.target(expr, legend)],
            },
            5 if title != "Active requests" else 4,
            5,
        )

    def timeseries(
        self,
        title: str,
        description: str,
        targets: list[dict[str, Any]],
        unit: str,
        *,
        width: int = 12,
        stack: bool = False,
        links: list[dict[str, Any]] | None = None,
        max_value: float | None = None,
    ) -> None:
        defaults: dict[str, Any] = {
            "unit": unit,
            "color": {"mode": "palette-classic"},
            "custom": {
                "drawStyle": "line",
                "lineWidth": 1,
                "fillOpacity": 20 if stack else 0,
                "showPoints": "never",
                "spanNulls": False,
                "stacking": {"mode": "normal" if stack else "none", "group": "A"},
            },
            "links": links or [],
        }
        if max_value is not None:
            defaults["min"] = 0
            defaults["max"] = max_value
        self.add(
            {
                "type": "timeseries",
                "title": title,
                "description": description,
                "datasource": PROMETHEUS,
                "fieldConfig": {"defaults": defaults, "overrides": []},
                "options": {
                    "legend": {"displayMode": "table", "placement": "bottom", "showLegend": True, "calcs": ["mean"]},
                    "tooltip": {"mode": "multi", "sort": "desc"},
                },
                "targets": targets,
            },
            width,
            8,
        )

    def heatmap(self, title: str, description: str, metric: str, unit: str) -> None:
        self.add(
            {
                "type": "heatmap",
                "title": title,
                "description": description,
                "datasource": PROMETHEUS,
                "fieldConfig": {"defaults": {"unit": unit, "custom": {}}, "overrides": []},
                "options": {
                    "calculate": False,
                    "cellGap": 1,
                    "color": {"mode": "scheme", "scheme": "Oranges", "scale": "exponential", "exponent": 0.5},
                    "yAxis": {"unit": unit, "axisPlacement": "left"},
                    # A cell is a rate of requests: without a unit of its own it takes the buckets' (0.4 req/s shown
                    # as "400 ms" in the tooltip and the colour scale).
                    "cellValues": {"unit": "reqps"},
                    "rowsFrame": {"layout": "auto"},
                    "tooltip": {"mode": "single", "yHistogram": True, "showColorScale": True},
                    "exemplars": {"color": "rgba(255,0,255,0.7)"},
                    "legend": {"show": True},
                },
                "targets": [
                    self.target(
                        f"sum by (le) ({self.rate(metric + '_bucket')})",
                        "{{le}}",
                        exemplar=True,
                        fmt="heatmap",
                    )
                ],
            },
            12,
            8,
        )

    def bargauge(
        self, title: str, description: str, expr: str, legend: str, unit: str, unlabelled: str = OVERFLOW_LEGEND
    ) -> None:
        self.add(
            {
                "type": "bargauge",
                "title": title,
                "description": description,
                "datasource": PROMETHEUS,
                "fieldConfig": {
                    "defaults": {
                        "unit": unit,
                        "color": {"mode": "continuous-BlYlRd"},
                        "thresholds": {"mode": "absolute", "steps": [{"color": "green", "value": None}]},
                    },
                    "overrides": [],
                },
                "options": {
                    "orientation": "horizontal",
                    "displayMode": "gradient",
                    "showUnfilled": True,
                    "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                },
                "targets": [self.target(expr, legend, instant=True, unlabelled=unlabelled)],
            },
            12,
            8,
        )

    def logs(self, title: str, description: str, expr: str) -> None:
        loki = {"type": "loki", "uid": self.loki_uid}
        self.add(
            {
                "type": "logs",
                "title": title,
                "description": description,
                "datasource": loki,
                "fieldConfig": {"defaults": {"unit": "none"}, "overrides": []},
                "options": {
                    "showTime": True,
                    "wrapLogMessage": True,
                    "prettifyLogMessage": False,
                    "enableLogDetails": True,
                    "sortOrder": "Descending",
                    "dedupStrategy": "none",
                },
                "targets": [
                    {"refId": "A", "datasource": loki, "editorMode": "code", "expr": expr, "legendFormat": "{{model}}"}
                ],
            },
            24,
            10,
        )

    def jaeger_link(self) -> dict[str, Any]:
        """A data link opening Jaeger's trace search for the clicked series' model, in the service the ``service``
        variable names."""
        pane = {
            "datasource": self.jaeger_uid,
            "queries": [
                {
                    "refId": "A",
                    "datasource": {"type": "jaeger", "uid": self.jaeger_uid},
                    "queryType": "search",
                    # The series carry no service: the panels sum over jobs, and a Prometheus job is named by
                    # the scrape (the operator's is the LLMTelemetry), not by OTEL_SERVICE_NAME.
                    "service": "${service}",
                    "tags": f"gen_ai.request.model=${{__field.labels.{REQUEST_MODEL}}}",
                }
            ],
            "range": {"from": "${__from}", "to": "${__to}"},
        }
        # Keep ${...} intact: Grafana interpolates the link before following it.
        panes = urllib.parse.quote(json.dumps({"a": pane}, separators=(",", ":")), safe="${}_.")
        return {"title": "Traces of this model in Jaeger", "url": f"/explore?schemaVersion=1&panes={panes}"}


def _quantiles(b: _Builder, metric: str) -> list[dict[str, Any]]:
    return [
        b.target(
            f"histogram_quantile({q}, sum by ({REQUEST_MODEL}, le) ({b.rate(metric + '_bucket')}))",
            f"p{round(q * 100)} {{{{{REQUEST_MODEL}}}}}",
            ref,
            exemplar=True,
        )
        for ref, q in (("A", 0.5), ("B", 0.95), ("C", 0.99))
    ]


def _variable(name: str, label: str, query: str, description: str, default: str | None = None) -> dict[str, Any]:
    """A multi-value query variable with an All option, opening on ``default`` (All when None)."""
    current = {"text": ["All"], "value": ["$__all"]} if default is None else {"text": [default], "value": [default]}
    return {
        "type": "query",
        "name": name,
        "label": label,
        "description": description,
        "datasource": PROMETHEUS,
        "definition": query,
        "query": {"qryType": 1, "query": query, "refId": "PrometheusVariableQueryEditor-VariableQuery"},
        "refresh": 2,
        "regex": "",
        "sort": 1,
        "multi": True,
        "includeAll": True,
        # ".*" rather than an alternation of every value: also matches series without the label
        # (no namespace outside Kubernetes, no attribution header on a request).
        "allValue": ".*",
        "current": {"selected": True, **current},
        "options": [],
        "hide": 0,
    }


def _services_variable(name: str, label: str, description: str, scope: str, *, every: bool) -> dict[str, Any]:
    """A variable of the OpenTelemetry service names (``target_info``) of the jobs ``scope`` selects: one of them
    (``every=False``, shown), or all of them at All (``every=True``, hidden). At All it is every service name, not
    ``.*``: the log queries filter by it."""
    variable = _variable(name, label, f"label_values(target_info{{{scope}}}, service_name)", description)
    del variable["allValue"]
    variable.update(multi=every, includeAll=every, hide=2 if every else 0)
    if not every:
        variable["current"] = {}
    return variable


def _templating(
    attribution: Sequence[str], namespace: str | None, job: str | None, endpoint: str | None
) -> list[dict[str, Any]]:
    scope = 'namespace=~"$namespace",job=~"$job",endpoint=~"$endpoint"'
    variables: list[dict[str, Any]] = [
        {
            "type": "datasource",
            "name": "datasource",
            "label": "Prometheus",
            "query": "prometheus",
            "current": {},
            "options": [],
            "refresh": 1,
            "regex": "",
            "hide": 0,
        },
        _variable(
            "namespace",
            "Namespace",
            f"label_values({REQUESTS}, namespace)",
            "Kubernetes namespace of the scraped pods.",
            namespace,
        ),
        _variable(
            "job",
            "Service",
            f'label_values({REQUESTS}{{namespace=~"$namespace"}}, job)',
            "Prometheus job, one per scraped Service or PodMonitor.",
            job,
        ),
        _variable(
            "endpoint",
            "Scrape endpoint",
            f'label_values({REQUESTS}{{namespace=~"$namespace",job=~"$job"}}, endpoint)',
            (
                "Port name of the scraped endpoint (the Prometheus Operator's endpoint label). A job scraped on two "
                "ports that both export these metrics (the metrics port and the app's own metrics path) would "
                "count every request twice; pick one."
            ),
            endpoint,
        ),
        _services_variable(
            "service",
            "Trace service",
            "OpenTelemetry service name (service_name of target_info) of the selected jobs: the service the trace"
            " links search in Jaeger. It filters no panel.",
            scope,
            every=False,
        ),
        # The same services, every one of them: what the error log panel keeps (Loki knows no Prometheus job, and
        # two LLMTelemetry resources of a namespace each have a dashboard). Hidden; at All with no value of its own
        # for All, Grafana joins every service found into one alternation.
        _services_variable(
            "log_services",
            "Services (logs)",
            "Every OpenTelemetry service name of the selected jobs: the error log panel shows theirs.",
            scope,
            every=True,
        ),
        _variable(
            "model",
            "Model",
            f"label_values({REQUESTS}{{{scope}}}, {REQUEST_MODEL})",
            "Model named in the request (gen_ai_request_model).",
        ),
    ]
    for name in attribution:
        short = name[len(METADATA_PREFIX) :]
        variables.append(
            _variable(
                name,
                short.replace("_", " ").capitalize(),
                f"label_values({REQUESTS}{{{scope}}}, {name})",
                f"Attribution label {name}, taken from a request header.",
            )
        )
    return variables


#: The bucket boundaries of the histogram each p95 panel of the Health row reads.
_P95_BOUNDS: Final = {
    "p95_request_duration_seconds": inst.REQUEST_DURATION_BUCKETS,
    "p95_ttft_seconds": inst.TIME_TO_FIRST_TOKEN_BUCKETS,
}


def threshold_steps(thresholds: AlertThresholds) -> dict[str, list[dict[str, Any]]]:
    """The colour steps of the Health row's error ratio and p95 panels, by the :class:`AlertThresholds` field each
    follows: red from the value its alert compares with, so the panel turns red where the alert would fire.

    The error ratio is orange from a fifth of its threshold (1% for the default 5%). A p95 is red from the bucket
    boundary its alert compares with (:meth:`AlertThresholds.alert_bound`: a threshold between two boundaries is
    rounded up, since between them a quantile is an interpolation) and orange from the boundary below that one."""
    red = thresholds.error_ratio
    steps: dict[str, list[dict[str, Any]]] = {
        "error_ratio": [
            {"color": "green", "value": None},
            {"color": "orange", "value": float(f"{red / 5:.6g}")},
            {"color": "red", "value": red},
        ]
    }
    for name, bounds in _P95_BOUNDS.items():
        bound = thresholds.alert_bound(name)
        below = [b for b in bounds if b < bound]
        orange: list[dict[str, Any]] = [{"color": "orange", "value": below[-1]}] if below else []
        steps[name] = [{"color": "green", "value": None}, *orange, {"color": "red", "value": bound}]
    return steps


def build_dashboard(
    *,
    title: str = "LLM services",
    uid: str = "llm-telemetry",
    jaeger_uid: str = "jaeger",
    loki_uid: str = "loki",
    attribution_labels: Sequence[str] = ("tenant",),
    logs_mode: str = "stdout",
    namespace: str | None = None,
    job: str | None = None,
    endpoint: str | None = None,
    thresholds: AlertThresholds | None = None,
) -> dict[str, Any]:
    """The Grafana dashboard JSON model for the metrics of :mod:`llm_telemetry.instruments`.

    Args:
        title: Dashboard title.
        uid: Dashboard uid (stable, so re-imports replace the dashboard).
        jaeger_uid: uid of the Jaeger datasource the trace links open.
        loki_uid: uid of the Loki datasource of the error log panel.
        attribution_labels: Attribution label names without the ``llm_metadata_`` prefix; each gets a
            variable and a pair of "top" panels.
        logs_mode: How the request-log lines reach Loki, which decides the error log panel's query (see
            :data:`ERROR_LOG_QUERIES`): ``stdout`` (a log agent ships the JSON lines; the middleware's default)
            or ``otlp`` (``OTEL_LOGS_EXPORTER=otlp`` to Loki's OTLP endpoint; the operator's default).
        namespace, job, endpoint: The namespace, job and scrape endpoint (port name) the dashboard opens on (its
            variables' default values; All when None). The operator's dashboard for an LLMTelemetry opens on that
            resource's own service and the endpoint its ServiceMonitor scrapes, as its alerts select.
        thresholds: The alert thresholds the Health row's error ratio and p95 panels turn red at (the defaults
            when None): the values the alerts compare with (:func:`threshold_steps`).
    """
    if logs_mode not in ERROR_LOG_QUERIES:
        raise ValueError(f"logs_mode {logs_mode!r}: expected one of {', '.join(LOGS_MODES)}")
    for name in attribution_labels:
        if not _ATTRIBUTION_LABEL.fullmatch(name):
            raise ValueError(f"attribution label {name!r}: expected a Prometheus label name suffix such as 'tenant'")
    b = _Builder(attribution_labels, jaeger_uid, loki_uid)
    steps = threshold_steps(thresholds or AlertThresholds())
    model_legend = f"{{{{{REQUEST_MODEL}}}}}"
    cache_read = f'{TOKEN_DETAIL}="cache_read"'
    input_tokens = f'{TOKEN_TYPE}="input"'
    tool_error = f'{TOOL_STATUS}="error"'
    requests_rate = f"sum({b.rate(REQUESTS)})"

    b.row("Health")
    b.stat(
        "Requests/s",
        "LLM API requests handled per second, all outcomes.",
        requests_rate,
        "requests/s",
        "reqps",
        [{"color": "blue", "value": None}],
    )
    b.stat(
        "Error ratio",
        "Share of LLM requests that failed, any error type but client_disconnect (client errors included; a client"
        " leaving, its user pressing stop say, is no failure: see Errors/s by error type).",
        f"(sum({b.rate(ERRORS, NOT_LEFT)}) or vector(0)) / {requests_rate}",
        "error ratio",
        "percentunit",
        steps["error_ratio"],
    )
    b.stat(
        "p95 request duration",
        "95th percentile of the time from request arrival to the last byte of the response.",
        f"histogram_quantile(0.95, sum by (le) ({b.rate(REQUEST_DURATION + '_bucket')}))",
        "p95",
        "s",
        steps["p95_request_duration_seconds"],
    )
    b.stat(
        "p95 time to first token",
        "95th percentile of the time until the first generated chunk of streamed responses.",
        f"histogram_quantile(0.95, sum by (le) ({b.rate(TIME_TO_FIRST_TOKEN + '_bucket')}))",
        "p95",
        "s",
        steps["p95_ttft_seconds"],
    )
    b.stat(
        "Active requests",
        "LLM requests in flight right now (streams count until their last chunk).",
        f"sum({b.sel(REQUESTS_ACTIVE)})",
        "active",
        "short",
        [{"color": "blue", "value": None}],
        decimals=0,  # a count of requests: 3, not "3.00"
    )

    b.row("Latency")
    link = [b.jaeger_link()]
    b.timeseries(
        "Request duration by model",
        "p50, p95 and p99 request duration per model. Dots are exemplars: click one to open its trace.",
        _quantiles(b, REQUEST_DURATION),
        "s",
        links=link,
    )
    b.timeseries(
        "Time to first token by model",
        "p50, p95 and p99 time to first token of streamed responses per model, with exemplars.",
        _quantiles(b, TIME_TO_FIRST_TOKEN),
        "s",
        links=link,
    )
    b.timeseries(
        "Time per output token by model",
        "p50, p95 and p99 time per generated token after the first, per model (decode speed), with exemplars.",
        _quantiles(b, TIME_PER_OUTPUT_TOKEN),
        "s",
        links=link,
    )
    b.timeseries(
        "Streams left before the first token/s by model",
        "Streams whose clients left while still waiting for the first token, per second: the waits the time to first"
        " token panels leave out (they read the first tokens that came). A stalled upstream shows here. The TTFT"
        " objective counts those that waited longer than its latency as slow.",
        [b.target(f"sum by ({REQUEST_MODEL}) ({b.rate(TIME_TO_ABANDONMENT + '_count')})", model_legend)],
        "reqps",
        stack=True,
    )
    b.heatmap(
        "Request duration distribution",
        "Requests per second in each duration bucket; exemplars show individual traced requests.",
        REQUEST_DURATION,
        "s",
    )
    b.heatmap(
        "Time to first token distribution",
        "Streamed responses per second in each time-to-first-token bucket, with exemplars.",
        TIME_TO_FIRST_TOKEN,
        "s",
    )

    b.row("Tokens and cost")
    b.timeseries(
        "Tokens/min by model and type",
        "Billable tokens per minute by model and type (input, output); the stack's top is the billable total.",
        [
            b.target(
                f"sum by ({REQUEST_MODEL}, {TOKEN_TYPE}) ({b.rate(TOKENS)}) * 60",
                f"{{{{{REQUEST_MODEL}}}}} {{{{{TOKEN_TYPE}}}}}",
            )
        ],
        TOKENS_PER_MINUTE,
        stack=True,
    )
    b.timeseries(
        "Cache and reasoning tokens/min by model",
        "Parts of the billable tokens per minute: cache_read and cache_creation of input, reasoning of output. "
        "They overlap the billable counts, so they are lines, not a stack.",
        [
            b.target(
                f"sum by ({REQUEST_MODEL}, {TOKEN_DETAIL}) ({b.rate(TOKEN_DETAILS)}) * 60",
                f"{{{{{REQUEST_MODEL}}}}} {{{{{TOKEN_DETAIL}}}}}",
            )
        ],
        TOKENS_PER_MINUTE,
    )
    b.timeseries(
        "Cost per hour by model",
        "Spend in US dollars per hour at the current rate, from the pricing table. A response without usage (a"
        " stream whose client did not ask for it: stream_options.include_usage, off in the openai SDK by default) is"
        " priced from estimated tokens; see Estimated vs reported tokens.",
        [b.target(f"sum by ({REQUEST_MODEL}) ({b.rate(COST)}) * 3600", model_legend)],
        "currencyUSD",
        stack=True,
    )
    b.timeseries(
        "Cost per request by model",
        "Average spend per request in US dollars, failed requests included: most cost nothing, so fewer failures"
        " raise it as surely as longer prompts or a pricier model.",
        [
            b.target(
                f"sum by ({REQUEST_MODEL}) ({b.rate(COST)})\n/\nsum by ({REQUEST_MODEL}) ({b.rate(REQUESTS)})",
                model_legend,
            )
        ],
        "currencyUSD",
    )
    b.timeseries(
        "Cache-hit share of input tokens",
        "cache_read / input tokens per model (input includes cached tokens): the prompt share served from cache;"
        " 0 for a model with input and no cache reads.",
        [
            b.target(
                _share(REQUEST_MODEL, b.rate(TOKEN_DETAILS, cache_read), b.rate(TOKENS, input_tokens)),
                model_legend,
            )
        ],
        "percentunit",
        max_value=1,
    )
    b.timeseries(
        "Estimated vs reported tokens",
        "Tokens per minute by usage source: reported by the provider, or estimated when the response had no usage"
        " (a stream whose client did not set stream_options.include_usage): output from the deltas, input from the"
        " request's text at four characters a token, a lower bound.",
        [b.target(f"sum by ({USAGE_SOURCE}) ({b.rate(TOKENS)}) * 60", f"{{{{{USAGE_SOURCE}}}}}")],
        TOKENS_PER_MINUTE,
        stack=True,
    )
    b.timeseries(
        "Unpriced tokens/min by model",
        "Tokens whose cost is not counted above: of models missing from the pricing table, and those the advisor,"
        " the image generation tool or an SVG image's author ran on a model without a price (or, for the image tool,"
        " naming none), by the model of the call that used it.",
        [b.target(f"sum by ({REQUEST_MODEL}) ({b.rate(UNPRICED_TOKENS)}) * 60", model_legend)],
        TOKENS_PER_MINUTE,
    )

    b.row("Errors and finish reasons")
    b.timeseries(
        "Errors/s by error type",
        "Failed requests per second, stacked by error_type.",
        [b.target(f"sum by ({ERROR_TYPE}) ({b.rate(ERRORS)})", f"{{{{{ERROR_TYPE}}}}}")],
        "reqps",
        stack=True,
    )
    b.timeseries(
        "Error ratio by model",
        "Share of requests to each model that failed, any error type but client_disconnect.",
        [b.target(_share(REQUEST_MODEL, b.rate(ERRORS, NOT_LEFT), b.rate(REQUESTS)), model_legend)],
        "percentunit",
        max_value=1,
    )
    truncated = f'{FINISH_REASON}=~"{"|".join(TRUNCATED_FINISH_REASONS)}"'
    b.timeseries(
        "Responses/s by finish reason",
        "Responses per second by the reason the model stopped, as the provider names it (stop, length, tool_calls,"
        " content_filter; Anthropic's end_turn, max_tokens, tool_use). A response whose choices stopped for different"
        " reasons counts once under each; failed requests have none.",
        [b.target(f"sum by ({FINISH_REASON}) ({b.rate(FINISH_REASONS)})", f"{{{{{FINISH_REASON}}}}}")],
        "reqps",
        stack=True,
    )
    b.timeseries(
        "Truncated response ratio by model",
        "Share of each model's finish reasons that say the output hit a token limit (length, max_tokens,"
        " max_output_tokens; model_context_window_exceeded, Anthropic's for a context window that filled up first):"
        " answers cut short, which a larger max_tokens or a shorter prompt would have finished.",
        [b.target(_share(REQUEST_MODEL, b.rate(FINISH_REASONS, truncated), b.rate(FINISH_REASONS)), model_legend)],
        "percentunit",
        max_value=1,
    )
    b.logs(
        "Error log lines",
        "Request log lines with an error_type for the selected namespaces and models, newest first (Loki).",
        ERROR_LOG_QUERIES[logs_mode],
    )

    b.row("Tools")
    b.timeseries(
        "Tool calls/s by tool",
        "Tool calls the model asked for, per second, by tool name.",
        [b.target(f"sum by ({TOOL_NAME}) ({b.rate(TOOL_CALLS)})", f"{{{{{TOOL_NAME}}}}}")],
        "cps",
        stack=True,
    )
    b.timeseries(
        "Tool failure ratio by tool",
        "Share of the tool results clients sent back that were errors, by tool name.",
        [b.target(_share(TOOL_NAME, b.rate(TOOL_RESULTS, tool_error), b.rate(TOOL_RESULTS)), f"{{{{{TOOL_NAME}}}}}")],
        "percentunit",
        max_value=1,
    )

    if b.attribution:
        b.row("Attribution")
    for name in b.attribution:
        short = name[len(METADATA_PREFIX) :]
        legend = f"{{{{{name}}}}}"
        b.bargauge(
            f"Top {short} by tokens",
            f"The 10 values of {name} that used the most tokens over the dashboard's time range. increase() leaves"
            " out each series' first count (a series starts holding it: a new pod, model or value), so a value with"
            " a few requests spread over pods can read low, or 0.",
            _by_attribution(name, f"increase({b.sel(TOKENS)}[$__range])"),
            legend,
            "short",
            UNATTRIBUTED_LEGEND,
        )
        b.bargauge(
            f"Top {short} by cost",
            f"The 10 values of {name} that cost the most (USD) over the dashboard's time range. increase() leaves"
            " out each series' first count (a series starts holding it: a new pod, model or value), so a value with"
            " a few requests spread over pods can read low, or 0.",
            _by_attribution(name, f"increase({b.sel(COST)}[$__range])"),
            legend,
            "currencyUSD",
            UNATTRIBUTED_LEGEND,
        )

    return {
        "annotations": {
            "list": [
                {
                    "builtIn": 1,
                    "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                    "enable": True,
                    "hide": True,
                    "iconColor": "rgba(0, 211, 255, 1)",
                    "name": "Annotations & Alerts",
                    "type": "dashboard",
                }
            ]
        },
        "description": "LLM API traffic, latency, tokens, cost, errors and tools, from llm-telemetry.",
        "editable": True,
        "fiscalYearStartMonth": 0,
        "graphTooltip": 1,
        "id": None,
        "links": [],
        "panels": b.panels,
        "refresh": "30s",
        "schemaVersion": SCHEMA_VERSION,
        "tags": ["llm", "gen-ai", "llm-telemetry"],
        "templating": {"list": _templating(b.attribution, namespace, job, endpoint)},
        "time": {"from": "now-6h", "to": "now"},
        "timepicker": {},
        "timezone": "browser",
        "title": title,
        "uid": uid,
        "version": 1,
        "weekStart": "",
    }


def render_dashboard_json(**kw: Any) -> str:
    """:func:`build_dashboard` as indented JSON with a trailing newline, ready to import into Grafana."""
    return json.dumps(build_dashboard(**kw), indent=2) + "\n"


__all__: Sequence[str] = ("build_dashboard", "render_dashboard_json")
