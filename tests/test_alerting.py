"""Alerts end to end: the operator's PrometheusRules in a real Prometheus, notifications from a real Alertmanager.

Two services of the demo app (uvicorn processes), ``chat`` and ``search`` in namespace ``llm``, each with the
PrometheusRule the operator builds for its LLMTelemetry: chat keeps the default availability objective (0.99),
search sets a loose one (0.5). Prometheus scrapes both as their ServiceMonitors make it (the job is the
LLMTelemetry's name), loads both rule files as the Prometheus Operator does (one per PrometheusRule), and sends its
alerts to an Alertmanager whose webhook receiver is this test. Both services fail 30% of their requests. That burns
chat's budget 30 times over, so chat's burn-rate alerts must reach the receiver with their labels and annotations
rendered (the runbook link the operator is configured with); search's objective allows it, so no notification may
name search. Each service is judged by its own resource's thresholds only. Both also get requests with bodies past
the inspection budget's uncounted 64 KiB; chat's budget is 1 byte (``LLM_TELEMETRY_MAX_INSPECTED_BYTES``), so it
leaves them unread, and its LLMTelemetryUnreadBodies alert must be pending (its ``for`` is 15 minutes), search's not.

Needs the ``prometheus`` and ``prometheus-alertmanager`` (or ``alertmanager``) binaries (Debian packages
``prometheus`` and ``prometheus-alertmanager``); skipped otherwise.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

PROMETHEUS = shutil.which("prometheus")
ALERTMANAGER = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")
if PROMETHEUS is None or ALERTMANAGER is None:
    pytest.skip(
        "needs the prometheus and alertmanager binaries (Debian packages prometheus, prometheus-alertmanager)",
        allow_module_level=True,
    )
pytest.importorskip("uvicorn")

from llm_telemetry_operator.config import OperatorConfig  # noqa: E402
from llm_telemetry_operator.constants import METRICS_PORT_NAME  # noqa: E402
from llm_telemetry_operator.resources import build_prometheus_rule  # noqa: E402
from llm_telemetry_operator.spec import parse_spec  # noqa: E402
from support import free_port, stop_process, wait_for  # noqa: E402

pytestmark = pytest.mark.slow

NAMESPACE = "llm"
#: Each LLMTelemetry (its name is the job its ServiceMonitor sets) and its spec.alerts.
RESOURCES = {"chat": {}, "search": {"availabilityObjective": 0.5}}
#: Each service's LLM_TELEMETRY_MAX_INSPECTED_BYTES: chat has no room for any body past the uncounted 64 KiB.
INSPECTED_BYTES = {"chat": "1", "search": str(256 * 1024 * 1024)}
#: Where the operator is configured to link the alerts' runbooks (chart value defaults.runbookUrl).
RUNBOOKS = "https://runbooks.example.com/llm-telemetry"
DEMO_SERVICE = [
    sys.executable,
    "-m",
    "uvicorn",
    "--factory",
    "llm_telemetry.demo.app:create_app",
    "--host",
    "127.0.0.1",
]
#: Three of every ten requests fail.
FAILING = {0, 4, 7}

ALERTMANAGER_CONFIG = """
route:
  receiver: test
  group_by: [alertname, namespace, job]
  group_wait: 1s
  group_interval: 1s
  repeat_interval: 1h
receivers:
  - name: test
    webhook_configs:
      - url: http://127.0.0.1:{webhook}/
        send_resolved: false
"""


class Receiver(ThreadingHTTPServer):
    """Alertmanager's webhook receiver: keeps every notification's JSON."""

    def __init__(self) -> None:
        self.notifications: list[dict[str, Any]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.notifications.append(json.loads(body))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)

    def alerts(self) -> list[dict[str, Any]]:
        return [alert for notification in self.notifications for alert in notification["alerts"]]


def _start(command: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)


def _up(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=5) as response:
        return bool(response.status == 200)


def _send(base: str, fail: bool, large: bool = False) -> None:
    content = "hi" * (50_000 if large else 1)  # (large: 100 KB, past the 64 KiB of a body the budget does not count)
    body = json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": content}]}).encode()
    headers = {"content-type": "application/json", **({"x-demo-fail": "server_error"} if fail else {})}
    request = urllib.request.Request(f"{base}/v1/chat/completions", data=body, headers=headers)
    try:
        urllib.request.urlopen(request, timeout=10).close()
    except urllib.error.HTTPError as exc:
        assert fail and exc.code == 500


@dataclass(frozen=True)
class Notified:
    receiver: Receiver
    prometheus: str

    def alerts(self) -> list[dict[str, Any]]:
        return self.receiver.alerts()


@pytest.fixture(scope="module")
def notified(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Notified]:
    """Both services under traffic until chat's alerts have reached the receiver, and a while after."""
    root = tmp_path_factory.mktemp("alerting")
    receiver = Receiver()
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    processes: list[subprocess.Popen[bytes]] = []
    try:
        services, scrape_configs, rule_files = {}, [], []
        for name, alerts in RESOURCES.items():
            port, metrics_port = free_port(), free_port()
            env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "LLM_TELEMETRY_"))}
            env.update(
                LLM_TELEMETRY_METRICS_PORT=str(metrics_port),
                LLM_TELEMETRY_METRICS_HOST="127.0.0.1",
                LLM_TELEMETRY_REQUEST_LOGS="false",
                OTEL_SERVICE_NAME=name,
                LLM_TELEMETRY_MAX_INSPECTED_BYTES=INSPECTED_BYTES[name],
            )
            processes.append(_start([*DEMO_SERVICE, "--port", str(port)], root / f"{name}.log", env))
            services[name] = f"http://127.0.0.1:{port}"
            # What the Prometheus Operator makes of the ServiceMonitor: the job is the LLMTelemetry's name, the
            # endpoint its port's name.
            labels = {"namespace": NAMESPACE, "endpoint": METRICS_PORT_NAME}
            scrape_configs.append(
                {"job_name": name, "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"], "labels": labels}]}
            )
            owner = {"metadata": {"name": name, "namespace": NAMESPACE, "uid": f"uid-{name}"}}
            spec = parse_spec({"selector": {"matchLabels": {"app": name}}, "alerts": alerts})
            rule = build_prometheus_rule(owner, spec, OperatorConfig(runbook_url=RUNBOOKS))
            (root / f"{name}.rules.yaml").write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
            rule_files.append(str(root / f"{name}.rules.yaml"))

        # The team's own ServiceMonitor of the app's Service, named as the LLMTelemetry is: the same job, another
        # endpoint; its target is down (nothing listens there).
        app_target = {"targets": [f"127.0.0.1:{free_port()}"], "labels": {"namespace": NAMESPACE, "endpoint": "http"}}
        scrape_configs.append(
            {
                "job_name": "chat-app",
                "static_configs": [app_target],
                "relabel_configs": [{"target_label": "job", "replacement": "chat"}],
            }
        )

        am_port = free_port()
        (root / "alertmanager.yml").write_text(ALERTMANAGER_CONFIG.format(webhook=receiver.server_address[1]))
        processes.append(
            _start(
                [
                    ALERTMANAGER,
                    f"--config.file={root / 'alertmanager.yml'}",
                    f"--storage.path={root / 'am'}",
                    f"--web.listen-address=127.0.0.1:{am_port}",
                    "--cluster.listen-address=",
                ],
                root / "alertmanager.log",
            )
        )
        prom_port = free_port()
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "1s"},
            "rule_files": rule_files,
            "alerting": {"alertmanagers": [{"static_configs": [{"targets": [f"127.0.0.1:{am_port}"]}]}]},
            "scrape_configs": scrape_configs,
        }
        (root / "prometheus.yml").write_text(yaml.safe_dump(config))
        processes.append(
            _start(
                [
                    PROMETHEUS,
                    f"--config.file={root / 'prometheus.yml'}",
                    f"--storage.tsdb.path={root / 'data'}",
                    f"--web.listen-address=127.0.0.1:{prom_port}",
                ],
                root / "prometheus.log",
            )
        )
        for base in services.values():
            wait_for("the demo service", lambda base=base: _up(f"{base}/healthz"))
        wait_for("Alertmanager", lambda: _up(f"http://127.0.0.1:{am_port}/-/ready"))
        wait_for("Prometheus", lambda: _up(f"http://127.0.0.1:{prom_port}/-/ready"))

        sent = 0

        def traffic_until(done: float) -> None:
            nonlocal sent
            while time.monotonic() < done:
                for base in services.values():
                    _send(base, sent % 10 in FAILING, large=sent % 10 == 5)
                sent += 1

        def chat_alerted() -> bool:
            traffic_until(time.monotonic() + 0.5)
            names = {a["labels"]["alertname"] for a in receiver.alerts() if a["labels"].get("job") == "chat"}
            return names >= {"LLMAvailabilityBurnRateFast", "LLMAvailabilityBurnRateSlow"}

        wait_for("chat's burn-rate alerts at the receiver", chat_alerted, seconds=120)
        # Long enough after for any alert on search to have been evaluated, sent and grouped too.
        traffic_until(time.monotonic() + 8)
        yield Notified(receiver, f"http://127.0.0.1:{prom_port}")
    finally:
        for process in processes:
            stop_process(process)
        receiver.shutdown()


def test_chats_burn_alerts_arrive_rendered(notified: Notified) -> None:
    chat = [a for a in notified.alerts() if a["labels"]["job"] == "chat"]
    assert {a["labels"]["alertname"] for a in chat} == {"LLMAvailabilityBurnRateFast", "LLMAvailabilityBurnRateSlow"}
    for alert in chat:
        name, speed = alert["labels"]["alertname"], alert["labels"]["alertname"].removeprefix("LLMAvailabilityBurnRate")
        severity = "critical" if speed == "Fast" else "warning"
        assert alert["status"] == "firing"
        assert alert["labels"] == {
            "alertname": name,
            "namespace": NAMESPACE,
            "job": "chat",
            "severity": severity,
            "slo": "availability",
        }
        annotations = alert["annotations"]
        assert annotations["runbook_url"] == f"{RUNBOOKS}#{name.lower()}"
        steadily = "fast" if speed == "Fast" else "steadily"
        assert annotations["summary"] == f"llm/chat is spending its availability error budget {steadily}"
        ratio = re.search(
            r"Objective 0\.99 \(1% budget\);.* Ratio over the long window: ([0-9.]+)%\.$", annotations["description"]
        )
        assert ratio and 20 <= float(ratio.group(1)) <= 40, annotations["description"]


def test_no_alert_judges_a_service_by_another_resources_objective(notified: Notified) -> None:
    assert [a["labels"] for a in notified.alerts() if a["labels"]["job"] != "chat"] == []


def test_the_apps_own_scrape_of_the_same_job_is_not_an_llm_target(notified: Notified) -> None:
    """Its target is down, but it is not the LLM metrics endpoint: LLMTargetDown must not even be pending."""
    with urllib.request.urlopen(f"{notified.prometheus}/api/v1/targets", timeout=10) as response:
        targets = json.loads(response.read())["data"]["activeTargets"]
    assert [t["health"] for t in targets if t["labels"]["endpoint"] == "http"] == ["down"]
    with urllib.request.urlopen(f"{notified.prometheus}/api/v1/alerts", timeout=10) as response:
        alerts = json.loads(response.read())["data"]["alerts"]
    # (About that target: the LLM one, scraped with a 1 s timeout on a loaded machine, may miss one scrape.)
    down = [a["labels"] for a in alerts if a["labels"]["alertname"] == "LLMTargetDown"]
    assert [labels for labels in down if labels.get("endpoint") == "http"] == []


def test_bodies_left_unread_are_pending_for_their_service_only(notified: Notified) -> None:
    """The middleware's counter of bodies left unread, as Prometheus scrapes it, is what LLMTelemetryUnreadBodies
    reads: chat's alert is pending, by reason, with its summary rendered; search, with room for its bodies, has none.
    (Firing takes 15 minutes; tests/promtool/service_health.yaml pins when it fires and resolves.)"""
    with urllib.request.urlopen(f"{notified.prometheus}/api/v1/alerts", timeout=10) as response:
        alerts = json.loads(response.read())["data"]["alerts"]
    unread = [a for a in alerts if a["labels"]["alertname"] == "LLMTelemetryUnreadBodies"]
    assert [(a["state"], a["labels"]) for a in unread] == [
        (
            "pending",
            {
                "alertname": "LLMTelemetryUnreadBodies",
                "namespace": NAMESPACE,
                "job": "chat",
                "llm_telemetry_reason": "budget",
                "severity": "info",
            },
        )
    ]
    assert unread[0]["annotations"]["summary"] == "llm-telemetry in llm/chat keeps leaving LLM bodies unread (budget)"
    assert unread[0]["annotations"]["runbook_url"] == f"{RUNBOOKS}#llmtelemetryunreadbodies"
