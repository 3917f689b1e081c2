"""The suite's hooks for running it in several processes (tests/conftest.py), run by a real pytest-xdist session
on a small project of their own."""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

pytest.importorskip("xdist")

_CONFTEST = pathlib.Path(__file__).parent / "conftest.py"


def _project(root: pathlib.Path, tests: dict[str, str]) -> None:
    """A project with the suite's conftest, an ``integration`` directory beside it as in tests/, and ``tests``."""
    shutil.copy(_CONFTEST, root / "conftest.py")
    (root / "pytest.ini").write_text("[pytest]\n")
    (root / "integration").mkdir()
    for name, text in tests.items():
        (root / name).write_text(text)


def _run(root: pathlib.Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "PYTHONPATH"))}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-v", "-rN", *args],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )


_MANY = "import pytest\n\n\n@pytest.mark.parametrize('i', range(12))\ndef test_{name}(i):\n    pass\n"


def test_the_real_cluster_tests_run_in_one_worker_under_loadgroup(tmp_path: pathlib.Path) -> None:
    _project(
        tmp_path,
        {
            "integration/test_cluster.py": _MANY.format(name="cluster"),
            "integration/test_helm.py": _MANY.format(name="helm"),
            "test_other.py": _MANY.format(name="other"),
            # Modules of more tests than the real-cluster group, one more than the workers: the group still goes
            # first (it takes longest), not after one of them.
            **{f"test_large{i}.py": _MANY.replace("range(12)", "range(40)").format(name=f"large{i}") for i in range(4)},
        },
    )
    run = _run(tmp_path, "-n", "3", "--dist", "loadgroup")
    assert run.returncode == 0, run.stdout + run.stderr
    workers: dict[str, set[str]] = {"integration": set(), "other": set()}
    first: dict[str, str] = {}
    for worker, nodeid in re.findall(r"^\[(gw\d+)\] .*?PASSED (\S+)", run.stdout, re.MULTILINE):
        workers["integration" if nodeid.startswith("integration/") else "other"].add(worker)
        first.setdefault(worker, nodeid)
    assert len(workers["integration"]) == 1, run.stdout
    assert workers["other"], run.stdout
    assert first[next(iter(workers["integration"]))].startswith("integration/"), run.stdout


_MODULE_FIXTURE = """\
import os
import pathlib

import pytest


@pytest.fixture(scope="module")
def costly():
    with open(pathlib.Path(__file__).with_name("setups.log"), "a") as log:
        log.write(os.environ["PYTEST_XDIST_WORKER"] + "\\n")


@pytest.mark.parametrize("i", range(12))
def test_costly(costly, i):
    pass
"""


def test_a_modules_tests_run_in_one_worker_and_its_fixture_is_set_up_once(tmp_path: pathlib.Path) -> None:
    """A module-scoped fixture is set up in every worker that gets some of its module's tests: the benchmarks' smoke
    run (a minute) ran three times in CI. Each module's tests go to one worker."""
    _project(
        tmp_path,
        {
            "test_costly.py": _MODULE_FIXTURE,
            "test_other.py": _MANY.format(name="other"),
            "test_more.py": _MANY.format(name="more"),
        },
    )
    run = _run(tmp_path, "-n", "3", "--dist", "loadgroup")
    assert run.returncode == 0, run.stdout + run.stderr
    assert len((tmp_path / "setups.log").read_text().split()) == 1, run.stdout
    workers: dict[str, set[str]] = {}
    for worker, module in re.findall(r"^\[(gw\d+)\] .*?PASSED (test_\w+\.py)::", run.stdout, re.MULTILINE):
        workers.setdefault(module, set()).add(worker)
    assert sorted(workers) == ["test_costly.py", "test_more.py", "test_other.py"], run.stdout
    assert all(len(used) == 1 for used in workers.values()), workers
    assert len(set().union(*workers.values())) > 1, workers  # the modules still spread over the workers


_SURROGATES = """\
import pytest


def test_fails_with_a_lone_surrogate():
    assert "a\\ud800" == "b", "told \\udfff"


def test_skips_with_a_lone_surrogate():
    pytest.skip("skipped \\ud800")


def test_prints_a_lone_surrogate():
    print("printed \\ud800")


@pytest.mark.parametrize("i", range(6))
def test_after(i):
    pass
"""


def test_a_failure_whose_text_holds_a_lone_surrogate_is_reported_by_a_worker(tmp_path: pathlib.Path) -> None:
    """A report UTF-8 cannot carry crashed the worker sending it, and the whole session ended in an INTERNALERROR
    without the failure."""
    _project(tmp_path, {"test_hostile.py": _SURROGATES})
    run = _run(tmp_path, "-n", "2", "-rA")
    assert "INTERNALERROR" not in run.stdout + run.stderr, run.stdout + run.stderr
    assert run.returncode == 1, run.stdout + run.stderr
    assert re.search(r"^FAILED test_hostile\.py::test_fails_with_a_lone_surrogate", run.stdout, re.MULTILINE)
    assert "told \\udfff" in run.stdout and "skipped \\ud800" in run.stdout, run.stdout
    assert "1 failed, 7 passed, 1 skipped" in run.stdout, run.stdout
