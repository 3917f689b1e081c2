"""Fixtures for the operator tests; the helpers themselves live in kopf_testing.py, importable by name."""

import importlib.util
from pathlib import Path

from prometheus_operator import prometheus_operator_schemas

if importlib.util.find_spec("kmock") is None:
    # kmock, the API emulator, needs Python 3.11 (as kopf's newer releases do): on 3.10 the modules that use it
    # are not collected, and the rest (the API client, the spec, the CRD, the Python floor) run.
    collect_ignore = [p.name for p in Path(__file__).parent.glob("test_*.py") if "kopf_testing" in p.read_text()]
    __all__ = ["prometheus_operator_schemas"]
else:
    from kopf_testing import emulator, kmock_options, monitoring_crds

    __all__ = ["emulator", "kmock_options", "monitoring_crds", "prometheus_operator_schemas"]
