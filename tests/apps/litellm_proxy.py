"""The LiteLLM proxy, wrapped in the middleware as a user would deploy it, for test_hostile_litellm.py.

``python tests/apps/litellm_proxy.py`` with ``CONFIG_FILE_PATH`` (LiteLLM's model list), ``LITELLM_MASTER_KEY``,
``PROXY_PORT`` and the ``LLM_TELEMETRY_*`` variables set. Runs offline (``LITELLM_LOCAL_MODEL_COST_MAP=True``).
"""

from __future__ import annotations

import os

import uvicorn
from litellm.proxy.proxy_server import app

from llm_telemetry import LLMTelemetryMiddleware

if __name__ == "__main__":
    uvicorn.run(LLMTelemetryMiddleware(app), host="127.0.0.1", port=int(os.environ["PROXY_PORT"]), log_level="warning")
