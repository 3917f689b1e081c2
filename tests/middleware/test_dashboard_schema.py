"""The shipped dashboard against Grafana's own model of a dashboard and of each panel plugin's options
(``@grafana/schema``, checked by the TypeScript compiler; see ``tests/grafana_schema.py``)."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from grafana_schema import GrafanaSchema, find_schema
from llm_telemetry.monitoring.dashboards import build_dashboard


@pytest.fixture(scope="module")
def schema() -> GrafanaSchema:
    return find_schema()


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"logs_mode": "otlp", "attribution_labels": ("tenant", "team"), "namespace": "llm", "job": "chat"},
        {"attribution_labels": ()},
    ],
    ids=["default", "operator", "no-attribution"],
)
def test_dashboard_is_what_grafanas_schema_declares(schema: GrafanaSchema, options: Any) -> None:
    assert schema.errors(build_dashboard(**options)) == []


def _first(dashboard: dict[str, Any], kind: str) -> dict[str, Any]:
    return next(p for p in dashboard["panels"] if p["type"] == kind)


def _spoil_legend(d: dict[str, Any]) -> None:
    _first(d, "timeseries")["options"]["legend"]["displayMode"] = "tabel"


def _spoil_option_name(d: dict[str, Any]) -> None:
    _first(d, "stat")["options"]["graphmode"] = "area"


def _spoil_type(d: dict[str, Any]) -> None:
    _first(d, "heatmap")["options"]["cellGap"] = "1"


def _spoil_color(d: dict[str, Any]) -> None:
    _first(d, "timeseries")["fieldConfig"]["defaults"]["color"]["mode"] = "palette"


def _spoil_logs(d: dict[str, Any]) -> None:
    _first(d, "logs")["options"]["sortOrder"] = "desc"


def _spoil_grid(d: dict[str, Any]) -> None:
    _first(d, "bargauge")["gridPos"]["w"] = "12"


def _spoil_variable(d: dict[str, Any]) -> None:
    d["templating"]["list"][1]["multiple"] = True


@pytest.mark.parametrize(
    "spoil",
    [_spoil_legend, _spoil_option_name, _spoil_type, _spoil_color, _spoil_logs, _spoil_grid, _spoil_variable],
)
def test_schema_check_refuses_a_spoilt_dashboard(schema: GrafanaSchema, spoil: Any) -> None:
    dashboard = copy.deepcopy(build_dashboard())
    spoil(dashboard)
    assert len(schema.errors(dashboard)) == 1
