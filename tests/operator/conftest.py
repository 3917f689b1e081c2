"""Fixtures for the operator tests; the helpers themselves live in kopf_testing.py, importable by name."""

from kopf_testing import emulator, kmock_options, shared_crds

__all__ = ["emulator", "kmock_options", "shared_crds"]
