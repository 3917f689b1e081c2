"""Entry point of ``llm-telemetry-operator``: run kopf with settings from flags and the environment.

Every setting has an ``LLM_TELEMETRY_OPERATOR_*`` variable (what the Helm chart sets); a flag given on the
command line wins over its variable, so a developer can run the operator by hand against any cluster.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import getpass
import os
import re
import socket
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from llm_telemetry_operator import config as cfg
from llm_telemetry_operator.config import OperatorConfig
from llm_telemetry_operator.errors import ConfigurationError

#: kopf releases from 1.45 need Python 3.11, and the operator's own passes run in tasks started in kopf's
#: context (``asyncio.create_task(..., context=)``, new in 3.11). The middleware alone runs on 3.10.
MIN_PYTHON = (3, 11)

#: Flags that stand for an environment variable: (flag destination, variable).
_ENV_FLAGS = (
    ("traces_endpoint", cfg.LLM_TELEMETRY_OPERATOR_TRACES_ENDPOINT),
    ("logs_endpoint", cfg.LLM_TELEMETRY_OPERATOR_LOGS_ENDPOINT),
    ("logs_tenant", cfg.LLM_TELEMETRY_OPERATOR_LOGS_TENANT),
    ("jaeger_datasource_uid", cfg.LLM_TELEMETRY_OPERATOR_JAEGER_DATASOURCE_UID),
    ("loki_datasource_uid", cfg.LLM_TELEMETRY_OPERATOR_LOKI_DATASOURCE_UID),
    ("runbook_url", cfg.LLM_TELEMETRY_OPERATOR_RUNBOOK_URL),
    ("servicemonitor_labels", cfg.LLM_TELEMETRY_OPERATOR_SERVICEMONITOR_LABELS),
    ("dashboard_label", cfg.LLM_TELEMETRY_OPERATOR_DASHBOARD_LABEL),
    ("peering", cfg.LLM_TELEMETRY_OPERATOR_PEERING),
    ("priority", cfg.LLM_TELEMETRY_OPERATOR_PRIORITY),
    ("peering_lifetime_seconds", cfg.LLM_TELEMETRY_OPERATOR_PEERING_LIFETIME_SECONDS),
    ("metrics_port", cfg.LLM_TELEMETRY_OPERATOR_METRICS_PORT),
    ("health", cfg.LLM_TELEMETRY_OPERATOR_HEALTH),
    ("resync_seconds", cfg.LLM_TELEMETRY_OPERATOR_RESYNC_SECONDS),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llm-telemetry-operator",
        description=(
            "Wire LLM telemetry (metrics, traces, logs, alerts, dashboards) into the workloads that LLMTelemetry "
            "resources select. Each flag overrides its LLM_TELEMETRY_OPERATOR_* environment variable."
        ),
        epilog=(
            "Peering: unless --standalone is given, the operator coordinates replicas through a ClusterKopfPeering "
            "(in namespaced mode too), which the Helm chart creates. "
            "Without that object the operator stands by; run with --standalone when only one replica runs, e.g. "
            "by hand against a development cluster."
        ),
    )
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument(
        "-n",
        "--namespace",
        action="append",
        dest="namespaces",
        metavar="NAMESPACE",
        help="watch this namespace (repeatable; default: LLM_TELEMETRY_OPERATOR_NAMESPACES, else all namespaces)",
    )
    scope.add_argument(
        "-A", "--all-namespaces", action="store_true", help="watch every namespace, whatever the environment says"
    )
    parser.add_argument(
        "--standalone",
        action="store_true",
        default=None,
        help="run without peering: no ClusterKopfPeering needed (one replica only)",
    )
    parser.add_argument(
        "--kubeconfig", help="kubeconfig file (default: in-cluster, else $KUBECONFIG or ~/.kube/config)"
    )
    parser.add_argument("--context", help="kubeconfig context (default: the current one)")
    parser.add_argument("--peering", metavar="NAME", help="name of the ClusterKopfPeering")
    parser.add_argument("--priority", help="peering priority: an integer, or 'auto' for a random one")
    parser.add_argument(
        "--peering-lifetime-seconds",
        metavar="SECONDS",
        help="how long a replica counts as alive after its last peering keepalive: a standby takes over this long"
        " at most after the active replica went silent (default 60)",
    )
    parser.add_argument("--traces-endpoint", metavar="URL", help="default OTLP endpoint for traces")
    parser.add_argument("--logs-endpoint", metavar="URL", help="default Loki OTLP base URL for logs")
    parser.add_argument("--logs-tenant", metavar="TENANT", help="default Loki tenant (X-Scope-OrgID) for logs")
    parser.add_argument("--jaeger-datasource-uid", metavar="UID", help="Grafana's Jaeger datasource, for trace links")
    parser.add_argument("--loki-datasource-uid", metavar="UID", help="Grafana's Loki datasource, for the log panel")
    parser.add_argument("--runbook-url", metavar="URL", help="base of each alert's runbook_url annotation")
    parser.add_argument(
        "--servicemonitor-labels", metavar="K=V,...", help="labels put on every ServiceMonitor and PrometheusRule"
    )
    parser.add_argument("--dashboard-label", metavar="K=V", help="label Grafana's dashboard sidecar selects by")
    parser.add_argument("--metrics-port", metavar="PORT", help="port of the operator's own metrics; 0 turns them off")
    parser.add_argument("--health", metavar="URL", help="liveness endpoint URL; empty turns it off")
    parser.add_argument("--resync-seconds", metavar="SECONDS", help="interval of the periodic full pass")
    parser.add_argument(
        "--log-format",
        choices=("json", "text"),
        default="json",
        help="json (default, for log shippers) or text: one line per record with time, logger and level",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    return parser


def config_from_args(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> OperatorConfig:
    """The environment's settings with the flags given on the command line put over them."""
    merged = dict(os.environ if env is None else env)
    #: The variables set from flags, with the flag: a bad value is reported as the flag's, as it was typed.
    flags: dict[str, str] = {}
    if args.all_namespaces:
        merged[cfg.LLM_TELEMETRY_OPERATOR_NAMESPACES] = ""
    elif args.namespaces:
        merged[cfg.LLM_TELEMETRY_OPERATOR_NAMESPACES] = ",".join(args.namespaces)
        flags[cfg.LLM_TELEMETRY_OPERATOR_NAMESPACES] = "--namespace"
    if args.standalone:
        merged[cfg.LLM_TELEMETRY_OPERATOR_STANDALONE] = "true"
    for dest, variable in _ENV_FLAGS:
        value = getattr(args, dest)
        if value is not None:
            merged[variable] = str(value)
            flags[variable] = "--" + dest.replace("_", "-")
    try:
        config = OperatorConfig.from_env(merged)
    except ConfigurationError as exc:
        # Each setting a flag gave is named by that flag, wherever the message names it: a message about two
        # settings (the health endpoint on the metrics port) named the variable of `--metrics-port 8080`.
        message = str(exc)
        for variable, flag in flags.items():
            message = re.sub(rf"\b{re.escape(variable)}(?=[=:])", flag, message)
        if message != str(exc):
            raise ConfigurationError(message) from None
        raise
    return dataclasses.replace(config, kubeconfig=args.kubeconfig, context=args.context)


#: The cyclic garbage collector's thresholds while the operator runs (Python's default: 700, 10, 10).
GC_THRESHOLDS = (20_000, 20, 20)


def tune_gc() -> None:
    """Make the cyclic garbage collector run less often and skip what was loaded at startup.

    Measured at N=1,000 on a real API server, the collector took about 15% of the operator's CPU (4.2 s of
    26.7 s): each full collection walks every tracked object, the modules of kopf and the ``kubernetes`` package
    (thousands of classes and functions) included, and with the default thresholds a collection of the youngest
    generation ran every few tens of milliseconds. ``gc.freeze()`` moves everything alive now into a permanent
    generation no collection walks; the higher thresholds collect the same garbage in fewer, larger rounds (the
    operator's own garbage is mostly freed by reference counting; what cycles remain, asyncio futures and
    exception tracebacks, waits a little longer).
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def peering_identity() -> str | None:
    """The name this process goes by in the peering object, when kopf's own choice would fail; else None.

    kopf takes ``POD_ID`` (the chart sets it to the pod's name), else ``user@host/time/random``, looking the user
    up in the password database. A container run under a UID the image does not list (OpenShift's restricted
    security context constraints assign one per namespace) has no entry there, and kopf's lookup raises before
    the operator starts, on every restart. Such a process goes by ``uid<N>@host/pid`` instead.
    """
    if os.environ.get("POD_ID"):
        return None
    try:
        getpass.getuser()
    except (KeyError, OSError):  # KeyError up to Python 3.12, OSError from 3.13
        return f"uid{os.getuid()}@{socket.gethostname()}/{os.getpid()}"
    return None


def kopf_options(config: OperatorConfig) -> dict[str, Any]:
    """The arguments of ``kopf.run`` (and ``kopf.operator``) that follow from the configuration."""
    import kopf

    options: dict[str, Any] = {
        # Peering on unless standalone: a standby replica waits while another one holds the peering object.
        "standalone": config.standalone,
        # kopf treats any peering name as "peering is mandatory" and, standalone or not, pauses every watch
        # until the peering CRD exists: so standalone passes none.
        "peering_name": None if config.standalone else config.peering,
        "priority": config.priority,
        "clusterwide": config.clusterwide,
        "namespaces": list(config.namespaces),
        "memo": kopf.Memo(config=config),
    }
    # The name this replica goes by in the peering object, chosen here rather than by kopf (whose own choice,
    # without POD_ID, is random per call): the operator's passes of its own stand by as kopf does (standby.py).
    identity = (
        os.environ.get("POD_ID") or peering_identity() or f"{getpass.getuser()}@{socket.gethostname()}/{os.getpid()}"
    )
    options["identity"] = identity
    if not config.standalone:
        options["memo"]["identity"] = identity
    return options


def main(argv: Sequence[str] | None = None) -> int:
    """Run the operator until it is signalled to stop; exit 2 on bad flags or configuration."""
    args = build_parser().parse_args(argv)
    if sys.version_info < MIN_PYTHON:
        running = ".".join(map(str, sys.version_info[:3]))
        print(f"llm-telemetry-operator: needs Python 3.11 or newer; this is {running}", file=sys.stderr)
        return 2
    try:
        config = config_from_args(args)
    except ConfigurationError as exc:
        print(f"llm-telemetry-operator: configuration error: {exc}", file=sys.stderr)
        return 2
    try:
        import kopf  # imported here so that --help and configuration errors answer at once
    except ModuleNotFoundError as exc:
        print(f"llm-telemetry-operator: {exc}; install the operator's extra: pip install 'llm-telemetry[operator]'",
              file=sys.stderr)  # fmt: skip
        return 2

    kopf.configure(
        debug=args.verbose,
        verbose=args.verbose,
        log_format=kopf.LogFormat.JSON if args.log_format == "json" else kopf.LogFormat.FULL,
        # Text lines about a resource start with its "[namespace/name]" (JSON lines carry it as "object").
        log_prefix=args.log_format != "json",
        log_refkey="object",
    )
    from llm_telemetry_operator import (
        handlers,  # noqa: F401  (registers the handlers)
        metrics,
    )

    try:
        # Bound before kopf runs: a port taken is a configuration error to exit on, not a startup retried each minute.
        metrics.serve(config.metrics_port)
    except OSError as exc:
        print(f"llm-telemetry-operator: metrics port {config.metrics_port}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    tune_gc()
    kopf.run(liveness_endpoint=config.health or None, **kopf_options(config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
