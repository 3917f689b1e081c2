"""The operator's Python floor: started on an older Python, it says so and exits, instead of failing its passes."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.skipif(sys.version_info >= (3, 11), reason="checks the refusal on Python 3.10; this is 3.11 or newer")
def test_refuses_to_start_below_python_3_11() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "llm_telemetry_operator", "--standalone"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert "needs Python 3.11 or newer" in result.stderr
