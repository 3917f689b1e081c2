"""The ``llm-telemetry`` command as a user runs it: the demo, and the rule and dashboard renderers."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from support import free_port

CLI = [sys.executable, "-m", "llm_telemetry"]


def test_demo_drives_the_service_and_prints_a_summary_from_its_metrics() -> None:
    result = subprocess.run(
        [*CLI, "demo", "--port", str(free_port()), "--metrics-port", str(free_port()), "--requests", "8"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    # 8 chats + 2 for the tool round trip + 1 answer cut at max_tokens + 1 embedding + 4 failures.
    assert re.search(r"^requests\s+16$", out, re.M), out
    # The chats and the tool call's answer stop; the tool call itself, and the capped answer, do not.
    assert re.search(r"^  stop\s+9$", out, re.M), out
    assert re.search(r"^  tool_calls\s+1$", out, re.M), out
    assert re.search(r"^  length\s+1$", out, re.M), out
    assert re.search(r"^  get_weather\s+1$", out, re.M), out
    assert re.search(r"^  rate_limit\s+2$", out, re.M), out
    assert re.search(r"^  context_length\s+1$", out, re.M), out
    assert re.search(r"^  server_error\s+1$", out, re.M), out
    # 4 streams of 12 words; the ones without include_usage (i = 0 and 4) are estimated.
    assert re.search(r"^  output \(estimated\)\s+24$", out, re.M), out
    ttft = re.search(r"^TTFT p50 / p95\s+(\d+) ms / (\d+) ms$", out, re.M)
    assert ttft is not None and 50 <= int(ttft.group(1)) <= int(ttft.group(2)), out
    assert re.search(r"^cost\s+\$0\.0\d+$", out, re.M), out


def _listens(host: str) -> bool:
    try:
        with socket.create_server((host, 0), family=socket.AF_INET6 if ":" in host else socket.AF_INET):
            return True
    except OSError:
        return False


@pytest.mark.parametrize("host", ["::1", "127.0.0.2", "0.0.0.0"])
def test_the_demo_on_another_address_is_driven_and_scraped_there(host: str) -> None:
    """``--host`` puts the service and its metrics on that address. The summary scraped 127.0.0.1 whatever it said
    (``--host 127.0.0.2``: a traceback, connection refused), and ``--host ::1`` gave the client an unbracketed URL
    (a traceback, "Invalid port"); a wildcard address is reached at the loopback one."""
    if not _listens(host):
        pytest.skip(f"this host cannot listen on {host}")
    port, metrics_port = free_port(), free_port()
    result = subprocess.run(
        [*CLI, "demo", "--host", host, "--port", str(port), "--metrics-port", str(metrics_port), "--requests", "2"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    client = {"::1": "[::1]", "0.0.0.0": "127.0.0.1"}.get(host, host)
    assert f"metrics on http://{client}:{metrics_port}/metrics" in result.stdout, result.stdout
    assert re.search(r"^requests\s+10$", result.stdout, re.M), result.stdout


@pytest.mark.parametrize("taken", ["--port", "--metrics-port"])
def test_the_demo_on_a_port_another_process_holds_says_which_and_exits(taken: str) -> None:
    """A held ``--port`` ended in a traceback; a held ``--metrics-port`` left the metrics listener trying again every
    second while the summary scraped the other process (here one that never answers: a traceback after its time-out;
    another demo's metrics would have been summed instead, unsaid)."""
    ports = {"--port": free_port(), "--metrics-port": free_port()}
    with socket.create_server(("127.0.0.1", ports[taken])):
        result = subprocess.run(
            [*CLI, "demo", *(str(item) for pair in ports.items() for item in pair), "--requests", "2"],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert (result.returncode, result.stdout) == (1, ""), result.stdout
    assert f"llm-telemetry demo: --host/{taken}: cannot listen on 127.0.0.1:{ports[taken]}" in result.stderr
    assert "Traceback" not in result.stderr, result.stderr


def test_rules_command_renders_a_file_promtool_accepts(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (apt-get install prometheus)")
    out = subprocess.run(
        [*CLI, "rules", "--cost-per-hour", "5", "--selector", 'namespace="llm"'],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    path = tmp_path / "rules.yaml"
    path.write_text(out)
    check = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "LLMCostBudgetExceeded" in out and 'namespace="llm"' in out


def test_rules_command_rejects_a_ttft_objective_off_the_buckets() -> None:
    result = subprocess.run([*CLI, "rules", "--ttft-objective-seconds", "3"], capture_output=True, text=True)
    assert result.returncode == 2
    assert "not a bucket boundary" in result.stderr


def test_rules_command_sets_the_runbook_base_and_the_token_rate_anomaly() -> None:
    out = subprocess.run(
        [*CLI, "rules", "--runbook-url", "https://wiki.example/llm", "--token-rate-spike-factor", "5",
         "--token-rate-floor", "50"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    groups = yaml.safe_load(out)["groups"]
    alerts = {rule["alert"]: rule for group in groups for rule in group["rules"] if "alert" in rule}
    assert alerts["LLMNoTraffic"]["annotations"]["runbook_url"] == "https://wiki.example/llm#llmnotraffic"
    anomaly = alerts["LLMTokenRateAnomaly"]["expr"]
    assert "> 50" in anomaly and "> 5 * (" in anomaly, anomaly


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["rules", "--selector", "bad selector"], "llm-telemetry rules: selector 'bad selector'"),
        (["rules", "--prometheus-rule", "Bad Name"], "--prometheus-rule 'Bad Name': not a Kubernetes object name"),
        (["rules", "--prometheus-rule", "llm", "--namespace", "x y"], "--namespace 'x y': not a Kubernetes namespace"),
        (["rules", "--token-rate-floor", "-1"], "token_rate_floor_per_second=-1.0"),
        (["rules", "--runbook-url", "https://wiki/r#llm"], "runbook URL 'https://wiki/r#llm': no spaces or fragment"),
        (["dashboard", "--attribution-label", "bad-label"], "llm-telemetry dashboard: attribution label 'bad-label'"),
        # 0 is no metrics listener: the demo then ended in a traceback, scraping port 0; -3 sent the fixed mix.
        (["demo", "--metrics-port", "0"], "argument --metrics-port: 0 is not a port number from 1 to 65535"),
        (["demo", "--port", "70000"], "argument --port: 70000 is not a port number from 1 to 65535"),
        (["demo", "--requests", "-3"], "argument --requests: -3 is negative"),
    ],
)
def test_bad_arguments_exit_2_with_one_line_naming_them(arguments: list[str], message: str) -> None:
    result = subprocess.run([*CLI, *arguments], capture_output=True, text=True)
    assert (result.returncode, result.stdout) == (2, "")
    assert message in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_dashboard_command_prints_grafana_json() -> None:
    out = subprocess.run(
        [*CLI, "dashboard", "--jaeger-uid", "my-jaeger", "--attribution-label", "team"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    dashboard = json.loads(out)
    assert dashboard["uid"] == "llm-telemetry"
    assert "my-jaeger" in out and "llm_metadata_team" in out


def test_dashboard_command_turns_red_where_the_rules_commands_alerts_fire() -> None:
    """The same threshold flags as the rules command: the Health row turns red at what its alerts compare with (a
    p95 threshold between two bucket boundaries at the next one, 20 s at 20.48 s)."""
    flags = ["--error-ratio", "0.02", "--p95-request-duration", "20", "--p95-ttft", "5"]
    rules = subprocess.run([*CLI, "rules", *flags], capture_output=True, text=True, check=True).stdout
    alerts = {r["alert"]: r["expr"] for g in yaml.safe_load(rules)["groups"] for r in g["rules"] if "alert" in r}
    out = subprocess.run([*CLI, "dashboard", *flags], capture_output=True, text=True, check=True).stdout
    red = {
        p["title"]: p["fieldConfig"]["defaults"]["thresholds"]["steps"][-1]["value"]
        for p in json.loads(out)["panels"]
        if p["type"] == "stat"
    }
    assert "> 0.02\n" in alerts["LLMHighErrorRatio"] and red["Error ratio"] == 0.02
    assert alerts["LLMHighRequestDuration"].endswith("> 20.48") and red["p95 request duration"] == 20.48
    assert alerts["LLMHighTimeToFirstToken"].endswith("> 5") and red["p95 time to first token"] == 5
    bad = subprocess.run([*CLI, "dashboard", "--error-ratio", "-1"], capture_output=True, text=True)
    assert bad.returncode == 2 and "error_ratio" in bad.stderr


@pytest.mark.parametrize("mode", ["stdout", "otlp"])
def test_dashboard_command_queries_loki_for_the_logs_mode(mode: str) -> None:
    from llm_telemetry.monitoring.dashboards import ERROR_LOG_QUERIES

    out = subprocess.run([*CLI, "dashboard", "--logs-mode", mode], capture_output=True, text=True, check=True).stdout
    (panel,) = [p for p in json.loads(out)["panels"] if p["type"] == "logs"]
    assert panel["targets"][0]["expr"] == ERROR_LOG_QUERIES[mode]


@pytest.mark.parametrize("missing", ["uvicorn", "openai"])
def test_the_demo_without_its_extra_names_the_extra_to_install(missing: str) -> None:
    """Installed without the ``demo`` extra (a ``None`` in ``sys.modules`` makes an import fail as a missing module
    does), the demo says what to install instead of ending in a traceback."""
    script = (
        f"import sys; sys.modules[{missing!r}] = None; from llm_telemetry.cli import main; sys.exit(main(['demo']))"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert "pip install '.[demo]'" in result.stderr and "Traceback" not in result.stderr


def test_rules_help_states_each_thresholds_default_as_the_one_taken() -> None:
    """Each threshold's help ends with its default in brackets: given as the option, it changes no byte of the
    rule file (so the help cannot fall behind the defaults); every threshold option states one."""
    env = {**os.environ, "COLUMNS": "400"}
    shown = subprocess.run([*CLI, "rules", "--help"], capture_output=True, text=True, check=True, env=env).stdout
    options = dict(re.findall(r"^  (--[a-z0-9-]+) [A-Z0-9_]+\s+(.*)$", shown, re.MULTILINE))
    plain = {"--selector", "--runbook-url", "--prometheus-rule", "--namespace"}
    assert len(options) == 14 and plain <= set(options), options
    default = subprocess.run([*CLI, "rules"], capture_output=True, text=True, check=True).stdout
    for option, text in options.items():
        if option in plain:
            continue
        stated = re.search(r"\(([^()]+)\)$", text)
        assert stated, f"{option}: no default in its help ({text!r})"
        if stated[1] == "off":
            continue
        given = subprocess.run([*CLI, "rules", option, stated[1]], capture_output=True, text=True, check=True)
        assert given.stdout == default, f"{option} {stated[1]} is not the default"
