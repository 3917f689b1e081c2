"""The watches of what resources wait for (collector Services, pricing ConfigMaps) are capped: resources each naming
a Service of their own that does not exist no longer make a thread and a watch each in the operator."""

from __future__ import annotations

import logging
import threading
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
    install_prometheus_operator_crds,
    minimal_llmt,
    running_operator,
)
from test_operator_kmock import check_usage, hand

from llm_telemetry_operator import constants as c
from llm_telemetry_operator import resources as r
from llm_telemetry_operator.config import MAX_AWAITED_WATCHES, OperatorConfig

LLMT_PATH = f"/apis/llmtelemetry.dev/v1alpha1/namespaces/{NAMESPACE}/llmtelemetries"
#: The watches of a test: fewer than the operator's, so that a few resources go past them.
CAP = 2
CAPPED = "more than the 2 watched at once"


def make_resources(emulator: Any, monitoring_crds: Any, names: list[str]) -> None:
    """Resources that each wait for a Service of their own and for nothing else: their passes succeed (the
    Prometheus Operator's CRDs installed), so that no retry of a failed pass comes before their resync."""
    install_prometheus_operator_crds(emulator, monitoring_crds)
    for name in names:
        emulator.objects[LLMT, NAMESPACE, name] = waiting_for_own_collector(name)


def waiting_for_own_collector(name: str) -> dict[str, Any]:
    """A resource whose traces go to a Service of its own name in namespace observability (none exists)."""
    return minimal_llmt(name, tracing={"endpoint": f"http://{name}.observability.svc:4318"}, logs={"enabled": False})


def reason(emulator: Any, name: str) -> str | None:
    return condition(get(emulator, LLMT, name), c.CONDITION_COLLECTORS).get("reason")


async def all_waiting(emulator: Any, names: list[str]) -> None:
    await eventually(
        lambda: all(reason(emulator, name) == "CollectorNotFound" for name in names), "every collector reported missing"
    )


def service_watch_names(emulator: Any) -> set[str]:
    """The Services the operator watched by name (its watch requests, as the API server received them)."""
    return {
        request.params["fieldSelector"].removeprefix("metadata.name=")
        for request in list(emulator)
        if request.method.value == "GET"
        and str(request.url.path) == "/api/v1/namespaces/observability/services"
        and request.params.get("watch") == "true"
        and "fieldSelector" in request.params
    }


def service_watch_threads() -> set[str]:
    """The threads of the operator's watches of the Services named here (its metrics Services have one of their own)."""
    return {t.name for t in threading.enumerate() if t.name.startswith("watch-services-svc-")}


def create_service(emulator: Any, name: str) -> Any:
    body = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name}, "spec": {"ports": [{"port": 4318}]}}
    return hand(emulator, "POST", "/api/v1/namespaces/observability/services", body)


def config(resync_seconds: float = 3600) -> OperatorConfig:
    return OperatorConfig(
        peering=PEERING, metrics_port=0, health="", resync_seconds=resync_seconds, awaited_watches=CAP
    )


def test_the_operator_watches_a_bounded_number_of_objects_waited_for() -> None:
    assert OperatorConfig().awaited_watches == OperatorConfig.from_env({}).awaited_watches == MAX_AWAITED_WATCHES


async def test_resources_waiting_for_more_services_than_the_cap_make_no_more_watches(
    emulator: Any, monitoring_crds: Any, caplog: Any
) -> None:
    """Seven resources each name a Service that does not exist: the operator watched each, seven threads and seven
    watches on the API server (300 of them for 300 such resources). Only the cap's are watched, the same ones at
    every pass (resyncs every 2 s here), and the log says so once."""
    caplog.set_level(logging.WARNING)
    names = [f"svc-{i}" for i in range(7)]
    make_resources(emulator, monitoring_crds, names)
    async with running_operator(config(resync_seconds=2)) as memo:
        await all_waiting(emulator, names)
        state = memo["state"]
        await eventually(lambda: len(state.collector_waiters) == len(names), "every Service waited for")
        watches = dict(state.collector_watches)
        assert len(watches) == CAP
        first = {key: started for key, (started, _) in state.passes.items()}
        # Every resource gets passes again (its resyncs): each finds its Service missing again. (Up to a minute: on
        # a machine loaded six times over its cores, 15 s did not see every resource's resync.)
        await eventually(
            lambda: all(state.passes.get(key, (started,))[0] > started for key, started in first.items()),
            "a second pass of each",
            attempts=1200,
        )
        assert state.collector_watches == watches  # the same watches, none stopped or started
        assert all(watch._thread.is_alive() for watch in watches.values())
        watched = {name for _, name in watches}
        assert service_watch_names(emulator) == watched
        assert service_watch_threads() == {f"watch-services-{name}-observability" for name in watched}
    told = [record for record in caplog.records if CAPPED in record.getMessage()]
    assert len(told) == 1, [record.getMessage() for record in told]
    assert told[0].levelno == logging.WARNING
    check_usage(emulator)


async def test_a_service_created_for_a_resource_past_the_cap_is_found_at_its_resync(
    emulator: Any, monitoring_crds: Any
) -> None:
    """A resource whose Service is not watched (past the cap) still gets it once created: at its resync."""
    names = ["svc-a", "svc-b", "svc-c"]
    make_resources(emulator, monitoring_crds, names)
    async with running_operator(config(resync_seconds=4)) as memo:
        await all_waiting(emulator, names)
        state = memo["state"]
        await eventually(lambda: len(state.collector_waiters) == len(names), "every Service waited for")
        (unwatched,) = set(state.collector_waiters) - set(state.collector_watches)
        await create_service(emulator, unwatched[1])
        await eventually(
            lambda: reason(emulator, unwatched[1]) == "CollectorsFound", "the Service found at a resync", attempts=600
        )
        assert unwatched not in state.collector_watches  # found by the resync, not by a watch
    check_usage(emulator)


@pytest.mark.parametrize("freed_by", ["edit", "deletion"])
async def test_a_watch_freed_goes_to_a_service_waited_for_past_the_cap(
    emulator: Any, monitoring_crds: Any, freed_by: str
) -> None:
    """A resource stops waiting for its watched Service (its tracing turned off, or the resource deleted): the place
    goes to the Service past the cap, whose resource then gets its pass as soon as that Service is created (the
    resync is an hour away here)."""
    names = ["svc-a", "svc-b", "svc-c"]
    make_resources(emulator, monitoring_crds, names)
    async with running_operator(config()) as memo:
        await all_waiting(emulator, names)
        state = memo["state"]
        await eventually(lambda: len(state.collector_waiters) == len(names), "every Service waited for")
        (unwatched,) = set(state.collector_waiters) - set(state.collector_watches)
        freed = sorted(state.collector_watches)[0]
        waiting = (NAMESPACE, unwatched[1])
        last_pass = state.passes[waiting][0]
        if freed_by == "edit":
            await hand(emulator, "PATCH", f"{LLMT_PATH}/{freed[1]}", {"spec": {"tracing": {"enabled": False}}})
        else:
            await hand(emulator, "DELETE", f"{LLMT_PATH}/{freed[1]}")
        await eventually(lambda: freed not in state.collector_watches, "the freed Service no longer watched")
        await eventually(lambda: unwatched in state.collector_watches, "the Service past the cap watched")
        assert len(state.collector_watches) == CAP
        assert state.passes[waiting][0] == last_pass  # given the place, not taking it at a pass of its own
        await eventually(lambda: unwatched[1] in service_watch_names(emulator), "its watch on the API server")
        await create_service(emulator, unwatched[1])
        await eventually(lambda: reason(emulator, unwatched[1]) == "CollectorsFound", "the Service found at once")
    check_usage(emulator)


def waiting_for_prices(name: str) -> dict[str, Any]:
    """A resource serving Deployment ``name`` whose pricing ConfigMap "prices" does not exist yet, and that waits for
    no collector (its traces and logs off): it holds its workload back, and its passes are retried with backoff."""
    body = minimal_llmt(name, tracing={"enabled": False}, logs={"enabled": False})
    body["spec"]["selector"] = {"matchLabels": {"app": name}}
    body["spec"]["pricing"] = {"configMapRef": {"name": "prices"}}
    return body


PRICES = (NAMESPACE, "prices")


def create_prices(emulator: Any) -> Any:
    body = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "prices"},
            "data": {"pricing.yaml": "gpt-4o: {input: 2.5, output: 10}\n"}}  # fmt: skip
    return hand(emulator, "POST", f"/api/v1/namespaces/{NAMESPACE}/configmaps", body)


def prices_watched_on_server(emulator: Any) -> bool:
    """Whether the operator asked the API server for a watch of ConfigMap "prices" by name."""
    return any(
        request.method.value == "GET"
        and str(request.url.path) == f"/api/v1/namespaces/{NAMESPACE}/configmaps"
        and request.params.get("watch") == "true"
        and request.params.get("fieldSelector") == "metadata.name=prices"
        for request in list(emulator)
    )


async def priced_past_the_cap(emulator: Any, memo: Any) -> None:
    """Two resources wait for Services of their own (the cap's two watches), then "priced" comes, waiting for its
    pricing ConfigMap: past the cap, not watched."""
    await all_waiting(emulator, ["svc-a", "svc-b"])
    state = memo["state"]
    await eventually(lambda: len(state.collector_watches) == CAP, "both Services watched")
    await hand(emulator, "POST", LLMT_PATH, waiting_for_prices("priced"))
    await eventually(lambda: PRICES in state.pricing_waiters, "the pricing ConfigMap waited for")
    assert reason_of(emulator, "priced", c.CONDITION_INJECTED) == "PricingConfigMapNotFound"
    assert PRICES not in state.pricing_watches
    assert not prices_watched_on_server(emulator)


def reason_of(emulator: Any, name: str, type_: str) -> str | None:
    return condition(get(emulator, LLMT, name), type_).get("reason")


def setup_priced(emulator: Any, monitoring_crds: Any) -> None:
    make_resources(emulator, monitoring_crds, ["svc-a", "svc-b"])
    emulator.objects[DEPLOYMENTS, NAMESPACE, "priced"] = deployment("priced", labels={"app": "priced"})


async def test_a_pricing_configmap_created_for_a_resource_past_the_cap_is_found_at_its_retry(
    emulator: Any, monitoring_crds: Any, caplog: Any
) -> None:
    """A resource waiting for a pricing ConfigMap that is not watched (the watches are the Services') still gets it
    once created, at its next retry (the resync is an hour away here), and injects its workload then."""
    caplog.set_level(logging.INFO)
    setup_priced(emulator, monitoring_crds)
    async with running_operator(config()) as memo:
        await priced_past_the_cap(emulator, memo)
        await create_prices(emulator)
        await eventually(
            lambda: condition(get(emulator, LLMT, "priced"), c.CONDITION_INJECTED).get("status") == "True",
            "the ConfigMap found at a retry",
            attempts=600,
        )
        assert PRICES not in memo["state"].pricing_watches  # found by the retry, not by a watch
        assert not prices_watched_on_server(emulator)
        assert r.injected_record(get(emulator, DEPLOYMENTS, "priced") or {}) is not None
    found = [m for rec in caplog.records if f"{NAMESPACE}/priced: reconciled (" in (m := rec.getMessage())]
    assert not [m for m in found if "reconciled (pricing)" in m], found
    check_usage(emulator)


async def test_a_watch_freed_goes_to_a_pricing_configmap_waited_for_past_the_cap(
    emulator: Any, monitoring_crds: Any, caplog: Any
) -> None:
    """A resource waiting for a Service is deleted: its watch's place goes to the pricing ConfigMap past the cap, and
    the resource waiting for it gets its pass as soon as that ConfigMap is created, not at its next retry."""
    caplog.set_level(logging.INFO)
    setup_priced(emulator, monitoring_crds)
    async with running_operator(config()) as memo:
        await priced_past_the_cap(emulator, memo)
        state = memo["state"]
        await hand(emulator, "DELETE", f"{LLMT_PATH}/svc-a")
        await eventually(lambda: PRICES in state.pricing_watches, "the ConfigMap watched in the place freed")
        assert len(state.collector_watches) + len(state.pricing_watches) == CAP
        await eventually(lambda: prices_watched_on_server(emulator), "its watch on the API server")
        # Just after one of its retries (the next one is 2.5 s away at the soonest), the ConfigMap is created.
        key = (NAMESPACE, "priced")
        last = state.passes[key][0]
        await eventually(lambda: state.passes.get(key, (last,))[0] > last, "a retry of priced", attempts=600)
        await create_prices(emulator)
        await eventually(
            lambda: condition(get(emulator, LLMT, "priced"), c.CONDITION_INJECTED).get("status") == "True",
            "the ConfigMap found",
        )
    found = [m for rec in caplog.records if f"{NAMESPACE}/priced: reconciled (" in (m := rec.getMessage())]
    assert any("reconciled (pricing)" in m for m in found), found
    check_usage(emulator)
