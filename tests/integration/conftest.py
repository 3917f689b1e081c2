"""Fixtures for the real-cluster tests; the helpers live in clusterkit.py, importable by name."""

from clusterkit import api, kubeconfig

__all__ = ["api", "kubeconfig"]
