"""The demo LLM service and the script that drives it (``llm-telemetry demo``)."""
