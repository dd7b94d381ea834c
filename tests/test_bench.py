"""`dla bench` end to end on minimal sizes: it checks, times and writes its JSON.

Speed is not asserted (it is measured, not tested); the test checks that the command
runs through the CLI, reports every backend it was asked for (ran, skipped or not
applicable, with a reason), and writes the figures docs/benchmarks.md relies on.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

pytest.importorskip("torch", reason="the bench's torch-chunked row needs torch")
SESSION = importlib.util.find_spec("dla_backends.decoder") is not None  # the decode session


def test_quick_bench_writes_the_json(tmp_path):
    out = tmp_path / "bench.json"
    command = [sys.executable, "-m", "dla_backends", "bench", "--quick", "--tokens", "16",
               "--check-tokens", "8", "--reference-tokens", "16", "--budget", "5",
               "--backends", "reference,torch-chunked", "--device", "cpu",
               "--workloads", "prefill-mamba2,decode,gdn", "--json", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "torch-chunked@cpu" in done.stdout and "[6/6]" in done.stderr  # table, progress

    report = json.loads(out.read_text())
    for key in ("command", "machine", "versions", "device", "dtype", "matmul_GFLOPs",
                "workloads", "settings", "results"):
        assert key in report, key
    assert report["device"] == "cpu" and report["dtype"] == "float32"
    assert report["matmul_GFLOPs"] > 0
    rows = {(r["backend"], r["workload"]): r for r in report["results"]}
    assert set(rows) == {(b, w) for b in ("reference", "torch-chunked")
                         for w in ("prefill-mamba2", "decode", "gdn")}

    gdn = rows["torch-chunked", "gdn"]
    assert gdn["status"] == "n/a" and "gdn" in gdn["reason"]
    for (backend, workload), row in rows.items():
        if (backend, workload) == ("torch-chunked", "gdn"):
            continue
        assert row["status"] == "ok", row
        assert row["T"] == 16 and 0 < row["T_timed"] <= 16
        assert row["tokens_per_s"] > 0 and row["over_reference"] > 0
        assert row["K30_over_K1"] > 0
        if backend != "reference":
            assert 0 <= row["check_budget_share"] <= 1
        if workload == "decode":
            assert row["decode_GBps"] > 0 and row["merge_overhead"] > -1
            assert row["merge_overhead_worst"] > -1
            assert row["copy_seconds"] > 0 and row["step_over_copy"] > 0
            session = backend == "reference" and SESSION  # torch-chunked: no one-token path
            assert row["decode_session"] == ("Decoder" if session else "dla() per token")
        else:
            assert row["DLA_over_loglinear"] > 0 and row["matmul_fraction"] > 0
            assert row["loglinear_form"]
    assert rows["torch-chunked", "prefill-mamba2"]["loglinear_form"] == \
        "dla_backends.kernels.torch_chunked.loglinear"
    assert all(len(line) <= 100 for line in done.stdout.splitlines()), done.stdout


# --- the parts of the bench that run without a GPU or a timing ------------------------------


class FakeEvent:
    """A CUDA event on a fake timeline: record() reads the clock the test advances."""

    def __init__(self, timeline):
        self.timeline, self.at = timeline, None

    def record(self):
        self.at = self.timeline["now"]

    def synchronize(self):
        pass

    def elapsed_time(self, end):
        return (end.at - self.at) * 1e3  # milliseconds, as CUDA events report


def test_cuda_clock_flushes_before_every_call_warms_up_and_keeps_the_least():
    from dla_backends.cli.bench import CudaClock, least

    timeline, log = {"now": 0.0}, []
    durations = iter([9.0, 3.0, 2.0, 5.0])  # the first call is the warm-up: not counted

    def call(state):
        log.append(("call", state))
        timeline["now"] += next(durations)

    clock = CudaClock(lambda: FakeEvent(timeline), lambda: log.append(("flush", None)))
    seconds = least(clock, lambda x: x + 1, call, 41, repeat=3)
    assert seconds == 2.0
    assert log == [("flush", None), ("call", 42)] * 4  # an L2 flush before each call


def test_the_flush_buffer_exceeds_the_l2_cache():
    from dla_backends.cli.bench import flush_bytes

    for l2 in (0, 40 << 20, 50 << 20, 300 << 20):
        assert flush_bytes(l2) > l2 and flush_bytes(l2) >= 256 << 20


def test_fla_anchors_say_why_they_are_skipped():
    from dla_backends.cli.bench import WORKLOADS, fla_anchors

    if importlib.util.find_spec("fla") is not None:
        pytest.skip("fla is installed here: the anchors would run (on CUDA)")
    said = []
    rows = fla_anchors(WORKLOADS["prefill-mamba2"], "prefill-mamba2", 64, None, 1, said.append)
    assert [r["status"] for r in rows] == ["skipped"] and "fla" in rows[0]["reason"]
    assert said and "skipped" in said[0]


def test_a_negative_overhead_is_within_noise_and_the_table_fits_100_columns():
    from dla_backends.cli.bench import overhead, table

    assert overhead(-0.14) == "within noise" and overhead(0.0) == "+0%"
    assert overhead(0.125) == "+12%"
    decode = dict(backend="torch-chunked", device="cuda", workload="decode", status="ok", T=2048,
                  T_timed=1728, seconds_per_token=0.0146, over_reference=0.84,
                  K30_over_K1=4.07, copy_seconds=0.0008, step_over_copy=18.2,
                  merge_overhead=-0.2, merge_overhead_worst=0.03,
                  decode_session="dla() per token")
    failed = dict(backend="numba", device="cpu", workload="prefill-linear", status="FAILED",
                  reason="x" * 300)
    report = dict(device="cuda", machine=dict(cpu="AMD EPYC", gpu="NVIDIA H200"),
                  matmul_GFLOPs=1.0, timing="CUDA events, L2 flushed")
    text = table([decode, failed], report)
    lines = text.splitlines()
    assert all(len(line) <= 100 for line in lines), text
    assert "within noise" in text and "FAILED" in text


def test_training_row_checks_gradients_then_times_forward_and_backward(tmp_path):
    out = tmp_path / "train.json"
    command = [sys.executable, "-m", "dla_backends", "bench", "--quick", "--tokens", "16",
               "--check-tokens", "8", "--budget", "5", "--backends", "torch-chunked",
               "--device", "cpu", "--workloads", "train-mamba2", "--json", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (row,) = json.loads(out.read_text())["results"]
    assert row["backend"] == "torch-chunked" and row["status"] == "ok", row
    assert 0 <= row["check_budget_share"] <= 1  # check_grads against dla_ref.vjp ran first
    assert row["tokens_per_s"] > 0 and row["train_over_forward"] > 0
    assert "fwd+bwd tok/s" in done.stdout
