"""The operator's pod meets the ``restricted`` Pod Security Standard with every value set the tests render, so a
namespace that enforces it admits the pod (checked on a real API server's admission too; see docs/install.md)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
from chartkit import VALUE_SETS, one

Render = Callable[..., list[dict[str, Any]]]

#: Volume types the restricted profile allows.
ALLOWED_VOLUMES = {
    "configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected", "secret"
}  # fmt: skip


def restricted_violations(pod: dict[str, Any]) -> list[str]:
    """What in ``pod`` (a pod spec) the restricted profile refuses, after the baseline one's host checks."""
    found = []
    pod_sc = pod.get("securityContext") or {}
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(field):
            found.append(f"pod: {field}")
    if pod_sc.get("sysctls"):
        found.append("pod: sysctls")
    for volume in pod.get("volumes") or []:
        kinds = set(volume) - {"name"}
        if not kinds <= ALLOWED_VOLUMES:
            found.append(f"volume {volume['name']}: {sorted(kinds - ALLOWED_VOLUMES)}")
    for container in [*(pod.get("initContainers") or []), *pod["containers"]]:
        sc = container.get("securityContext") or {}
        name = container["name"]

        def setting(key: str, sc: dict[str, Any] = sc) -> Any:
            return sc[key] if key in sc else pod_sc.get(key)  # the container's, else the pod's

        if sc.get("privileged"):
            found.append(f"{name}: privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            found.append(f"{name}: allowPrivilegeEscalation is not false")
        capabilities = sc.get("capabilities") or {}
        if "ALL" not in (capabilities.get("drop") or []):
            found.append(f"{name}: capabilities do not drop ALL")
        if set(capabilities.get("add") or []) - {"NET_BIND_SERVICE"}:
            found.append(f"{name}: capabilities add {capabilities['add']}")
        if setting("runAsNonRoot") is not True:
            found.append(f"{name}: runAsNonRoot is not true")
        if setting("runAsUser") == 0:
            found.append(f"{name}: runAsUser 0")
        if (setting("seccompProfile") or {}).get("type") not in ("RuntimeDefault", "Localhost"):
            found.append(f"{name}: seccompProfile is not RuntimeDefault or Localhost")
        if any(port.get("hostPort") for port in container.get("ports") or []):
            found.append(f"{name}: hostPort")
        if sc.get("procMount") not in (None, "Default"):
            found.append(f"{name}: procMount")
    return found


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_the_operator_pod_meets_the_restricted_pod_security_standard(render: Render, name: str) -> None:
    pod = one(render(VALUE_SETS[name]), "Deployment")["spec"]["template"]["spec"]
    assert restricted_violations(pod) == []


def test_the_check_finds_what_restricted_refuses(render: Render) -> None:
    # What the chart renders, each time with one thing the restricted profile refuses.
    pod = one(render(), "Deployment")["spec"]["template"]["spec"]
    cases = [
        lambda p: p.update(hostNetwork=True),
        lambda p: p["volumes"].append({"name": "host", "hostPath": {"path": "/"}}),
        lambda p: p["containers"][0]["securityContext"].update(allowPrivilegeEscalation=True),
        lambda p: p["containers"][0]["securityContext"]["capabilities"].update(add=["SYS_ADMIN"]),
        lambda p: p["containers"][0]["securityContext"].update(runAsNonRoot=False),
        lambda p: p["containers"][0]["securityContext"].update(seccompProfile={"type": "Unconfined"}),
        lambda p: p["containers"][0]["ports"][0].update(hostPort=9465),
    ]
    for spoil in cases:
        spoilt = copy.deepcopy(pod)
        spoil(spoilt)
        assert restricted_violations(spoilt), spoilt
