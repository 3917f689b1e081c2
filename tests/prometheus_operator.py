"""The Prometheus Operator's API schemas, from the npm package @kubernetes-models/prometheus-operator.

``scripts/get-prometheus-operator-schemas`` installs the package into ``.tools/npm`` (once); node runs its validators
(``prometheus_operator.mjs``). Where node, npm or the registry is missing, the fixture skips and says why.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "scripts" / "get-prometheus-operator-schemas"
RUNNER = Path(__file__).with_suffix(".mjs")
#: The kinds the operator or the chart create.
KINDS = frozenset({"ServiceMonitor", "PodMonitor", "PrometheusRule"})


@dataclass(frozen=True)
class PrometheusOperatorSchemas:
    """Validates objects of the Prometheus Operator's kinds, in one node process per call."""

    node: str
    prefix: Path

    def errors(self, objects: Sequence[Mapping[str, Any]]) -> list[str | None]:
        """For each object, None when valid, else the validator's message."""
        result = subprocess.run(
            [self.node, str(RUNNER), str(self.prefix)],
            input=json.dumps(list(objects)),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if result.returncode != 0:
            raise AssertionError(f"node {RUNNER.name} failed ({result.returncode}):\n{result.stderr}")
        found: list[str | None] = json.loads(result.stdout)
        return found

    def assert_valid(self, objects: Sequence[Mapping[str, Any]]) -> None:
        failures = [
            f"{obj['kind']}/{obj['metadata']['name']}: {error}"
            for obj, error in zip(objects, self.errors(objects), strict=True)
            if error is not None
        ]
        assert not failures, "invalid per the Prometheus Operator's schemas:\n" + "\n".join(failures)


def find_schemas() -> PrometheusOperatorSchemas:
    """The installed schemas, installing them first if need be; skips the calling test when they cannot be had."""
    node = shutil.which("node")
    if node is None or shutil.which("npm") is None or shutil.which("bash") is None:
        pytest.skip(
            "node and npm are needed to validate Prometheus Operator kinds (Debian: apt-get install nodejs npm)"
        )
    try:
        result = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=600, check=False)
    except subprocess.TimeoutExpired:
        pytest.skip("npm did not install @kubernetes-models/prometheus-operator within 10 minutes")
    if result.returncode != 0 or not result.stdout.strip():
        pytest.skip(
            f"could not install @kubernetes-models/prometheus-operator from npm: {result.stderr.strip()[-500:]}"
        )
    return PrometheusOperatorSchemas(node, Path(result.stdout.strip()))


@pytest.fixture(scope="session")
def prometheus_operator_schemas() -> PrometheusOperatorSchemas:
    return find_schemas()
