"""The demo LLM service as an import string for real multi-worker servers in tests/middleware/test_workers.py.

``uvicorn workers_app:app --app-dir tests/apps --workers N`` or
``gunicorn -w N -k uvicorn.workers.UvicornWorker --chdir tests/apps workers_app:app``. The middleware reads its
settings from ``LLM_TELEMETRY_*``; every response carries ``x-worker-pid`` so a test knows which worker answered.
A request with ``x-hold-worker: <seconds>`` first blocks its worker that long (outside the middleware, which sees
nothing of it): the kernel then gives new connections to the other workers.
"""

from __future__ import annotations

import os
import time
from typing import Any

from llm_telemetry.demo.app import create_app

_demo = create_app(
    first_token_delay=float(os.environ.get("WORKERS_APP_FIRST_TOKEN_DELAY", "0.02")),
    token_delay=float(os.environ.get("WORKERS_APP_TOKEN_DELAY", "0.02")),
)


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        await _demo(scope, receive, send)
        return
    # Read per request: gunicorn forks its workers after importing this module.
    pid = str(os.getpid()).encode()
    for name, value in scope["headers"]:
        if name == b"x-hold-worker":
            time.sleep(float(value))  # noqa: ASYNC251 - blocks the worker's event loop: it accepts no connection meanwhile

    async def send_with_pid(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", ()), (b"x-worker-pid", pid)]}
        await send(message)

    await _demo(scope, receive, send_with_pid)
