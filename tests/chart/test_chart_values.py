"""values.yaml and values.schema.json: documented, in step with each other, and strict about what users type."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped]
import pytest
import yaml
from chartkit import CHART, Helm

SCHEMA = json.loads((CHART / "values.schema.json").read_text())
VALUES = yaml.safe_load((CHART / "values.yaml").read_text())


def schema_paths(schema: dict[str, Any], prefix: str = "") -> Iterator[str]:
    """Dotted paths of every key the schema spells out (free-form maps stop the descent)."""
    for key, sub in schema.get("properties", {}).items():
        yield prefix + key
        yield from schema_paths(sub, f"{prefix}{key}.")


def value_paths(values: dict[str, Any], schema: dict[str, Any], prefix: str = "") -> Iterator[str]:
    for key, value in values.items():
        yield prefix + key
        sub = schema.get("properties", {}).get(key, {})
        if isinstance(value, dict) and "properties" in sub:
            yield from value_paths(value, sub, f"{prefix}{key}.")


def test_values_yaml_is_valid_against_its_schema() -> None:
    jsonschema.validate(VALUES, SCHEMA)


def test_schema_and_values_describe_the_same_keys() -> None:
    # `global` is Helm's own key for parent charts; strategy/rollingUpdate are documented examples, empty by default.
    optional = {"global", "strategy.type", "strategy.rollingUpdate", "resources.claims"}
    in_schema = {p for p in schema_paths(SCHEMA) if not p.startswith("strategy.rollingUpdate.")}
    assert set(value_paths(VALUES, SCHEMA)) == in_schema - optional


def test_schema_closes_every_object_it_spells_out() -> None:
    def walk(schema: dict[str, Any], path: str) -> Iterator[str]:
        if "properties" in schema and schema.get("additionalProperties") is not False:
            yield path or "<root>"
        for key, sub in schema.get("properties", {}).items():
            yield from walk(sub, f"{path}.{key}".lstrip("."))

    assert list(walk(SCHEMA, "")) == []


def test_every_values_key_has_a_comment_above_it() -> None:
    lines = (CHART / "values.yaml").read_text().splitlines()
    key = re.compile(r"^(\s*)([A-Za-z_][\w.-]*):")
    missing = []
    for number, line in enumerate(lines):
        if key.match(line) and not lines[number - 1].lstrip().startswith("#"):
            missing.append(f"line {number + 1}: {line.strip()}")
    assert missing == []


@pytest.mark.parametrize(
    ("values", "complaint"),
    [
        ({"replicaCounts": 2}, "replicaCounts"),
        ({"image": {"repo": "x"}}, "repo"),
        ({"serviceMonitor": {"enable": True}}, "enable"),
        ({"defaults": {"traceEndpoint": "http://x:4318"}}, "traceEndpoint"),
        ({"replicaCount": "two"}, "replicaCount"),
        ({"watchNamespaces": "llm"}, "watchNamespaces"),
        ({"serviceMonitor": {"enabled": "yes"}}, "enabled"),
        ({"defaults": {"dashboardLabel": "grafana_dashboard"}}, "dashboardLabel"),
        ({"defaults": {"tracesEndpoint": "jaeger:4318"}}, "tracesEndpoint"),
        ({"peering": {"priority": "high"}}, "priority"),
        ({"metrics": {"port": 70000}}, "port"),
        ({"defaults": {"logsTenant": ".."}}, "logsTenant"),
        ({"defaults": {"logsTenant": "team a"}}, "logsTenant"),
        ({"defaults": {"lokiDatasourceUid": "loki.prod"}}, "lokiDatasourceUid"),
        ({"defaults": {"runbookUrl": "https://wiki/runbooks#top"}}, "runbookUrl"),
        # The pod labels the chart sets: the Deployment's selector (the API server refused the Deployment after the
        # release's other objects were applied) and its component label (silently replaced).
        ({"podLabels": {"app.kubernetes.io/name": "other"}}, "app.kubernetes.io/name"),
        ({"podLabels": {"app.kubernetes.io/instance": "other"}}, "app.kubernetes.io/instance"),
        ({"podLabels": {"app.kubernetes.io/component": "other"}}, "app.kubernetes.io/component"),
        # (The API server refuses it: a failed release, the release's other objects applied already.)
        ({"strategy": {"type": "Recreate", "rollingUpdate": {"maxSurge": 1}}}, "rollingUpdate"),
    ],
)
def test_schema_rejects_misspelled_keys_and_wrong_types(
    helm: Helm, values_file: Callable[[dict[str, Any]], Path], values: dict[str, Any], complaint: str
) -> None:
    path = str(values_file(values))
    for command in (["template", "x", str(CHART)], ["lint", "--strict", str(CHART)]):
        result = helm.run(*command, "--values", path, check=False)
        assert result.returncode != 0, f"helm {command[0]} accepted {values}"
        assert complaint in result.stdout + result.stderr


def test_health_and_metrics_on_one_port_fail_the_install(helm: Helm) -> None:
    """The operator cannot start with both listeners on one port: refused at install, not a crash-looping pod."""
    result = helm.run("template", "x", str(CHART), "--set", "healthPort=9465", check=False)
    assert result.returncode != 0
    assert "healthPort and metrics.port must differ" in result.stderr
    helm.run("template", "x", str(CHART), "--set", "healthPort=9465", "--set", "metrics.port=9466")


def test_set_flags_are_checked_too(helm: Helm) -> None:
    result = helm.run("template", "x", str(CHART), "--set", "podDisruptionBudget.enabeld=true", check=False)
    assert result.returncode != 0
    assert "enabeld" in result.stderr


def test_readme_documents_every_value() -> None:
    readme = (CHART / "README.md").read_text()

    def documented(path: str) -> bool:
        parts = path.split(".")
        prefixes = [".".join(parts[:n]) for n in range(1, len(parts) + 1)]
        return f"`{path}`" in readme or any(f"`{p}`" in readme or f"`{p}.*`" in readme for p in prefixes[:-1])

    paths = list(value_paths(VALUES, SCHEMA))
    leaves = [p for p in paths if not any(other.startswith(p + ".") for other in paths)]
    assert [p for p in leaves if not documented(p)] == []


def test_readme_defaults_are_the_values() -> None:
    """The README's Default column is values.yaml's: each row whose default is one literal (not the probes' four
    numbers, nor the security contexts described in words) gives the value as values.yaml has it."""
    readme = (CHART / "README.md").read_text()
    rows = re.findall(r"^\| `([A-Za-z.]+)` \| `([^`]*)` \|", readme, re.MULTILINE)
    assert len(rows) > 30
    for path, default in rows:
        value: Any = VALUES
        for key in path.split("."):
            value = value[key]
        assert yaml.safe_load(default or '""') == value, f"{path}: the README says {default}, values.yaml {value!r}"
