"""The rendered rules and the dashboard's queries on a real Prometheus server scraping the real middleware.

A demo LLM service wrapped by ``LLMTelemetryMiddleware`` runs under uvicorn on 127.0.0.1; the Debian
``prometheus`` binary scrapes it every second and evaluates the rule file every second.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = pytest.mark.slow

PROMETHEUS = shutil.which("prometheus") or ("/usr/bin/prometheus" if Path("/usr/bin/prometheus").exists() else None)
if PROMETHEUS is None:
    pytest.skip("the prometheus server binary is not installed (Debian package prometheus)", allow_module_level=True)

pytest.importorskip("uvicorn")
pytest.importorskip("openai")
demo_app = pytest.importorskip("llm_telemetry.demo.app", reason="the demo service (llm_telemetry.demo) is missing")
demo_run = pytest.importorskip("llm_telemetry.demo.run", reason="the demo driver (llm_telemetry.demo.run) is missing")

from llm_telemetry.monitoring.dashboards import build_dashboard  # noqa: E402
from llm_telemetry.monitoring.rules import AlertThresholds, render_rule_file  # noqa: E402
from support import free_port, serve  # noqa: E402

JOB = "llm"
#: Panels the demo traffic cannot fill: the demo service reports no prompt-cache or reasoning tokens.
EMPTY_WITH_DEMO_TRAFFIC = {"Cache-hit share of input tokens", "Cache and reasoning tokens/min by model"}


class PrometheusAPI:
    def __init__(self, base: str) -> None:
        self.base = base

    def get(self, path: str, **params: str) -> Any:
        url = f"{self.base}{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
        with urllib.request.urlopen(url, timeout=10) as response:
            body = json.loads(response.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self.get("/api/v1/query", query=expr)
        result: list[dict[str, Any]] = data["result"]
        return result

    def wait_for(self, what: str, check: Any, timeout: float = 90) -> Any:
        """Poll ``check()`` until it returns something truthy (no assertion on how long it took)."""
        deadline = time.monotonic() + timeout
        while True:
            value = check()
            if value:
                return value
            if time.monotonic() > deadline:
                pytest.fail(f"gave up waiting for {what}")
            time.sleep(0.5)


@pytest.fixture(scope="module")
def demo() -> Iterator[tuple[str, int]]:
    metrics_port = free_port()
    app = demo_app.create_app(
        first_token_delay=0.02,
        token_delay=0.002,
        metrics_port=metrics_port,
        metrics_host="127.0.0.1",
        attribution_headers={"x-tenant-id": "tenant"},
    )
    with serve(app) as base_url:
        yield base_url, metrics_port


@pytest.fixture(scope="module")
def prometheus(demo: tuple[str, int], tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrometheusAPI]:
    base_url, metrics_port = demo
    # Traffic before the first scrape creates the series; traffic after it makes the counters move.
    demo_run.drive(f"{base_url}/v1", 4)
    directory = tmp_path_factory.mktemp("prometheus")
    rules = directory / "llm-telemetry.rules.yaml"
    rules.write_text(render_rule_file(AlertThresholds(cost_per_hour_usd=1000), selector=f'job="{JOB}"'))
    config = directory / "prometheus.yml"
    config.write_text(
        yaml.safe_dump(
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "1s"},
                "rule_files": [str(rules)],
                "scrape_configs": [{"job_name": JOB, "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"]}]}],
            }
        )
    )
    port = free_port()
    log = (directory / "prometheus.log").open("w")
    process = subprocess.Popen(
        [
            str(PROMETHEUS),
            f"--config.file={config}",
            f"--storage.tsdb.path={directory / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    api = PrometheusAPI(f"http://127.0.0.1:{port}")
    try:

        def ready() -> bool:
            if process.poll() is not None:
                pytest.fail(f"prometheus exited: {(directory / 'prometheus.log').read_text()}")
            try:
                with urllib.request.urlopen(f"{api.base}/-/ready", timeout=2) as response:
                    return bool(response.status == 200)
            except (urllib.error.URLError, ConnectionError):
                return False

        api.wait_for("prometheus to become ready", ready)
        api.wait_for("the first successful scrape", lambda: api.query(f'up{{job="{JOB}"}} == 1'))
        demo_run.drive(f"{base_url}/v1", 8)
        yield api
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def _non_nan(result: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in result if r["value"][1] not in ("NaN", "+Inf", "-Inf")]


@pytest.mark.parametrize(
    "record",
    [
        "llm:llm_requests:rate5m",
        "llm:llm_errors:rate5m",
        "llm:llm_errors:ratio_rate5m",
        "llm:gen_ai_server_request_duration_seconds:p95_5m",
        "llm:gen_ai_server_time_to_first_token_seconds:p95_5m",
        "llm:gen_ai_server_time_per_output_token_seconds:p95_5m",
        "llm:llm_tokens:rate5m",
        "llm:llm_tokens:rate1h",
        "llm:llm_cost_usd:rate1h",
        "llm:llm_tool_results:error_ratio_rate5m",
        "llm:slo_availability:ratio_rate5m",
        "llm:slo_availability:ratio_rate3d",
        "llm:slo_ttft:ratio_rate5m",
        "llm:slo_ttft:ratio_rate1h",
    ],
)
def test_recording_rules_return_data(prometheus: PrometheusAPI, record: str) -> None:
    result = prometheus.wait_for(f"{record} to have a value", lambda: _non_nan(prometheus.query(record)))
    assert {r["metric"]["job"] for r in result} == {JOB}
    assert all(float(r["value"][1]) >= 0 for r in result)


def test_recorded_values_reflect_the_traffic(prometheus: PrometheusAPI) -> None:
    requests = prometheus.wait_for("a request rate above zero", lambda: prometheus.query("llm:llm_requests:rate5m > 0"))
    assert float(requests[0]["value"][1]) > 0
    # The demo driver's failures: rate_limit and server_error count against availability, context_length not.
    errors = prometheus.wait_for("error rates", lambda: prometheus.query("llm:llm_errors:rate5m > 0"))
    assert {"rate_limit", "server_error", "context_length"} <= {r["metric"]["error_type"] for r in errors}
    tokens = prometheus.wait_for("token rates", lambda: prometheus.query("llm:llm_tokens:rate5m > 0"))
    assert {"input", "output"} <= {r["metric"]["gen_ai_token_type"] for r in tokens}
    assert {"gpt-4o", "gpt-4o-mini"} <= {r["metric"]["gen_ai_request_model"] for r in tokens}


def test_every_rule_evaluates_without_error(prometheus: PrometheusAPI) -> None:
    def evaluated() -> list[dict[str, Any]] | None:
        rules = [rule for group in prometheus.get("/api/v1/rules")["groups"] for rule in group["rules"]]
        return rules if rules and all(rule["health"] != "unknown" for rule in rules) else None

    rules = prometheus.wait_for("every rule to be evaluated", evaluated)
    assert [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"] == []
    alerts = {r["name"] for r in rules if r["type"] == "alerting"}
    assert {"LLMHighErrorRatio", "LLMTargetDown", "LLMCostBudgetExceeded", "LLMAvailabilityBurnRateFast"} <= alerts


def test_target_down_alert_does_not_fire_while_scrapes_succeed(prometheus: PrometheusAPI) -> None:
    prometheus.wait_for("a successful scrape", lambda: prometheus.query(f'up{{job="{JOB}"}} == 1'))
    firing = prometheus.get("/api/v1/alerts")["alerts"]
    assert [a for a in firing if a["labels"]["alertname"] == "LLMTargetDown"] == []


def test_dashboard_queries_return_data_from_raw_metrics(prometheus: PrometheusAPI) -> None:
    # The dashboard reads raw metrics only; with every variable on "All" each panel must show something.
    prometheus.wait_for("latency histograms", lambda: _non_nan(prometheus.query("llm:slo_ttft:ratio_rate5m")))
    dashboard = build_dashboard()
    empty = []
    for panel in dashboard["panels"]:
        if panel["type"] in ("row", "logs"):
            continue
        results = []
        for target in panel["targets"]:
            expr = target["expr"].replace("$__rate_interval", "1m").replace("$__range", "1h")
            results += _non_nan(prometheus.query(re.sub(r"\$[a-z_]+", ".*", expr)))
        if not results:
            empty.append(panel["title"])
    assert set(empty) == EMPTY_WITH_DEMO_TRAFFIC


def test_dashboard_variables_list_the_scraped_values(prometheus: PrometheusAPI) -> None:
    models = prometheus.get("/api/v1/label/gen_ai_request_model/values", **{"match[]": "llm_requests_total"})
    assert {"gpt-4o", "gpt-4o-mini"} <= set(models)
    jobs = prometheus.get("/api/v1/label/job/values", **{"match[]": "llm_requests_total"})
    assert jobs == [JOB]
