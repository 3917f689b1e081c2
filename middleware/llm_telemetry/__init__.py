"""llm-telemetry: LLM-aware ASGI middleware for metrics, traces and logs."""

from __future__ import annotations

from .config import ConfigurationError, Settings
from .middleware import LLMTelemetryMiddleware, Observer, shutdown
from .pricing import PricingTable
from .record import LLMCall
from .version import __version__

__all__ = [
    "ConfigurationError",
    "LLMCall",
    "LLMTelemetryMiddleware",
    "Observer",
    "PricingTable",
    "Settings",
    "__version__",
    "shutdown",
]
