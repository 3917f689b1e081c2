"""Fixtures for the operator tests; the helpers themselves live in kopf_testing.py, importable by name."""

import importlib.util
import sys
from pathlib import Path

from prometheus_operator import prometheus_operator_schemas

if importlib.util.find_spec("kmock") is None:
    # kmock, the API emulator, needs Python 3.11 (as kopf's newer releases do): on 3.10 the modules that use it
    # are not collected, and the rest (the API client, the spec, the CRD, the Python floor) run.
    collect_ignore = [p.name for p in Path(__file__).parent.glob("test_*.py") if "kopf_testing" in p.read_text()]
    if sys.version_info < (3, 11):  # the operator's standby code uses 3.11's datetime.UTC, as do its tests
        collect_ignore.append("test_standby.py")
    __all__ = ["prometheus_operator_schemas"]
else:
    from kopf_testing import emulator, kmock_options, monitoring_crds

    __all__ = ["emulator", "kmock_options", "monitoring_crds", "prometheus_operator_schemas"]
