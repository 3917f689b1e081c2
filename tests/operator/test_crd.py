"""The CRD's own openAPIV3Schema accepts the examples and rejects bad specs."""

from __future__ import annotations

import copy
from typing import Any

import jsonschema
import pytest
import yaml
from kopf_testing import CRD_PATH, REPO_ROOT, crd_validator, load_crd

from llm_telemetry_operator.spec import parse_spec

EXAMPLES = sorted((REPO_ROOT / "examples").glob("llmtelemetry-*.yaml"))
MINIMAL: dict[str, Any] = {
    "apiVersion": "llmtelemetry.dev/v1alpha1",
    "kind": "LLMTelemetry",
    "metadata": {"name": "chat", "namespace": "llm"},
    "spec": {"selector": {"matchLabels": {"app": "chat"}}},
}


def test_crd_names_and_printer_columns() -> None:
    crd = load_crd(CRD_PATH)
    assert crd["spec"]["names"]["plural"] == "llmtelemetries"
    assert crd["spec"]["names"]["shortNames"] == ["llmt"]
    version = crd["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    assert [col["name"] for col in version["additionalPrinterColumns"] if col.get("priority", 0) == 0] == [
        "Targets",
        "Ready",
        "Age",
    ]


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_crd_accepts_examples(path: Any) -> None:
    obj = yaml.safe_load(path.read_text())
    crd_validator(load_crd(CRD_PATH)).validate(obj)
    parse_spec(obj["spec"])  # and the operator accepts them too


@pytest.mark.parametrize(
    ("patch", "why"),
    [
        ({"selector": None}, "selector is required"),
        ({"metrics": {"port": 0}}, "port minimum"),
        ({"metrics": {"interval": "often"}}, "interval pattern"),
        ({"tracing": {"protocol": "thrift"}}, "protocol enum"),
        ({"tracing": {"samplingRatio": 1.5}}, "ratio maximum"),
        ({"logs": {"mode": "syslog"}}, "logs mode enum"),
        ({"alerts": {"availabilityObjective": 1}}, "objective below 1"),
        ({"alerts": {"ttftObjectiveSeconds": 3}}, "TTFT bucket"),
        ({"attribution": {"headers": {"x-tenant-id": "Tenant-Id"}}}, "label pattern"),
        ({"pricing": {"models": {"gpt-4o": {"input": -1, "output": 1}}}}, "negative price"),
        ({"selector": {"matchExpressions": [{"key": "a", "operator": "Near"}]}}, "operator enum"),
    ],
)
def test_crd_rejects_bad_specs(patch: dict[str, Any], why: str) -> None:
    obj = copy.deepcopy(MINIMAL)
    for key, value in patch.items():
        if value is None:
            del obj["spec"][key]
        else:
            obj["spec"][key] = value
    with pytest.raises(jsonschema.ValidationError):
        crd_validator(load_crd(CRD_PATH)).validate(obj)
