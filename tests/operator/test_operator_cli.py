"""``llm-telemetry-operator`` run by hand: flags over environment, ``--help``, and no silent idle without peering."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import pytest
from kopf_testing import (
    DEPLOYMENTS,
    LLMT,
    NAMESPACE,
    PEERING,
    condition,
    deployment,
    eventually,
    get,
    minimal_llmt,
    running_operator,
)

from llm_telemetry_operator import config as cfg
from llm_telemetry_operator.__main__ import _ENV_FLAGS, build_parser, config_from_args, main
from llm_telemetry_operator.config import OperatorConfig

ENV = {
    cfg.LLM_TELEMETRY_OPERATOR_NAMESPACES: "from-env",
    cfg.LLM_TELEMETRY_OPERATOR_PEERING: "env-peering",
    cfg.LLM_TELEMETRY_OPERATOR_METRICS_PORT: "9000",
}


def configured(*argv: str, env: dict[str, str] | None = None) -> OperatorConfig:
    return config_from_args(build_parser().parse_args(argv), ENV if env is None else env)


def test_help_runs_as_a_command() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "llm_telemetry_operator", "--help"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    for flag in ("--namespace", "--all-namespaces", "--standalone", "--kubeconfig", "--peering", "--metrics-port"):
        assert flag in result.stdout
    assert result.stdout.startswith("usage: llm-telemetry-operator")


def test_environment_applies_without_flags() -> None:
    config = configured()
    assert (config.namespaces, config.peering, config.metrics_port, config.standalone) == (
        ("from-env",),
        "env-peering",
        9000,
        False,
    )


def test_flags_override_environment() -> None:
    config = configured(
        "-n", "a", "--namespace", "b", "--peering", "mine", "--metrics-port", "0", "--standalone",
        "--kubeconfig", "kc.yaml", "--context", "dev", "--resync-seconds", "30", "--peering-lifetime-seconds", "20",
    )  # fmt: skip
    assert config.namespaces == ("a", "b")
    assert config.peering_lifetime_seconds == 20
    assert (config.peering, config.metrics_port, config.standalone) == ("mine", 0, True)
    assert (config.kubeconfig, config.context, config.resync_seconds) == ("kc.yaml", "dev", 30.0)


def test_every_setting_has_a_flag() -> None:
    """docs/operator.md: by hand, flags do what the chart's variables do (the namespaces and standalone mode have
    flags of their own shape)."""
    config = configured(
        "--logs-tenant", "team-a", "--jaeger-datasource-uid", "j1", "--loki-datasource-uid", "l1",
        "--runbook-url", "https://wiki.example/llm", "--traces-endpoint", "http://otel:4318",
        "--logs-endpoint", "http://loki:3100/otlp", "--servicemonitor-labels", "release=kps",
        "--dashboard-label", "grafana_dashboard=1", "--priority", "7", "--health", "", "--metrics-port", "0",
    )  # fmt: skip
    assert (config.logs_tenant, config.jaeger_datasource_uid, config.loki_datasource_uid) == ("team-a", "j1", "l1")
    assert config.runbook_url == "https://wiki.example/llm"
    flagged = {variable for _, variable in _ENV_FLAGS} | {
        cfg.LLM_TELEMETRY_OPERATOR_NAMESPACES,
        cfg.LLM_TELEMETRY_OPERATOR_STANDALONE,
    }
    variables = {value for name, value in vars(cfg).items() if name.startswith("LLM_TELEMETRY_OPERATOR_")}
    assert variables == flagged


def test_all_namespaces_overrides_the_environments_list() -> None:
    config = configured("--all-namespaces")
    assert config.clusterwide and config.namespaces == ()


def test_namespace_and_all_namespaces_exclude_each_other(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as raised:
        build_parser().parse_args(["-n", "a", "--all-namespaces"])
    assert raised.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_standalone_from_environment() -> None:
    assert configured(env={cfg.LLM_TELEMETRY_OPERATOR_STANDALONE: "true"}).standalone


def test_bad_flag_value_exits_2_naming_the_flag(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--metrics-port", "99999"]) == 2
    err = capsys.readouterr().err
    assert "--metrics-port=99999" in err and cfg.LLM_TELEMETRY_OPERATOR_METRICS_PORT not in err
    assert main(["-n", "Not_A_Namespace"]) == 2
    err = capsys.readouterr().err
    assert "--namespace: 'Not_A_Namespace'" in err and cfg.LLM_TELEMETRY_OPERATOR_NAMESPACES not in err


def test_a_flag_that_clashes_with_another_setting_is_named_as_typed(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--metrics-port 8080`, the port of the default liveness endpoint: the message names the flag the user typed
    (it named LLM_TELEMETRY_OPERATOR_METRICS_PORT, a variable never set) beside the health endpoint's variable."""
    monkeypatch.delenv(cfg.LLM_TELEMETRY_OPERATOR_HEALTH, raising=False)
    monkeypatch.delenv(cfg.LLM_TELEMETRY_OPERATOR_METRICS_PORT, raising=False)
    assert main(["--metrics-port", "8080"]) == 2
    err = capsys.readouterr().err
    assert "the same port as --metrics-port=8080" in err, err
    assert cfg.LLM_TELEMETRY_OPERATOR_METRICS_PORT not in err and f"{cfg.LLM_TELEMETRY_OPERATOR_HEALTH}=" in err
    assert main(["--metrics-port", "8080", "--health", "http://0.0.0.0:8080/healthz"]) == 2
    err = capsys.readouterr().err
    assert "--health='http://0.0.0.0:8080/healthz': the same port as --metrics-port=8080" in err, err


def test_bad_environment_value_exits_2_naming_the_variable(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(cfg.LLM_TELEMETRY_OPERATOR_RESYNC_SECONDS, "-5")
    assert main(["--metrics-port", "0"]) == 2
    assert f"{cfg.LLM_TELEMETRY_OPERATOR_RESYNC_SECONDS}='-5'" in capsys.readouterr().err


def test_a_bad_peering_lifetime_flag_exits_2_naming_the_flag(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--metrics-port", "0", "--peering-lifetime-seconds", "5"]) == 2
    assert "--peering-lifetime-seconds='5': must be between 15 and 3600 seconds" in capsys.readouterr().err


def peering_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "peering" in r.getMessage()]


async def test_missing_peering_object_is_a_startup_warning(emulator: Any, caplog: pytest.LogCaptureFixture) -> None:
    """Peering on, and no ClusterKopfPeering of that name: the operator says so, with the remedy."""
    caplog.set_level(logging.INFO)
    emulator.objects[DEPLOYMENTS, NAMESPACE, "chat"] = deployment()
    emulator.objects[LLMT, NAMESPACE, "chat"] = minimal_llmt()
    async with running_operator(OperatorConfig(peering="nobody-made-this", metrics_port=0, health="")):
        warnings = await eventually(lambda: peering_warnings(caplog), "a warning about the missing peering object")
    assert len(warnings) == 1
    assert "ClusterKopfPeering 'nobody-made-this' does not exist" in warnings[0]
    assert "--standalone" in warnings[0] and "helm" in warnings[0]


async def test_missing_peering_object_is_a_startup_warning_in_namespaced_mode_too(
    emulator: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Watching one namespace, kopf waits for the ClusterKopfPeering too (no KopfPeering in the namespace)."""
    caplog.set_level(logging.INFO)
    emulator.objects[DEPLOYMENTS, NAMESPACE, "chat"] = deployment()
    emulator.objects[LLMT, NAMESPACE, "chat"] = minimal_llmt()
    config = OperatorConfig(peering="nobody-made-this", namespaces=(NAMESPACE,), metrics_port=0, health="")
    async with running_operator(config):
        warnings = await eventually(lambda: peering_warnings(caplog), "a warning about the missing peering object")
    assert len(warnings) == 1
    assert "ClusterKopfPeering 'nobody-made-this' does not exist" in warnings[0]
    assert "--standalone" in warnings[0]


async def test_existing_peering_object_gives_no_warning(emulator: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    emulator.objects[DEPLOYMENTS, NAMESPACE, "chat"] = deployment()
    emulator.objects[LLMT, NAMESPACE, "chat"] = minimal_llmt()
    async with running_operator():
        await eventually(lambda: condition(get(emulator, LLMT, "chat"), "Injected").get("status") == "True", "injected")
    assert peering_warnings(caplog) == []


async def test_standalone_needs_no_peering_object(emulator: Any, caplog: pytest.LogCaptureFixture) -> None:
    """--standalone: no peering object anywhere, and the operator works and does not warn."""
    caplog.set_level(logging.INFO)
    emulator.objects[DEPLOYMENTS, NAMESPACE, "chat"] = deployment()
    emulator.objects[LLMT, NAMESPACE, "chat"] = minimal_llmt()
    config = OperatorConfig(peering="nobody-made-this", standalone=True, metrics_port=0, health="")
    async with running_operator(config):
        await eventually(lambda: condition(get(emulator, LLMT, "chat"), "Injected").get("status") == "True", "injected")
    assert peering_warnings(caplog) == []


def peering_status(emulator: Any) -> dict[str, Any]:
    peering = emulator.objects["kopf.dev/v1/clusterkopfpeerings", None, PEERING]
    return dict(peering.get("status") or {})


@pytest.fixture
def assigned_uid(monkeypatch: pytest.MonkeyPatch) -> None:
    """A container run under a UID its image does not list (OpenShift assigns one per namespace): no user name in
    the environment, no POD_ID, and the password database has no entry for the process's UID."""
    import pwd

    for name in ("LOGNAME", "USER", "LNAME", "USERNAME", "POD_ID"):
        monkeypatch.delenv(name, raising=False)

    def no_entry(uid: int) -> Any:
        raise KeyError(f"getpwuid(): uid not found: {uid}")

    monkeypatch.setattr(pwd, "getpwuid", no_entry)


@pytest.mark.usefixtures("assigned_uid")
async def test_runs_under_a_uid_the_image_does_not_list(emulator: Any) -> None:
    """kopf names a replica by its user, looked up in the password database; with no entry the operator must still
    start, peer and reconcile (it crashed at start, so the pod restarted forever)."""
    emulator.objects[DEPLOYMENTS, NAMESPACE, "chat"] = deployment()
    emulator.objects[LLMT, NAMESPACE, "chat"] = minimal_llmt()
    async with running_operator():
        await eventually(lambda: condition(get(emulator, LLMT, "chat"), "Injected").get("status") == "True", "injected")
        identities = await eventually(lambda: list(peering_status(emulator)), "the replica in the peering object")
    assert identities == [f"uid{os.getuid()}@{socket.gethostname()}/{os.getpid()}"]


async def test_the_pod_name_names_the_replica(emulator: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The chart sets POD_ID to the pod's name: that is the replica's name in the peering object."""
    monkeypatch.setenv("POD_ID", "llm-telemetry-operator-6d4b9c7f5-x2x8q")
    emulator.objects[DEPLOYMENTS, NAMESPACE, "chat"] = deployment()
    emulator.objects[LLMT, NAMESPACE, "chat"] = minimal_llmt()
    async with running_operator():
        identities = await eventually(lambda: list(peering_status(emulator)), "the replica in the peering object")
    assert identities == ["llm-telemetry-operator-6d4b9c7f5-x2x8q"]


def test_without_the_operator_extra_it_names_the_extra_to_install() -> None:
    script = (
        "import sys; sys.modules['kopf'] = None; from llm_telemetry_operator.__main__ import main; "
        "sys.exit(main(['--standalone']))"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLM_TELEMETRY_OPERATOR_")}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 2, result.stderr
    assert "pip install 'llm-telemetry[operator]'" in result.stderr and "Traceback" not in result.stderr


def test_a_metrics_port_already_taken_exits_2_naming_it() -> None:
    """Another process on the operator's metrics port: it exits at once, saying so, rather than starting and retrying
    its startup every minute with neither the metrics nor the resources served."""
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "llm_telemetry_operator", "--standalone", "--metrics-port", str(port), "--health",
             "", "--kubeconfig", "/nonexistent/kubeconfig"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert f"metrics port {port}: Address already in use" in result.stderr


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


@contextlib.asynccontextmanager
async def _serving_one_resource(emulator: Any, config: OperatorConfig) -> AsyncIterator[None]:
    """kopf running the operator's handlers with ``config``'s options and liveness endpoint, as
    ``llm-telemetry-operator`` starts it, against the emulator holding one Deployment and one LLMTelemetry selecting
    it: entered once the resource is injected, stopped on leaving."""
    import asyncio

    import kopf

    from llm_telemetry_operator import handlers  # noqa: F401  (registers the handlers)
    from llm_telemetry_operator.__main__ import kopf_options

    emulator.objects[DEPLOYMENTS, NAMESPACE, "chat"] = deployment()
    emulator.objects[LLMT, NAMESPACE, "chat"] = minimal_llmt()
    stop = asyncio.Event()
    task = asyncio.create_task(kopf.operator(stop_flag=stop, liveness_endpoint=config.health, **kopf_options(config)))
    try:
        await eventually(lambda: condition(get(emulator, LLMT, "chat"), "Injected").get("status") == "True", "injected")
        yield
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=30)


@pytest.mark.skipif(not _ipv6_loopback(), reason="this host has no IPv6 loopback address")
async def test_its_metrics_answer_on_ipv6_and_ipv4_and_its_health_where_the_chart_says(emulator: Any) -> None:
    """The kubelet probes, and Prometheus scrapes, the pod's own address, IPv6 in an IPv6 cluster: the metrics port
    answers on both families, and the liveness endpoint the chart renders for ``healthAddress: "::"`` answers on
    IPv6 (kopf's, as ``llm-telemetry-operator`` starts it)."""
    import httpx

    from support import free_port

    metrics_port, health_port = free_port(), free_port()
    config = OperatorConfig(
        standalone=True, metrics_port=metrics_port, health=f"http://[::]:{health_port}/healthz", peering=PEERING
    )
    async with _serving_one_resource(emulator, config), httpx.AsyncClient(timeout=5) as client:
        for host in ("127.0.0.1", "[::1]"):
            scraped = await client.get(f"http://{host}:{metrics_port}/metrics")
            assert "llm_telemetry_operator_reconciles_total" in scraped.text, host
        assert (await client.get(f"http://[::1]:{health_port}/healthz")).status_code == 200


async def test_the_kubelets_probes_of_the_liveness_endpoint_are_not_logged(
    emulator: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """kopf's liveness endpoint is an aiohttp server whose access log wrote a line at INFO for every probe: with the
    chart's probes (liveness every 20 s, readiness every 10 s) some 13,000 lines a day that say nothing, and as many
    again through an API-server outage, when the log is read. The endpoint answers as before."""
    import httpx

    from support import free_port

    access = logging.getLogger("aiohttp.access")
    level = access.level
    access.setLevel(logging.NOTSET)  # as a new process has it
    caplog.set_level(logging.INFO)
    health_port = free_port()
    config = OperatorConfig(
        standalone=True, metrics_port=0, health=f"http://127.0.0.1:{health_port}/healthz", peering=PEERING
    )
    try:
        async with _serving_one_resource(emulator, config), httpx.AsyncClient(timeout=5) as client:
            for _ in range(3):
                assert (await client.get(f"http://127.0.0.1:{health_port}/healthz")).status_code == 200
    finally:
        access.setLevel(level)
    # (The emulator is an aiohttp server too, logging to the same logger: only the probes' lines are looked at.)
    assert [r.getMessage() for r in caplog.records if r.name == "aiohttp.access" and "/healthz" in r.getMessage()] == []
