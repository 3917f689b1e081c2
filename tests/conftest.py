"""Hooks for the whole suite, for running it in several processes (pytest-xdist, as ``.ci/run`` does)."""

from __future__ import annotations

import pathlib
from collections.abc import Generator

import pytest

_INTEGRATION = pathlib.Path(__file__).parent / "integration"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The real-cluster tests share one control plane and its cluster-wide objects (the CRD, ClusterRoles): under
    ``--dist loadgroup`` they all run in one worker, one after the other, as they do in a single process."""
    for item in items:
        if item.path.is_relative_to(_INTEGRATION):
            item.add_marker(pytest.mark.xdist_group("kube-apiserver"))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """A worker sends its reports to the controller as UTF-8, and a captured section holding a lone surrogate (a
    hostile value a test sent through the middleware and logged) cannot be sent: the worker would crash. Such
    characters are written escaped, as Python's stderr writes them."""
    report = yield
    report.sections = [
        (title, text.encode("utf-8", "backslashreplace").decode("utf-8")) for title, text in report.sections
    ]
    return report
