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
        },
    )
    run = _run(tmp_path, "-n", "3", "--dist", "loadgroup")
    assert run.returncode == 0, run.stdout + run.stderr
    workers: dict[str, set[str]] = {"integration": set(), "other": set()}
    for worker, nodeid in re.findall(r"^\[(gw\d+)\] .*?PASSED (\S+)", run.stdout, re.MULTILINE):
        workers["integration" if nodeid.startswith("integration/") else "other"].add(worker)
    assert len(workers["integration"]) == 1, run.stdout
    assert workers["other"], run.stdout
