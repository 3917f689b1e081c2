"""Prometheus recording and alerting rules for the metrics the middleware exports, built as plain data.

One function, :func:`build_rule_groups`, produces the rule groups; :func:`render_rule_file` wraps them in a
plain Prometheus rule file and :func:`build_prometheus_rule` in a Prometheus Operator ``PrometheusRule``
object. Metric and label names come from the contract in :mod:`llm_telemetry.instruments`, as do the
Grafana dashboard's (:mod:`llm_telemetry.monitoring.dashboards`).

Usage::

    from llm_telemetry.monitoring.rules import AlertThresholds, render_rule_file

    text = render_rule_file(AlertThresholds(cost_per_hour_usd=20.0), selector='namespace="llm",job="chat"')

Naming: recording rules are ``llm:<metric>:<operation>`` and always keep ``namespace`` and ``job`` in their
``by`` clause, so the rules of several services loaded into one Prometheus never collide.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import yaml

from llm_telemetry import instruments as inst

# --- the metric contract, in Prometheus names -----------------------------------------------------

label = inst.label

REQUEST_DURATION: Final = inst.REQUEST_DURATION.prometheus_name
TIME_TO_FIRST_TOKEN: Final = inst.TIME_TO_FIRST_TOKEN.prometheus_name
TIME_TO_ABANDONMENT: Final = inst.TIME_TO_ABANDONMENT.prometheus_name
TIME_PER_OUTPUT_TOKEN: Final = inst.TIME_PER_OUTPUT_TOKEN.prometheus_name
TOKENS: Final = inst.TOKENS.prometheus_name
TOKEN_DETAILS: Final = inst.TOKEN_DETAILS.prometheus_name
REQUESTS: Final = inst.REQUESTS.prometheus_name
ERRORS: Final = inst.ERRORS.prometheus_name
COST: Final = inst.COST.prometheus_name
UNPRICED_TOKENS: Final = inst.UNPRICED_TOKENS.prometheus_name
TOOL_CALLS: Final = inst.TOOL_CALLS.prometheus_name
TOOL_RESULTS: Final = inst.TOOL_RESULTS.prometheus_name
FINISH_REASONS: Final = inst.FINISH_REASONS.prometheus_name
REQUESTS_ACTIVE: Final = inst.REQUESTS_ACTIVE.prometheus_name
INTERNAL_ERRORS: Final = inst.INTERNAL_ERRORS.prometheus_name
UNREAD_BODIES: Final = inst.UNREAD_BODIES.prometheus_name

OPERATION: Final = label(inst.GEN_AI_OPERATION_NAME)
PROVIDER: Final = label(inst.GEN_AI_PROVIDER_NAME)
REQUEST_MODEL: Final = label(inst.GEN_AI_REQUEST_MODEL)
RESPONSE_MODEL: Final = label(inst.GEN_AI_RESPONSE_MODEL)
TOKEN_TYPE: Final = label(inst.GEN_AI_TOKEN_TYPE)
TOKEN_DETAIL: Final = label(inst.LLM_TOKEN_DETAIL)
TOOL_NAME: Final = label(inst.GEN_AI_TOOL_NAME)
ERROR_TYPE: Final = label(inst.ERROR_TYPE)
STREAM: Final = label(inst.GEN_AI_REQUEST_STREAM)
USAGE_SOURCE: Final = label(inst.LLM_USAGE_SOURCE)
TOOL_STATUS: Final = label(inst.LLM_TOOL_STATUS)
FINISH_REASON: Final = label(inst.LLM_FINISH_REASON)
COMPONENT: Final = label(inst.LLM_TELEMETRY_COMPONENT)
UNREAD_REASON: Final = label(inst.LLM_TELEMETRY_REASON)
#: Attribution labels: ``llm_metadata_<name>``.
METADATA_PREFIX: Final = label(inst.LLM_METADATA_PREFIX)

#: Labels Prometheus itself adds when scraping a pod through a ServiceMonitor or PodMonitor (`endpoint`: the port name).
SCRAPE_LABELS: Final = ("namespace", "job", "endpoint", "pod", "instance")

#: Every metric the middleware exports, by Prometheus name (histograms add ``_bucket``/``_count``/``_sum``).
METRICS: Final[Mapping[str, inst.MetricSpec]] = inst.BY_PROMETHEUS_NAME

#: ``llm_finish_reason`` values that say the output was cut at a token limit: OpenAI's chat and completions
#: (``length``), Anthropic's messages (``max_tokens``, and ``model_context_window_exceeded`` where the model's
#: context window filled up first) and the Responses API's incomplete responses (``max_output_tokens``).
TRUNCATED_FINISH_REASONS: Final = ("length", "max_tokens", "max_output_tokens", "model_context_window_exceeded")

#: The failed requests of the error ratios: a client leaving (its user pressing stop, say) is not one. A stream
#: left before its first token counts against the TTFT objective instead, when it waited past its latency.
NOT_LEFT: Final = f'{ERROR_TYPE}!="client_disconnect"'

#: ``error_type`` values caused by the caller rather than the service; they don't spend the availability
#: error budget (but for client_disconnect, they still count in the plain error ratio alert and on the dashboard).
CLIENT_ERROR_TYPES: Final = (
    "invalid_request",
    "auth",
    "not_found",
    "context_length",
    "content_filter",
    "client_disconnect",
)

# --- thresholds -----------------------------------------------------------------------------------

#: Where runbook links point unless told otherwise; each alert appends ``#<anchor>``. A path relative to the
#: repository root, so it is correct wherever the repository is hosted; pass a full URL in production.
DEFAULT_RUNBOOK_URL: Final = "docs/runbooks.md"

#: Burn-rate windows: (severity, long window, short window, burn factor), from the multi-window,
#: multi-burn-rate recipe of Google's SRE workbook (chapter "Alerting on SLOs").
BURN_RATE_WINDOWS: Final = (
    ("critical", "1h", "5m", 14.4),
    ("critical", "6h", "30m", 6.0),
    ("warning", "1d", "2h", 3.0),
    ("warning", "3d", "6h", 1.0),
)
SLO_WINDOWS: Final = ("5m", "30m", "1h", "2h", "6h", "1d", "3d")
#: Bad events (failed requests, late first tokens) a burn-rate alert needs in its short window, and failed requests
#: the error-ratio alert needs in its 5 minutes: at a few requests an hour, or in a service's first minutes (when
#: every window holds only those minutes), one failure is a ratio of 10 or 20%, which paged and stayed firing.
MIN_BURN_EVENTS: Final = 3


@dataclass(frozen=True)
class AlertThresholds:
    """Alert thresholds and SLO objectives; the defaults suit a chat service behind a hosted LLM API.

    Args:
        error_ratio: Share of failed requests over 5 minutes above which LLMHighErrorRatio fires.
        p95_request_duration_seconds: p95 request duration (per model) for LLMHighRequestDuration.
        p95_ttft_seconds: p95 time to first token (per model) for LLMHighTimeToFirstToken. Both alerts compare with
            the histogram's bucket boundaries (see :meth:`alert_bound`): a value between two is rounded up.
        tool_failure_ratio: Share of tool results reported as errors (per tool) for LLMHighToolFailureRatio.
        cost_per_hour_usd: Spend per hour for LLMCostBudgetExceeded; ``None`` leaves the alert out.
        availability_objective: Share of requests that must not fail through the service's fault.
        ttft_objective: Share of streamed first tokens that must arrive within ``ttft_objective_seconds``.
        ttft_objective_seconds: The TTFT objective's latency; one of the TTFT histogram's bucket boundaries.
        token_rate_spike_factor: LLMTokenRateAnomaly fires when the 5 minute token rate exceeds this multiple
            of the hourly rate measured 15 minutes earlier...
        token_rate_floor_per_second: ...and the 5 minute rate is above this floor, so idle services stay quiet.

    Usage::

        AlertThresholds(error_ratio=0.02, cost_per_hour_usd=50.0)
    """

    error_ratio: float = 0.05
    p95_request_duration_seconds: float = 81.92
    p95_ttft_seconds: float = 2.5
    tool_failure_ratio: float = 0.2
    cost_per_hour_usd: float | None = None
    availability_objective: float = 0.99
    ttft_objective: float = 0.99
    ttft_objective_seconds: float = 2.5
    token_rate_spike_factor: float = 3.0
    token_rate_floor_per_second: float = 20.0

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"AlertThresholds.{field.name}={value!r}: expected a finite number")
            if value <= 0:
                raise ValueError(f"AlertThresholds.{field.name}={value!r}: must be greater than 0")
        for name in ("error_ratio", "tool_failure_ratio"):
            if getattr(self, name) > 1:
                raise ValueError(f"AlertThresholds.{name}={getattr(self, name)!r}: a ratio must be at most 1")
        for name in ("availability_objective", "ttft_objective"):
            if getattr(self, name) >= 1:
                raise ValueError(
                    f"AlertThresholds.{name}={getattr(self, name)!r}: an objective must be below 1 (1 leaves no budget)"
                )
        for name, buckets in _P95_BUCKETS.items():
            if getattr(self, name) > buckets[-2]:
                raise ValueError(
                    f"AlertThresholds.{name}={getattr(self, name)!r}: at most {buckets[-2]:g}; a p95 past the "
                    f"histogram's last bucket boundaries ({buckets[-2]:g}, {buckets[-1]:g}) cannot be told apart"
                )
        if float(self.ttft_objective_seconds) not in inst.TIME_TO_FIRST_TOKEN_BUCKETS:
            bounds = ", ".join(f"{b:g}" for b in inst.TIME_TO_FIRST_TOKEN_BUCKETS)
            raise ValueError(
                f"AlertThresholds.ttft_objective_seconds={self.ttft_objective_seconds!r} is not a bucket boundary of "
                f"{TIME_TO_FIRST_TOKEN}; choose one of: {bounds}"
            )

    def alert_bound(self, name: str) -> float:
        """The value the p95 alert of threshold ``name`` compares with: the threshold, or the histogram's next
        bucket boundary above it. A quantile between two boundaries is an interpolation, which reads a p95 of
        2.425 s for requests that all took 1.05 s (2.5 s buckets' linear spread): compared with 2 s, that alerts
        on traffic well under the threshold. Against a boundary, ``p95 > bound`` holds exactly when more than 5%
        of the requests took longer than the bound."""
        threshold = float(getattr(self, name))
        return next(bound for bound in _P95_BUCKETS[name] if bound >= threshold)


#: The buckets of each p95 alert's histogram.
_P95_BUCKETS: Final = {
    "p95_request_duration_seconds": inst.REQUEST_DURATION_BUCKETS,
    "p95_ttft_seconds": inst.TIME_TO_FIRST_TOKEN_BUCKETS,
}


def _rounded_note(thresholds: AlertThresholds, name: str) -> str:
    bound = thresholds.alert_bound(name)
    if bound == getattr(thresholds, name):
        return ""
    return f" ({_exact(getattr(thresholds, name))}s, rounded up to the histogram's next bucket boundary)"


# --- PromQL helpers -------------------------------------------------------------------------------

BY: Final = "namespace, job"
#: The series of our metrics that hold the label combinations past the cardinality limit
#: (instruments.CARDINALITY_LIMIT); the names keep other services' OpenTelemetry metrics out.
OVERFLOW_MATCHER: Final = 'otel_metric_overflow="true"'
#: The label of those series. The per-model and per-tool rules keep it in their ``by`` clause: an overflow series has
#: no model or tool name, so without it the overflow's traffic was grouped under an empty name and an alert on it
#: named nothing ("of results of tool  are errors"); with it, the group is told apart (every other series has the
#: label empty, which Prometheus reads as absent) and the alert names it (see :func:`_named`).
OVERFLOW_LABEL: Final = "otel_metric_overflow"
#: The components whose failure is counted once, when a process starts: the middleware's setup (it then passes
#: requests through unmeasured) and the workers' shared files (the process then reports only its own share).
SETUP_MATCHER: Final = f'{COMPONENT}=~"setup|multiproc_setup"'
#: What grows in an overflow series, per metric of ours (a histogram's count; the gauge of active requests has no
#: growth to see). One term each: rate() drops the metric's name, and the overflow series of two metrics of one
#: target have the same labels otherwise (``otel_metric_overflow`` and the target's), so a rate over several names
#: at once is an evaluation error ("vector cannot contain metrics with the same labelset") exactly when two overflow.
OVERFLOWING: Final = tuple(
    spec.prometheus_name + ("_count" if spec.kind == "histogram" else "")
    for spec in inst.CONTRACT
    if spec.kind != "updowncounter"
)


def _normalize_selector(selector: str) -> str:
    selector = selector.strip()
    if selector.startswith("{") and selector.endswith("}"):
        selector = selector[1:-1].strip()
    selector = selector.strip(",").strip()
    if "{" in selector or "}" in selector:
        raise ValueError(f'selector {selector!r}: expected label matchers such as namespace="llm",job="chat"')
    return selector


#: One label matcher of a selector, its value in any of PromQL's three quotes.
_MATCHER: Final = re.compile(
    r"""\s*([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)\s*(?:"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)\s*"""
)


def recorded_selector(selector: str) -> str:
    """The matchers of a (normalized) selector on the labels every recording rule keeps (``BY``).

    Each service's rules record under the same names (one rule file or PrometheusRule per service), so an alert
    that reads a recorded series must select its own service's: without this, every service's rules judged every
    other's recorded series by their own thresholds, and identical alerts from two rule files collided.
    Matchers on other labels cannot apply to recorded series; rules for services told apart only by such labels
    should differ in namespace or job as well.
    """
    kept = {label.strip() for label in BY.split(",")}
    matchers, position = [], 0
    while position < len(selector):
        match = _MATCHER.match(selector, position)
        if match is None or (match.end() < len(selector) and selector[match.end()] != ","):
            raise ValueError(f'selector {selector!r}: expected label matchers such as namespace="llm",job="chat"')
        if match.group(1) in kept:
            matchers.append(match.group(0).strip())
        position = match.end() + 1
    return ",".join(matchers)


def series(metric: str, selector: str = "", *matchers: str) -> str:
    """``metric{selector,matchers...}``, or the bare name when there are no matchers."""
    parts = [p for p in (selector, *matchers) if p]
    return f"{metric}{{{','.join(parts)}}}" if parts else metric


def le_value(bound: float) -> str:
    """The ``le`` label value the OpenTelemetry Prometheus exporter writes for a bucket boundary."""
    return f"{float(bound)}"


def _fmt(number: float) -> str:
    return f"{number:g}" if abs(number) >= 1e-4 else repr(number)


def _exact(number: float) -> str:
    """A threshold as written into a rule: the shortest text that reads back as the same float (``:g`` keeps six
    digits, which makes an objective of 0.9999999 read 1, a budget of 0, and the burn-rate alerts fire on any error)."""
    text = repr(float(number))
    return text[:-2] if text.endswith(".0") else text


def _record(name: str, expr: str) -> dict[str, Any]:
    return {"record": name, "expr": expr}


def _alert(
    name: str,
    expr: str,
    *,
    severity: str,
    for_: str | None,
    summary: str,
    description: str,
    runbook_url: str,
    labels: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    rule: dict[str, Any] = {"alert": name, "expr": expr}
    if for_:
        rule["for"] = for_
    rule["labels"] = {"severity": severity, **(labels or {})}
    rule["annotations"] = {
        "summary": summary,
        "description": description,
        "runbook_url": f"{runbook_url}#{name.lower()}",
    }
    return rule


#: What an alert on an overflow series names instead of a model or a tool (see :data:`OVERFLOW_LABEL`).
OVERFLOWED_MODELS: Final = f"the models past the series limit ({OVERFLOW_LABEL})"
OVERFLOWED_TOOLS: Final = f"the tools past the series limit ({OVERFLOW_LABEL})"


def _named(label: str, overflow: str, prefix: str = "") -> str:
    """An alert template naming the ``label`` value of the alert's series (after ``prefix``), or ``overflow`` for an
    overflow series, which has no value of ``label``: the middleware leaves it out past the series limit."""
    return (
        f"{{{{ if $labels.{OVERFLOW_LABEL} }}}}{overflow}{{{{ else }}}}{prefix}{{{{ $labels.{label} }}}}{{{{ end }}}}"
    )


def _quantile_record(metric: str, q: float, selector: str) -> dict[str, Any]:
    return _record(
        f"llm:{metric}:p{round(q * 100)}_5m",
        f"histogram_quantile({q:g}, sum by ({BY}, {REQUEST_MODEL}, {OVERFLOW_LABEL}, le) "
        f"(rate({series(metric + '_bucket', selector)}[5m])))",
    )


def _ratio(bad: str, total: str) -> str:
    # "or total * 0": without any bad events the ratio is 0 rather than absent, so healthy services record a value.
    return f"(\n  {bad}\n  or\n  {total} * 0\n)\n/\n{total}"


def _failed(selector: str) -> str:
    """The errors through the service's fault: the availability SLO's bad events."""
    return series(ERRORS, selector, f'{ERROR_TYPE}!~"{"|".join(CLIENT_ERROR_TYPES)}"')


def availability_error_ratio_expr(window: str, selector: str = "") -> str:
    """Requests failed through the service's fault over all requests, per service."""
    return _ratio(
        f"sum by ({BY}) (rate({_failed(selector)}[{window}]))",
        f"sum by ({BY}) (rate({series(REQUESTS, selector)}[{window}]))",
    )


def _plus(one: str, other: str) -> str:
    """``one + other`` per service, either side missing read as 0 (a service with no series of one of them)."""
    return f"({one} or {other} * 0)\n  +\n  ({other} or {one} * 0)"


def counted(selected: str, window: str) -> str:
    """The events the counters ``selected`` counted over ``window``, per series, for the "at least MIN_BURN_EVENTS"
    guards: ``increase()``. It extrapolates the change between the first and the last sample inside the window to
    the window's length, so near the threshold it may read one event more or fewer than there were (3 failures read
    2.22 when the window's first scrape counted one of them; 2 of a pod stopped just after the window's start, 3.33):
    the guard keeps a handful of failures from paging, it is not an exact count. It adds back what a counter lost
    when its process restarted, every restart in the window: a process crash-looping and failing every request
    pages. Exact counts (the last value less the one at the window's start, with the cases of restarts and new
    series) were tried: they read each range about nine times (5 to 11 times the cost of ``increase()`` on 2,000
    series) and counted only a crash-looping process's last life, so it never paged (docs/alerts.md,
    tests/promtool/event_counts.yaml).
    """
    return f"increase({selected}[{window}])"


def availability_bad_events_expr(window: str, selector: str = "") -> str:
    """Requests failed through the service's fault over ``window``, per service (see :func:`counted`)."""
    return f"sum by ({BY}) ({counted(_failed(selector), window)})"


def _ttft_parts(function: str, window: str, objective_seconds: float, selector: str) -> tuple[str, str]:
    """The streams late to their first token (see :func:`ttft_slow_ratio_expr`), and all those streams, by
    ``function`` (``rate``, or ``counted`` for the guards' events, see :func:`counted`) over ``window``."""
    le = f'le="{le_value(objective_seconds)}"'

    def over(metric: str, *matchers: str) -> str:
        selected = series(metric, selector, *matchers)
        if function == "counted":
            return f"sum by ({BY}) ({counted(selected, window)})"
        return f"sum by ({BY}) ({function}({selected}[{window}]))"

    def late(histogram: str) -> str:
        if function == "counted":
            # Per series, and never below 0: a process restarted in the window can have its count not fall (more
            # streams since than before) and its bucket fall, and increase() then adds back the bucket's loss only:
            # its late streams read negative (-6.7, promtool, tests/promtool/event_counts.yaml) and took other
            # series' late streams off the service's sum.
            count = counted(series(histogram + "_count", selector), window)
            bucket = counted(series(histogram + "_bucket", selector, le), window)
            return f"sum by ({BY}) (clamp_min({count} - ignoring (le) {bucket}, 0))"
        return f"({over(histogram + '_count')} - {over(histogram + '_bucket', le)})"

    answered = over(TIME_TO_FIRST_TOKEN + "_count")
    slow = late(TIME_TO_FIRST_TOKEN)
    left_late = late(TIME_TO_ABANDONMENT)
    return _plus(slow, left_late), _plus(answered, left_late)


def ttft_slow_ratio_expr(window: str, objective_seconds: float, selector: str = "") -> str:
    """Streams whose first token came later than the objective, or that their clients left without one after
    waiting longer than the objective, over all those streams. Streams left sooner are counted in neither: whether
    their first token would have been in time is unknown. Without the left ones, a stalled upstream that every
    client gives up on would meet the objective: only the streams that got a token would count."""
    late, streams = _ttft_parts("rate", window, objective_seconds, selector)
    return f"(\n  {late}\n)\n/\n(\n  {streams}\n)"


def ttft_late_events_expr(window: str, objective_seconds: float, selector: str = "") -> str:
    """Streams late to their first token (see :func:`ttft_slow_ratio_expr`) over ``window``, per service."""
    return _ttft_parts("counted", window, objective_seconds, selector)[0]


def _burn_alerts(
    slo: str,
    alert_prefix: str,
    objective: float,
    what: str,
    runbook_url: str,
    own: str,
    bad_events: Callable[[str], str],
) -> list[dict[str, Any]]:
    """The burn-rate alerts of an SLO; ``bad_events(window)``: its bad events over ``window``, per service."""
    budget = 1 - objective
    rules = []
    for severity, speed in (("critical", "Fast"), ("warning", "Slow")):
        clauses = []
        for sev, long_w, short_w, factor in BURN_RATE_WINDOWS:
            if sev != severity:
                continue
            threshold = f"({factor:g} * (1 - {_exact(objective)}))"
            clauses.append(
                f"(\n  {series(f'llm:slo_{slo}:ratio_rate{long_w}', own)} > {threshold}\n"
                f"  and\n  {series(f'llm:slo_{slo}:ratio_rate{short_w}', own)} > {threshold}\n"
                f"  and\n  ({bad_events(short_w)}) >= {MIN_BURN_EVENTS}\n)"
            )
        windows = " or ".join(
            f"{factor:g}x over {long_w} and {short_w}"
            for sev, long_w, short_w, factor in BURN_RATE_WINDOWS
            if sev == severity
        )
        rules.append(
            _alert(
                f"{alert_prefix}BurnRate{speed}",
                "\nor\n".join(clauses),
                severity=severity,
                for_=None,
                summary=f"{{{{ $labels.namespace }}}}/{{{{ $labels.job }}}} is spending its {slo} error budget "
                + ("fast" if speed == "Fast" else "steadily"),
                description=(
                    f"{what} Objective {_exact(objective)} ({_fmt(budget * 100)}% budget); burn rate above {windows}"
                    f" (and at least {MIN_BURN_EVENTS} bad events in the short window). "
                    "Ratio over the long window: {{ $value | humanizePercentage }}."
                ),
                runbook_url=runbook_url,
                labels={"slo": slo},
            )
        )
    return rules


# --- the rules ------------------------------------------------------------------------------------


def build_rule_groups(
    thresholds: AlertThresholds = AlertThresholds(),
    *,
    selector: str = "",
    runbook_url: str = DEFAULT_RUNBOOK_URL,
) -> list[dict[str, Any]]:
    """The recording and alerting rule groups, as ``groups:`` entries of a Prometheus rule file.

    Args:
        thresholds: Alert thresholds and SLO objectives.
        selector: Extra label matchers (``namespace="llm",job="chat-metrics"``) put into every raw metric
            selector, so rules made for different services don't read each other's series.
        runbook_url: Base of each alert's ``runbook_url`` annotation; ``#<alert name in lower case>`` is appended.
    """
    if "#" in runbook_url or any(ch.isspace() for ch in runbook_url):
        raise ValueError(f"runbook URL {runbook_url!r}: no spaces or fragment (each alert appends its own #name)")
    t = thresholds
    sel = _normalize_selector(selector)
    own = recorded_selector(sel)  # what alerts select the recorded series by

    tool_error = f'{TOOL_STATUS}="error"'
    recording: list[dict[str, Any]] = [
        _record("llm:llm_requests:rate5m", f"sum by ({BY}) (rate({series(REQUESTS, sel)}[5m]))"),
        _record("llm:llm_errors:rate5m", f"sum by ({BY}, {ERROR_TYPE}) (rate({series(ERRORS, sel)}[5m]))"),
        _record(
            "llm:llm_errors:ratio_rate5m",
            _ratio(
                f"sum by ({BY}) (rate({series(ERRORS, sel, NOT_LEFT)}[5m]))",
                f"sum by ({BY}) (rate({series(REQUESTS, sel)}[5m]))",
            ),
        ),
    ]
    for q in (0.5, 0.95, 0.99):
        recording.append(_quantile_record(REQUEST_DURATION, q, sel))
    for q in (0.5, 0.95, 0.99):
        recording.append(_quantile_record(TIME_TO_FIRST_TOKEN, q, sel))
    recording.append(_quantile_record(TIME_PER_OUTPUT_TOKEN, 0.95, sel))
    recording += [
        _record(
            "llm:llm_tokens:rate5m",
            f"sum by ({BY}, {REQUEST_MODEL}, {TOKEN_TYPE}) (rate({series(TOKENS, sel)}[5m]))",
        ),
        _record(
            "llm:llm_token_details:rate5m",
            f"sum by ({BY}, {REQUEST_MODEL}, {TOKEN_TYPE}, {TOKEN_DETAIL}) (rate({series(TOKEN_DETAILS, sel)}[5m]))",
        ),
        # llm_tokens_total holds billable tokens only (input, output), so these sums never double count.
        _record("llm:llm_tokens:rate1h", f"sum by ({BY}) (rate({series(TOKENS, sel)}[1h]))"),
        _record("llm:llm_cost_usd:rate1h", f"sum by ({BY}) (rate({series(COST, sel)}[1h]))"),
        _record(
            "llm:llm_tool_results:error_ratio_rate5m",
            _ratio(
                f"sum by ({BY}, {TOOL_NAME}, {OVERFLOW_LABEL}) (rate({series(TOOL_RESULTS, sel, tool_error)}[5m]))",
                f"sum by ({BY}, {TOOL_NAME}, {OVERFLOW_LABEL}) (rate({series(TOOL_RESULTS, sel)}[5m]))",
            ),
        ),
    ]

    slo_recording: list[dict[str, Any]] = []
    for window in SLO_WINDOWS:
        slo_recording.append(
            _record(f"llm:slo_availability:ratio_rate{window}", availability_error_ratio_expr(window, sel))
        )
    for window in SLO_WINDOWS:
        slo_recording.append(
            _record(f"llm:slo_ttft:ratio_rate{window}", ttft_slow_ratio_expr(window, t.ttft_objective_seconds, sel))
        )

    service = "{{ $labels.namespace }}/{{ $labels.job }}"
    alerts: list[dict[str, Any]] = [
        _alert(
            "LLMTargetDown",
            f"{series('up', sel)} == 0",
            severity="critical",
            for_="5m",
            summary=f"Prometheus cannot scrape LLM metrics from {{{{ $labels.instance }}}} ({service})",
            description="The metrics endpoint has failed every scrape for 5 minutes; the other LLM alerts are blind.",
            runbook_url=runbook_url,
        ),
        # No increase in 30 minutes, and the count the same as 30 minutes ago: a series born holding its first
        # requests (those of a new or restarted process before its first scrape) shows no increase to rate() or
        # increase(), but changes the count, so a restart that served requests and then fell quiet is not taken for
        # 30 quiet minutes.
        # Or: a target of it is up (or was, within 10 minutes: a Recreate rollout leaves none for minutes), none
        # shows a request series, its recorded request rate has been 0 (or absent) for 25 minutes (so 30 after its
        # last request), and it had traffic within a day. A process exports no request series before its first
        # request, so a service restarted (a rollout) into silence had none to stay flat, and was never reported;
        # one quiet before the rollout stays reported through it.
        _alert(
            "LLMNoTraffic",
            f"(\n  (sum by ({BY}) (increase({series(REQUESTS, sel)}[30m])) == 0) and on ({BY})\n"
            f"  (sum by ({BY}) ({series(REQUESTS, sel)}) == sum by ({BY}) ({series(REQUESTS, sel)} offset 30m))\n)\n"
            f"or\n(\n  sum by ({BY}) (max_over_time({series('up', sel)}[10m]) == 1)\n"
            f"  unless on ({BY}) sum by ({BY}) ({series(REQUESTS, sel)})\n"
            f"  unless on ({BY}) (max by ({BY}) (max_over_time({series('llm:llm_requests:rate5m', own)}[25m])) > 0)\n"
            f"  and on ({BY}) (max by ({BY}) (max_over_time({series('llm:llm_requests:rate5m', own)}[1d])) > 0)\n)",
            severity="info",
            for_=None,
            summary=f"{service} has handled no LLM requests for 30 minutes",
            description="The service's LLM request counter has not moved for 30 minutes (or, its processes "
            "restarted, none has counted a request since, within a day of its last traffic).",
            runbook_url=runbook_url,
        ),
        _alert(
            "LLMHighErrorRatio",
            f"{series('llm:llm_errors:ratio_rate5m', own)} > {_exact(t.error_ratio)}\n"
            f"and on ({BY})\n"
            f"sum by ({BY}) ({counted(series(ERRORS, sel, NOT_LEFT), '5m')}) >= {MIN_BURN_EVENTS}",
            severity="warning",
            for_="5m",
            summary=f"{service}: {{{{ $value | humanizePercentage }}}} of LLM requests fail",
            description=f"More than {_fmt(t.error_ratio * 100)}% of LLM requests failed over 5 minutes, at least "
            f"{MIN_BURN_EVENTS} of them (every error type but client_disconnect: a client leaving is not a failure).",
            runbook_url=runbook_url,
        ),
        _alert(
            "LLMHighRequestDuration",
            f"{series(f'llm:{REQUEST_DURATION}:p95_5m', own)} > {t.alert_bound('p95_request_duration_seconds'):g}",
            severity="warning",
            for_="10m",
            summary=f"{service}: p95 request duration of {_named(REQUEST_MODEL, OVERFLOWED_MODELS)} is "
            "{{ $value | humanizeDuration }}",
            description=f"The 95th percentile of LLM request duration has been above "
            f"{t.alert_bound('p95_request_duration_seconds'):g}s"
            f"{_rounded_note(t, 'p95_request_duration_seconds')} for 10 minutes.",
            runbook_url=runbook_url,
        ),
        _alert(
            "LLMHighTimeToFirstToken",
            f"{series(f'llm:{TIME_TO_FIRST_TOKEN}:p95_5m', own)} > {t.alert_bound('p95_ttft_seconds'):g}",
            severity="warning",
            for_="10m",
            summary=f"{service}: p95 time to first token of {_named(REQUEST_MODEL, OVERFLOWED_MODELS)} is "
            "{{ $value | humanizeDuration }}",
            description=f"The 95th percentile of time to first token of streamed responses has been above "
            f"{t.alert_bound('p95_ttft_seconds'):g}s{_rounded_note(t, 'p95_ttft_seconds')} for 10 minutes.",
            runbook_url=runbook_url,
        ),
        _alert(
            "LLMHighToolFailureRatio",
            f"{series('llm:llm_tool_results:error_ratio_rate5m', own)} > {_exact(t.tool_failure_ratio)}\n"
            f"and on ({BY}, {TOOL_NAME}, {OVERFLOW_LABEL})\n"
            # As LLMHighErrorRatio: a tool whose results are rare (one failed result now and then) is not paged for.
            f"sum by ({BY}, {TOOL_NAME}, {OVERFLOW_LABEL}) "
            f"({counted(series(TOOL_RESULTS, sel, tool_error), '5m')}) >= {MIN_BURN_EVENTS}",
            severity="warning",
            for_="10m",
            summary=f"{service}: {{{{ $value | humanizePercentage }}}} of results of "
            f"{_named(TOOL_NAME, OVERFLOWED_TOOLS, 'tool ')} are errors",
            description=f"More than {_fmt(t.tool_failure_ratio * 100)}% of the tool results clients sent back "
            f"were errors for 10 minutes, at least {MIN_BURN_EVENTS} in the last 5 minutes throughout.",
            runbook_url=runbook_url,
        ),
        _alert(
            "LLMTokenRateAnomaly",
            f"sum by ({BY}) ({series('llm:llm_tokens:rate5m', own)})\n"
            f"  > {_exact(t.token_rate_spike_factor)} * ({series('llm:llm_tokens:rate1h', own)} offset 15m)\n"
            f"and\nsum by ({BY}) ({series('llm:llm_tokens:rate5m', own)}) > {_exact(t.token_rate_floor_per_second)}\n"
            # A baseline of a whole hour: the service had traffic 75 minutes ago (else the hourly rate 15 minutes
            # ago spans a few minutes of smoke tests, and real traffic starting reads as a spike).
            f"and\nsum by ({BY}) ({series('llm:llm_tokens:rate5m', own)} offset 75m) > 0",
            severity="warning",
            for_="10m",
            summary=f"{service} is using tokens {_exact(t.token_rate_spike_factor)}x faster than in the hour before",
            description=f"Token rate {{{{ $value | humanize }}}}/s exceeds {_exact(t.token_rate_spike_factor)} times "
            "the hourly average measured 15 minutes earlier "
            f"(and the floor of {_exact(t.token_rate_floor_per_second)}/s).",
            runbook_url=runbook_url,
        ),
        _alert(
            "LLMTelemetryInternalErrors",
            f"sum by ({BY}, {COMPONENT}) (rate({series(INTERNAL_ERRORS, sel)}[5m])) > 0",
            severity="info",
            for_="15m",
            summary=f"llm-telemetry in {service} keeps failing in {{{{ $labels.{COMPONENT} }}}}",
            description="The middleware caught its own errors for 15 minutes; requests are unaffected but some "
            "telemetry is missing.",
            runbook_url=runbook_url,
        ),
        _alert(
            "LLMTelemetrySetupFailed",
            # Counted once per process and never again: a rate would never see it, its presence is the failure.
            f"max by ({BY}, {COMPONENT}) ({series(INTERNAL_ERRORS, sel, SETUP_MATCHER)}) > 0",
            severity="warning",
            for_="5m",
            summary=f"llm-telemetry could not start in {service} ({{{{ $labels.{COMPONENT} }}}})",
            description="A process of the service failed to set up llm-telemetry and stays so until it restarts: "
            "after a setup failure it passes every LLM request through unmeasured, after a multiproc_setup failure "
            "it reports only its own share of the workers' metrics.",
            runbook_url=runbook_url,
        ),
        _alert(
            "LLMTelemetryUnreadBodies",
            # As LLMTelemetrySeriesOverflow: the rate over 15m of one body left unread holds for less than 15 minutes
            # (a scrape interval less), so a single large body at a busy moment does not fire; bodies left unread
            # again and again, throughout, do. By reason, which tells what to do.
            f"sum by ({BY}, {UNREAD_REASON}) (rate({series(UNREAD_BODIES, sel)}[15m])) > 0",
            severity="info",
            for_="15m",
            summary=f"llm-telemetry in {service} keeps leaving LLM bodies unread ({{{{ $labels.{UNREAD_REASON} }}}})",
            description="For 15 minutes, request bodies or JSON answers kept to be read have filled "
            "LLM_TELEMETRY_MAX_INSPECTED_BYTES, and further ones were passed on unread (budget: no room when they "
            "came; stalled: given up by requests whose clients stopped sending or reading): their calls are recorded "
            "without their request fields, or without their finish reasons, tool calls and served model. Clients "
            "get every byte; some telemetry is missing.",
            runbook_url=runbook_url,
        ),
        _alert(
            "LLMTelemetrySeriesOverflow",
            "\nor\n".join(
                f"sum by ({BY}) (rate({series(name, sel, OVERFLOW_MATCHER)}[15m])) > 0" for name in OVERFLOWING
            ),
            severity="info",
            for_="15m",
            summary=f"{service} has more label combinations than llm-telemetry keeps per process",
            description=f"Some LLM metrics reached {inst.CARDINALITY_LIMIT:,} label combinations in a process; the "
            'traffic of further ones is counted in the series labelled otel_metric_overflow="true", so per-model '
            "and per-tenant breakdowns miss it (totals stay exact).",
            runbook_url=runbook_url,
        ),
    ]
    if t.cost_per_hour_usd is not None:
        alerts.append(
            _alert(
                "LLMCostBudgetExceeded",
                f"{series('llm:llm_cost_usd:rate1h', own)} * 3600 > {_exact(t.cost_per_hour_usd)}",
                severity="warning",
                for_="5m",
                summary=f'{service} spends {{{{ $value | printf "%.2f" }}}} USD per hour',
                description="Spend over the last hour is above the budget of "
                f"{_exact(t.cost_per_hour_usd)} USD per hour.",
                runbook_url=runbook_url,
            )
        )

    slo_alerts = _burn_alerts(
        "availability",
        "LLMAvailability",
        t.availability_objective,
        "Requests are failing through the service's fault (client errors excluded).",
        runbook_url,
        own,
        lambda window: availability_bad_events_expr(window, sel),
    ) + _burn_alerts(
        "ttft",
        "LLMTimeToFirstToken",
        t.ttft_objective,
        f"Streamed responses are taking more than {_exact(t.ttft_objective_seconds)}s to their first token, or"
        " are left without one after waiting that long.",
        runbook_url,
        own,
        lambda window: ttft_late_events_expr(window, t.ttft_objective_seconds, sel),
    )

    return [
        {"name": "llm-telemetry.recording", "rules": recording},
        {"name": "llm-telemetry.slo.recording", "rules": slo_recording},
        {"name": "llm-telemetry.alerts", "rules": alerts},
        {"name": "llm-telemetry.slo.alerts", "rules": slo_alerts},
    ]


def build_prometheus_rule(
    name: str,
    namespace: str,
    thresholds: AlertThresholds = AlertThresholds(),
    *,
    selector: str = "",
    labels: Mapping[str, str] | None = None,
    runbook_url: str = DEFAULT_RUNBOOK_URL,
) -> dict[str, Any]:
    """A ``monitoring.coreos.com/v1`` PrometheusRule holding :func:`build_rule_groups`.

    ``labels`` go on the object's metadata, e.g. the ``release`` label a kube-prometheus-stack Prometheus
    selects rules by.
    """
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": name, "namespace": namespace, "labels": dict(labels or {})},
        "spec": {"groups": build_rule_groups(thresholds, selector=selector, runbook_url=runbook_url)},
    }


class _Dumper(yaml.SafeDumper):
    pass


def _str_representer(dumper: yaml.SafeDumper, data: str) -> yaml.ScalarNode:
    # Multi-line PromQL reads best as a literal block, as in hand-written rule files.
    style = "|" if "\n" in data else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)


_Dumper.add_representer(str, _str_representer)


def dump_yaml(data: Any) -> str:
    """YAML with literal blocks for multi-line strings and keys in insertion order."""
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, width=1000, allow_unicode=True)


def render_rule_file(
    thresholds: AlertThresholds = AlertThresholds(),
    *,
    selector: str = "",
    runbook_url: str = DEFAULT_RUNBOOK_URL,
) -> str:
    """A plain Prometheus rule file (``groups: [...]``) for ``rule_files:`` or ``promtool check rules``."""
    return dump_yaml({"groups": build_rule_groups(thresholds, selector=selector, runbook_url=runbook_url)})


__all__: Sequence[str] = (
    "DEFAULT_RUNBOOK_URL",
    "METRICS",
    "AlertThresholds",
    "build_prometheus_rule",
    "build_rule_groups",
    "dump_yaml",
    "render_rule_file",
)
