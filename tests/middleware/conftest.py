"""Fixtures shared by the middleware tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from llm_telemetry import LLMTelemetryMiddleware


@pytest.fixture
def cleanup() -> Iterator[list[LLMTelemetryMiddleware]]:
    """Middlewares a test made: their telemetry (listeners, exporters) is shut down after it."""
    made: list[LLMTelemetryMiddleware] = []
    yield made
    for wrapped in made:
        wrapped.telemetry.shutdown()
