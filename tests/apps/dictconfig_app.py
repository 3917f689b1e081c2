"""The demo LLM service in an app that configures logging in its lifespan startup with ``logging.config.dictConfig``
(``disable_existing_loggers`` left at its default, true), for tests/middleware/test_logs.py:
``uvicorn dictconfig_app:app --app-dir tests/apps``. The configuration names the root logger, writing plain text to
stderr, and, when ``DICTCONFIG_APP_LOGGER`` names one, that logger too (at ``DICTCONFIG_APP_LEVEL``, default INFO),
with no handler of its own.
"""

from __future__ import annotations

import contextlib
import logging.config
import os
from collections.abc import AsyncIterator
from typing import Any

from llm_telemetry import LLMTelemetryMiddleware
from llm_telemetry.demo.app import DemoLLM

_NAMED = os.environ.get("DICTCONFIG_APP_LOGGER", "")


@contextlib.asynccontextmanager
async def _lifespan(_app: Any) -> AsyncIterator[None]:
    logging.config.dictConfig(
        {
            "version": 1,
            "formatters": {"plain": {"format": "%(levelname)s %(name)s %(message)s"}},
            "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "plain"}},
            "root": {"handlers": ["stderr"], "level": "INFO"},
            "loggers": {_NAMED: {"level": os.environ.get("DICTCONFIG_APP_LEVEL", "INFO")}} if _NAMED else {},
        }
    )
    yield


_demo = DemoLLM()
_demo.app.router.lifespan_context = _lifespan
app = LLMTelemetryMiddleware(_demo.app)
