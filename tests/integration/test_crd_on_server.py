"""The CRD as a real API server judges resources. Every case of tests/crd_cases.py, sent as a server-side dry run,
is admitted or refused as the checks without a cluster (kube_schema) say for the CRD the server stored: the OpenAPI
part on any server, and the validation rules run by the server's own CEL where it keeps them (on by default from
1.25; on the 1.23 and 1.24 builds these tests have used, only with
``--feature-gates=CustomResourceValidationExpressions=true``)."""

from __future__ import annotations

import copy
import pathlib
from typing import Any

import pytest
from clusterkit import CHART, apply, wait_for

import kube_schema
from crd_cases import ACCEPTED, BAD_SPECS, GOOD_INTERVALS, GOOD_SELECTORS, REFUSED, with_field, with_spec
from llm_telemetry_operator.spec import OWN_LABELS

pytestmark = pytest.mark.k8s

CRD_FILE = CHART / "crds" / "llmtelemetry.dev_llmtelemetries.yaml"
CRD_NAME = "llmtelemetries.llmtelemetry.dev"
EXAMPLES = sorted((pathlib.Path(__file__).resolve().parents[2] / "examples").glob("llmtelemetry-*.yaml"))


def _rules(crd: dict[str, Any]) -> list[tuple[str, str]]:
    return [rule for _, schema in kube_schema.versions(crd) for rule in kube_schema.cel_rules(schema)]


@pytest.fixture(scope="module")
def stored(api: Any) -> dict[str, Any]:
    """The CRD applied from the chart, as the server stored it (a server with the rules off drops them)."""
    import yaml
    from kubernetes import dynamic

    apply(api, yaml.safe_load(CRD_FILE.read_text()))
    crds = dynamic.DynamicClient(api).resources.get(
        api_version="apiextensions.k8s.io/v1", kind="CustomResourceDefinition"
    )

    def established() -> dict[str, Any] | None:
        crd: dict[str, Any] = crds.get(name=CRD_NAME).to_dict()
        conditions = crd.get("status", {}).get("conditions") or []
        return crd if any(c["type"] == "Established" and c["status"] == "True" for c in conditions) else None

    crd: dict[str, Any] = wait_for(established, "the CRD established")
    return crd


def _server_admits(api: Any, obj: dict[str, Any]) -> tuple[bool, str]:
    from kubernetes import dynamic
    from kubernetes.client.exceptions import ApiException

    obj = copy.deepcopy(obj)
    obj["metadata"]["namespace"] = "default"
    resource = dynamic.DynamicClient(api).resources.get(api_version=obj["apiVersion"], kind=obj["kind"])
    try:
        resource.create(body=obj, namespace="default", dry_run="All")
    except ApiException as exc:
        if exc.status != 422:
            raise
        return False, str(exc.body)
    return True, ""


def _judged_alike(api: Any, stored: dict[str, Any], obj: dict[str, Any]) -> None:
    offline = kube_schema.validate_object(stored, obj)
    admitted, message = _server_admits(api, obj)
    assert admitted == (offline == []), f"server admitted={admitted} ({message[:600]}); offline: {offline}"


def test_the_server_keeps_the_validation_rules(stored: dict[str, Any]) -> None:
    """Where the server runs the rules, it stored every one of them; the cases below then check each with its CEL."""
    ours = _rules(_load(CRD_FILE))
    kept = _rules(stored)
    if not kept:
        pytest.skip(
            "this API server drops the CRD's validation rules (CEL off: a 1.23 or 1.24 server "
            "without --feature-gates=CustomResourceValidationExpressions=true); the cases still check the OpenAPI part"
        )
    assert sorted(kept) == sorted(ours)


def test_kubectl_explain_finds_the_status_fields(api: Any, stored: dict[str, Any]) -> None:
    """The server's OpenAPI v2, which ``kubectl explain`` reads before 1.27, lists the status's fields (a status
    keeping unknown fields was published as an empty object: ``kubectl explain llmtelemetry.status.conditions``
    printed no field)."""
    import json
    import time

    def published() -> dict[str, Any]:
        request = api.param_serialize(method="GET", resource_path="/openapi/v2", auth_settings=["BearerToken"])
        response = api.call_api(*request)
        response.read()
        definition = json.loads(response.data)["definitions"].get("dev.llmtelemetry.v1alpha1.LLMTelemetry") or {}
        return dict((definition.get("properties") or {}).get("status") or {})

    # (The server publishes a CRD's OpenAPI, or a change of it, a moment after it is established.)
    deadline = time.monotonic() + 30
    while "properties" not in (status := published()) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert {"conditions", "phase", "observedGeneration", "targets"} <= set(status.get("properties") or {}), status
    condition = status["properties"]["conditions"]["items"]
    assert {"type", "status", "reason", "message", "lastTransitionTime"} <= set(condition["properties"])


def _load(path: pathlib.Path) -> dict[str, Any]:
    import yaml

    crd: dict[str, Any] = yaml.safe_load(path.read_text())
    return crd


@pytest.mark.parametrize(("patch", "why"), BAD_SPECS, ids=[why for _, why in BAD_SPECS])
def test_bad_specs(api: Any, stored: dict[str, Any], patch: dict[str, Any], why: str) -> None:
    obj = with_spec(patch)
    if _rules(stored) or "(CEL rule)" not in why:
        assert kube_schema.validate_object(stored, obj), why
    _judged_alike(api, stored, obj)


@pytest.mark.parametrize(("section", "field", "value"), ACCEPTED + REFUSED)
def test_fields_taken_and_refused(api: Any, stored: dict[str, Any], section: str, field: str, value: str) -> None:
    _judged_alike(api, stored, with_field(section, field, value))


@pytest.mark.parametrize("selector", GOOD_SELECTORS)
def test_selectors_that_name_their_workloads(api: Any, stored: dict[str, Any], selector: dict[str, Any]) -> None:
    obj = with_spec({"selector": selector})
    assert kube_schema.validate_object(stored, obj) == []
    _judged_alike(api, stored, obj)


@pytest.mark.parametrize("interval", [*GOOD_INTERVALS, "76s", "2m", "1h", "500ms", "1m15s"])
def test_scrape_intervals(api: Any, stored: dict[str, Any], interval: str) -> None:
    _judged_alike(api, stored, with_spec({"metrics": {"interval": interval}}))


@pytest.mark.parametrize("key", sorted(OWN_LABELS))
def test_the_operators_own_labels(api: Any, stored: dict[str, Any], key: str) -> None:
    _judged_alike(api, stored, with_spec({"metrics": {"labels": {"release": "kps", key: "argocd"}}}))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_the_examples(api: Any, stored: dict[str, Any], path: pathlib.Path) -> None:
    obj = _load(path)
    assert kube_schema.validate_object(stored, obj) == []
    _judged_alike(api, stored, obj)


def test_an_over_long_container_list_or_name_is_refused_saying_so(api: Any, stored: dict[str, Any]) -> None:
    """spec.containers holds at most 32 names of at most 63 characters (a container name's length): the server
    admits the bound and refuses past it, its message naming the field and the bound."""
    names = [f"{i:02d}{'c' * 61}" for i in range(32)]
    assert _server_admits(api, with_spec({"containers": names})) == (True, "")
    admitted, message = _server_admits(api, with_spec({"containers": [*names, "one-more"]}))
    assert not admitted and "spec.containers" in message and "should have at most 32 items" in message, message
    admitted, message = _server_admits(api, with_spec({"containers": ["app", "c" * 64]}))
    assert not admitted and "spec.containers" in message and "should be at most 63 chars long" in message, message
