"""Grafana's published model of a dashboard (npm ``@grafana/schema``), applied with the TypeScript compiler.

``scripts/get-grafana-schema`` installs ``@grafana/schema`` and ``typescript`` into ``.tools/grafana-schema``
(once). ``check`` writes the dashboard into a TypeScript module as object literals typed with Grafana's
``Dashboard`` and, per panel, with its plugin's ``Options`` and ``FieldConfig``, and runs ``tsc``: an object literal
may only name fields its type declares, with values of their types. Every field is made optional (Grafana fills
what a dashboard leaves out from the plugin's defaults) and enums are taken as their string values, as they are
written in JSON; nothing else is relaxed. Where node, npm or the registry is missing, the fixture skips.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "scripts" / "get-grafana-schema"
MODULE = "@grafana/schema/dist/esm/raw"
#: Panel plugin -> (its types' module under composable/, whether it declares a FieldConfig for ``custom``).
PANEL_TYPES = {
    "timeseries": ("timeseries/panelcfg/x/TimeSeriesPanelCfg_types.gen", True),
    "stat": ("stat/panelcfg/x/StatPanelCfg_types.gen", False),
    "heatmap": ("heatmap/panelcfg/x/HeatmapPanelCfg_types.gen", True),
    "bargauge": ("bargauge/panelcfg/x/BarGaugePanelCfg_types.gen", False),
    "logs": ("logs/panelcfg/x/LogsPanelCfg_types.gen", False),
}
#: Fields Grafana writes into dashboards that its schema does not declare, and where.
UNDECLARED = {
    "definition": "a query variable's query as text: Grafana's variable editor saves it and lists variables by it",
}

_PRELUDE = """\
// Every field optional; an enum is its string values, as JSON writes it.
type Loose<T> = T extends string ? `${T}` : T extends number | boolean | null | undefined ? T
  : T extends ReadonlyArray<infer U> ? Array<Loose<U>> : T extends object ? { [K in keyof T]?: Loose<T[K]> } : T;
type PanelOf<O, F> = { options?: Loose<O>; fieldConfig?: { defaults?: { custom?: Loose<F> } } };
"""


@dataclass(frozen=True)
class GrafanaSchema:
    node: str
    prefix: Path

    def source(self, dashboard: Mapping[str, Any]) -> str:
        """The TypeScript module that types ``dashboard`` with Grafana's model."""
        lines = [f'import type {{ Dashboard }} from "{MODULE}/dashboard/x/Dashboard_types.gen";']
        for name, (path, _) in PANEL_TYPES.items():
            lines.append(f'import type * as P_{name} from "{MODULE}/composable/{path}";')
        lines.append(_PRELUDE)
        body = json.loads(json.dumps(dashboard))
        for variable in body.get("templating", {}).get("list", []):
            for name in UNDECLARED:
                variable.pop(name, None)
        lines.append(f"export const dashboard: Loose<Dashboard> = {json.dumps(body, indent=1)};")
        panels = [p for p in body.get("panels", []) if p.get("type") != "row"]
        for index, panel in enumerate(panels):
            kind = panel["type"]
            assert kind in PANEL_TYPES, f"panel type {kind!r}: add its types to PANEL_TYPES"
            custom = f"P_{kind}.FieldConfig" if PANEL_TYPES[kind][1] else "Record<string, never>"
            typed = {"options": panel.get("options", {}), "fieldConfig": {"defaults": {}}}
            if "custom" in panel.get("fieldConfig", {}).get("defaults", {}):
                typed["fieldConfig"]["defaults"]["custom"] = panel["fieldConfig"]["defaults"]["custom"]
            lines.append(f"// {panel.get('title')!r}")
            lines.append(f"export const panel{index}: PanelOf<P_{kind}.Options, {custom}> = {json.dumps(typed)};")
        return "\n".join(lines) + "\n"

    def errors(self, dashboard: Mapping[str, Any]) -> list[str]:
        """The compiler's errors for ``dashboard``, each with the offending line; empty when it type-checks."""
        # Inside the install, so that the compiler finds the package as any project does (node_modules above).
        with tempfile.TemporaryDirectory(dir=self.prefix, prefix="check-") as name:
            return self._errors(dashboard, Path(name))

    def _errors(self, dashboard: Mapping[str, Any], workdir: Path) -> list[str]:
        (workdir / "dashboard.ts").write_text(self.source(dashboard))
        config = {
            "compilerOptions": {
                "strict": True,
                "noEmit": True,
                "module": "esnext",
                "moduleResolution": "bundler",
                "target": "es2022",
                "skipLibCheck": True,
                "types": [],
            },
            "files": ["dashboard.ts"],
        }
        (workdir / "tsconfig.json").write_text(json.dumps(config))
        tsc = self.prefix / "node_modules" / "typescript" / "bin" / "tsc"
        result = subprocess.run(
            [self.node, str(tsc), "-p", str(workdir / "tsconfig.json"), "--pretty", "false"],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        if result.returncode == 0:
            return []
        source = (workdir / "dashboard.ts").read_text().splitlines()
        found = []
        for line in result.stdout.splitlines():
            if at := re.search(r"dashboard\.ts\((\d+),\d+\): (.*)", line):
                found.append(f"line {at.group(1)}: {at.group(2)}\n    at: {source[int(at.group(1)) - 1].strip()[:200]}")
        assert found, f"tsc failed without errors in the dashboard:\n{result.stdout}{result.stderr}"
        return found


def find_schema() -> GrafanaSchema:
    """The installed schema, installing it first if need be; skips the calling test when it cannot be had."""
    node = shutil.which("node")
    if node is None or shutil.which("npm") is None or shutil.which("bash") is None:
        pytest.skip("node and npm are needed for Grafana's dashboard schema (Debian: apt-get install nodejs npm)")
    result = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=600, check=False)
    if result.returncode != 0:
        pytest.skip(f"@grafana/schema could not be installed from npm: {result.stderr.strip()[-400:]}")
    return GrafanaSchema(node, Path(result.stdout.strip()))
