"""What the kubelet does with a container's ``env`` when it starts a pod, for tests that run the injected app here:
field references resolved from the pod, ``$(VAR)`` expanded from the variables before it."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any


def expand(value: str, defined: Mapping[str, str]) -> str:
    """The kubelet's ``$(VAR)`` expansion: a variable defined earlier in the list is replaced, ``$$`` escapes, and
    anything else is left as written."""

    def one(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1)
        return defined[name] if name in defined else match.group(0)

    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)", one, value)


def container_env(container: Mapping[str, Any], pod: Mapping[str, str]) -> dict[str, str]:
    """The environment the kubelet gives the container, in its order. ``pod`` maps the field paths of the pod
    (``metadata.name``, ...) to their values; the operator injects no other kind of reference, and any other would
    fail here."""
    env: dict[str, str] = {}
    for entry in container.get("env") or []:
        if "valueFrom" in entry:
            env[entry["name"]] = pod[entry["valueFrom"]["fieldRef"]["fieldPath"]]
        else:  # (no value: the variable is set, to "")
            env[entry["name"]] = expand(entry.get("value", ""), env)
    return env
