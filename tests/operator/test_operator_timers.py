"""The operator's internal timers (``config.Timers``): their defaults are the values the documentation gives a user,
they are no setting (the environment never changes them), and only a positive, finite number of seconds is one."""

from __future__ import annotations

import math
import pathlib
import re

import pytest

from llm_telemetry_operator.config import OperatorConfig, Timers

DOCS = pathlib.Path(__file__).resolve().parents[2] / "docs"


def _said(doc: str) -> str:
    """A doc's text with its line breaks and runs of spaces as single spaces, as a sentence reads."""
    return re.sub(r"\s+", " ", (DOCS / doc).read_text(encoding="utf-8"))


def test_the_defaults_are_the_documented_values() -> None:
    timers = Timers()
    assert timers.holder_check_seconds == 10.0
    assert timers.takeover_grace_seconds == 300.0
    assert timers.takeover_confirm_seconds == 15.0
    assert timers.release_recheck_seconds == 25.0
    assert timers.access_recheck_seconds == 60.0
    assert timers.missing_retry_seconds == 30.0


def test_the_docs_say_what_the_defaults_are() -> None:
    """Each sentence of the docs that gives a user one of these waits gives the default's value."""
    timers = Timers()
    install, operator = _said("install.md"), _said("operator.md")
    grace = f"{timers.takeover_grace_seconds / 60:g} minutes"
    assert f"no live replica in its peering object for {grace}" in install
    assert f"has had no live replica for its {grace}" in install
    # The second look at an operator seen gone comes a second after its confirmation could be made.
    assert f"looked at again {timers.takeover_confirm_seconds + 1:g} seconds later" in install
    assert f"looked at again every {timers.release_recheck_seconds:g} s" in install
    assert timers.access_recheck_seconds == 60.0
    assert "as such checks come at most once a minute" in install
    assert f"tries again every {timers.missing_retry_seconds:g} s while the kind is not served" in operator
    assert f"A kind whose CRD is not installed yet is tried again every {timers.missing_retry_seconds:g} s" in operator
    # The operator's own list of them.
    assert (
        f"taken over once it has had no live replica for {grace}, confirmed by a second look"
        f" {timers.takeover_confirm_seconds:g} s after the first, its peering object read at most every"
        f" {timers.holder_check_seconds:g} s, a resource to let go at startup looked at again every"
        f" {timers.release_recheck_seconds:g} s (see install.md), checks of the permissions started by refusals at"
        f" most once a minute, and a kind of child not served tried again every {timers.missing_retry_seconds:g} s"
    ) in operator


def test_no_environment_variable_sets_them() -> None:
    """Not settings: what ``llm-telemetry-operator`` reads from its environment leaves the defaults, which run."""
    names = [name for name in Timers.__dataclass_fields__] + ["release_recheck_seconds"]
    env = {f"LLM_TELEMETRY_OPERATOR_{name.upper()}": "1" for name in names}
    env |= {f"LLM_TELEMETRY_OPERATOR_{name.upper().removesuffix('_SECONDS')}": "1" for name in names}
    assert OperatorConfig.from_env(env).timers == Timers()
    assert OperatorConfig().timers == Timers()


@pytest.mark.parametrize("seconds", [0.0, -1.0, math.inf, math.nan])
def test_a_timer_is_a_positive_number_of_seconds(seconds: float) -> None:
    for name in Timers.__dataclass_fields__:
        with pytest.raises(ValueError, match=name):
            Timers(**{name: seconds})
