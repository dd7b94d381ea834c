"""``dla train``: the quick run learns (its loss falls) and bad requests are usage errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("torch", reason="dla train needs torch")


def dla(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "dla_backends", *args], capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.parametrize("task", ["mqar", "niah"])
def test_quick_run_lowers_the_loss_and_writes_json(tmp_path, task):
    out = tmp_path / "run.json"
    run = dla("train", "--task", task, "--quick", "--seed", "1", "--json", str(out))
    assert run.returncode == 0, run.stderr
    assert "loss" in run.stderr  # the progress line
    result = json.loads(out.read_text())
    losses = [point["loss"] for point in result["curve"]]
    assert sum(losses[-3:]) / 3 < losses[0] - 0.3, losses
    assert result["config"]["task"] == task and result["config"]["seed"] == 1
    assert 0.0 <= result["eval_accuracy"] <= 1.0
    assert len(result["example_boundaries"]) == result["config"]["n_heads"]


@pytest.mark.parametrize("args, message", [
    (["--task", "copy"], "invalid choice"),
    (["--task", "mqar", "--policy", "random"], "invalid choice"),
    (["--task", "mqar", "-T", "64", "--capacity", "5", "--match"], "does not match"),
    (["--task", "mqar", "--d-model", "33", "--heads", "2"], "not divisible"),
    (["--task", "mqar", "-T", "64", "--policy", "loglinear", "--capacity", "3"],
     "needs --capacity >= 7"),
    (["--task", "mqar", "--policy", "fixed", "--gate", "ste"], "ste"),
    (["--task", "mqar", "-T", "16", "--pairs", "8"], "T >= 4 \\* pairs"),
    (["--task", "mqar", "--steps", "0"], "must be >= 1"),
    (["--task", "mqar", "--json", "out.txt"], "does not end in .json"),
])
def test_bad_requests_are_usage_errors(args, message):
    import re

    run = dla("train", *args)
    assert run.returncode == 2, run.stderr
    assert "usage:" in run.stderr and "Traceback" not in run.stderr
    assert re.search(message, run.stderr), run.stderr
