"""After a gap in the watches (the API server out of reach, then its history compacted: 410 Gone), a pass that an
event of the workloads' own watch starts runs with the LLMTelemetry as the API server has it now, not with the body
kopf's watch delivered before the gap.

The workloads' watch often resumes before kopf's watch of the resources has listed them again: its events started
passes with a spec from before the gap, so a spec edited meanwhile was applied in its old form first (a rollout of
the workload) and in its new one when kopf caught up (a second rollout). Here kopf's watch never hears of the edit
(it is stored with no watch event, as if made while every watch was away), so only a pass that reads the resource
again applies it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from kopf_testing import (
    DEPLOYMENTS,
    LLMT,
    NAMESPACE,
    NAMESPACES,
    PEERING,
    by_name,
    cache_lagging,
    condition,
    consistent_reads,
    deployment,
    eventually,
    get,
    install_default_collectors,
    install_prometheus_operator_crds,
    minimal_llmt,
    namespace_object,
    ready,
    running_operator,
)
from test_operator_kmock import hand, in_namespace

from llm_telemetry_operator.config import OperatorConfig


def metrics_port(dep: Any) -> str | None:
    """The metrics port injected into a Deployment's pod template, or None without an injection."""
    env = (dep or {})["spec"]["template"]["spec"]["containers"][0].get("env") or []
    return next((e.get("value") for e in env if e["name"] == "LLM_TELEMETRY_METRICS_PORT"), None)


@contextlib.asynccontextmanager
async def served(emulator: Any, monitoring_crds: Any) -> AsyncIterator[dict[str, Any]]:
    """An operator serving one LLMTelemetry that selects one Deployment; the resource once Ready, and once kopf's
    watch has delivered the echo of the pass's status write."""
    install_prometheus_operator_crds(emulator, monitoring_crds)
    install_default_collectors(emulator)
    emulator.objects[DEPLOYMENTS, NAMESPACE, "chat"] = deployment()
    emulator.objects[LLMT, NAMESPACE, "chat"] = minimal_llmt()
    async with running_operator():
        owner = await ready(emulator)
        assert metrics_port(get(emulator, DEPLOYMENTS, "chat")) == "9464"
        await asyncio.sleep(1.0)
        yield owner


async def reapplied_in_gap(emulator: Any) -> None:
    """The Deployment put back as its manifest has it (a GitOps re-apply, which drops the injection) with no watch
    hearing of it, then the workloads' watch sent back to list them again (410): the re-applied one starts a pass."""
    reapplied = deployment()
    reapplied["metadata"]["generation"] = get(emulator, DEPLOYMENTS, "chat")["metadata"]["generation"] + 1
    emulator.write_unseen(DEPLOYMENTS, NAMESPACE, "chat", reapplied)
    await emulator.expire_watches("deployments")


def rollouts(emulator: Any) -> list[str | None]:
    """The metrics port injected in each version the Deployment had (None: none injected)."""
    return [metrics_port(version) for version in emulator.objects[DEPLOYMENTS, NAMESPACE, "chat"].history[:]]


async def test_a_workload_event_after_a_watch_gap_applies_the_spec_edited_in_the_gap(
    emulator: Any, monitoring_crds: Any
) -> None:
    async with served(emulator, monitoring_crds) as owner:
        # In the gap: the spec edited, and the workload put back as its manifest has it (a GitOps re-apply, which
        # drops the injection); no watch hears of either.
        edited = {**owner, "spec": {**owner["spec"], "metrics": {"port": 9500}}}
        edited["metadata"] = {**owner["metadata"], "generation": 2}
        emulator.write_unseen(LLMT, NAMESPACE, "chat", edited)
        # The workloads' watch comes back to a compacted history: it lists them again, and the re-applied
        # Deployment starts a pass.
        await reapplied_in_gap(emulator)
        await eventually(lambda: metrics_port(get(emulator, DEPLOYMENTS, "chat")) == "9500", "the new spec injected")
        # The old spec's injection was never written back in between: one rollout, not two.
        ports = rollouts(emulator)
        assert [port for port in ports if port is not None] == ["9500"], ports
        await eventually(
            lambda: (get(emulator, LLMT, "chat") or {}).get("status", {}).get("observedGeneration") == 2,
            "the edited generation observed",
        )
        # The watch cache had it: no read beside that one.
        assert not consistent_reads(emulator)


async def test_a_resource_a_lagging_watch_cache_lacks_after_a_watch_gap_is_not_forgotten(
    emulator: Any, monitoring_crds: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """The read after a gap is a list from an API server's watch cache, which may lag behind the one kopf's watch
    reads, and not have the resource yet: it was taken for gone and forgotten (no pass until its next change, its
    workloads handed to the next in line), and the re-applied workload was never injected again. A consistent list
    now confirms such an answer before the resource is forgotten."""
    caplog.set_level(logging.INFO)
    async with served(emulator, monitoring_crds):
        cache_lagging(emulator)
        await reapplied_in_gap(emulator)
        await eventually(lambda: metrics_port(get(emulator, DEPLOYMENTS, "chat")) == "9464", "injected again")
        assert "is gone, though its deletion was never reported" not in caplog.text
        assert consistent_reads(emulator)


async def test_a_read_after_a_watch_gap_older_than_the_body_had_is_not_taken(
    emulator: Any, monitoring_crds: Any
) -> None:
    """The read after a gap is a list from an API server's watch cache, which may lag behind the one kopf's watch
    reads (several API servers behind one address): a body of an older generation than the one had is not applied."""
    async with served(emulator, monitoring_crds) as owner:
        generation = owner["metadata"]["generation"]
        # A lagging cache's answer: the resource as it was before its last spec change.
        lagging = {**owner, "spec": {**owner["spec"], "metrics": {"port": 9600}}}
        lagging["metadata"] = {**owner["metadata"], "generation": generation - 1}
        emulator.write_unseen(LLMT, NAMESPACE, "chat", lagging)
        await reapplied_in_gap(emulator)
        await eventually(lambda: metrics_port(get(emulator, DEPLOYMENTS, "chat")) == "9464", "injected again")
        ports = rollouts(emulator)
        assert "9600" not in ports, ports


@pytest.mark.parametrize("gap", ["deleted", "made anew"])
async def test_a_resource_deleted_or_made_anew_in_a_watch_gap_gets_no_pass_with_the_body_had_before(
    emulator: Any, monitoring_crds: Any, caplog: pytest.LogCaptureFixture, gap: str
) -> None:
    """In the gap, the resource is deleted (its finalizer holds it, with a deletionTimestamp and a generation the API
    server raised), or deleted and made anew under another uid; the workload is put back as its manifest has it. The
    read after the gap finds that the body had is no longer one to apply: the pass that the workload's event started
    injected the old spec again all the same (a rollout, undone by the deletion's handler a moment later, or an
    injection naming a resource that is gone). Now no pass runs with it; kopf's watch brings the deletion or the new
    resource (it never does here: neither write is seen by any watch)."""
    caplog.set_level(logging.INFO)
    async with served(emulator, monitoring_crds) as owner:
        if gap == "deleted":
            meta = {**owner["metadata"], "deletionTimestamp": "2026-01-01T00:00:00Z"}
            meta["generation"] = owner["metadata"]["generation"] + 1
            emulator.write_unseen(LLMT, NAMESPACE, "chat", {**owner, "metadata": meta})
        else:
            anew = minimal_llmt(metrics={"port": 9500})
            anew["metadata"]["uid"] = "uid-chat-anew"
            emulator.write_unseen(LLMT, NAMESPACE, "chat", anew)
        await reapplied_in_gap(emulator)
        said = "being deleted: no pass" if gap == "deleted" else "is gone, though its deletion was never reported"
        await eventually(
            lambda: metrics_port(get(emulator, DEPLOYMENTS, "chat")) is not None or said in caplog.text,
            "the pass the re-applied workload's event started",
        )
        ports = rollouts(emulator)
        assert ports[-1] is None, ports


async def test_one_namespace_s_watch_failing_has_only_that_namespace_s_resources_read_again(
    emulator: Any, monitoring_crds: Any
) -> None:
    """Each watched namespace has watches of its own. One that fails alone (a connection reset, its version expired)
    says nothing of kopf's watches of the other namespaces: the resources of its namespace are read again at their
    next pass, and no other. Every resource of every namespace was (on a real API server, 3 namespaces of 4
    resources each: 12 lists after one namespace's workload watch broke, where 4 are due)."""
    other = "team-b"
    install_prometheus_operator_crds(emulator, monitoring_crds)
    install_default_collectors(emulator)
    emulator.objects[NAMESPACES, None, other] = namespace_object(other)
    for ns in (NAMESPACE, other):
        emulator.objects[DEPLOYMENTS, ns, "chat"] = in_namespace(deployment(), ns)
        emulator.objects[LLMT, ns, "chat"] = in_namespace(minimal_llmt(), ns)
    config = OperatorConfig(namespaces=(NAMESPACE, other), peering=PEERING, metrics_port=0, health="")
    async with running_operator(config) as memo:
        for ns in (NAMESPACE, other):
            await eventually(lambda ns=ns: condition(get(emulator, LLMT, "chat", ns), "Ready").get("status"), ns)
        await asyncio.sleep(1.0)
        before = len(list(emulator))
        await emulator.expire_watches("deployments", namespace=other)
        broken = time.monotonic()
        # A change of each namespace's workload: a pass for each resource.
        for ns in (NAMESPACE, other):
            await hand(emulator, "PATCH", f"/apis/apps/v1/namespaces/{ns}/deployments/chat", {"spec": {"replicas": 2}})
        passes = memo["state"].passes
        await eventually(
            lambda: all(passes.get((ns, "chat"), (0.0,))[0] > broken for ns in (NAMESPACE, other)), "both passes"
        )
        reads = {ns: [r for r in list(emulator)[before:] if by_name(r, namespace=ns)] for ns in (NAMESPACE, other)}
        assert reads[other] and not reads[NAMESPACE], reads
