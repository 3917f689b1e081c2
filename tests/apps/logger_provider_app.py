"""The demo LLM service in an app that installs a global OpenTelemetry SDK ``LoggerProvider`` of its own, for
tests/middleware/test_otlp_logs.py: ``uvicorn logger_provider_app:app --app-dir tests/apps``.

``LOGGER_PROVIDER_APP_WHEN`` says when it installs it: ``import`` (as the module is imported) or ``lifespan`` (in
its lifespan startup, where FastAPI apps commonly set up OpenTelemetry). The provider's resource names the service
``LOGGER_PROVIDER_APP_SERVICE``, and it exports over OTLP/HTTP to ``LOGGER_PROVIDER_APP_ENDPOINT``; it is shut down
(its records flushed) at the lifespan shutdown. With ``LOGGER_PROVIDER_APP_NESTED=1`` the app is wrapped in the
middleware twice, one instance inside the other, both reached by the lifespan (with a metrics port, they share one
pipeline).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from typing import Any

from opentelemetry._logs import set_logger_provider
from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter
from opentelemetry.sdk._logs import LoggerProvider
from opentelemetry.sdk._logs.export import BatchLogRecordProcessor
from opentelemetry.sdk.resources import Resource

from llm_telemetry import LLMTelemetryMiddleware
from llm_telemetry.demo.app import DemoLLM

_WHEN = os.environ["LOGGER_PROVIDER_APP_WHEN"]


def _install() -> LoggerProvider:
    provider = LoggerProvider(resource=Resource({"service.name": os.environ["LOGGER_PROVIDER_APP_SERVICE"]}))
    exporter = OTLPLogExporter(endpoint=os.environ["LOGGER_PROVIDER_APP_ENDPOINT"])
    provider.add_log_record_processor(BatchLogRecordProcessor(exporter, schedule_delay_millis=20))
    set_logger_provider(provider)
    return provider


_installed = _install() if _WHEN == "import" else None


@contextlib.asynccontextmanager
async def _lifespan(_app: Any) -> AsyncIterator[None]:
    provider = _install() if _WHEN == "lifespan" else _installed
    yield
    assert provider is not None
    provider.shutdown()


_demo = DemoLLM()
_demo.app.router.lifespan_context = _lifespan
app = LLMTelemetryMiddleware(_demo.app)
if os.environ.get("LOGGER_PROVIDER_APP_NESTED") == "1":
    app = LLMTelemetryMiddleware(app)
