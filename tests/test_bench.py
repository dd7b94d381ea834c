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
