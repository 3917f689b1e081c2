"""Where each signal of an injected pod goes, and with which headers, over any mix of OTLP settings a container may
have of its own (in ``env``, through ``envFrom``, declared empty or as no headers ``,``, from a ConfigMap key that is
empty or missing) and any resource: the operator's real injection, the environment the kubelet gives the pod
(``tests/kubelet.py``), and then the endpoint and headers the OpenTelemetry SDK's own OTLP exporters take from that
environment (a signal's own variable wins over the generic one, an empty one counts as unset), read from the
exporters themselves."""

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
#: data, which the operator does not read), declared empty in ``env`` (a chart's ``value: ""``) or as ``,``, or in
#: ``env`` from a ConfigMap's key that is empty in the pod, or missing and optional (unset in the pod): the operator
#: sees a ``valueFrom``, the SDK nothing.
PLACES: Final = ("absent", "env", "secret", "envFrom", "empty", "comma", "emptykey", "missingkey")
#: The places that declare the variable in the container's ``env``, and those of them that set it as the operator
#: reads it (a ``valueFrom`` is set, whatever it holds; an empty value is not).
DECLARED: Final = frozenset(PLACES) - {"absent", "envFrom"}
SET: Final = DECLARED - {"empty"}


def pod_env(container: Mapping[str, Any], envfrom: Mapping[str, str]) -> dict[str, str]:
    configmaps = {"blank": {name: "" for name in OWN}}
    return container_env(container, POD, configmaps=configmaps, secrets={"own": dict(envfrom), "vendor": dict(OWN)})


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
    if where in ("emptykey", "missingkey"):
        selector = {"name": "blank", "key": name if where == "emptykey" else "missing", "optional": True}
        return {"name": name, "valueFrom": {"configMapKeyRef": selector}}, {}
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


def routes_itself(signal: str, places: Mapping[str, str]) -> bool:
    """Whether the container routes ``signal`` itself, as docs/crd.md says (``spec.tracing.enabled``): it declares
    the signal's own endpoint or headers in ``env`` (headers of ``,``, no headers, aside), or, for the traces, sets
    the generic endpoint there. The injection then routes nothing of that signal."""
    own = places[endpoint_var(signal)] in DECLARED or places[headers_var(signal)] in DECLARED - {"comma"}
    return own or (signal == "traces" and places[GENERIC_ENDPOINT] in SET)


# The leaks found so far, each through the real exporters: the app's own logs following the traces' generic endpoint
# with the generic key (logs off; and, the other way, its generic endpoint's logs losing their key to an injected
# ``,``); a signal's key in env, its endpoint through envFrom; a signal's own endpoint from a ConfigMap key empty in
# the pod, or missing, which the SDK reads as unset and then took the injected generic endpoint with the generic key
# (traces, metrics and logs alike); a signal's headers declared empty beside the generic key.
@example({GENERIC_HEADERS: "secret"}, {"tracing": TRACING, "logs": {"enabled": False}}, frozenset())
@example(
    {GENERIC_HEADERS: "env", GENERIC_ENDPOINT: "env"}, {"tracing": TRACING, "logs": {"mode": "stdout"}}, frozenset()
)
@example({GENERIC_ENDPOINT: "envFrom", headers_var("traces"): "secret"}, {"tracing": TRACING, "logs": {}}, frozenset())
@example({GENERIC_HEADERS: "secret", endpoint_var("traces"): "emptykey"}, {"tracing": TRACING, "logs": {}}, frozenset())
@example({GENERIC_HEADERS: "env", endpoint_var("metrics"): "missingkey"}, {"tracing": TRACING, "logs": {}}, frozenset())
@example({GENERIC_HEADERS: "envFrom", endpoint_var("logs"): "emptykey"}, {"tracing": TRACING, "logs": {}}, frozenset())
@example({GENERIC_HEADERS: "secret", headers_var("traces"): "empty"}, {"tracing": TRACING, "logs": {}}, frozenset())
@example({headers_var("logs"): "comma"}, {"tracing": TRACING, "logs": {"tenant": "team-a"}}, frozenset())
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
    traces_collector = urlparse(r.traces_endpoint(parsed, CONFIG)).netloc
    named = {traces_collector, urlparse(CONFIG.logs_endpoint).netloc}
    keys = {v for name, v in after.items() if name.endswith("_HEADERS") and v == OWN.get(name)}
    keys = {value.split("=", 1)[1] for value in keys}
    routed = {
        "traces": parsed.tracing.enabled and "traces" not in without,
        "logs": parsed.logs.enabled and parsed.logs.mode == "otlp" and "logs" not in without,
        "metrics": False,
    }
    otel = OTelEnvironment.resolve(after)
    tenant = {"x-scope-orgid": "team-a"} if spec["logs"] == {"tenant": "team-a"} else {}

    for signal in SIGNALS:
        host, headers = route(after, signal)
        # 1. The app's headers for its own backend, set in env or through envFrom, never go to a collector this
        # resource names.
        if host in named:
            event(f"1: {signal} at a named collector" + (" beside a key of the app's" if keys else ""))
            assert not keys & set(headers.values()), (signal, host, headers)
        if routed[signal] and not routes_itself(signal, places):
            # 2. A signal the resource routes, in a container that does not route it itself, goes to the resource's
            # collector, with no headers but the Loki tenant (whatever the app has through envFrom, which the
            # injected variables beat, as documented; a ``,`` of the container's own, no headers, wins over the
            # tenant, as any variable of its own); the middleware exports it.
            event(f"2: {signal} to the resource's collector")
            collector = traces_collector if signal == "traces" else urlparse(CONFIG.logs_endpoint).netloc
            expected = tenant if signal == "logs" and places[headers_var(signal)] != "comma" else {}
            sent = {k: v for k, v in headers.items() if k not in ("content-type", "user-agent")}  # (the exporter's)
            assert (host, sent) == (collector, expected), (signal, after)
            if places[exporter_var(signal)] not in DECLARED:
                assert "otlp" in (otel.traces_exporters if signal == "traces" else otel.logs_exporters)
        else:
            # 3. Any other signal (the metrics always: the resource routes none) goes where it went before the
            # injection, with the same headers: nothing generic is injected that it would follow.
            event(f"3: {signal} where the app sends it")
            assert (host, headers) == route(before, signal), (signal, before, after)
        # 4. A signal the app sends to an endpoint of its own keeps its exporter on.
        if signal != "metrics" and (routes_itself(signal, places) or places[GENERIC_ENDPOINT] in SET):
            if before.get(exporter_var(signal)) != "none":
                assert after.get(exporter_var(signal)) != "none", (signal, after)
    # 5. The operator says which signals the resource routes the container keeps on its own pipeline (the
    # SignalsRouted condition), naming the variables, never a value; the same before the injection and after it,
    # whose own variables are not the container's.
    own = {
        signal.upper(): [endpoint_var(signal)] * (places[endpoint_var(signal)] in DECLARED)
        + [headers_var(signal)] * (places[headers_var(signal)] in DECLARED - {"comma"})
        + [GENERIC_ENDPOINT] * (signal == "traces" and places[GENERIC_ENDPOINT] in SET)
        for signal in ("traces", "logs")
        if routed[signal] and routes_itself(signal, places)
    }
    expected_own = {"app": own} if own else {}
    assert r.own_routes(workload, injection) == expected_own, places
    assert r.own_routes(merge_patch(workload, patch), injection) == expected_own, places
