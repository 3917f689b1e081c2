"""Hooks for the whole suite, for running it in several processes (pytest-xdist, as ``.ci/run`` does)."""

from __future__ import annotations

import pathlib
from collections.abc import Generator
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

# No property test judges time: hypothesis' default deadline (200 ms an example) and its check that generating data
# is not too slow failed tests on a loaded machine (a test of log levels took 309 ms once, 13 ms when replayed).
settings.register_profile("suite", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("suite")

_INTEGRATION = pathlib.Path(__file__).parent / "integration"
_GROUP = "kube-apiserver"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The real-cluster tests share one control plane and its cluster-wide objects (the CRD, ClusterRoles): under
    ``--dist loadgroup`` they all run in one worker, one after the other, as they do in a single process (the
    scheduler below puts them together; the mark says so to a reader and to ``-m``)."""
    for item in items:
        if item.path.is_relative_to(_INTEGRATION):
            item.add_marker(pytest.mark.xdist_group(_GROUP))


@pytest.hookimpl(optionalhook=True)  # an xdist hook: pytest without xdist (-p no:xdist) runs on
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """Under ``--dist loadgroup``, xdist's own scheduler with the real-cluster tests in one group, found by their path,
    and every other module's tests in one worker each, so that a module's fixtures (a server, a Prometheus, a
    benchmark's run) are set up once, not once in each worker that gets some of its tests (the benchmarks' smoke
    run took a minute, three times over).

    xdist groups by a suffix its worker adds to the test ids of marked tests, and neither way of getting it there
    holds: its hook reads the marks before this conftest's adds them (a plugin registered later is called first),
    and with pytest 9.2 it writes the suffix where pytest no longer reads a test's id. Either way every test was its
    own group, and the real-cluster tests ran in every worker at once against the one control plane."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadGroupScheduling

    try:
        prefix = _INTEGRATION.relative_to(config.rootpath).as_posix() + "/"
    except ValueError:
        return None

    class ByModule(LoadGroupScheduling):  # type: ignore[misc]
        """The real-cluster group, the longest, goes first: xdist hands out the units with the most tests first, and
        a few modules have more."""

        def _split_scope(self, nodeid: str) -> str:
            return _GROUP if nodeid.startswith(prefix) else nodeid.split("::", 1)[0]

        def _assign_work_unit(self, node: Any) -> None:
            if _GROUP in self.workqueue:
                self.workqueue.move_to_end(_GROUP, last=False)
            super()._assign_work_unit(node)

    return ByModule(config, log)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """A worker sends its reports to the controller as UTF-8, and a captured section or a failure's text holding a
    lone surrogate (a hostile value a test sent through the middleware and logged, or one in an assertion's message)
    cannot be sent: the worker would crash, and the session with it, the failure unreported. Such characters are
    written escaped, as Python's stderr writes them; a failure's text so escaped is sent as plain text."""
    report = yield
    report.sections = [(title, _escaped(text)) for title, text in report.sections]
    longrepr = report.longrepr
    if isinstance(longrepr, tuple):  # a skip: (path, line, reason)
        report.longrepr = tuple(_escaped(part) if isinstance(part, str) else part for part in longrepr)  # type: ignore[assignment]
    elif longrepr is not None and (text := str(longrepr)) != _escaped(text):
        report.longrepr = _escaped(text)
    return report


def _escaped(text: str) -> str:
    """``text`` with each character UTF-8 cannot carry (a lone surrogate) written as its escape."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")
