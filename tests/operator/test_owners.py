"""OwnerIndex: a workload event looks only at the LLMTelemetry it can concern, and never misses one."""

from __future__ import annotations

import random
from typing import Any

from llm_telemetry_operator.owners import OwnerIndex
from llm_telemetry_operator.spec import TelemetrySpec, parse_spec

NS = "llm"


def spec(match_labels: dict[str, str] | None = None, expressions: list[dict[str, Any]] | None = None) -> TelemetrySpec:
    selector: dict[str, Any] = {}
    if match_labels is not None:
        selector["matchLabels"] = match_labels
    if expressions is not None:
        selector["matchExpressions"] = expressions
    return parse_spec({"selector": selector})


def test_a_thousand_resources_one_candidate_each() -> None:
    index = OwnerIndex()
    for i in range(1000):
        index.put((NS, f"app-{i}"), spec({"app": f"app-{i}"}))
    assert index.candidates(NS, {"app": "app-7", "tier": "web"}) == ["app-7"]
    assert index.candidates(NS, {"app": "other"}) == []
    assert index.candidates("elsewhere", {"app": "app-7"}) == []
    assert index.names(NS)[:3] == ["app-0", "app-1", "app-10"]


def test_served_workloads_and_named_owners_are_candidates_until_forgotten() -> None:
    index = OwnerIndex()
    index.put((NS, "chat"), spec({"app": "chat"}))
    index.put((NS, "embed"), spec({"app": "embed"}))
    index.serve((NS, "chat"), ["Deployment/chat"])
    # Relabelled: the selector no longer selects it, but its last pass served it, and its record names embed.
    assert index.candidates(NS, {"app": "other"}, "Deployment/chat", "embed") == ["chat", "embed"]
    assert index.candidates(NS, {"app": "other"}, "Deployment/chat", "gone") == ["chat"]
    index.serve((NS, "chat"), [])
    assert index.candidates(NS, {"app": "other"}, "Deployment/chat") == []
    index.serve((NS, "chat"), ["Deployment/chat"])
    index.remove((NS, "chat"))
    assert index.candidates(NS, {"app": "chat"}, "Deployment/chat", "chat") == []
    assert index.names(NS) == ["embed"]
    index.remove((NS, "chat"))  # twice: nothing to do


def test_spec_change_files_the_resource_anew() -> None:
    index = OwnerIndex()
    index.put((NS, "chat"), spec({"app": "chat"}))
    index.put((NS, "chat"), spec({"app": "chat2"}))
    assert index.candidates(NS, {"app": "chat"}) == []
    assert index.candidates(NS, {"app": "chat2"}) == ["chat"]
    index.put((NS, "chat"), None)  # invalid spec: kept, looked at for every workload (the caller skips it)
    assert index.candidates(NS, {"x": "y"}) == ["chat"]
    assert index.names(NS) == ["chat"]


def test_candidates_are_never_fewer_than_the_selectors_that_match() -> None:
    """Random selectors (matchLabels, matchExpressions, both, none) against random label sets: every resource
    whose selector selects the labels is a candidate."""
    rnd = random.Random(16)
    keys, values = ["app", "tier", "team"], ["a", "b", "c"]
    index = OwnerIndex()
    specs: dict[str, TelemetrySpec] = {}
    for i in range(200):
        labels = {k: rnd.choice(values) for k in rnd.sample(keys, rnd.randint(0, 2))}
        expressions = [
            {
                "key": rnd.choice(keys),
                "operator": op,
                **({"values": [rnd.choice(values)]} if op in ("In", "NotIn") else {}),
            }
            for op in rnd.sample(["In", "NotIn", "Exists", "DoesNotExist"], rnd.randint(0, 2))
        ]
        if not labels and not any(e["operator"] in ("In", "Exists") for e in expressions):
            expressions.append({"key": "app", "operator": "Exists"})  # a selector must name what it selects
        specs[f"r{i:03}"] = spec(labels or None, expressions or None)
        index.put((NS, f"r{i:03}"), specs[f"r{i:03}"])
    for _ in range(500):
        labels = {k: rnd.choice(values) for k in rnd.sample(keys, rnd.randint(0, 3))}
        matching = {name for name, s in specs.items() if s.selector.matches(labels)}
        found = index.candidates(NS, labels)
        assert matching <= set(found), (labels, sorted(matching - set(found)))
        assert found == sorted(found)


def test_a_workload_found_gone_is_forgotten_only_for_the_resource_its_record_names() -> None:
    index = OwnerIndex()
    index.record(NS, "Deployment/chat", "chat")
    index.record(NS, "Deployment/embed", "embed")
    index.gone((NS, "chat"), "Deployment/embed")  # (its record names another: a newer version than the read)
    index.gone((NS, "chat"), "Deployment/chat")
    assert index.recorded((NS, "chat")) == []
    assert index.recorded((NS, "embed")) == ["Deployment/embed"]
