"""A kopf operator that wires an LLM service's metrics, alerts, dashboard, traces and logs from one resource."""

from __future__ import annotations

from llm_telemetry_operator.constants import API_VERSION, GROUP, KIND, PLURAL, VERSION

__all__ = ["API_VERSION", "GROUP", "KIND", "PLURAL", "VERSION"]
