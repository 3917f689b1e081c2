"""What the kubelet does with a container's ``env`` when it starts a pod, for tests that run the injected app here:
field references resolved from the pod, ConfigMaps and Secrets read, ``$(VAR)`` expanded from the variables
before it."""

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


def container_env(
    container: Mapping[str, Any],
    pod: Mapping[str, str],
    configmaps: Mapping[str, Mapping[str, str]] | None = None,
    secrets: Mapping[str, Mapping[str, str]] | None = None,
) -> dict[str, str]:
    """The environment the kubelet gives the container, in its order. ``pod`` maps the field paths of the pod
    (``metadata.name``, ...) to their values; ``configmaps`` and ``secrets`` map a name to its data, for the
    container's ``envFrom`` (set first: a variable of ``env`` wins over one of the same name there) and its
    ``configMapKeyRef`` and ``secretKeyRef`` values. A reference to anything not given fails here, but for one marked
    ``optional``, which leaves the variable unset, as the kubelet does."""
    sources = {"configMapRef": configmaps or {}, "secretRef": secrets or {}}
    env: dict[str, str] = {}
    for source in container.get("envFrom") or []:
        [(kind, ref)] = [(k, v) for k, v in source.items() if k in sources]
        env.update({source.get("prefix", "") + name: val for name, val in sources[kind][ref["name"]].items()})
    for entry in container.get("env") or []:
        if "valueFrom" in entry:
            ref = entry["valueFrom"]
            if "fieldRef" in ref:
                env[entry["name"]] = pod[ref["fieldRef"]["fieldPath"]]
            else:
                kind, data = ("configMapKeyRef", configmaps) if "configMapKeyRef" in ref else ("secretKeyRef", secrets)
                selector = ref[kind]
                held = (data or {}).get(selector["name"])
                if selector.get("optional") and (held is None or selector["key"] not in held):
                    continue  # (the kubelet leaves the variable unset)
                env[entry["name"]] = (data or {})[selector["name"]][selector["key"]]
        else:  # (no value: the variable is set, to "")
            env[entry["name"]] = expand(entry.get("value", ""), env)
    return env
