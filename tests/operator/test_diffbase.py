"""kopf's diff base from status.observedGeneration: what kopf sees as handled, and that it writes nothing."""

from __future__ import annotations

import copy
from typing import Any

import kopf
import pytest

from llm_telemetry_operator.diffbase import ObservedGenerationDiffBase


def llmt(generation: int | None, observed: int | None) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": "chat",
        "namespace": "llm",
        "uid": "uid-chat",
        "resourceVersion": "7",
        "labels": {"team": "a"},
        "annotations": {
            "note": "kept",
            "kopf.zalando.org/last-handled-configuration": '{"spec": {}}',
            "kubectl.kubernetes.io/last-applied-configuration": "{}",
        },
        "finalizers": ["llmtelemetry.dev/finalizer"],
        "managedFields": [{"manager": "kubectl", "fieldsV1": {"f:spec": {}}}],
    }
    if generation is not None:
        meta["generation"] = generation
    body: dict[str, Any] = {
        "apiVersion": "llmtelemetry.dev/v1alpha1",
        "kind": "LLMTelemetry",
        "metadata": meta,
        "spec": {"selector": {"matchLabels": {"app": "chat"}}, "alerts": {"rules": [{"x": [1, 2]}]}},
    }
    if observed is not None:
        body["status"] = {"observedGeneration": observed, "conditions": [{"type": "Ready", "status": "True"}]}
    return body


def test_essence_is_the_one_kopf_builds() -> None:
    body = kopf.Body(llmt(3, 3))
    ours = ObservedGenerationDiffBase().build(body=body)
    assert ours == kopf.AnnotationsDiffBaseStorage().build(body=body)
    assert "status" not in ours and set(ours["metadata"]) == {"labels", "annotations"}
    # A copy: editing it leaves the body alone.
    ours["spec"]["alerts"]["rules"][0]["x"].append(3)
    assert body["spec"]["alerts"]["rules"][0]["x"] == [1, 2]


@pytest.mark.parametrize(
    ("generation", "observed", "handled"),
    [(3, 3, True), (4, 3, False), (3, None, False), (None, None, False)],
    ids=["applied", "spec-changed", "never-passed", "no-generation"],
)
def test_handled_only_when_the_generation_was_observed(generation: Any, observed: Any, handled: bool) -> None:
    body = kopf.Body(llmt(generation, observed))
    storage = ObservedGenerationDiffBase()
    old = storage.fetch(body=body)
    assert (old == storage.build(body=body)) if handled else old is None


def test_storing_writes_nothing() -> None:
    raw = llmt(4, 3)
    body = kopf.Body(raw)
    before = copy.deepcopy(raw)
    patch = kopf.Patch()
    ObservedGenerationDiffBase().store(body=body, patch=patch, essence=ObservedGenerationDiffBase().build(body=body))
    assert not patch and raw == before


@pytest.mark.parametrize(
    ("written", "handled"),
    [({"observedGeneration": 3}, True), ({"observedGeneration": 2}, False), (None, False)],
    ids=["own-write-observed-it", "own-write-older", "nothing-written"],
)
def test_a_body_lagging_behind_the_operators_own_status_write(written: Any, handled: bool) -> None:
    """The echo of a new resource's claim (`status.operator` only) arrives after the pass wrote observedGeneration:
    handled, by what the operator wrote for that uid, so kopf does not run the creation again."""
    raw = llmt(3, None)
    raw["status"] = {"operator": "llm-telemetry-operator"}
    body = kopf.Body(raw)
    storage = ObservedGenerationDiffBase(written={"uid-chat": written}.get if written else {}.get)
    old = storage.fetch(body=body)
    assert (old == storage.build(body=body)) if handled else old is None
