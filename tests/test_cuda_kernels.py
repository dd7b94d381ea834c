"""The CUDA backend: its sources compile, its NumPy model agrees with the reference, and
on a GPU the kernel itself does.

(a) every backends/kernels/cuda/*.cu compiles with nvcc for sm_90, all warnings errors
    (skipped where nvcc is missing);
(b) the model of the kernel's index math (dla_backends.kernels.cuda_model) on the regimes of its
    decomposition: more row groups than rows, a block that Dv does not divide, threads
    owning several rows, several columns (Dv > BLOCK), idle threads; and on the rules a
    decomposition can break (ties, forced traces, initial caches, decode = prefill);
(c) the CuPy kernel (dla_backends.kernels.cupy_kernels) against dla_ref and against the model,
    skipped with the reason where CuPy or a CUDA device is missing.

Values are judged by dla_backends.testing (both layers of docs/spec/trace.md and its tolerance
table), with the float64 reference as the expected side. The general differential suite
(tests/test_differential.py) runs "cuda-model" and "cupy" on drawn cases as well.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import dla_backends
import dla_ref
from dla_backends import host
from dla_backends.kernels import cuda_model
from dla_backends.testing import assert_matches_reference, to_native, to_numpy

ROOT = Path(__file__).resolve().parents[1]
CUDA_SOURCES = sorted((Path(dla_backends.__file__).parent / "kernels" / "cuda").glob("*.cu"))

# (Dk, Dv) -> what it exercises, for any power-of-two BLOCK (C = min(Dv, BLOCK) column
# lanes, G = BLOCK // C row groups); the values in brackets are for BLOCK = 1024.
BLOCK = cuda_model.BLOCK
REGIMES = {
    (4, 4): "G > Dk: most row groups own no row",
    (3, 5): "C = 5 does not divide the block: its last threads own nothing",
    (BLOCK // 3 + 15, 3): "Dk > G: some threads own two rows [356, 3]",
    (2, BLOCK + 44): "Dv > BLOCK: some threads own two columns [2, 1068]",
    (5, BLOCK - 56): "G = 1 and the last 56 threads idle [5, 968]",
}


def inputs(rng, B, T, H, Dk, Dv, K, backbone, segments=3):
    """Piecewise-stationary tokens (so that scores fall on both sides of tau) as float64.

    Keys and values repeat a per-segment direction plus noise; gdn keys are unit rows.
    """
    def piecewise(D):
        base = np.repeat(rng.standard_normal((B, segments, H, D)), -(-T // segments), axis=1)
        return base[:, :T] + 0.3 * rng.standard_normal((B, T, H, D))

    k, v = piecewise(Dk), piecewise(Dv)
    if backbone == "gdn":
        k /= np.linalg.norm(k, axis=-1, keepdims=True)
    return dict(
        q=rng.standard_normal((B, T, H, Dk)), k=k, v=v, lam=rng.random((B, T, H, K)),
        log_alpha=None if backbone == "linear" else -rng.random((B, T, H)),
        beta=rng.random((B, T, H)) if backbone == "gdn" else None,
    )


def cast(args, dtype, namespace="numpy", device="cpu"):
    """The arrays of ``inputs`` in a namespace and dtype."""
    return {name: None if x is None else to_native(x, namespace, device, dtype)
            for name, x in args.items()}


# --- (a) the sources compile --------------------------------------------------------------


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")
@pytest.mark.parametrize("source", CUDA_SOURCES, ids=lambda p: p.name)
def test_source_compiles_for_sm90_without_warnings(source, tmp_path):
    """nvcc -arch=sm_90 -Werror all-warnings: what NVRTC compiles on the GPU, checked here."""
    command = ["nvcc", "-arch=sm_90", "-Werror", "all-warnings", "--std=c++17",
               f"-DDLA_BLOCK={cuda_model.BLOCK}", "-c", str(source),
               "-o", str(tmp_path / "out.o")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{' '.join(command)}\n{done.stdout}{done.stderr}"


def test_there_are_sources():
    assert CUDA_SOURCES, "no backends/kernels/cuda/*.cu found"


def test_gpu_check_dry_run_lists_its_parts_and_runs_none(tmp_path):
    """scripts/gpu_check.sh --dry-run works here, so the GPU machine's run is no first try."""
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run"],
                          env={**os.environ, "OUT": str(tmp_path)}, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    for name in ("nvidia-smi", "cuda kernel tests", "differential cupy",
                 "differential triton@cuda", "differential torch@cuda",
                 "differential torch-chunked@cuda"):
        assert f"would run [{name}]" in done.stdout, done.stdout
    assert "=== [" not in done.stdout  # the header of a part that runs


# --- (b) the model of the decomposition ---------------------------------------------------


@pytest.mark.parametrize("Dk, Dv", list(REGIMES) + [(1, 1), (64, 64), (7, 256), (1, 513)])
def test_every_entry_has_exactly_one_owner(Dk, Dv):
    """The ownership rule covers the Dk x Dv state once, so no phase needs a barrier for S."""
    own = cuda_model.owner(Dk, Dv)
    rows = np.broadcast_to(own.rows[:, None, :], own.cols.shape + own.rows.shape[1:2])
    cols = np.broadcast_to(own.cols[:, :, None], rows.shape)
    owned = (rows >= 0) & (cols >= 0)
    count = np.zeros((Dk, Dv), int)
    np.add.at(count, (rows[owned], cols[owned]), 1)
    assert (count == 1).all(), f"entries owned {count.min()} to {count.max()} times"


def test_a_warp_reads_a_row_contiguously():
    """Threads 0 ... C-1 own columns 0 ... C-1 of the same row: coalesced accesses."""
    own = cuda_model.owner(64, 64)
    assert (own.cols[:64, 0] == np.arange(64)).all()
    assert (own.rows[:64, 0] == 0).all()


@pytest.mark.parametrize("backbone", dla_ref.BACKBONES)
@pytest.mark.parametrize("Dk, Dv", list(REGIMES), ids=list(REGIMES.values()))
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_model_matches_reference(Dk, Dv, backbone, dtype):
    """Own trace admissible, and the reference under that trace agrees (docs/spec/trace.md)."""
    K = 3
    args = inputs(np.random.default_rng(Dk * 1000 + Dv), 2, 10, 2, Dk, Dv, K, backbone)
    assert_matches_reference(cuda_model.dla, **cast(args, dtype), state_dtype=dtype,
                             backbone=backbone, capacity=K, tau=0.6)


def test_model_with_the_cupy_backends_float32_state_on_float64_inputs():
    """The host side's state_dtype, as "cupy" uses it: o in float64, the rest in float32."""
    from functools import partial

    args = inputs(np.random.default_rng(8), 2, 12, 2, 5, 4, 3, "mamba2")
    model = partial(host.run, cuda_model.launch, backend="cuda-model", state_dtype="float32")
    assert_matches_reference(model, **args, state_dtype="float32", backbone="mamba2",
                             capacity=3, tau=0.5)


@pytest.mark.parametrize("score", dla_ref.SCORES)
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("slots", dla_ref.SLOT_ORDERS)
def test_model_options(score, normalize, slots):
    args = inputs(np.random.default_rng(7), 2, 16, 2, 6, 5, 4, "mamba2")
    assert_matches_reference(cuda_model.dla, **cast(args, "float32"), state_dtype="float32",
                             backbone="mamba2", capacity=4, tau=0.5, score=score,
                             normalize=normalize, slots=slots)


@pytest.mark.parametrize("tau, K", [(math.inf, 3), (-math.inf, 3), (-math.inf, 1), (0.6, 20)])
def test_model_edge_rules(tau, K):
    """tau = +inf never opens a second slot, -inf always does; K = 1; K >= T."""
    args = inputs(np.random.default_rng(3), 1, 12, 2, 4, 3, K, "gdn")
    got = cuda_model.dla(**args, backbone="gdn", capacity=K, tau=tau)
    want = dla_ref.dla(**args, backbone="gdn", capacity=K, tau=tau)
    np.testing.assert_array_equal(got.trace.boundary, want.trace.boundary)
    np.testing.assert_array_equal(got.trace.merged, want.trace.merged)
    assert_matches_reference(cuda_model.dla, **args, state_dtype="float64", backbone="gdn",
                             capacity=K, tau=tau)


def equal_density_cache(B, H, K, Dk, Dv):
    """A full cache whose adjacent pairs all have the same density (n = 1, J = 0.5)."""
    rng = np.random.default_rng(11)
    return dla_ref.Cache(S=rng.standard_normal((B, H, K, Dk, Dv)),
                         n=np.ones((B, H, K), np.int64), info=np.full((B, H, K), 0.5),
                         m=np.full((B, H), K, np.int64))


def test_model_density_ties_go_to_the_oldest_pair():
    """Every pair equally dense and tau = -inf: each merge takes j = 0, as the reference."""
    args = inputs(np.random.default_rng(5), 2, 1, 2, 3, 4, 4, "linear")
    cache = equal_density_cache(2, 2, 4, 3, 4)
    got = cuda_model.dla(**args, capacity=4, tau=-math.inf, initial_cache=cache)
    want = dla_ref.dla(**args, capacity=4, tau=-math.inf, initial_cache=cache)
    np.testing.assert_array_equal(want.trace.merged, 0)
    np.testing.assert_array_equal(got.trace.merged, want.trace.merged)


def test_model_replays_a_forced_trace_from_an_initial_cache():
    rng = np.random.default_rng(9)
    args = inputs(rng, 2, 14, 2, 4, 4, 3, "mamba2")
    first = {name: None if x is None else x[:, :6] for name, x in args.items()}
    rest = {name: None if x is None else x[:, 6:] for name, x in args.items()}
    cache = dla_ref.dla(**first, backbone="mamba2", capacity=3).cache
    forced = dla_ref.dla(**rest, backbone="mamba2", capacity=3, tau=-math.inf,
                         initial_cache=cache).trace  # a trace no score would give at tau=0.6
    assert_matches_reference(cuda_model.dla, **rest, state_dtype="float64", backbone="mamba2",
                             capacity=3, trace=forced, initial_cache=cache)


def test_model_rejects_a_trace_that_does_not_fit_like_the_reference():
    args = inputs(np.random.default_rng(2), 1, 5, 1, 3, 3, 2, "linear")
    trace = dla_ref.Trace(np.zeros((1, 5, 1)), np.zeros((1, 5, 1), bool),
                          np.full((1, 5, 1), -1))  # token 0 must open a slot
    with pytest.raises(ValueError) as want:
        dla_ref.dla(**args, capacity=2, trace=trace)
    with pytest.raises(ValueError) as got:
        cuda_model.dla(**args, capacity=2, trace=trace)
    assert str(got.value) == str(want.value)


def test_model_decode_steps_continue_the_prefill():
    """decode_step token by token from a prefill's cache = one prefill over everything."""
    args = cast(inputs(np.random.default_rng(4), 2, 12, 2, 5, 3, 3, "gdn"), "float32")
    options = dict(backbone="gdn", capacity=3, tau=0.5)
    whole = cuda_model.dla(**args, **options)
    part = cuda_model.dla(**{n: None if x is None else x[:, :8] for n, x in args.items()},
                          **options)
    cache, outputs = part.cache, []
    for t in range(8, 12):
        step = cuda_model.decode_step(**{n: None if x is None else x[:, t]
                                         for n, x in args.items()}, cache=cache, **options)
        cache = step.cache
        outputs.append(step.o)
    np.testing.assert_array_equal(np.stack(outputs, axis=1), whole.o[:, 8:])
    for got, want in zip(cache, whole.cache):
        np.testing.assert_array_equal(got, want)


def test_importing_the_backends_does_not_import_cupy():
    code = ("import sys, dla_backends, dla_backends.kernels.cupy_kernels, "
            "dla_backends.kernels.cuda_model; sys.exit('cupy' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0


# --- (c) the kernel, on a GPU --------------------------------------------------------------

CUPY_OK, CUPY_WHY = dla_backends.get("cupy").available()
needs_gpu = pytest.mark.skipif(not CUPY_OK, reason=f"cupy backend unavailable: {CUPY_WHY}")


def cupy_float64_state(q, k, v, lam, **options):
    """The kernel instantiated for a float64 state: the index math at float64 tolerance."""
    from dla_backends.kernels import cupy_kernels

    return host.run(cupy_kernels.launch, q, k, v, lam, backend="cupy", state_dtype="float64",
                    **options)


def on_gpu(args, dtype):
    return cast(args, dtype, "cupy", "cuda")


@needs_gpu
@pytest.mark.parametrize("backbone", dla_ref.BACKBONES)
@pytest.mark.parametrize("Dk, Dv", list(REGIMES), ids=list(REGIMES.values()))
def test_kernel_matches_reference(Dk, Dv, backbone):
    from dla_backends.kernels import cupy_kernels

    K = 3
    args = inputs(np.random.default_rng(Dk * 1000 + Dv), 2, 10, 2, Dk, Dv, K, backbone)
    options = dict(backbone=backbone, capacity=K, tau=0.6)
    assert_matches_reference(cupy_kernels.dla, **on_gpu(args, "float32"),
                             state_dtype="float32", **options)
    assert_matches_reference(cupy_float64_state, **on_gpu(args, "float64"),
                             state_dtype="float64", **options)


@needs_gpu
@pytest.mark.parametrize("score", dla_ref.SCORES)
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("slots", dla_ref.SLOT_ORDERS)
def test_kernel_options(score, normalize, slots):
    from dla_backends.kernels import cupy_kernels

    args = inputs(np.random.default_rng(7), 2, 16, 2, 6, 5, 4, "gdn")
    assert_matches_reference(cupy_kernels.dla, **on_gpu(args, "float32"), state_dtype="float32",
                             backbone="gdn", capacity=4, tau=0.5, score=score,
                             normalize=normalize, slots=slots)


@needs_gpu
@pytest.mark.parametrize("backbone", dla_ref.BACKBONES)
def test_kernel_at_the_paper_size(backbone):
    """Dk = Dv = 64, K = 30 (the paper's): 16 entries per thread, the cache fills and merges."""
    from dla_backends.kernels import cupy_kernels

    args = inputs(np.random.default_rng(1), 1, 48, 2, 64, 64, 30, backbone, segments=40)
    assert_matches_reference(cupy_kernels.dla, **on_gpu(args, "float32"), state_dtype="float32",
                             backbone=backbone, capacity=30, tau=0.6)


@needs_gpu
@pytest.mark.parametrize("Dk, Dv", list(REGIMES), ids=list(REGIMES.values()))
def test_kernel_agrees_with_its_model(Dk, Dv):
    """Under one trace, the kernel and its model differ by rounding only (FMA)."""
    from dla_backends.kernels import cupy_kernels

    args = inputs(np.random.default_rng(Dk + Dv), 2, 10, 2, Dk, Dv, 3, "gdn")
    options = dict(backbone="gdn", capacity=3, tau=0.6)
    model = cuda_model.dla(**cast(args, "float32"), **options)
    forced = dla_ref.Trace(*(to_native(x, "cupy", "cuda") for x in model.trace))
    kernel = cupy_kernels.dla(**on_gpu(args, "float32"), trace=forced, **options)
    for name, got, want in (("o", kernel.o, model.o), ("S", kernel.cache.S, model.cache.S),
                            ("scores", kernel.trace.scores, model.trace.scores)):
        got = to_numpy(got)
        assert np.abs(got - want).max() <= 1e-5 * (1 + np.abs(want).max()), name
    np.testing.assert_array_equal(to_numpy(kernel.cache.n), model.cache.n)


@needs_gpu
def test_kernel_decode_steps_continue_the_prefill():
    from dla_backends.kernels import cupy_kernels

    args = on_gpu(inputs(np.random.default_rng(4), 2, 12, 2, 8, 8, 3, "mamba2"), "float32")
    options = dict(backbone="mamba2", capacity=3, tau=0.5)
    whole = cupy_kernels.dla(**args, **options)
    part = cupy_kernels.dla(**{n: None if x is None else x[:, :8] for n, x in args.items()},
                            **options)
    cache, outputs = part.cache, []
    for t in range(8, 12):
        step = cupy_kernels.decode_step(**{n: None if x is None else x[:, t]
                                           for n, x in args.items()}, cache=cache, **options)
        cache = step.cache
        outputs.append(to_numpy(step.o))
    np.testing.assert_array_equal(np.stack(outputs, axis=1), to_numpy(whole.o)[:, 8:])
    for got, want in zip(cache, whole.cache):
        np.testing.assert_array_equal(to_numpy(got), to_numpy(want))


@needs_gpu
def test_kernel_rejects_a_trace_that_does_not_fit_like_the_reference():
    from dla_backends.kernels import cupy_kernels

    args = inputs(np.random.default_rng(2), 1, 5, 1, 3, 3, 2, "linear")
    trace = dla_ref.Trace(np.zeros((1, 5, 1)), np.ones((1, 5, 1), bool),
                          np.full((1, 5, 1), -1))  # the third boundary finds the cache full
    with pytest.raises(ValueError) as want:
        dla_ref.dla(**args, capacity=2, trace=trace)
    gpu_trace = dla_ref.Trace(*(to_native(x, "cupy", "cuda") for x in trace))
    with pytest.raises(ValueError) as got:
        cupy_kernels.dla(**on_gpu(args, "float32"), capacity=2, trace=gpu_trace)
    assert str(got.value) == str(want.value)
