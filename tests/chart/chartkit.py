"""Shared constants and helpers of the chart tests (a module of its own so test files can import it by name)."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
CHART = REPO_ROOT / "charts" / "llm-telemetry-operator"
SHARED = REPO_ROOT.parent / "shared"
RELEASE = "llm-telemetry"
NAMESPACE = "llm-telemetry"
#: The Kubernetes version the chart is rendered for and validated against.
KUBE_VERSION = "1.31.0"

#: Value sets every rendering test runs with; the issue asks for defaults, namespaced mode, custom endpoints, and
#: PDB plus ServiceMonitor on (with two replicas, since a PDB over a single pod blocks drains).
VALUE_SETS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "namespaced": {"watchNamespaces": ["llm-prod", "llm-staging"]},
    "custom-endpoints": {
        "defaults": {
            "tracesEndpoint": "http://tempo-distributor.tracing:4318",
            "logsEndpoint": "https://loki.example.com/otlp",
            "serviceMonitorLabels": {"release": "prometheus", "team": "ml-platform"},
            "dashboardLabel": "grafana_dashboard=llm",
            "jaegerDatasourceUid": "P14A4C8C6B8A2B0D1",
            "lokiDatasourceUid": "loki_prod",
            "runbookUrl": "https://wiki.example.com/llm/runbooks",
            "logsTenant": "ml-platform",
        },
        "image": {"repository": "registry.example.com/llm-telemetry-operator", "tag": "0.1.0-rc1"},
    },
    "pdb-servicemonitor": {
        "replicaCount": 2,
        "podDisruptionBudget": {"enabled": True},
        "serviceMonitor": {"enabled": True, "labels": {"team": "ml-platform"}, "scrapeTimeout": "10s"},
    },
    "minimal": {
        "rbac": {"create": False},
        "serviceAccount": {"create": False, "name": "existing-operator"},
        "peering": {"create": False, "installCRDs": False, "priority": 10},
        "metrics": {"service": {"enabled": False}},
        "image": {"digest": "sha256:" + "0" * 64},
    },
    # Argo CD: the peering object as a plain manifest (see "GitOps" in docs/install.md).
    "argo-cd": {"peering": {"hook": False}},
    # The platform assigns the UID (OpenShift's restricted SCC): docs/install.md's values for it.
    "assigned-uid": {"podSecurityContext": {"runAsUser": None, "runAsGroup": None, "fsGroup": None}},
}


@dataclass(frozen=True)
class Helm:
    """The real helm binary, run against the chart in this repository."""

    path: str

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([self.path, *args], capture_output=True, text=True, timeout=60, check=False)
        if check and result.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
        return result


def find(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = find(docs, kind)
    assert len(found) == 1, f"expected one {kind}, got {[d['metadata']['name'] for d in found]}"
    return found[0]
