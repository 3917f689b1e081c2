"""Where each signal of an injected pod goes, and with which headers, over any mix of OTLP settings a container may
have of its own (in ``env``, through ``envFrom``, declared empty or as no headers ``,``) and any resource: the
operator's real injection, the environment the kubelet gives the pod (``tests/kubelet.py``), and then the endpoint
and headers the OpenTelemetry SDK's own OTLP exporters take from that environment (a signal's own variable wins over
the generic one, an empty one counts as unset), read from the exporters themselves."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final
from urllib.parse import urlparse

from hypothesis import event, example, given, settings
from hypothesis import strategies as st

from kube_schema import merge_patch
from kubelet import container_env
from llm_telemetry.config import OTelEnvironment
from llm_telemetry_operator import resources as r
from llm_telemetry_operator.config import OperatorConfig
from llm_telemetry_operator.spec import parse_spec
from otlp_receiver import isolated_env

CONFIG: Final = OperatorConfig()
POD: Final = {"metadata.name": "chat-6d4b9c7f5-x2x8q", "metadata.namespace": "llm", "metadata.uid": "pod-uid"}
SIGNALS: Final = ("traces", "metrics", "logs")
GENERIC_ENDPOINT: Final = "OTEL_EXPORTER_OTLP_ENDPOINT"
GENERIC_HEADERS: Final = "OTEL_EXPORTER_OTLP_HEADERS"


def endpoint_var(signal: str) -> str:
    return f"OTEL_EXPORTER_OTLP_{signal.upper()}_ENDPOINT"


def headers_var(signal: str) -> str:
    return f"OTEL_EXPORTER_OTLP_{signal.upper()}_HEADERS"


def exporter_var(signal: str) -> str:
    return f"OTEL_{signal.upper()}_EXPORTER"


#: The app's own settings, each with the value it has when the app sets it: a vendor's endpoints, and a key of its own
#: per headers variable, so that any of them found in what goes to a collector is seen.
OWN: Final = {
    GENERIC_ENDPOINT: "https://vendor.example:4318",
    **{endpoint_var(s): f"https://{s}.vendor.example/v1/{s}" for s in SIGNALS},
    GENERIC_HEADERS: "authorization=Bearer vendor-key-generic",
    **{headers_var(s): f"authorization=Bearer vendor-key-{s}" for s in SIGNALS},
    **{exporter_var(s): "otlp" for s in SIGNALS},
}
#: Where a variable is: absent, in the container's ``env`` (a value, or a Secret's key), in ``envFrom`` (a Secret's
#: data, which the operator does not read), declared empty in ``env`` (a chart's ``value: ""``) or as ``,``.
PLACES: Final = ("absent", "env", "secret", "envFrom", "empty", "comma")


def pod_env(container: Mapping[str, Any], envfrom: Mapping[str, str]) -> dict[str, str]:
    return container_env(container, POD, secrets={"own": dict(envfrom), "vendor": dict(OWN)})


def route(env: Mapping[str, str], signal: str) -> tuple[str, dict[str, str]]:
    """The host (and port) the SDK's OTLP exporter of ``signal`` sends to under ``env``, with its headers."""
    from opentelemetry.exporter.otlp.proto.grpc._log_exporter import OTLPLogExporter as GrpcLogs
    from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter as GrpcMetrics
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcSpans
    from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter as HttpLogs
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter as HttpMetrics
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpSpans

    protocol = env.get(f"OTEL_EXPORTER_OTLP_{signal.upper()}_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
    grpc = protocol == "grpc"
    kinds = {"traces": (GrpcSpans, HttpSpans), "metrics": (GrpcMetrics, HttpMetrics), "logs": (GrpcLogs, HttpLogs)}
    with isolated_env(dict(env)):
        exporter: Any = kinds[signal][0 if grpc else 1]()
    try:
        if grpc:
            return exporter._endpoint, {k.lower(): v for k, v in exporter._headers}
        return urlparse(exporter._endpoint).netloc, dict(exporter._client._headers)
    finally:
        exporter.shutdown()


def place(name: str, where: str) -> tuple[dict[str, Any] | None, dict[str, str]]:
    """The container's ``env`` entry for ``name`` placed ``where`` (None: none), and its ``envFrom`` data."""
    if where == "env":
        return {"name": name, "value": OWN[name]}, {}
    if where == "secret":
        return {"name": name, "valueFrom": {"secretKeyRef": {"name": "vendor", "key": name}}}, {}
    if where == "empty":
        return {"name": name, "value": ""}, {}
    if where == "comma":
        return {"name": name, "value": ","}, {}
    return None, ({name: OWN[name]} if where == "envFrom" else {})


SPECS: Final = st.fixed_dictionaries(
    {
        "tracing": st.fixed_dictionaries(
            {"enabled": st.booleans(), "protocol": st.sampled_from(["http/protobuf", "grpc"])}
        ),
        "logs": st.sampled_from([{}, {"tenant": "team-a"}, {"mode": "stdout"}, {"enabled": False}]),
    }
)


TRACING: Final = {"enabled": True, "protocol": "http/protobuf"}


# The leaks found so far, each through the real exporters: the app's own logs following the traces' generic endpoint
# with the generic key (logs off; and, the other way, its generic endpoint's logs losing their key to an injected
# ``,``); a signal's key in env, its endpoint through envFrom.
@example({GENERIC_HEADERS: "secret"}, {"tracing": TRACING, "logs": {"enabled": False}}, frozenset())
@example(
    {GENERIC_HEADERS: "env", GENERIC_ENDPOINT: "env"}, {"tracing": TRACING, "logs": {"mode": "stdout"}}, frozenset()
)
@example({GENERIC_ENDPOINT: "envFrom", headers_var("traces"): "secret"}, {"tracing": TRACING, "logs": {}}, frozenset())
@settings(max_examples=400)
@given(
    places=st.dictionaries(st.sampled_from(list(OWN)), st.sampled_from(PLACES[1:]), max_size=4),
    spec=SPECS,
    without=st.frozensets(st.sampled_from(["traces", "logs"])),
)
def test_each_signal_goes_where_the_docs_say_with_no_key_of_the_apps_at_a_collector_the_resource_names(
    places: dict[str, str], spec: dict[str, Any], without: frozenset[str]
) -> None:
    env: list[dict[str, Any]] = []
    envfrom: dict[str, str] = {}
    places = {name: places.get(name, "absent") for name in OWN}
    for name, where in places.items():
        entry, data = place(name, where)
        env += [entry] if entry else []
        envfrom |= data
    container = {"name": "app", "image": "chat:1", "env": env, "envFrom": [{"secretRef": {"name": "own"}}]}
    workload = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "chat", "namespace": "llm", "uid": "deployment-uid"},
        "spec": {
            "selector": {"matchLabels": {"app": "chat"}},
            "template": {"metadata": {"labels": {"app": "chat"}}, "spec": {"containers": [container]}},
        },
    }
    parsed = parse_spec({"selector": {"matchLabels": {"app": "chat"}}, **spec})
    injection = r.build_injection(parsed, CONFIG, workload, "chat", without)
    patch = r.build_workload_patch(workload, injection, "chat")
    assert patch is not None
    injected = merge_patch(workload, patch)["spec"]["template"]["spec"]["containers"][0]
    before, after = pod_env(container, envfrom), pod_env(injected, envfrom)

    # The collectors this resource names (any of its endpoints, whatever it injected).
    named = {urlparse(r.traces_endpoint(parsed, CONFIG)).netloc, urlparse(CONFIG.logs_endpoint).netloc}
    keys = {v for name, v in after.items() if name.endswith("_HEADERS") and v == OWN.get(name)}
    keys = {value.split("=", 1)[1] for value in keys}
    in_env = {e["name"] for e in env}
    set_in_env = {name for name, where in places.items() if where in ("env", "secret", "comma")}
    logs_endpoint_injected = any(e["name"] == endpoint_var("logs") for e in injection.env)

    for signal in SIGNALS:
        host, headers = route(after, signal)
        # 1. The app's headers for its own backend, set in env or through envFrom, never go to a collector this
        # resource names. (Documented exception: a signal's headers variable declared empty in env, which the SDK
        # reads as unset, lets OTEL_EXPORTER_OTLP_HEADERS through; crd.md says to leave it out or give it a value.)
        if host in named and places[headers_var(signal)] != "empty":
            event(f"1: {signal} at a named collector" + (" beside a key of the app's" if keys else ""))
            assert not keys & set(headers.values()), (signal, host, headers)
        # 3. A signal the app sends to an endpoint of its own (its own or the generic one in env, which the logs'
        # own injected endpoint beats; or its own headers in env, for an endpoint the operator cannot see) keeps
        # going there with the same headers, and its exporter is not switched off.
        own_endpoint = endpoint_var(signal) in set_in_env or (
            GENERIC_ENDPOINT in set_in_env and not (signal == "logs" and logs_endpoint_injected)
        )
        own_headers = places[headers_var(signal)] in ("env", "secret")
        if own_endpoint or own_headers:
            event(f"3: {signal} to an endpoint of the app's own")
            assert (host, headers) == route(before, signal), (signal, before, after)
            if signal != "metrics" and before.get(exporter_var(signal)) != "none":
                assert after.get(exporter_var(signal)) != "none", (signal, after)

    # 2. A container with no OTLP settings of its own in env (envFrom loses to the injected variables, as documented)
    # sends the middleware's spans, and its request logs in otlp mode, to this resource's collectors, keyless.
    if not in_env:
        otel = OTelEnvironment.resolve(after)
        tenant = {"x-scope-orgid": "team-a"} if spec["logs"] == {"tenant": "team-a"} else {}
        # (Counterexample, not a leak: the traces' own endpoint through envFrom beats the generic one injected, so
        # the spans go there, without the app's key: the operator injects no OTEL_EXPORTER_OTLP_TRACES_ENDPOINT.)
        if parsed.tracing.enabled and "traces" not in without and places[endpoint_var("traces")] != "envFrom":
            event("2: the middleware's spans")
            host, headers = route(after, "traces")
            assert "otlp" in otel.traces_exporters
            assert host == urlparse(r.traces_endpoint(parsed, CONFIG)).netloc
            assert "authorization" not in headers
        if parsed.logs.enabled and parsed.logs.mode == "otlp" and "logs" not in without:
            event("2: the middleware's request logs")
            host, headers = route(after, "logs")
            assert "otlp" in otel.logs_exporters
            assert host == urlparse(CONFIG.logs_endpoint).netloc
            assert "authorization" not in headers and headers.get("x-scope-orgid") == tenant.get("x-scope-orgid")
