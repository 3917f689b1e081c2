"""What the status says of a pricing ConfigMap the middleware cannot read: where it is wrong, never what it holds.

Whoever may read an LLMTelemetry's status (anyone who may create one) may not be allowed to read the ConfigMap its
``pricing.configMapRef`` names. The reason once quoted the parser's error, and with it the content: a one-line key
whole (a YAML scalar was even taken as a path, and the operator opened that file of its own), the offending line of
broken YAML, the keys of a mapping.
"""

from __future__ import annotations

import base64
import dataclasses
from pathlib import Path
from typing import Any

import pytest
from kopf_testing import CONFIGMAPS, NAMESPACE

from kube_schema import merge_patch
from llm_telemetry.config import Settings
from llm_telemetry.pricing import PricingTable
from llm_telemetry_operator import constants as c
from llm_telemetry_operator import kube
from llm_telemetry_operator.config import OperatorConfig
from llm_telemetry_operator.reconcile import _missing_pricing
from llm_telemetry_operator.resources import build_injection, build_workload_patch
from llm_telemetry_operator.spec import parse_spec

SECRET = "sk-TEAMB-TOP-SECRET-0001"


async def _reason(emulator: Any, data: dict[str, str], key: str = "pricing.yaml", binary: bool = False) -> str | None:
    config_map: dict[str, Any] = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "prices"}}
    config_map["binaryData" if binary else "data"] = data
    emulator.objects[CONFIGMAPS, NAMESPACE, "prices"] = config_map
    reference = {"configMapRef": {"name": "prices", "key": key}}
    spec = parse_spec({"selector": {"matchLabels": {"app": "chat"}}, "pricing": reference})
    client = kube.KubeClient(kube.load_configuration())
    try:
        return await _missing_pricing(client, NAMESPACE, spec)
    finally:
        await client.close()


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (SECRET, "not a YAML mapping of model names to prices"),  # a scalar: no path to open
        ("/etc/hostname", "not a YAML mapping of model names to prices"),
        (f"admin: {{token: [unterminated {SECRET}\n", "not YAML: line 2, column 1"),
        (f"db_password: {SECRET}\n", "not a YAML mapping of model names to prices"),
        (f"gpt-4o: {{input: 1, output: 2, {SECRET}: 3}}\n", "not a YAML mapping of model names to prices"),
        (f"gpt-4o: {{input: -1, output: '{SECRET}'}}\n", "not a YAML mapping of model names to prices"),
    ],
)
async def test_an_unreadable_pricing_key_is_described_without_its_content(
    emulator: Any, content: str, says: str
) -> None:
    reason = await _reason(emulator, {"pricing.yaml": content})
    assert reason is not None and says in reason, reason
    for leaked in (SECRET, "db_password", "admin", "unterminated", "No such file", "hostname"):
        assert leaked not in reason, reason


async def test_json_and_binary_keys_are_described_the_same_way(emulator: Any) -> None:
    reason = await _reason(emulator, {"prices.json": f'{{"{SECRET}": 1,'}, key="prices.json")
    assert reason is not None and "not JSON: line 1" in reason and SECRET not in reason, reason
    encoded = base64.b64encode(b"\xff\xfe" + SECRET.encode()).decode()
    reason = await _reason(emulator, {"pricing.yaml": encoded}, binary=True)
    assert reason is not None and "not UTF-8 text" in reason and SECRET not in reason, reason


async def test_a_key_nested_too_deeply_is_said_to_be(emulator: Any) -> None:
    """(The parser's RecursionError escaped the check, and every pass of the resource failed.)"""
    reason = await _reason(emulator, {"deep.json": "[" * 100_000}, key="deep.json")
    assert reason is not None and "nested too deeply" in reason, reason


async def test_a_readable_pricing_key_is_fine(emulator: Any) -> None:
    assert await _reason(emulator, {"pricing.yaml": "gpt-4o: {input: 2.5, output: 10}\n"}) is None


@pytest.mark.parametrize(
    ("key", "content"),
    [
        # Tab-indented JSON (``jq --tab``, Go's MarshalIndent with a tab) is JSON, and not YAML: YAML forbids tabs
        # in indentation. It was checked as JSON and mounted as pricing.yaml, where the pods failed their startup.
        ("pricing.json", '{\n\t"models": {\n\t\t"gpt-4o": {"input": 2.5, "output": 10}\n\t}\n}\n'),
        ("prices.yml", "models:\n  gpt-4o: {input: 2.5, output: 10}\n"),
    ],
)
async def test_a_key_the_check_accepts_is_read_alike_by_the_middleware(
    emulator: Any, tmp_path: Path, key: str, content: str
) -> None:
    """The operator checks a key by its own name (JSON when it ends in ``.json``); the middleware reads the file the
    injection mounts by that file's name. A kubelet writes the key's text at the volume item's path."""
    assert await _reason(emulator, {key: content}, key=key) is None
    spec = parse_spec(
        {"selector": {"matchLabels": {"app": "chat"}}, "pricing": {"configMapRef": {"name": "prices", "key": key}}}
    )
    workload = {"kind": "Deployment", "metadata": {"name": "chat"}, "spec": {"template": {"spec": {}}}}
    injection = build_injection(spec, OperatorConfig(), workload, "llm")
    assert injection.volume is not None and injection.volume_mount is not None
    (item,) = injection.volume["configMap"]["items"]
    assert item["key"] == key
    (tmp_path / item["path"]).write_text(content)
    (variable,) = [e["value"] for e in injection.env if e["name"] == "LLM_TELEMETRY_PRICING"]
    mounted = Path(variable).relative_to(injection.volume_mount["mountPath"])
    table = PricingTable(Settings.resolve(env={"LLM_TELEMETRY_PRICING": str(tmp_path / mounted)}).pricing)
    price = table.price("gpt-4o")
    assert price is not None and price.input == 2.5, price


@pytest.mark.parametrize("record", ["kept", "lost"])
def test_a_json_key_mounted_as_pricing_yaml_by_an_earlier_version_moves_to_pricing_json_in_one_patch(
    record: str,
) -> None:
    """An earlier version mounted every key as ``pricing.yaml`` and pointed LLM_TELEMETRY_PRICING there. The next
    pass mounts a ``.json`` key as ``pricing.json`` and points the variable there too, in one patch, whether or not
    the workload kept its injection record (lost, the variable was kept as the user's: it named a file no longer
    mounted, and the pods failed their startup while the resource said Ready)."""
    spec = parse_spec(
        {
            "selector": {"matchLabels": {"app": "chat"}},
            "pricing": {"configMapRef": {"name": "p", "key": "pricing.json"}},
        }
    )
    workload: dict[str, Any] = {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "chat", "namespace": NAMESPACE, "labels": {"app": "chat"}},
        "spec": {"selector": {"matchLabels": {"app": "chat"}},
                 "template": {"metadata": {"labels": {"app": "chat"}},
                              "spec": {"containers": [{"name": "app", "image": "x"}]}}},
    }  # fmt: skip
    injection = build_injection(spec, OperatorConfig(), workload, "llm")
    assert injection.volume is not None
    earlier = dataclasses.replace(
        injection,
        volume={**injection.volume, "configMap": {**injection.volume["configMap"],
                                                  "items": [{"key": "pricing.json", "path": "pricing.yaml"}]}},
        env=tuple({**e, "value": "/etc/llm-telemetry/pricing.yaml"} if e["name"] == "LLM_TELEMETRY_PRICING" else e
                  for e in injection.env),
    )  # fmt: skip
    before = merge_patch(workload, build_workload_patch(workload, earlier, "llm"))
    if record == "lost":
        del before["metadata"]["annotations"][c.ANNOTATION_INJECTED]
    after = merge_patch(before, build_workload_patch(before, injection, "llm"))
    pod = after["spec"]["template"]["spec"]
    assert [e["value"] for e in pod["containers"][0]["env"] if e["name"] == "LLM_TELEMETRY_PRICING"] == [
        "/etc/llm-telemetry/pricing.json"
    ]
    assert [v["configMap"]["items"] for v in pod["volumes"]] == [[{"key": "pricing.json", "path": "pricing.json"}]]
    assert build_workload_patch(after, injection, "llm") is None
