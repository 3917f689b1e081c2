"""Fixtures for the operator tests; the helpers themselves live in kopf_testing.py, importable by name."""

from kopf_testing import emulator, kmock_options, monitoring_crds

from prometheus_operator import prometheus_operator_schemas

__all__ = ["emulator", "kmock_options", "monitoring_crds", "prometheus_operator_schemas"]
