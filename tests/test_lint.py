"""The repository passes ``ruff check`` (the rules and line length are pyproject's [tool.ruff]).

Run by the suite so that a violation fails like any other test, with ruff's own report
(file, line, rule, message) as the failure message. ruff comes with the test extra.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


def test_ruff_check_is_clean():
    pytest.importorskip("ruff", reason="ruff not installed (it is in the test extra: "
                                       "pip install -e '.[test]')")
    run = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache",
                          "--output-format=concise", "."],
                         cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, f"ruff check found violations:\n{run.stdout}{run.stderr}"
