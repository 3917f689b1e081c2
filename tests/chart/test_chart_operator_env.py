"""What the chart hands the operator: a value the schema admits starts the operator, one the operator would refuse
at its start is refused by `helm install` instead, and extraEnv cannot set what the chart sets itself."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from chartkit import CHART, NAMESPACE, Helm, one

from llm_telemetry_operator.config import OperatorConfig

Render = Callable[..., list[dict[str, Any]]]
ValuesFile = Callable[[dict[str, Any]], Path]


def operator_env(docs: list[dict[str, Any]]) -> dict[str, Any]:
    [operator] = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    return {e["name"]: e.get("value") for e in operator["env"]}


def refusal(helm: Helm, values_file: ValuesFile, values: dict[str, Any]) -> str:
    """What `helm template` says refusing ``values`` (it must refuse them)."""
    result = helm.run("template", "x", str(CHART), "--namespace", NAMESPACE, "--values", str(values_file(values)),
                      check=False)  # fmt: skip
    assert result.returncode != 0, f"helm accepted {values}"
    return result.stderr


@pytest.mark.parametrize("priority", [2147483647, 1000000, -1000000, 999999, 5, 0])
def test_a_fixed_priority_from_a_values_file_reaches_the_operator(render: Render, priority: int) -> None:
    """A number in a values file reaches the templates as a float, which Helm wrote as 1e+06 from a million on: the
    operator then refused `2.147483647e+09` at its start (exit 2), after `helm install` had succeeded."""
    env = operator_env(render({"peering": {"priority": priority}}))
    assert env["LLM_TELEMETRY_OPERATOR_PRIORITY"] == str(priority)
    assert OperatorConfig.from_env(env).priority == priority
