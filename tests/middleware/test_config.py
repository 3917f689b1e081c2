"""Settings: constructor arguments win, then LLM_TELEMETRY_* variables, then defaults; bad values name themselves."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from llm_telemetry import config
from llm_telemetry.config import ConfigurationError, OTelEnvironment, Settings
from llm_telemetry.labels import LabelLimiter
from llm_telemetry.middleware import Router
from support import free_port, wait_for


def test_settings_defaults() -> None:
    settings = Settings.resolve(env={})
    assert (settings.metrics_port, settings.metrics_host, settings.metrics_app_path) == (9464, "::", None)
    assert settings.max_label_values == 100 and settings.max_request_bytes == 8 * 1024 * 1024
    assert settings.metrics_exporters == ("prometheus",) and settings.capture_content is False


def test_settings_env_fills_gaps_and_arguments_win() -> None:
    env = {
        "LLM_TELEMETRY_METRICS_PORT": "9999",
        "LLM_TELEMETRY_METRICS_HOST": "127.0.0.1",
        "LLM_TELEMETRY_ATTRIBUTION_HEADERS": "x-tenant-id=tenant, x-team=team",
        "LLM_TELEMETRY_METRICS_EXPORTER": "prometheus,otlp",
        "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT": "true",
    }
    settings = Settings.resolve(env=env, metrics_port=1234)
    assert settings.metrics_port == 1234
    assert settings.metrics_host == "127.0.0.1"
    assert dict(settings.attribution_headers) == {"x-tenant-id": "tenant", "x-team": "team"}
    assert settings.metrics_exporters == ("prometheus", "otlp")
    assert settings.capture_content is True
    assert Settings.resolve(env={**env, "LLM_TELEMETRY_CAPTURE_CONTENT": "false"}).capture_content is False
    assert Settings.resolve(env={"LLM_TELEMETRY_METRICS_EXPORTER": "none"}).metrics_exporters == ()


@pytest.mark.parametrize(
    ("value", "capture"),
    [
        ("true", True), ("SPAN_ONLY", True), ("span_and_event", True),
        ("false", False), ("NO_CONTENT", False), ("EVENT_ONLY", False), ("whatever", False),
    ],
)  # fmt: skip
def test_opentelemetrys_capture_variable_in_any_of_its_spellings_never_stops_the_app(value: str, capture: bool) -> None:
    """OpenTelemetry's GenAI helpers spell the variable's values NO_CONTENT, SPAN_ONLY, EVENT_ONLY, SPAN_AND_EVENT
    (with OTEL_SEMCONV_STABILITY_OPT_IN=gen_ai_latest_experimental): a pod set up for them must still start."""
    env = {"OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT": value}
    assert Settings.resolve(env=env).capture_content is capture


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"LLM_TELEMETRY_METRICS_PORT": "http"}, "LLM_TELEMETRY_METRICS_PORT='http': expected an integer"),
        ({"LLM_TELEMETRY_METRICS_PORT": "70000"}, "^LLM_TELEMETRY_METRICS_PORT=70000: must be between 0 and 65535"),
        (
            {"LLM_TELEMETRY_METRICS_APP_PATH": "metrics"},
            "^LLM_TELEMETRY_METRICS_APP_PATH='metrics': must start with '/'",
        ),
        ({"LLM_TELEMETRY_MAX_LABEL_VALUES": "0"}, "must be at least 1"),
        ({"LLM_TELEMETRY_ATTRIBUTION_HEADERS": "x-tenant-id"}, "not of the form key=value"),
        (
            {"LLM_TELEMETRY_ATTRIBUTION_HEADERS": "x-tenant-id=ten-ant"},
            "^LLM_TELEMETRY_ATTRIBUTION_HEADERS: header 'x-tenant-id' maps to 'ten-ant': a label is ASCII letters",
        ),
        (  # Prometheus label names are ASCII: this one was scraped as llm_metadata_quipe
            {"LLM_TELEMETRY_ATTRIBUTION_HEADERS": "x-team=\u00e9quipe"},
            "^LLM_TELEMETRY_ATTRIBUTION_HEADERS: header 'x-team' maps to '\u00e9quipe': a label is ASCII letters",
        ),
        ({"LLM_TELEMETRY_METRICS_EXPORTER": "statsd"}, "'statsd' is not one of prometheus, otlp, none"),
        ({"LLM_TELEMETRY_REQUEST_LOGS": "maybe"}, "expected true or false"),
    ],
)
def test_settings_bad_values_fail_with_the_setting_named(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message.replace("(", r"\(").replace("[", r"\[")):
        Settings.resolve(env=env)


#: Every option of the README's table, as text its environment variable takes.
_AS_TEXT = {
    "metrics_port": ("LLM_TELEMETRY_METRICS_PORT", "9999"),
    "metrics_host": ("LLM_TELEMETRY_METRICS_HOST", "127.0.0.1"),
    "metrics_app_path": ("LLM_TELEMETRY_METRICS_APP_PATH", "/metrics"),
    "metrics_exporters": ("LLM_TELEMETRY_METRICS_EXPORTER", "prometheus,otlp"),
    "pricing": ("LLM_TELEMETRY_PRICING", "prices.yaml"),
    "attribution_headers": ("LLM_TELEMETRY_ATTRIBUTION_HEADERS", "x-tenant-id=tenant, x-team=team"),
    "max_label_values": ("LLM_TELEMETRY_MAX_LABEL_VALUES", "7"),
    "max_request_bytes": ("LLM_TELEMETRY_MAX_REQUEST_BYTES", "1024"),
    "max_inspected_bytes": ("LLM_TELEMETRY_MAX_INSPECTED_BYTES", "1048576"),
    "routes": ("LLM_TELEMETRY_ROUTES", "/generate=openai.chat"),
    "request_logs": ("LLM_TELEMETRY_REQUEST_LOGS", "false"),
    "capture_content": ("LLM_TELEMETRY_CAPTURE_CONTENT", "true"),
    "capture_content_max_chars": ("LLM_TELEMETRY_CAPTURE_CONTENT_MAX_CHARS", "100"),
    "echo_request_id": ("LLM_TELEMETRY_ECHO_REQUEST_ID", "true"),
    "tracing_http_span": ("LLM_TELEMETRY_TRACING_HTTP_SPAN", "true"),
    "multiproc_dir": ("LLM_TELEMETRY_MULTIPROC_DIR", "off"),
    "enabled": ("LLM_TELEMETRY_ENABLED", "false"),
}


@pytest.mark.parametrize("option", sorted(_AS_TEXT))
def test_an_argument_written_as_its_variable_means_what_the_variable_means(option: str) -> None:
    """The README's table gives each option's values as its variable takes them (``x-tenant-id=tenant``,
    ``prometheus,otlp``, ``false``); given so as an argument, each means the same (not a string iterated, nor a
    truthy ``"false"``)."""
    var, text = _AS_TEXT[option]
    assert Settings.resolve(env={}, **{option: text}) == Settings.resolve(env={var: text})
    assert Settings.resolve(env={}, **{option: text}) != Settings.resolve(env={})


#: How the README's default column says a setting has no value of its own until given one.
_NO_VALUE = ("off", "none", "the embedded table", "chosen automatically")


def _readme_settings() -> dict[str, tuple[str, str]]:
    """The README's table of options: argument -> (its environment variable, the text of its default column)."""
    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    rows = re.findall(r"^\| `([a-z_]+)` \| `(LLM_TELEMETRY_[A-Z_]+)` \| (.+) \|$", text, re.MULTILINE)
    return {option: (var, default) for option, var, default in rows}


def test_the_readme_table_of_options_is_what_the_middleware_reads() -> None:
    """README.md's table is where a user looks for the settings: a row for every setting with a variable (all but
    ``redact``, a function), and no other; each row's variable is the one read for its option, and the default it
    gives is the one the middleware takes (given as the variable, it changes nothing; a default in words, such as
    "off" or "none", is no value at all). Every ``LLM_TELEMETRY_*`` variable the middleware declares has its row."""
    table = _readme_settings()
    assert sorted(table) == sorted(f.name for f in dataclasses.fields(Settings) if f.name != "redact")
    assert sorted(table) == sorted(_AS_TEXT)  # (the tests above take each option as its variable's text)
    declared = {getattr(config, name) for name in dir(config) if name.startswith("LLM_TELEMETRY_")}
    assert sorted(var for var, _ in table.values()) == sorted(declared)
    defaults = Settings.resolve(env={})
    for option, (var, default) in table.items():
        given = Settings.resolve(env={var: _AS_TEXT[option][1]})
        assert getattr(given, option) != getattr(defaults, option), f"{var} is not what {option} reads"
        value = re.match(r"`([^`]+)`", default)
        if value:
            assert Settings.resolve(env={var: value[1]}) == defaults, f"{option}: the README's default {value[1]}"
        else:
            assert default.startswith(_NO_VALUE) and not getattr(defaults, option), f"{option}: {default}"


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"metrics_port": [1]}, "metrics_port=[1]: expected an integer"),
        ({"metrics_port": True}, "metrics_port=True: expected an integer"),
        ({"metrics_port": "http"}, "metrics_port='http': expected an integer"),
        ({"max_label_values": 0}, "max_label_values='0': must be at least 1"),
        ({"enabled": "maybe"}, "enabled='maybe': expected true or false"),
        ({"request_logs": 0}, "request_logs=0: expected True or False"),
        ({"attribution_headers": 5}, "attribution_headers=5: expected a mapping"),
        ({"routes": {"/generate": 1}}, "keys and values must be non-empty text"),
        ({"metrics_exporters": "statsd"}, "'statsd' is not one of prometheus, otlp, none"),
        ({"metrics_exporters": [1]}, "expected a list of names"),
        ({"pricing": 3}, "pricing=3: expected a mapping"),
        ({"pricing": " "}, "^pricing is blank: give the path of a YAML or JSON pricing file"),
        ({"metrics_port": 70000}, "^metrics_port=70000: must be between 0 and 65535"),
        ({"attribution_headers": {"x-tenant-id": "ten-ant"}}, "^attribution_headers: header 'x-tenant-id' maps to"),
        ({"attribution_headers": {"Authorization": "key"}}, "header 'Authorization' carries credentials"),
        ({"attribution_headers": "x-api-key=key"}, "header 'x-api-key' carries credentials"),
    ],
)
def test_an_argument_of_the_wrong_type_fails_naming_it(arguments: dict[str, object], message: str) -> None:
    """Checked when the settings are made, so the server's startup fails naming it: taken as it was, a wrong type
    failed every request with a 500 instead."""
    with pytest.raises(ConfigurationError, match=message.replace("(", r"\(").replace("[", r"\[")):
        Settings.resolve(env={}, **arguments)


@pytest.mark.parametrize("value", [" ", "\n", " \t "])
@pytest.mark.parametrize("option", sorted(_AS_TEXT))
def test_a_blank_variable_fails_naming_it(option: str, value: str) -> None:
    """A variable set to blank text is a mistake (a template's missing value): it fails as any unusable value does,
    naming the variable. Read on, a blank LLM_TELEMETRY_ENABLED or LLM_TELEMETRY_REQUEST_LOGS was false (the
    middleware, or its log lines, off without a word), a blank LLM_TELEMETRY_METRICS_EXPORTER named no exporter (every
    metric off) and a blank LLM_TELEMETRY_METRICS_HOST failed only as the listener started, naming no setting. An
    empty variable stays unset: its default."""
    var = _AS_TEXT[option][0]
    with pytest.raises(ConfigurationError, match=f"^{var} is blank: give it a value, or leave it unset"):
        Settings.resolve(env={var: value})
    assert Settings.resolve(env={var: ""}) == Settings.resolve(env={})


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"enabled": ""}, "^enabled='': expected true or false"),
        ({"request_logs": " "}, "^request_logs=' ': expected true or false"),
        ({"metrics_exporters": ""}, "^metrics_exporters='': names no exporter"),
        ({"metrics_exporters": "prometheus,none"}, "^metrics_exporters='prometheus,none': none turns every exporter"),
        ({"metrics_host": ""}, "^metrics_host is blank"),
    ],
)
def test_a_blank_argument_fails_naming_it(arguments: dict[str, object], message: str) -> None:
    """Text given as an argument is read as its variable's text, and blank text fails the same way."""
    with pytest.raises(ConfigurationError, match=message):
        Settings.resolve(env={}, **arguments)


def test_an_unknown_api_in_routes_names_the_setting_it_came_from() -> None:
    """The route's API was checked only as the middleware was built, in a message that named no setting."""
    with pytest.raises(ConfigurationError, match=r"^LLM_TELEMETRY_ROUTES: route '/generate' names unknown API 'cohere"):
        Settings.resolve(env={"LLM_TELEMETRY_ROUTES": "/generate=cohere.chat"})
    with pytest.raises(ConfigurationError, match=r"^routes: route '/generate' names unknown API 'cohere\.chat'"):
        Settings.resolve(env={}, routes={"/generate": "cohere.chat"})


def test_a_blank_pricing_variable_is_named_not_read_as_the_working_directory() -> None:
    """Read as a path, a blank LLM_TELEMETRY_PRICING named a file no one gave: "pricing file '.': Is a directory".
    (An empty one is unset, as every variable's is: the embedded table.)"""
    with pytest.raises(ConfigurationError, match=r"^LLM_TELEMETRY_PRICING is blank"):
        Settings.resolve(env={"LLM_TELEMETRY_PRICING": " \n"})
    assert Settings.resolve(env={"LLM_TELEMETRY_PRICING": ""}).pricing is None


def test_exporters_as_a_list_and_none() -> None:
    assert Settings.resolve(env={}, metrics_exporters=["otlp", "prometheus"]).metrics_exporters == (
        "otlp",
        "prometheus",
    )
    assert Settings.resolve(env={}, metrics_exporters=("none",)).metrics_exporters == ()
    assert Settings.resolve(env={}, metrics_exporters=()).metrics_exporters == ()
    assert Settings.resolve(env={}, pricing=Path("prices.yaml")).pricing == "prices.yaml"


def test_an_unknown_option_is_a_type_error_naming_the_option_meant() -> None:
    with pytest.raises(TypeError, match=r"unknown settings: metrics_prot \(did you mean metrics_port\?\), zzz$"):
        Settings.resolve(env={}, metrics_prot=1, zzz=2)


def test_router_matches_by_suffix_longest_first_and_custom_routes() -> None:
    router = Router({"/generate": "openai.chat", "v2/complete": "anthropic.messages"})
    assert router.match("/v1/chat/completions").name == "openai.chat"  # type: ignore[union-attr]
    assert router.match("/openai/deployments/x/chat/completions/").name == "openai.chat"  # type: ignore[union-attr]
    assert router.match("/v1/completions").name == "openai.completions"  # type: ignore[union-attr]
    assert router.match("/anthropic/v1/messages").name == "anthropic.messages"  # type: ignore[union-attr]
    assert router.match("/api/generate").name == "openai.chat"  # type: ignore[union-attr]
    assert router.match("/v2/complete").name == "anthropic.messages"  # type: ignore[union-attr]
    assert router.match("/v1/models") is None
    with pytest.raises(ConfigurationError, match=r"unknown API 'cohere\.chat'"):
        Router({"/x": "cohere.chat"})


def test_label_limiter_caps_distinct_values() -> None:
    limit = LabelLimiter(2)
    assert [limit("m", v) for v in ("a", "b", "c", "a", "d")] == ["a", "b", "other", "a", "other"]
    assert limit("other_label", "c") == "c"  # each label has its own budget


# --- the OpenTelemetry environment ---------------------------------------------------------------------


def test_otel_environment_defaults_to_nothing_exported() -> None:
    otel = OTelEnvironment.resolve({})
    assert (otel.sdk_disabled, otel.traces_exporters, otel.logs_exporters) == (False, (), ())
    assert otel.traces_protocol == otel.metrics_protocol == otel.logs_protocol == "http/protobuf"


def test_otel_environment_endpoint_turns_tracing_on_and_signal_protocols_win() -> None:
    otel = OTelEnvironment.resolve(
        {
            "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318",
            "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
            "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL": "http/protobuf",
            "OTEL_LOGS_EXPORTER": "otlp",
        }
    )
    assert otel.traces_exporters == ("otlp",) and otel.logs_exporters == ("otlp",)
    assert (otel.traces_protocol, otel.metrics_protocol, otel.logs_protocol) == ("grpc", "http/protobuf", "grpc")
    explicit = OTelEnvironment.resolve({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "x", "OTEL_TRACES_EXPORTER": "none"})
    assert explicit.traces_exporters == ()
    assert OTelEnvironment.resolve({"OTEL_TRACES_EXPORTER": "Console"}).traces_exporters == ("console",)


def test_otel_sdk_disabled_turns_every_signal_off() -> None:
    env = {
        "OTEL_SDK_DISABLED": "TRUE",
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318",
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_LOGS_EXPORTER": "otlp",
    }
    otel = OTelEnvironment.resolve(env)
    assert otel.sdk_disabled and otel.traces_exporters == () and otel.logs_exporters == ()


_CONFIGURED_APP = """
import json, os, sys
from fastapi import FastAPI
from llm_telemetry import LLMTelemetryMiddleware

app = FastAPI()

@app.get("/health")
async def health() -> dict:
    return {"ok": True}

options = json.loads(os.environ.get("CONFIGURED_OPTIONS", "{}"))
if "settings" in options:  # a whole Settings, resolved from these
    from llm_telemetry import Settings

    options["settings"] = Settings.resolve(**options["settings"])
if sys.argv[1] == "starlette":
    app.add_middleware(LLMTelemetryMiddleware, **options)  # built inside the first ASGI call, the lifespan's
else:
    app = LLMTelemetryMiddleware(app, **options)  # built here, as the module is imported
"""


@pytest.mark.parametrize(
    ("options", "variables", "named"),
    [
        ({"metrics_port": 0}, {"LLM_TELEMETRY_MAX_LABEL_VALUES": "0"}, "LLM_TELEMETRY_MAX_LABEL_VALUES"),
        ({"metrics_port": 0, "max_label_values": 0}, {}, "max_label_values"),
        ({"metrics_prot": 0}, {}, "metrics_prot (did you mean metrics_port?)"),  # a misspelt option
        # Blank: read as false, it made the middleware a pass-through without a word.
        ({"metrics_port": 0}, {"LLM_TELEMETRY_ENABLED": " "}, "LLM_TELEMETRY_ENABLED is blank"),
        ({"metrics_port": 0}, {"LLM_TELEMETRY_ROUTES": "/generate=cohere.chat"}, "LLM_TELEMETRY_ROUTES: route"),
        # Beside settings=, an argument (or a misspelt one) was ignored without a word.
        (
            {"settings": {"metrics_port": 0}, "metrics_port": 9},
            {},
            "metrics_port given beside settings=, which is used instead of the arguments",
        ),
        ({"settings": {"metrics_port": 0}, "metrics_prot": 9}, {}, "metrics_prot (did you mean metrics_port?)"),
    ],
    ids=["variable", "argument", "unknown-option", "blank-variable", "routes", "beside-settings", "misspelt-beside"],
)
@pytest.mark.parametrize("form", ["starlette", "wrapped"])
def test_a_bad_setting_stops_uvicorn_at_startup_naming_it_in_either_form(
    tmp_path: Path, form: str, options: dict[str, Any], variables: dict[str, str], named: str
) -> None:
    """Both forms the README shows fail the server's startup with the setting named. Starlette and FastAPI build their
    middleware inside the lifespan's first call, where an exception would read to uvicorn as "lifespan unsupported"
    and leave a server answering 500 to everything. Without a lifespan (``--lifespan off``) requests pass through."""
    run, env, port = _configured(tmp_path, variables, options)
    started = subprocess.run(
        [*run, form, str(tmp_path), str(port), "auto"], env=env, capture_output=True, text=True, timeout=60
    )
    assert started.returncode != 0, started.stderr
    assert named in started.stderr and "Application startup failed" in started.stderr

    server = subprocess.Popen(
        [*run, form, str(tmp_path), str(port), "off"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        wait_for("the server", lambda: _answers(f"http://127.0.0.1:{port}/health"), seconds=30)
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).json() == {"ok": True}
    finally:
        server.terminate()
        server.wait(timeout=10)
    assert server.stderr is not None
    assert named in server.stderr.read().decode(errors="replace")  # logged at construction


def _configured(
    tmp_path: Path, variables: dict[str, str], options: dict[str, Any]
) -> tuple[list[str], dict[str, str], int]:
    """The command, environment and port of a uvicorn serving ``_CONFIGURED_APP`` (written into ``tmp_path``) with
    ``options`` and the environment ``variables``; the command takes the app's form, ``tmp_path``, the port and
    uvicorn's lifespan mode after it."""
    (tmp_path / "configured.py").write_text(_CONFIGURED_APP)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "LLM_TELEMETRY_"))}
    env.update(variables, CONFIGURED_OPTIONS=json.dumps(options))
    run = (
        "import sys, uvicorn; sys.path.insert(0, sys.argv[2]); import configured; "
        "uvicorn.run(configured.app, host='127.0.0.1', port=int(sys.argv[3]), lifespan=sys.argv[4])"
    )
    return [sys.executable, "-c", run], env, free_port()


def _answers(url: str) -> bool:
    try:
        httpx.get(url, timeout=1)
    except httpx.TransportError:
        return False
    return True


@pytest.mark.parametrize("value", ["http/json", "grcp"])
def test_an_otlp_protocol_the_exporters_do_not_speak_is_named_in_a_warning(
    caplog: pytest.LogCaptureFixture, value: str
) -> None:
    with caplog.at_level("WARNING", logger="llm_telemetry"):
        env = OTelEnvironment.resolve({"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": value})
    assert env.traces_protocol == "http/protobuf"
    assert any(
        value in r.getMessage() and "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL" in r.getMessage() for r in caplog.records
    )
    caplog.clear()
    # The generic variable serves all three signals: one WARNING, not one per signal.
    with caplog.at_level("WARNING", logger="llm_telemetry"):
        env = OTelEnvironment.resolve({"OTEL_EXPORTER_OTLP_PROTOCOL": value})
    assert (env.traces_protocol, env.metrics_protocol, env.logs_protocol) == ("http/protobuf",) * 3
    assert [r.getMessage().count(value) for r in caplog.records] == [1], caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="llm_telemetry"):
        assert OTelEnvironment.resolve({"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}).metrics_protocol == "grpc"
    assert not caplog.records


@pytest.mark.parametrize(("value", "exemplars"), [("alwaysoff", True), ("always_off", False)])
def test_an_exemplar_filter_it_does_not_know_is_named_in_a_warning(
    caplog: pytest.LogCaptureFixture, value: str, exemplars: bool
) -> None:
    """docs/tracing.md: OTEL_METRICS_EXEMPLAR_FILTER is trace_based, always_on or always_off. A misspelt
    ``alwaysoff`` was taken as trace_based without a word: the exemplars it was set to drop stayed in the scrape."""
    from otlp_receiver import demo_server

    env = {"OTEL_TRACES_EXPORTER": "console", "OTEL_METRICS_EXEMPLAR_FILTER": value}
    with (
        caplog.at_level("WARNING", logger="llm_telemetry"),
        demo_server(env, metrics_port=free_port(), metrics_host="127.0.0.1") as (app, base),
    ):
        body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
        assert httpx.post(base + "/v1/chat/completions", json=body).is_success
        port = app.settings.metrics_port
        scrape = wait_for(
            "the request in the scrape",
            lambda: (
                text if "llm_requests_total" in (text := _openmetrics(f"http://127.0.0.1:{port}/metrics")) else None
            ),
        )
    assert (" # {" in scrape) is exemplars, scrape
    warned = [r for r in caplog.records if "OTEL_METRICS_EXEMPLAR_FILTER" in r.getMessage()]
    assert bool(warned) is exemplars and all(repr(value) in r.getMessage() for r in warned), caplog.text
    assert len(warned) == int(exemplars), caplog.text  # once per start, not once per signal that reads it


def _openmetrics(url: str) -> str:
    return httpx.get(url, headers={"Accept": "application/openmetrics-text; version=1.0.0"}, timeout=5).text


@pytest.mark.parametrize(
    ("name", "content", "said"),
    [
        ("prices.yaml", b"\xff\xfemodels: {}\n", "is not UTF-8 text"),
        ("prices.json", b"[" * 100_000, "nested too deeply"),
        ("prices.yaml", b"models:\n  gpt-4o: {input: 2.5, output: ten}\n", "output must be a non-negative number"),
        ("prices.yaml", b"models:\n  gpt-4o: {input: 2.5\n", 'in "{path}", line 3'),
        # Keys of several types: sorting them for the message raised TypeError out of the constructor.
        (
            "prices.yaml",
            b"models:\n  gpt-4o: {input: 2.5, output: 10, 3: x, ~: y, z: 1}\n",
            "unknown keys ['z', 3, None]",
        ),
        # An integer too large for a float: math.isfinite() raised OverflowError out of the constructor.
        (
            "prices.yaml",
            b"models:\n  gpt-4o: {input: 1" + b"0" * 400 + b", output: 10}\n",
            "input must be a non-negative number, got 1000",
        ),
        # A finite price past any provider's: accepted, it let the cost counter's sum reach infinity, and the series
        # vanished (tests/middleware/test_cost_bounds.py).
        (
            "prices.yaml",
            b"models:\n  gpt-4o: {input: 2.5, output: 10}\n  advisor: {input: 1.7e+308, output: 1}\n",
            "pricing for 'advisor': input is 1.7e+308 USD per million tokens, more than any provider charges",
        ),
    ],
    ids=["not-utf8", "nested", "bad-price", "bad-yaml", "mixed-keys", "huge-int", "past-any-price"],
)
@pytest.mark.parametrize("form", ["starlette", "wrapped"])
def test_a_bad_pricing_file_stops_uvicorn_at_startup_naming_the_file(
    tmp_path: Path, form: str, name: str, content: bytes, said: str
) -> None:
    """Whatever is wrong with the file LLM_TELEMETRY_PRICING names, the server's startup fails with a message that
    names that file and what is wrong with it, and without a lifespan the app serves unmeasured. A file that was not
    UTF-8, or nested too deeply, raised out of the middleware's constructor (the wrapped form's import failed, so the
    app could not serve even without a lifespan, and the message named no file); a wrong price named its model but
    not the file, and a YAML error's position named PyYAML's "<unicode string>"."""
    prices = tmp_path / name
    prices.write_bytes(content)
    run, env, port = _configured(tmp_path, {"LLM_TELEMETRY_PRICING": str(prices)}, {"metrics_port": 0})
    started = subprocess.run(
        [*run, form, str(tmp_path), str(port), "auto"], env=env, capture_output=True, text=True, timeout=60
    )
    assert started.returncode != 0, started.stderr
    assert "Application startup failed" in started.stderr, started.stderr
    assert f"pricing file {str(prices)!r}" in started.stderr, started.stderr
    assert said.format(path=prices) in started.stderr, started.stderr
    assert "<unicode string>" not in started.stderr

    server = subprocess.Popen(
        [*run, form, str(tmp_path), str(port), "off"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        wait_for("the server", lambda: _answers(f"http://127.0.0.1:{port}/health") or server.poll() is not None)
        assert server.poll() is None, "the server exited"
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).json() == {"ok": True}
    finally:
        server.terminate()
        server.wait(timeout=10)
    assert server.stderr is not None
    assert f"pricing file {str(prices)!r}" in server.stderr.read().decode(errors="replace")
