"""Default trace and log collectors that do not exist: no failing exporter in every pod, a condition and an event."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest
from kopf_testing import (
    DEPLOYMENTS,
    LLMT,
    NAMESPACE,
    PEERING,
    SERVICES,
    condition,
    deployment,
    eventually,
    get,
    minimal_llmt,
    posted_events,
    running_operator,
)
from test_operator_kmock import check_usage, env_of, hand

from llm_telemetry_operator import constants as c
from llm_telemetry_operator.collectors import CollectorCheck, port_of, service_of
from llm_telemetry_operator.config import OperatorConfig
from llm_telemetry_operator.errors import ApiError, NotFoundError


@pytest.mark.parametrize(
    ("endpoint", "service"),
    [
        ("http://jaeger.observability:4318", ("observability", "jaeger")),
        ("http://loki-gateway.observability/otlp", ("observability", "loki-gateway")),
        ("http://tempo.monitoring.svc:4318", ("monitoring", "tempo")),
        ("http://tempo.monitoring.svc.cluster.local:4318", ("monitoring", "tempo")),
        ("http://tempo.monitoring:4318", None),  # a user's own short name: trusted as given
        ("https://otlp.example.com", None),
        ("http://10.0.0.5:4318", None),
    ],
)
def test_service_of_endpoint(endpoint: str, service: tuple[str, str] | None) -> None:
    assert service_of(endpoint) == service


@pytest.mark.parametrize(
    ("endpoint", "port"),
    [
        ("http://jaeger.observability:4318", 4318),
        ("http://loki-gateway.observability/otlp", 80),
        ("https://tempo.monitoring.svc/otlp", 443),
        ("HTTP://tempo.monitoring.svc", 80),
        ("http://tempo.monitoring.svc:99999", None),  # not a port: left to the exporter to refuse
    ],
)
def test_port_of_endpoint(endpoint: str, port: int | None) -> None:
    assert port_of(endpoint) == port


class Services:
    """A client answering Service reads from a dict of Service specs."""

    def __init__(self, specs: dict[str, dict[str, Any]]) -> None:
        self.specs = specs

    async def get(self, resource: Any, namespace: str, name: str) -> dict[str, Any]:
        if name not in self.specs:
            raise NotFoundError(404, "NotFound", f"services {name!r} not found")
        return {"metadata": {"name": name, "namespace": namespace}, "spec": self.specs[name]}


@pytest.mark.parametrize(
    ("spec", "found", "ports"),
    [
        ({"ports": [{"name": "grpc", "port": 4317}, {"name": "http", "port": 4318}]}, True, ()),
        ({"ports": [{"name": "grpc", "port": 4317}]}, False, (4317,)),
        ({"clusterIP": "None"}, True, ()),  # headless, no ports: DNS gives the pods, any port reaches them
        ({"type": "ExternalName", "externalName": "otel.example.com", "ports": [{"port": 4317}]}, True, ()),
    ],
    ids=["listed", "other-port-only", "headless-without-ports", "external-name"],
)
async def test_a_collector_service_without_the_endpoints_port_counts_as_missing(
    spec: dict[str, Any], found: bool, ports: tuple[int, ...]
) -> None:
    lookup = await CollectorCheck().lookup(
        Services({"jaeger": spec}),  # type: ignore[arg-type]
        "http://jaeger.observability:4318",
    )
    assert (lookup.found, lookup.ports) == (found, ports)


async def collectors_condition(emulator: Any) -> dict[str, Any]:
    """The ``CollectorsAvailable`` condition of resource ``chat``, once written."""
    owner = await eventually(
        lambda: condition(get(emulator, LLMT, "chat"), c.CONDITION_COLLECTORS) and get(emulator, LLMT, "chat"),
        "CollectorsAvailable written",
    )
    return dict(condition(owner, c.CONDITION_COLLECTORS))


def collector_events(kmock: Any) -> list[str]:
    return [str(event.get("message")) for event in posted_events(kmock, "CollectorNotFound")]


class SlowServices:
    """A client whose Service reads take a while, counting them; ``answer``: None (found), or an error to raise."""

    def __init__(self, answer: Exception | None = None) -> None:
        self.reads = 0
        self.answer = answer
        self.release = asyncio.Event()

    async def get(self, resource: Any, namespace: str, name: str) -> dict[str, Any]:
        self.reads += 1
        await self.release.wait()
        if self.answer is not None:
            raise self.answer
        return {"metadata": {"name": name, "namespace": namespace}}


@pytest.mark.parametrize(
    ("answer", "found"),
    [(None, True), (NotFoundError(404, "NotFound", "gone"), False), (ApiError(503, "", "busy"), None)],
    ids=["found", "missing", "unreadable"],
)
async def test_passes_started_together_read_a_collector_service_once(answer: Exception | None, found: Any) -> None:
    check, client = CollectorCheck(), SlowServices(answer)
    lookups = [asyncio.ensure_future(check.lookup(client, "http://jaeger.observability:4318")) for _ in range(50)]  # type: ignore[arg-type]
    await asyncio.sleep(0.01)
    lookups[0].cancel()  # one pass stops: the others still get their answer
    client.release.set()
    results = await asyncio.gather(*lookups[1:], return_exceptions=True)
    assert client.reads == 1
    if found is None:
        # Unreadable: every pass that asked fails (and is retried), none goes on as if the Service were there.
        assert all(isinstance(result, ApiError) for result in results)
    else:
        assert {result.found for result in results} == {found}  # type: ignore[union-attr]
    # Found or missing is remembered; an unreadable Service is read again next time.
    client.answer = None
    await check.lookup(client, "http://jaeger.observability:4318")  # type: ignore[arg-type]
    assert client.reads == (2 if found is None else 1)


@pytest.mark.parametrize(
    ("namespaces", "answer", "unchecked"),
    [
        (("llm", "observability"), ApiError(403, "Forbidden", "refused"), True),
        ((), ApiError(403, "Forbidden", "refused"), False),  # cluster-wide: a ClusterRole that lacks it, said loudly
        (("llm", "observability"), ApiError(503, "", "busy"), False),
    ],
    ids=["namespaced-refused", "cluster-wide-refused", "namespaced-unavailable"],
)
async def test_a_watched_namespace_that_refuses_for_long_leaves_its_collector_unchecked(
    namespaces: tuple[str, ...], answer: ApiError, unchecked: bool
) -> None:
    """A namespaced operator whose watched namespace holding the collector was deleted (its Role with it) is
    refused every read there. A refusal fails the pass (the RBAC cache filling after a restart); one that lasts
    leaves the Service unchecked instead, so that resources exporting there are still served. Refused again after
    a read that worked, it starts anew."""
    endpoint = "http://jaeger.observability:4318"
    check, client = CollectorCheck(namespaces, refused_seconds=0.2), SlowServices(answer)
    client.release.set()
    with pytest.raises(ApiError):
        await check.lookup(client, endpoint)  # type: ignore[arg-type]
    await asyncio.sleep(0.25)
    if not unchecked:
        with pytest.raises(ApiError):
            await check.lookup(client, endpoint)  # type: ignore[arg-type]
        return
    lookup = await check.lookup(client, endpoint)  # type: ignore[arg-type]
    assert lookup.found is None
    assert "namespace observability has been refused" in lookup.note
    assert client.reads == 2  # each lookup asks again: the answer is not kept
    client.answer = None
    assert (await check.lookup(client, endpoint)).found is True  # type: ignore[arg-type]
    check.forget(("observability", "jaeger"))
    client.answer = answer
    with pytest.raises(ApiError):
        await check.lookup(client, endpoint)  # type: ignore[arg-type]


async def test_a_collector_lookup_the_api_server_refuses_fails_the_pass_and_injects_nothing(emulator: Any) -> None:
    """Refused a look at the collectors' Services (403 while the API server's RBAC cache fills after a restart, a
    role edited), a pass fails (Ready=False ApiError, retried) and leaves the workload as it is; it went on as if
    the Services were there, injecting exporters aimed at collectors that do not exist, to take them out again at
    the next pass: two rollouts of every workload. Once the lookups are allowed, one pass reports the collectors
    missing and injects no exporter for them."""
    emulator.objects[DEPLOYMENTS, NAMESPACE, "chat"] = deployment()
    emulator.objects[LLMT, NAMESPACE, "chat"] = minimal_llmt()
    emulator.forbid.add(("services", "observability"))
    config = OperatorConfig(peering=PEERING, metrics_port=0, health="", resync_seconds=3600)
    async with running_operator(config):
        await eventually(
            lambda: condition(get(emulator, LLMT, "chat"), "Ready").get("reason") == "ApiError", "the refused pass"
        )
        workload = get(emulator, DEPLOYMENTS, "chat")
        assert "OTEL_TRACES_EXPORTER" not in env_of(workload)
        emulator.forbid.clear()
        await eventually(  # the retry, after the pass's backoff
            lambda: condition(get(emulator, LLMT, "chat"), c.CONDITION_COLLECTORS).get("reason") == "CollectorNotFound",
            "the collectors reported missing",
            attempts=800,
        )
        env = env_of(get(emulator, DEPLOYMENTS, "chat"))
        assert (env["OTEL_TRACES_EXPORTER"], env["OTEL_LOGS_EXPORTER"]) == ("none", "none")


async def test_missing_default_collectors_are_reported_and_not_injected(emulator: Any) -> None:
    emulator.objects[DEPLOYMENTS, NAMESPACE, "chat"] = deployment()
    emulator.objects[LLMT, NAMESPACE, "chat"] = minimal_llmt()
    # A resync far beyond the test: a collector installed later is picked up by the watch of its Service.
    config = OperatorConfig(peering=PEERING, metrics_port=0, health="", resync_seconds=3600)
    async with running_operator(config) as memo:
        collectors = await collectors_condition(emulator)
        assert (collectors["status"], collectors["reason"]) == ("False", "CollectorNotFound")
        assert "Service jaeger in namespace observability" in collectors["message"]
        assert "Service loki-gateway in namespace observability" in collectors["message"]
        assert "spec.tracing.endpoint" in collectors["message"]
        # The rest of the wiring does not wait for collectors: metrics are injected all the same.
        env = env_of(get(emulator, DEPLOYMENTS, "chat"))
        assert env["LLM_TELEMETRY_METRICS_PORT"] == "9464"
        assert (env["OTEL_TRACES_EXPORTER"], env["OTEL_LOGS_EXPORTER"]) == ("none", "none")
        assert not [name for name in env if name.startswith("OTEL_EXPORTER_OTLP_")]
        events = await eventually(lambda: collector_events(emulator), "CollectorNotFound event")
        assert "Service jaeger in" in events[0]
        old_hash = get(emulator, DEPLOYMENTS, "chat")["spec"]["template"]["metadata"]["annotations"][
            c.ANNOTATION_CONFIG_HASH
        ]

        # Jaeger gets installed: the resource gets a pass at once, which injects the trace exporter, and the new
        # hash rolls the pods.
        await hand(
            emulator,
            "POST",
            "/api/v1/namespaces/observability/services",
            {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "jaeger"}, "spec": {}},
        )
        await eventually(
            lambda: (
                env_of(get(emulator, DEPLOYMENTS, "chat")).get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
                == "http://jaeger.observability:4318/v1/traces"
            ),
            "trace exporter injected once its collector exists",
        )
        dep = get(emulator, DEPLOYMENTS, "chat")
        assert env_of(dep)["OTEL_LOGS_EXPORTER"] == "none"  # Loki is still missing
        assert dep["spec"]["template"]["metadata"]["annotations"][c.ANNOTATION_CONFIG_HASH] != old_hash
        collectors = await eventually(
            lambda: (
                "jaeger" not in condition(get(emulator, LLMT, "chat"), c.CONDITION_COLLECTORS)["message"]
                and condition(get(emulator, LLMT, "chat"), c.CONDITION_COLLECTORS)
            ),
            "condition names only Loki",
        )
        assert collectors["reason"] == "CollectorNotFound" and "loki-gateway" in collectors["message"]
        # Only the Service still awaited is watched (from just after the pass that wrote the status).
        await eventually(
            lambda: set(memo["state"].collector_watches) == {("observability", "loki-gateway")},
            "only loki-gateway watched",
        )
    check_usage(emulator)


async def test_explicit_external_endpoint_is_trusted(emulator: Any) -> None:
    """An endpoint outside the cluster is injected unchecked; credentials in it reach the pods, never the status."""
    emulator.objects[DEPLOYMENTS, NAMESPACE, "chat"] = deployment()
    endpoint = "https://team:s3cret@otlp.example.com"
    emulator.objects[LLMT, NAMESPACE, "chat"] = minimal_llmt(tracing={"endpoint": endpoint}, logs={"enabled": False})
    async with running_operator():
        collectors = await collectors_condition(emulator)
    assert (collectors["status"], collectors["reason"]) == ("True", "NotChecked")
    assert "otlp.example.com" in collectors["message"] and "s3cret" not in collectors["message"]
    assert env_of(get(emulator, DEPLOYMENTS, "chat"))["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"] == endpoint + "/v1/traces"


@pytest.mark.parametrize(
    ("tracing", "endpoint"),
    [
        (
            {"endpoint": "http://jaeger.observability.svc:4317", "protocol": "grpc"},
            "http://jaeger.observability.svc:4317",
        ),
        # grpc alone: the operator's default endpoint names OTLP's HTTP port (4318), which refuses gRPC (every trace
        # was lost while the Service looked found); the default's gRPC port is checked and injected.
        ({"protocol": "grpc"}, "http://jaeger.observability:4317"),
    ],
)
async def test_a_collector_service_on_other_ports_is_reported_and_not_injected(
    emulator: Any, tracing: dict[str, str], endpoint: str
) -> None:
    """The traces' endpoint names Jaeger's OTLP/gRPC port, and the Service there serves only OTLP/HTTP: the exporter
    would fail in every pod, so it is left out and the condition says which ports the Service has."""
    emulator.objects[DEPLOYMENTS, NAMESPACE, "chat"] = deployment()
    emulator.objects[LLMT, NAMESPACE, "chat"] = minimal_llmt(tracing=tracing, logs={"enabled": False})
    emulator.objects["v1/services", "observability", "jaeger"] = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "jaeger", "namespace": "observability"},
        "spec": {"ports": [{"name": "otlp-http", "port": 4318}]},
    }
    async with running_operator():
        collectors = await collectors_condition(emulator)
        assert (collectors["status"], collectors["reason"]) == ("False", "CollectorNotFound")
        assert "has no port 4317 (it serves 4318)" in collectors["message"]
        # Not "point it at one of its ports": 4318 takes no gRPC.
        assert (
            "open the collector's OTLP/gRPC port there, or point spec.tracing.endpoint at its gRPC port"
            in (collectors["message"])
        )
        assert env_of(get(emulator, DEPLOYMENTS, "chat"))["OTEL_TRACES_EXPORTER"] == "none"
        events = await eventually(lambda: collector_events(emulator), "CollectorNotFound event")
        assert "has no port 4317" in events[0]

        # The collector starts serving OTLP/gRPC too: the exporter goes in now, not at the resync (300 s).
        ports = [{"name": "otlp-http", "port": 4318}, {"name": "otlp-grpc", "port": 4317}]
        await hand(emulator, "PATCH", "/api/v1/namespaces/observability/services/jaeger", {"spec": {"ports": ports}})
        env = await eventually(
            lambda: (e := env_of(get(emulator, DEPLOYMENTS, "chat"))).get("OTEL_TRACES_EXPORTER") == "otlp" and e,
            "trace exporter injected once the Service serves the endpoint's port",
        )
    assert (env["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"], env["OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"]) == (endpoint, "grpc")
    check_usage(emulator)


async def test_a_change_seen_while_a_read_is_under_way_is_read_again() -> None:
    """A collector Service created while a lookup of it is in flight: that read may have missed it, so it is not
    remembered, and the next lookup reads the Service again."""
    check, client = CollectorCheck(), SlowServices(NotFoundError(404, "NotFound", "gone"))
    first = asyncio.ensure_future(check.lookup(client, "http://jaeger.observability:4318"))  # type: ignore[arg-type]
    await asyncio.sleep(0.01)
    check.forget(("observability", "jaeger"))  # the watch saw it created
    client.release.set()
    assert (await first).found is False  # what that read found
    client.answer = None
    again = await check.lookup(client, "http://jaeger.observability:4318")  # type: ignore[arg-type]
    assert (again.found, client.reads) == (True, 2)


async def test_a_failed_pass_does_not_make_the_next_one_post_its_events_again(emulator: Any) -> None:
    """A pass the API server refuses keeps the other conditions in the status: the next pass that gets through
    posts no event again for what the resource still shows (a refusal made every event be posted twice)."""
    emulator.objects[DEPLOYMENTS, NAMESPACE, "chat"] = deployment()
    emulator.objects[LLMT, NAMESPACE, "chat"] = minimal_llmt()
    config = OperatorConfig(peering=PEERING, metrics_port=0, health="", resync_seconds=3600)
    async with running_operator(config):
        await eventually(lambda: collector_events(emulator), "CollectorNotFound event")
        emulator.forbid.add(("deployments", NAMESPACE))
        await hand(emulator, "DELETE", f"/api/v1/namespaces/{NAMESPACE}/services/chat-llm-metrics")
        await eventually(
            lambda: condition(get(emulator, LLMT, "chat"), "Ready").get("reason") == "ApiError", "the refused pass"
        )
        emulator.forbid.clear()
        await eventually(lambda: get(emulator, SERVICES, "chat-llm-metrics") is not None, "the retry", attempts=800)
        await eventually(
            lambda: condition(get(emulator, LLMT, "chat"), "Ready").get("reason") != "ApiError", "the status mended"
        )
        await asyncio.sleep(1)
        assert len(collector_events(emulator)) == 1
        (refused,) = posted_events(emulator, "ApiError")
        # Said by this operator, as `kubectl describe` shows it ("From"), not by kopf's default name.
        assert refused["source"]["component"] == refused["reportingComponent"] == "llm-telemetry-operator"
        assert refused["reportingInstance"] == socket.gethostname()


async def test_collectors_installed_together_are_found_by_one_pass(emulator: Any) -> None:
    """Jaeger and Loki installed in one apply, one Service a moment after the other: the waiting resources get
    their pass once both are there, so the workload rolls once, to both exporters, with no Warning that the
    second is missing."""
    emulator.objects[DEPLOYMENTS, NAMESPACE, "chat"] = deployment()
    emulator.objects[LLMT, NAMESPACE, "chat"] = minimal_llmt()
    config = OperatorConfig(peering=PEERING, metrics_port=0, health="", resync_seconds=3600)
    async with running_operator(config):
        await eventually(lambda: collector_events(emulator), "CollectorNotFound event")
        await eventually(lambda: "OTEL_TRACES_EXPORTER" in env_of(get(emulator, DEPLOYMENTS, "chat")), "injected")
        await asyncio.sleep(0.5)
        generation = get(emulator, DEPLOYMENTS, "chat")["metadata"]["generation"]
        for name, port in (("jaeger", 4318), ("loki-gateway", 80)):
            service = {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": name},
                "spec": {"ports": [{"port": port}]},
            }
            await hand(emulator, "POST", "/api/v1/namespaces/observability/services", service)
            await asyncio.sleep(0.3)
        await eventually(
            lambda: condition(get(emulator, LLMT, "chat"), c.CONDITION_COLLECTORS).get("status") == "True",
            "both collectors found",
        )
        exporters = ("OTEL_TRACES_EXPORTER", "OTEL_LOGS_EXPORTER")
        await eventually(
            lambda: [env_of(get(emulator, DEPLOYMENTS, "chat")).get(k) for k in exporters] == ["otlp", "otlp"],
            "both exporters injected",
        )
        await asyncio.sleep(1)  # time for a second rollout, were one to come
        assert get(emulator, DEPLOYMENTS, "chat")["metadata"]["generation"] == generation + 1  # one rollout
        assert len(collector_events(emulator)) == 1


async def test_the_stop_ends_a_read_a_change_made_stale_too() -> None:
    """A read under way when its Service was seen to change is no longer shared, but still runs for the passes that
    wait for it. The operator's stop ended only the shared reads: on an API server that did not answer, the stale one
    outlived the cleanup and held the exit up for kopf's 5 s wait for hung tasks."""
    check, client = CollectorCheck(), SlowServices()
    first = asyncio.ensure_future(check.lookup(client, "http://jaeger.observability:4318"))  # type: ignore[arg-type]
    await asyncio.sleep(0.01)
    check.forget(("observability", "jaeger"))  # the watch saw it change while the API server held the read
    first.cancel()  # the operator's stop cancels the pass first, then the reads
    await check.stop()
    reads = [
        task
        for task in asyncio.all_tasks()
        if not task.done() and getattr(task.get_coro(), "__qualname__", "") == "CollectorCheck._read"
    ]
    assert reads == [], "a collector read outlived the operator's stop"
    assert client.reads == 1 and not client.release.is_set()
