"""The LLMTelemetry CRD: what a kube-apiserver accepts in it, and what it accepts and refuses in a resource."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

import kube_schema
from crd_cases import (
    ACCEPTED,
    BAD_SPECS,
    GOOD_INTERVALS,
    GOOD_SELECTORS,
    MINIMAL,
    REFUSED,
    with_field,
    with_spec,
)
from llm_telemetry.config import ConfigurationError
from llm_telemetry_operator.spec import OWN_LABELS, SpecError, parse_spec

REPO_ROOT = Path(__file__).resolve().parents[2]
CRD_NAME = "llmtelemetry.dev_llmtelemetries.yaml"
#: The source, and the copy the chart installs (scripts/sync-crds writes it; a chart test keeps it identical).
CRD_COPIES = [REPO_ROOT / "crds" / CRD_NAME, REPO_ROOT / "charts" / "llm-telemetry-operator" / "crds" / CRD_NAME]
EXAMPLES = sorted((REPO_ROOT / "examples").glob("llmtelemetry-*.yaml"))


def load(path: Path = CRD_COPIES[0]) -> dict[str, Any]:
    crd: dict[str, Any] = yaml.safe_load(path.read_text())
    return crd


def test_the_alert_bounds_are_the_histograms() -> None:
    """The CRD refuses what AlertThresholds refuses, no more: p95 thresholds up to each histogram's second-to-last
    bucket boundary, TTFT objective latencies among its boundaries. The buckets were widened once (TTFT to 80 s),
    and a CRD left behind would refuse values the rules take."""
    from llm_telemetry import instruments

    alerts = load()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["alerts"]
    fields = alerts["properties"]
    assert fields["p95TtftSeconds"]["maximum"] == instruments.TIME_TO_FIRST_TOKEN_BUCKETS[-2]
    assert fields["p95RequestDurationSeconds"]["maximum"] == instruments.REQUEST_DURATION_BUCKETS[-2]
    assert fields["ttftObjectiveSeconds"]["enum"] == list(instruments.TIME_TO_FIRST_TOKEN_BUCKETS)


def test_every_field_says_what_it_is() -> None:
    """``kubectl explain llmtelemetry.spec.alerts`` (and status) prints each field's description: none may be
    blank. apiVersion, kind and metadata are explained by Kubernetes itself."""
    schema = load()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    blank: list[str] = []

    def walk(node: dict[str, Any], path: str) -> None:
        for key, sub in (node.get("properties") or {}).items():
            if not str(sub.get("description") or "").strip():
                blank.append(f"{path}.{key}")
            walk(sub, f"{path}.{key}")
        if isinstance(node.get("items"), dict):
            walk(node["items"], f"{path}[]")

    for part in ("spec", "status"):
        walk(schema["properties"][part], part)
    assert blank == []
    assert schema["properties"]["status"].get("description")
    # A node that keeps unknown fields is published in the API server's OpenAPI v2 without its fields, which is
    # what kubectl explain reads before 1.27: `kubectl explain llmtelemetry.status.conditions` then showed nothing.
    keeping = [key for key, node in schema["properties"].items() if node.get("x-kubernetes-preserve-unknown-fields")]
    assert keeping == []


def test_crd_names_and_printer_columns() -> None:
    crd = load()
    assert crd["spec"]["names"]["plural"] == "llmtelemetries"
    assert crd["spec"]["names"]["shortNames"] == ["llmt"]
    version = crd["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    assert [col["name"] for col in version["additionalPrinterColumns"] if col.get("priority", 0) == 0] == [
        "Targets",
        "Ready",
        "Age",
    ]


@pytest.mark.parametrize("path", CRD_COPIES, ids=["crds", "chart"])
def test_crd_schema_is_one_the_api_server_accepts(path: Path) -> None:
    assert kube_schema.structural_errors(load(path), oldest_minor=kube_schema.OLDEST_MINOR) == []


def test_crd_validation_rules_compile() -> None:
    rules = [rule for _, schema in kube_schema.versions(load()) for rule in kube_schema.cel_rules(schema)]
    assert {path for path, _ in rules} >= {".spec.selector", ".spec.pricing", ".spec.pricing.models.*"}
    for path, rule in rules:
        assert kube_schema.cel_compile_error(rule) is None, f"{path}: {rule}"


@pytest.mark.parametrize("path", CRD_COPIES, ids=["crds", "chart"])
def test_every_collection_a_validation_rule_iterates_is_bounded(path: Path) -> None:
    """A real API server of 1.25 or later estimates each rule's cost from the bounds declared, and refuses the CRD
    when one exceeds its budget: the 1.23 server of tests/integration does not, so this is checked here."""
    found = [f for _, schema in kube_schema.versions(load(path)) for f in kube_schema.unbounded_iterations(schema)]
    assert found == []


def test_the_bound_check_finds_a_rule_over_an_unbounded_collection() -> None:
    kinds = {"type": "object", "additionalProperties": {"type": "number"}}
    spec = {
        "type": "object",
        "properties": {"kinds": kinds, "names": {"type": "array", "items": {"type": "string"}}},
        "x-kubernetes-validations": [
            {"rule": "self.names.all(n, n != '')"},
            {"rule": "self.kinds.exists(k, k == 'input')"},
        ],
    }
    assert kube_schema.unbounded_iterations(spec) == [
        "<root>: self.names.all(n, n != '')",
        "<root>: self.kinds.exists(k, k == 'input')",
    ]
    spec["properties"]["names"]["maxItems"] = 8
    spec["properties"]["kinds"]["maxProperties"] = 5
    assert kube_schema.unbounded_iterations(spec) == []


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_crd_accepts_examples(path: Path) -> None:
    obj = yaml.safe_load(path.read_text())
    assert kube_schema.validate_object(load(), obj) == []
    parse_spec(obj["spec"])  # and the operator accepts them too


def test_the_full_example_sets_every_field_of_the_spec() -> None:
    """examples/llmtelemetry-full.yaml says it shows every field of the spec: each field the CRD's schema declares is
    set there, but spec.pricing.configMapRef (not allowed beside pricing.models, and shown as a comment)."""

    def fields(schema: dict[str, Any], prefix: str) -> set[str]:
        found = set()
        for key, sub in (schema.get("properties") or {}).items():
            found |= {prefix + key} | fields(sub.get("items", sub), f"{prefix}{key}.")
        return found

    def given(value: Any, prefix: str) -> set[str]:
        found = set()
        for item in value if isinstance(value, list) else [value]:
            for key, sub in item.items() if isinstance(item, dict) else ():
                found |= {prefix + key} | given(sub, f"{prefix}{key}.")
        return found

    spec = load()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    full = yaml.safe_load((REPO_ROOT / "examples" / "llmtelemetry-full.yaml").read_text())["spec"]
    missing = fields(spec, "") - given(full, "")
    assert sorted(missing) == ["pricing.configMapRef", "pricing.configMapRef.key", "pricing.configMapRef.name"]


def test_crd_accepts_every_price_kind() -> None:
    obj = copy.deepcopy(MINIMAL)
    prices = {"input": 2.5, "output": 10, "cache_read": 1.25, "cache_creation": 3}
    obj["spec"]["pricing"] = {"models": {"gpt-4o": prices, "claude-sonnet-4": {"input": 3, "output": 15}}}
    assert kube_schema.validate_object(load(), obj) == []
    assert parse_spec(obj["spec"]).pricing.models["gpt-4o"] == prices


@pytest.mark.parametrize("selector", GOOD_SELECTORS)
def test_crd_and_operator_take_selectors_that_name_their_workloads(selector: dict[str, Any]) -> None:
    obj = copy.deepcopy(MINIMAL)
    obj["spec"]["selector"] = selector
    assert kube_schema.validate_object(load(), obj) == []
    parse_spec(obj["spec"])


@pytest.mark.parametrize("interval", GOOD_INTERVALS)
def test_crd_and_operator_take_scrape_intervals_the_rules_work_with(interval: str) -> None:
    obj = copy.deepcopy(MINIMAL)
    obj["spec"]["metrics"] = {"interval": interval}
    assert kube_schema.validate_object(load(), obj) == []
    assert parse_spec(obj["spec"]).metrics.interval == interval


@pytest.mark.parametrize(("patch", "why"), BAD_SPECS)
def test_crd_rejects_bad_specs(patch: dict[str, Any], why: str) -> None:
    """And the operator refuses each too (an Invalid status naming the field): a server without the CRD's rules (before
    1.25, or a CRD installed before a rule, which Helm never upgrades) stores what the CRD now refuses."""
    obj = with_spec(patch)
    assert kube_schema.validate_object(load(), obj), why
    with pytest.raises(SpecError):
        parse_spec(obj["spec"])


@pytest.mark.parametrize(("section", "field", "value"), ACCEPTED)
def test_crd_and_operator_accept(section: str, field: str, value: str) -> None:
    obj = with_field(section, field, value)
    assert kube_schema.validate_object(load(), obj) == []
    assert getattr(getattr(parse_spec(obj["spec"]), section), field) == value


@pytest.mark.parametrize(("section", "field", "value"), REFUSED)
def test_operator_refuses_what_the_crd_refuses(section: str, field: str, value: str) -> None:
    """The operator checks it too: a CRD installed before the rule (Helm never upgrades one) lets it through."""
    obj = with_field(section, field, value)
    assert kube_schema.validate_object(load(), obj)
    with pytest.raises(SpecError, match=rf"spec\.{section}\.{field}"):
        parse_spec(obj["spec"])


@pytest.mark.parametrize("key", sorted(OWN_LABELS))
def test_the_operators_own_labels_are_refused_in_spec_metrics_labels(key: str) -> None:
    """The operator finds its children by these labels and sets them itself: one in spec.metrics.labels was
    dropped without a word. Refused by the CRD at apply, and by the operator (a CRD from before the rule)."""
    obj = copy.deepcopy(MINIMAL)
    obj["spec"]["metrics"] = {"labels": {"release": "kps", key: "argocd"}}
    assert kube_schema.validate_object(load(), obj)
    with pytest.raises(SpecError, match=r"spec\.metrics\.labels\."):
        parse_spec(obj["spec"])
    obj["spec"]["metrics"] = {"labels": {"release": "kps", "app.kubernetes.io/version": "1"}}
    assert kube_schema.validate_object(load(), obj) == []
    assert parse_spec(obj["spec"]).metrics.labels["release"] == "kps"


def test_crd_and_operator_take_up_to_32_container_names_of_up_to_63_characters() -> None:
    """spec.containers is bounded as the CRD's other lists are: its names go into the status and events (a workload
    lacking some is named with them), and a container name is a DNS-1123 label (63 characters), so a longer one
    names no container. Both the CRD and the operator (a resource stored before the bound) refuse past it."""
    names = [f"{i:02d}{'c' * 61}" for i in range(32)]
    obj = with_spec({"containers": names})
    assert kube_schema.validate_object(load(), obj) == []
    assert parse_spec(obj["spec"]).containers == tuple(names)
    over = (
        ([*names, "one-more"], "spec.containers:", "spec.containers"),
        (["app", "c" * 64], "spec.containers.1:", "spec.containers[1]"),
    )
    for containers, path, field in over:
        obj = with_spec({"containers": containers})
        refusals = kube_schema.validate_object(load(), obj)
        assert refusals and all(refusal.startswith(path) for refusal in refusals), refusals
        with pytest.raises(SpecError) as refused:
            parse_spec(obj["spec"])
        assert refused.value.field == field


def test_crd_unknown_price_kind_is_refused_not_pruned() -> None:
    """A misspelt price kind must fail the request: pruning it would silently drop the user's price."""
    obj = copy.deepcopy(MINIMAL)
    obj["spec"]["pricing"] = {"models": {"gpt-4o": {"input": 1, "output": 2, "cache_reads": 0.5}}}
    schema = dict(kube_schema.versions(load()))["v1alpha1"]
    assert kube_schema.prune_object(schema, obj) == obj, "the price map keeps unknown keys for the rule to see"
    assert kube_schema.validate_object(load(), obj) == [
        ".spec.pricing.models[gpt-4o]: price kinds are input, output, cache_read, cache_creation, cache_creation_1h,"
        " input_audio, input_image, output_audio, output_image and cache_read_image"
    ]


def test_the_highest_price_is_the_same_for_the_middleware_the_operator_and_the_crd() -> None:
    """A dollar a token is taken by all three, the next float above it refused by all three: a price the CRD and the
    operator took but the middleware refused would fail the startup of every pod the table is mounted into."""
    import math

    from llm_telemetry.pricing import MAX_PRICE, PricingTable
    from llm_telemetry_operator.spec import MAX_PRICE as OPERATOR_MAX_PRICE

    assert OPERATOR_MAX_PRICE == MAX_PRICE
    for price, taken in [(MAX_PRICE, True), (math.nextafter(MAX_PRICE, math.inf), False), (1e300, False)]:
        obj = copy.deepcopy(MINIMAL)
        obj["spec"]["pricing"] = {"models": {"gpt-4o": {"input": 2.5, "output": price}}}
        refusals = kube_schema.validate_object(load(), obj)
        assert (refusals == []) is taken, (price, refusals)
        if taken:
            assert parse_spec(obj["spec"]).pricing.models["gpt-4o"]["output"] == price
            PricingTable(parse_spec(obj["spec"]).pricing.models)
            continue
        assert all(r.startswith("spec.pricing.models.gpt-4o.output: ") for r in refusals), refusals
        with pytest.raises(SpecError) as refused:
            parse_spec(obj["spec"])
        assert refused.value.field == "spec.pricing.models.gpt-4o.output"
        with pytest.raises(ConfigurationError, match="more than any provider charges"):
            PricingTable({"gpt-4o": {"input": 2.5, "output": price}})


def test_every_price_kind_the_middleware_reads_is_accepted_by_the_crd_and_the_operator() -> None:
    """The three lists of price kinds (the middleware's pricing table, the operator's spec check, the CRD's rule and
    size bound) name the same kinds: a kind the middleware reads but the CRD refused could never be set."""
    from llm_telemetry.pricing import _KINDS
    from llm_telemetry_operator.spec import PRICE_KINDS

    assert set(PRICE_KINDS) == set(_KINDS)
    obj = copy.deepcopy(MINIMAL)
    obj["spec"]["pricing"] = {"models": {"claude-sonnet-4": dict.fromkeys(_KINDS, 1.0)}}
    assert kube_schema.validate_object(load(), obj) == []
    assert set(parse_spec(obj["spec"]).pricing.models["claude-sonnet-4"]) == set(_KINDS)
