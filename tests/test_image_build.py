"""The operator image's build stage, without a container engine: the package built from exactly the files the
Dockerfile copies, installed without the checkout (the tests otherwise import an editable install that reads the
source tree), imports every module and answers on its console scripts."""

from __future__ import annotations

import json
import pathlib
import re
import shutil
import subprocess
import sys
import sysconfig

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCKERFILE = REPO_ROOT / "Dockerfile"

#: Run by the interpreter with ``-S`` (no site-packages, so no editable install) and the wheel's files first on
#: the path: what each package and script resolves to, and every module imported.
PROBE = r"""
import importlib, importlib.metadata, json, pkgutil, sys
import llm_telemetry, llm_telemetry_operator
modules = []
for package in (llm_telemetry, llm_telemetry_operator):
    for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        if not info.name.endswith(".__main__"):  # runs its command when imported; the scripts load it below
            importlib.import_module(info.name)
        modules.append(info.name)
scripts = {}
for dist in importlib.metadata.distributions(path=[sys.argv[1]]):
    for ep in dist.entry_points.select(group="console_scripts"):
        scripts[ep.name] = ep.value
        ep.load()
print(json.dumps({
    "files": [llm_telemetry.__file__, llm_telemetry_operator.__file__],
    "modules": modules,
    "scripts": scripts,
}))
"""


def build_stage_sources() -> list[str]:
    """The paths the Dockerfile's first stage copies from the build context (``COPY src... dest``)."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    stages = re.split(r"^FROM\s", text, flags=re.MULTILINE)
    sources: list[str] = []
    for line in stages[1].splitlines():
        words = line.split()
        if words and words[0].upper() == "COPY" and not any(w.startswith("--from") for w in words):
            sources += [w for w in words[1:-1] if not w.startswith("--")]
    return sources


def _pattern(pattern: str) -> re.Pattern[str]:
    """A ``.dockerignore`` pattern as Docker reads it (Go's ``filepath.Match`` per path segment, ``**/`` for any
    number of leading segments), matching a path or anything under it."""
    parts = []
    for segment in pattern.strip("/").split("/"):
        if segment == "**":
            parts.append("(?:[^/]+/)*")
        else:
            parts.append(re.escape(segment).replace(r"\*", "[^/]*").replace(r"\?", "[^/]") + "/")
    return re.compile("".join(parts).removesuffix("/") + "(?:/.*)?")


def build_context() -> set[str]:
    """The checkout's files that ``docker build .`` sends as its context: ``.dockerignore`` applied, the last
    matching pattern deciding (``!`` takes a path back)."""
    rules = []
    for line in (REPO_ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            rules.append((line.startswith("!"), _pattern(line.lstrip("!"))))
    files = subprocess.run(["git", "ls-files"], cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout
    sent = set()
    for path in files.splitlines():
        kept = True
        for taken_back, pattern in rules:
            if pattern.fullmatch(path):
                kept = taken_back
        if kept:
            sent.add(path)
    return sent


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """The wheel built from the build stage's context, unpacked into a directory of its own."""
    root = tmp_path_factory.mktemp("image")
    context = root / "context"
    context.mkdir()
    sent = build_context()
    for source in build_stage_sources():
        name = source.rstrip("/")
        for path in sorted(p for p in sent if p == name or p.startswith(name + "/")):
            target = context / path
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO_ROOT / path, target)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    build = subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "--wheel-dir", str(root / "dist"), str(context)],
        capture_output=True, text=True, timeout=300, cwd=root,
    )  # fmt: skip
    assert build.returncode == 0, f"the build stage's context does not build:\n{build.stdout}\n{build.stderr}"
    [wheel] = (root / "dist").glob("*.whl")
    site = root / "site"
    install = subprocess.run(
        [*pip, "install", "--no-deps", "--no-index", "--target", str(site), str(wheel)],
        capture_output=True, text=True, timeout=300, cwd=root,
    )  # fmt: skip
    assert install.returncode == 0, install.stdout + install.stderr
    return site


def test_the_dockerfile_copies_the_package_sources() -> None:
    assert {"pyproject.toml", "middleware/", "operator/"} <= set(build_stage_sources())


def test_every_file_the_build_stage_copies_is_in_the_build_context() -> None:
    """A COPY of a path ``.dockerignore`` keeps out fails the build (``"/LICENSE": not found``)."""
    sent = build_context()
    for source in build_stage_sources():
        name = source.rstrip("/")
        assert any(p == name or p.startswith(name + "/") for p in sent), f"{source} is not in the build context"
    assert not any(p.startswith(("tests/", "charts/", ".git")) or p.endswith(".pyc") for p in sent)


def test_the_dockerfile_builds_the_tag_the_chart_pulls() -> None:
    """The build command in the Dockerfile's header makes the image the chart's defaults pull: its tag is the
    package version, which is the chart's appVersion."""
    from llm_telemetry.version import __version__

    (tag,) = re.findall(r"docker build -t llm-telemetry-operator:(\S+) \.", DOCKERFILE.read_text())
    chart = (REPO_ROOT / "charts" / "llm-telemetry-operator" / "Chart.yaml").read_text()
    assert tag == __version__ and re.search(rf"^appVersion: \"?{re.escape(tag)}\"?$", chart, re.M), (tag, __version__)


def test_the_built_package_runs_without_the_checkout(installed: pathlib.Path) -> None:
    dependencies = sysconfig.get_paths()["purelib"]  # the test environment's, for kopf, OpenTelemetry and the rest
    probe = subprocess.run(
        [sys.executable, "-S", "-c", PROBE, str(installed)],
        capture_output=True, text=True, timeout=300, cwd=installed.parent,
        env={"PYTHONPATH": f"{installed}:{dependencies}", "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert probe.returncode == 0, probe.stderr[-4000:]
    seen = json.loads(probe.stdout)
    for file in seen["files"]:
        assert pathlib.Path(file).is_relative_to(installed), f"imported from outside the built package: {file}"
    sources = {
        ".".join(p.relative_to(base).with_suffix("").parts)
        for base in (REPO_ROOT / "middleware", REPO_ROOT / "operator")
        for p in base.rglob("*.py")
        if p.name != "__init__.py" and "__pycache__" not in p.parts
    }
    assert sources <= set(seen["modules"]), f"not in the built package: {sorted(sources - set(seen['modules']))}"
    assert seen["scripts"] == {
        "llm-telemetry": "llm_telemetry.cli:main",
        "llm-telemetry-operator": "llm_telemetry_operator.__main__:main",
    }
    assert (installed / "llm_telemetry" / "py.typed").is_file()  # the middleware's types reach its users' mypy
    # The image carries the license its metadata declares (Apache-2.0 asks that its text go with the work).
    [license_file] = installed.glob("llm_telemetry-*.dist-info/licenses/LICENSE")
    assert license_file.read_text().split()[:4] == ["Apache", "License", "Version", "2.0,"]


def test_the_image_entry_point_starts(installed: pathlib.Path) -> None:
    """The image's ENTRYPOINT, ``llm-telemetry-operator``, from the built package: its usage, and a configuration
    error answered with exit code 2 (not a traceback)."""
    dependencies = sysconfig.get_paths()["purelib"]
    env = {"PYTHONPATH": f"{installed}:{dependencies}", "PATH": "/usr/bin:/bin"}
    run = "import sys; from llm_telemetry_operator.__main__ import main; sys.exit(main(sys.argv[1:]))"
    usage = subprocess.run(
        [sys.executable, "-S", "-c", run, "--help"], capture_output=True, text=True, timeout=120,
        cwd=installed.parent, env=env,
    )  # fmt: skip
    assert usage.returncode == 0 and usage.stdout.startswith("usage: llm-telemetry-operator"), usage.stderr
    bad = subprocess.run(
        [sys.executable, "-S", "-c", run, "--metrics-port", "http"], capture_output=True, text=True, timeout=120,
        cwd=installed.parent, env=env,
    )  # fmt: skip
    # (Below 3.11 the operator refuses to run at all, also with code 2; the image's Python is newer.)
    expected = "configuration error" if sys.version_info >= (3, 11) else "needs Python 3.11 or newer"
    assert bad.returncode == 2 and expected in bad.stderr and "Traceback" not in bad.stderr
