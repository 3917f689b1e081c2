"""The ``llm-telemetry`` command."""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence

from .version import __version__

#: Kubernetes object names: a PrometheusRule's (DNS subdomain) and a namespace's (DNS label).
_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llm-telemetry", description="LLM-aware telemetry for ASGI services.")
    parser.add_argument("--version", action="version", version=f"llm-telemetry {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="run the demo LLM service, drive it with the openai SDK, print a summary")
    demo.add_argument("--host", default="127.0.0.1", help="address of the demo service (default 127.0.0.1)")
    demo.add_argument("--port", type=_port, default=8000, help="port of the demo service (default 8000)")
    demo.add_argument("--metrics-port", type=_port, default=9464, help="port of the metrics endpoint (default 9464)")
    demo.add_argument("--requests", type=_count, default=40, help="chat requests to send (default 40)")
    demo.add_argument("--serve", action="store_true", help="keep serving after the summary, until Ctrl-C")
    demo.add_argument("--logs", action="store_true", help="also print the JSON request log lines")

    rules = commands.add_parser("rules", help="print the Prometheus rule file (recording rules and alerts)")
    rules.add_argument("--selector", default="", help='extra label matchers, e.g. \'namespace="llm",job="chat"\'')
    rules.add_argument("--error-ratio", type=float, help="alert above this share of failed requests (0.05)")
    rules.add_argument("--p95-request-duration", type=float, help="alert above this p95 duration, seconds (81.92)")
    rules.add_argument("--p95-ttft", type=float, help="alert above this p95 time to first token, seconds (2.5)")
    rules.add_argument("--tool-failure-ratio", type=float, help="alert above this share of failed tool results (0.2)")
    rules.add_argument("--cost-per-hour", type=float, help="alert above this spend per hour, USD (off)")
    rules.add_argument("--availability-objective", type=float, help="SLO for burn-rate alerts (0.99)")
    rules.add_argument(
        "--ttft-objective", type=float, help="share of first tokens under --ttft-objective-seconds (0.99)"
    )
    rules.add_argument("--ttft-objective-seconds", type=float, help="a TTFT bucket boundary (2.5)")
    rules.add_argument(
        "--token-rate-spike-factor",
        type=float,
        help="token rate anomaly: this many times the earlier hourly average (3)",
    )
    rules.add_argument(
        "--token-rate-floor", type=float, help="token rate anomaly: only above this many tokens per second (20)"
    )
    rules.add_argument("--runbook-url", metavar="URL", help="base of each alert's runbook_url annotation")
    rules.add_argument("--prometheus-rule", metavar="NAME", help="print a PrometheusRule object named NAME instead")
    rules.add_argument("--namespace", default="default", help="namespace of the PrometheusRule object")

    dashboard = commands.add_parser("dashboard", help="print the Grafana dashboard JSON")
    dashboard.add_argument("--title", default="LLM services")
    dashboard.add_argument("--uid", default="llm-telemetry")
    dashboard.add_argument("--jaeger-uid", default="jaeger", help="uid of the Jaeger datasource for trace links")
    dashboard.add_argument("--loki-uid", default="loki", help="uid of the Loki datasource for the log panel")
    from .monitoring.dashboards import LOGS_MODES

    dashboard.add_argument(
        "--logs-mode",
        choices=LOGS_MODES,
        default="stdout",
        help="how request logs reach Loki, for the log panel's query: stdout (a log agent ships them) or otlp",
    )
    dashboard.add_argument(
        "--attribution-label", action="append", help="attribution label (without llm_metadata_); repeatable"
    )
    # The rules command's alert thresholds, at which the Health row's panels turn red.
    dashboard.add_argument("--error-ratio", type=float, help="the error ratio panel is red from this share (0.05)")
    dashboard.add_argument("--p95-request-duration", type=float, help="p95 duration red from this, seconds (81.92)")
    dashboard.add_argument("--p95-ttft", type=float, help="p95 time to first token red from this, seconds (2.5)")

    args = parser.parse_args(argv)
    if args.command == "demo":
        try:
            import openai  # noqa: F401
            import uvicorn  # noqa: F401
        except ModuleNotFoundError as exc:
            print(
                f"llm-telemetry demo: {exc}; install the demo's extra from the checkout: pip install '.[demo]'",
                file=sys.stderr,
            )
            return 2
        from .demo.run import DemoError, run_demo

        try:
            return run_demo(args.host, args.port, args.metrics_port, args.requests, args.serve, logs=args.logs)
        except DemoError as exc:
            print(f"llm-telemetry demo: {exc}", file=sys.stderr)
            return 1
    if args.command == "rules":
        return _rules(args)
    if args.command == "dashboard":
        from .monitoring.dashboards import render_dashboard_json
        from .monitoring.rules import AlertThresholds

        labels = tuple(args.attribution_label) if args.attribution_label else ("tenant",)
        fields = {
            "error_ratio": args.error_ratio,
            "p95_request_duration_seconds": args.p95_request_duration,
            "p95_ttft_seconds": args.p95_ttft,
        }
        try:
            thresholds = AlertThresholds(**{k: v for k, v in fields.items() if v is not None})
            text = render_dashboard_json(
                title=args.title, uid=args.uid, jaeger_uid=args.jaeger_uid, loki_uid=args.loki_uid,
                attribution_labels=labels, logs_mode=args.logs_mode, thresholds=thresholds,
            )  # fmt: skip
        except ValueError as exc:
            print(f"llm-telemetry dashboard: {exc}", file=sys.stderr)
            return 2
        sys.stdout.write(text)
        return 0
    parser.error(f"unknown command {args.command!r}")
    return 2


def _port(text: str) -> int:
    """A port the demo listens on: 0 would be no metrics listener (or a port the demo could not name)."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port number from 1 to 65535")
    return port


def _count(text: str) -> int:
    try:
        count = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if count < 0:
        raise argparse.ArgumentTypeError(f"{count} is negative")
    return count


def _rules(args: argparse.Namespace) -> int:
    from .monitoring.rules import AlertThresholds, build_prometheus_rule, dump_yaml, render_rule_file

    fields = {
        "error_ratio": args.error_ratio,
        "p95_request_duration_seconds": args.p95_request_duration,
        "p95_ttft_seconds": args.p95_ttft,
        "tool_failure_ratio": args.tool_failure_ratio,
        "cost_per_hour_usd": args.cost_per_hour,
        "availability_objective": args.availability_objective,
        "ttft_objective": args.ttft_objective,
        "ttft_objective_seconds": args.ttft_objective_seconds,
        "token_rate_spike_factor": args.token_rate_spike_factor,
        "token_rate_floor_per_second": args.token_rate_floor,
    }
    options = {"selector": args.selector, **({"runbook_url": args.runbook_url} if args.runbook_url else {})}
    try:
        thresholds = AlertThresholds(**{k: v for k, v in fields.items() if v is not None})
        if args.prometheus_rule:
            if len(args.prometheus_rule) > 253 or not _SUBDOMAIN.fullmatch(args.prometheus_rule):
                raise ValueError(f"--prometheus-rule {args.prometheus_rule!r}: not a Kubernetes object name")
            if len(args.namespace) > 63 or not _DNS_LABEL.fullmatch(args.namespace):
                raise ValueError(f"--namespace {args.namespace!r}: not a Kubernetes namespace name")
            text = dump_yaml(build_prometheus_rule(args.prometheus_rule, args.namespace, thresholds, **options))
        else:
            text = render_rule_file(thresholds, **options)
    except ValueError as exc:
        print(f"llm-telemetry rules: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
