"""The ``dla`` command answers bad input with its usage and exit 2, never a traceback.

Each case runs the installed command in a subprocess, as a user would; drawn inputs
(Hypothesis) go through ``dla_backends.cli.main`` in this process, where argparse's
exit is a SystemExit. Values a user may well mean (``--tau -inf``, ``--needles 0``)
must work instead.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import math
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dla_backends.cli import attach_negative_values, build_parser, is_number, main


def dla(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "dla_backends", *args], capture_output=True,
                          text=True, timeout=timeout)


def assert_usage_error(done, *words):
    """Exit 2, the usage line, the words of the message, and no traceback."""
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    assert "usage: dla" in done.stderr and "Traceback" not in done.stderr, done.stderr
    for word in words:
        assert word in done.stderr, (word, done.stderr)


@pytest.mark.parametrize("args, words", [
    (["-K", "0"], ["--capacity", "must be >= 1"]),
    (["--capacity", "-3"], ["--capacity", "must be >= 1"]),
    (["--tau", "nan"], ["--tau", "nan"]),
    (["--tau", "abc"], ["--tau", "expected a number"]),
    (["--segments", "0"], ["--segments", "must be >= 2"]),
    (["--segments", "1"], ["--segments", "must be >= 2"]),
    (["-T", "64", "--segments", "3"], ["--segments 3", "at most 2"]),  # more than T allows
    (["-T", "64", "--segments", "2", "--needles", "5"], ["--needles 5", "at most 4"]),
    (["--needles", "-1"], ["--needles", "must be >= 0"]),
    (["--dim", "0"], ["--dim", "must be >= 1"]),
    (["--length", "10"], ["--length", "must be >= 64"]),
    (["-T", "1.5"], ["--length", "expected an integer"]),
    (["--seed", "-1"], ["--seed", "must be >= 0"]),
    (["--window", "-2"], ["--window", "must be >= 0"]),
    (["-o", "/nonexistent-dir/demo.png"], ["--output", "does not exist"]),
    (["-o", "demo.jpg"], ["--output", "does not end in .png"]),
])
def test_demo_rejects(args, words):
    assert_usage_error(dla("demo", *args), *words)


def test_demo_checks_the_output_directory_before_running(tmp_path):
    done = dla("demo", "-T", "64", "--segments", "2", "-o", str(tmp_path / "no" / "d.png"))
    assert_usage_error(done, "does not exist")
    assert done.stdout == ""  # nothing ran


@pytest.mark.parametrize("args, words", [
    (["--repeat", "0"], ["--repeat", "must be >= 1"]),
    (["--tokens", "0"], ["--tokens", "must be >= 1"]),
    (["--check-tokens", "0"], ["--check-tokens", "must be >= 1"]),
    (["--reference-tokens", "-4"], ["--reference-tokens", "must be >= 1"]),
    (["--budget", "0"], ["--budget", "must be > 0"]),
    (["--budget", "inf"], ["--budget", "finite"]),
    (["--json", "/nonexistent-dir/bench.json"], ["--json", "does not exist"]),
    (["--backends", "numba,nope"], ["--backends", "unknown: nope", "torch-chunked"]),
    (["--workloads", "prefil"], ["--workloads", "unknown: prefil", "prefill-mamba2"]),
    (["--device", "tpu"], ["--device", "invalid choice"]),
])
def test_bench_rejects(args, words):
    assert_usage_error(dla("bench", *args), *words)


def test_bench_without_cuda_refuses_device_cuda(tmp_path):
    from dla_backends.cli.bench import cuda_device

    if cuda_device():
        pytest.skip("this machine has a CUDA device: --device cuda is a valid request")
    done = dla("bench", "--device", "cuda", "--json", str(tmp_path / "b.json"))
    assert_usage_error(done, "--device cuda", "no CUDA device")
    assert not (tmp_path / "b.json").exists()


@pytest.mark.parametrize("args, words", [
    (["check", "--backend", "nope"], ["--backend", "unknown test backend 'nope'", "numba"]),
    (["check", "--backend", "numba", "--examples", "-1"], ["--examples", "must be >= 0"]),
    (["golden", "--dir", "/nonexistent-dir"], ["--dir", "no manifest.json"]),
    (["nonsense"], ["invalid choice"]),
])
def test_check_golden_and_the_command_reject(args, words):
    assert_usage_error(dla(*args), *words)


def test_golden_writes_then_checks_a_directory_of_cases(tmp_path):
    written = dla("golden", "--write", "--dir", str(tmp_path / "cases"))
    assert written.returncode == 0, written.stderr
    assert (tmp_path / "cases" / "manifest.json").is_file()
    checked = dla("golden", "--dir", str(tmp_path / "cases"))
    assert checked.returncode == 0 and "match the reference" in checked.stdout, checked.stdout
    (tmp_path / "cases" / "manifest.json").write_text(
        (tmp_path / "cases" / "manifest.json").read_text().replace('"sha256": "', '"sha256": "0'))
    broken = dla("golden", "--dir", str(tmp_path / "cases"))
    assert broken.returncode == 1 and "Traceback" not in broken.stderr, broken.stdout


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None,
                    reason="the demo's plot needs matplotlib")
@pytest.mark.parametrize("args", [["--needles", "0"], ["--tau", "-inf"], ["--tau", "inf"],
                                  ["-K", "1"], ["--dim", "1"]])
def test_demo_accepts_edge_requests(args, tmp_path):
    """0 needles is a valid request (the needle column shows '-'); tau may be infinite."""
    out = tmp_path / "d.png"
    done = dla("demo", "-T", "128", "--segments", "2", "-o", str(out), *args)
    assert done.returncode == 0, done.stderr
    assert out.read_bytes()[:4] == b"\x89PNG"
    if args == ["--needles", "0"]:
        assert "0 needles" in done.stdout


@pytest.mark.parametrize("command", [["golden"], ["demo", "-T", "64", "--segments", "2"]])
def test_output_into_a_closed_pipe_ends_quietly(command, tmp_path):
    """Like `dla golden | head -0`: the reader is gone before the first write."""
    extra = ["-o", str(tmp_path / "d.png")] if command[0] == "demo" else []
    child = subprocess.Popen([sys.executable, "-m", "dla_backends", *command, *extra],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    child.stdout.close()
    _, stderr = child.communicate(timeout=300)
    assert "BrokenPipeError" not in stderr and "Traceback" not in stderr, stderr


# --- drawn inputs, in this process ---------------------------------------------------------

COUNTS = {("demo", "--capacity"): 1, ("demo", "--segments"): 2, ("demo", "--dim"): 1,
          ("demo", "--length"): 64, ("demo", "--needles"): 0, ("bench", "--repeat"): 1,
          ("bench", "--tokens"): 1, ("bench", "--check-tokens"): 1}


def usage_error_of(argv) -> str:
    """What ``dla ARGV`` prints on stderr, asserting that it exits 2."""
    err = io.StringIO()
    with pytest.raises(SystemExit) as exit_, contextlib.redirect_stderr(err):
        main(argv)
    assert exit_.value.code == 2
    return err.getvalue()


@given(option=st.sampled_from(sorted(COUNTS)), below=st.integers(1, 10 ** 12))
def test_a_count_below_its_minimum_is_a_usage_error(option, below):
    command, name = option
    err = usage_error_of([command, name, str(COUNTS[option] - below)])
    assert "usage: dla" in err and name in err and f"must be >= {COUNTS[option]}" in err


@given(text=st.sampled_from(["nan", "NaN", "-nan", "+nan"]) | st.text(
    st.characters(codec="ascii", exclude_categories=("Cc",)), min_size=1, max_size=8).filter(
        lambda s: not is_number(s) and not s.startswith("-")))
def test_tau_that_is_not_a_number_is_a_usage_error(text):
    assert "--tau" in usage_error_of(["demo", "--tau", text])


@given(tau=st.floats(allow_nan=False))
def test_any_tau_but_nan_is_accepted_as_written(tau):
    """Negative ones included: '--tau -inf', '--tau -1e-300' reach the demo as numbers."""
    parser, _, _ = build_parser("demo")
    args = parser.parse_args(attach_negative_values(["demo", "--tau", repr(tau)]))
    assert args.tau == tau or (math.isinf(tau) and args.tau == tau)


