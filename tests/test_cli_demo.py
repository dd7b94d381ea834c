"""`dla demo` runs end to end, prints its table and writes its plot; README and CI agree."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_demo_prints_the_table_and_writes_the_plot(tmp_path):
    pytest.importorskip("matplotlib", reason="the demo's plot needs matplotlib")
    out = tmp_path / "demo.png"
    run = subprocess.run([sys.executable, "-m", "dla_backends", "demo", "--length", "256",
                          "--output", str(out)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    for policy in ("dla", "fixed", "loglinear", "single"):
        assert re.search(rf"^{policy}\s+\d+", run.stdout, re.M), run.stdout
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_stream_has_its_change_points_and_needles():
    from dla_backends.cli.demo import synthetic_stream

    s = synthetic_stream(T=512, D=8, segments=5, needles=3, seed=3)
    assert len(s.change_points) == 4 and len(s.needles) == 3
    k = s.k[0, :, 0]
    # inside a segment, neighbours point the same way; across a change point they do not
    c = s.change_points[0]
    inside = [t for t in range(1, c) if t not in s.needles and t - 1 not in s.needles]
    assert np.mean([k[t] @ k[t - 1] for t in inside]) > 0.8
    assert abs(k[c] @ k[c - 1]) < 0.8


def test_demo_rejects_a_too_short_stream():
    run = subprocess.run([sys.executable, "-m", "dla_backends", "demo", "--length", "10"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "--length" in run.stderr and "must be >= 64" in run.stderr


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"^    (python3 -m venv .*)$", readme, re.M)
    assert len(commands) == 2, "the README holds exactly two fresh-machine commands"
    assert commands[0].endswith("dla demo")
    assert commands[1] in (ROOT / ".ci" / "run").read_text()


def test_the_readme_example_runs():
    """The Python example in the README runs as written (its assert checks admissibility)."""
    readme = (ROOT / "README.md").read_text()
    (example,) = re.findall(r"```python\n(.*?)```", readme, re.S)
    exec(compile(example, "README.md", "exec"), {})
