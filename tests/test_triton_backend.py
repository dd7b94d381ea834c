"""What is specific to the Triton backend (dla_backends.kernels.triton_kernels): its two kernels,
their tilings, and the host code around them.

The general differential suite (tests/test_differential.py) runs "triton" through every
backend-independent check. Here: forced traces, the decode kernel against the prefill
kernel, several column blocks per stream (the duplicated decision) and the GPU's slot
tiling, odd head sizes, K = 1, tau = +-inf, an initial cache, half-precision inputs and
the errors. The expected side is dla_ref (float64) through dla_backends.testing's
check_case (both layers of docs/spec/trace.md, with its tolerance table), or, for decode against
prefill, the other kernel.

On CUDA the kernels are compiled; without CUDA they run under TRITON_INTERPRET=1 on CPU
tensors (slow: about 50 ms per token and stream, so the cases are small).
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest

import dla_ref

torch = pytest.importorskip("torch", reason="the triton backend runs on torch tensors")
CUDA = torch.cuda.is_available()
if not CUDA:  # triton reads it when it is imported (tests/conftest.py sets it too)
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton", reason="triton not installed")

from dla_backends import host, registry  # noqa: E402 -- after the environment is set
from dla_backends.testing import (  # noqa: E402
    CaseSpec, build_case, check_case, get_backend, run_candidate, to_native)

available, why = registry.get("triton").available()
if not available:
    pytest.skip(f"triton backend unavailable: {why}", allow_module_level=True)

from dla_backends.kernels import triton_kernels  # noqa: E402 -- decorates the kernels

DEVICE = "cuda" if CUDA else "cpu"
TRITON = get_backend(f"triton@{DEVICE}")
BACKBONES = ("linear", "mamba2", "gdn")


def tiled(monkeypatch, block_dv=None, slot_block=None):
    """Make ``dla`` launch both kernels with this tiling instead of the defaults."""
    if block_dv is not None:
        monkeypatch.setattr(triton_kernels, "decode_block_dv", lambda Dk, Dv: block_dv)
        monkeypatch.setattr(triton_kernels, "prefill_block_dv", lambda K, Dk, Dv: block_dv)
    if slot_block is not None:
        monkeypatch.setattr(triton_kernels, "decode_slot_block",
                            lambda K, device: slot_block)


def tensors(case, dtype=torch.float32):
    """The case's token inputs as torch tensors on DEVICE (None stays None)."""
    def to(x):
        return None if x is None else torch.tensor(x, dtype=dtype, device=DEVICE)
    return dict(q=to(case.q), k=to(case.k), v=to(case.v), lam=to(case.lam),
                log_alpha=to(case.log_alpha), beta=to(case.beta))


def on_device(record):
    """A dla_ref record (Trace or Cache) of NumPy arrays as torch tensors on DEVICE, floats
    as float32 (the backend's state dtype)."""
    return type(record)(*(to_native(x, "torch", DEVICE, "float32") for x in record))


def tokens(arrays, start, stop):
    """Tokens start .. stop-1 of every [B, T, H, ...] input."""
    return {name: None if x is None else x[:, start:stop] for name, x in arrays.items()}


def assert_same_run(a: dla_ref.Result, b: dla_ref.Result):
    """Two triton runs on the same tokens: equal decisions and counts, values within a few
    float32 roundings (the two kernels are compiled separately)."""
    for x, y in zip((a.o, *a.cache, *a.trace), (b.o, *b.cache, *b.trace)):
        if x.dtype.is_floating_point:
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(x, y)


# --- against the reference ---------------------------------------------------------


@pytest.mark.parametrize("backbone", BACKBONES)
def test_forced_trace_matches_reference(backbone):
    """Under a forced trace (merges included) the outputs, final cache and recomputed
    scores match the reference's, and the returned decisions are the forced ones."""
    spec = CaseSpec(backbone=backbone, forced_trace=True, B=2, H=1, T=10, Dk=3, Dv=5,
                    capacity=3, seed=21)
    check_case(TRITON, build_case(spec))


@pytest.mark.parametrize("options", [
    dict(backbone="linear", tau=0.3, capacity="exceeded"),
    dict(backbone="mamba2", score="state", slots="newest-first", tau=0.3, capacity=3),
    dict(backbone="gdn", normalize=False, tau=1.0, capacity=3),
], ids=["linear", "mamba2-state-newest", "gdn-raw"])
def test_own_decisions_match_reference(options):
    """Its own trace is admissible and, where the reference's decisions are clear, equal
    to it; under it the values match (check_case's two layers)."""
    check_case(TRITON, build_case(CaseSpec(B=2, H=1, T=12, Dk=3, Dv=4, seed=22, **options)))


@pytest.mark.parametrize("block_dv", [16, 4, 1])
def test_prefill_column_blocks_match_reference(monkeypatch, block_dv):
    """Dv = 20 in 2, 5 or 20 column blocks (a masked last block for 16): every program of
    a stream scores on its own copy of the open state, must reach the same decisions and
    shift its own columns at merges. Odd Dk, gdn (a transition that sums over Dk)."""
    tiled(monkeypatch, block_dv=block_dv)
    spec = CaseSpec(backbone="gdn", B=1, H=1, T=8, Dk=5, Dv=20 if block_dv > 1 else 3,
                    capacity=3, tau=0.3, seed=23)
    check_case(TRITON, build_case(spec))


@pytest.mark.parametrize("tiling", [dict(block_dv=16), dict(slot_block=1),
                                    dict(block_dv=16, slot_block=2)],
                         ids=["two-column-blocks", "one-slot-at-a-time", "two-slots"])
def test_decode_tilings_match_reference(monkeypatch, tiling):
    """The decode kernel from a cache that is full (the token merges) with Dv = 20 in two
    column blocks, and its slot loop one or two slots at a time (the GPU's tiling)."""
    tiled(monkeypatch, **tiling)
    spec = CaseSpec(backbone="gdn", B=1, H=2, T=1, split=6, Dk=5, Dv=20, capacity=3,
                    tau=-float("inf"), seed=23)
    check_case(TRITON, build_case(spec))


@pytest.mark.parametrize("Dk, Dv", [(1, 7), (7, 1), (17, 3)])
def test_odd_head_sizes(Dk, Dv):
    """Head sizes that are not powers of two, and Dk past one 16-row tile."""
    spec = CaseSpec(backbone="mamba2", B=1, H=1, T=8, Dk=Dk, Dv=Dv, capacity=2, tau=0.3,
                    seed=24)
    check_case(TRITON, build_case(spec))


def test_capacity_one_is_the_single_state_backbone():
    """K = 1: only token 0 opens a slot, never a merge, and with lam = 1 o equals
    dla_ref.single."""
    case = build_case(CaseSpec(backbone="gdn", capacity=1, tau=0.0, B=1, H=2, T=9, seed=25))
    case = dataclasses.replace(case, lam=np.ones_like(case.lam))
    check_case(TRITON, case)
    got = run_candidate(TRITON, case)
    assert got.trace.boundary[:, 0].all() and not got.trace.boundary[:, 1:].any()
    assert (got.trace.merged == -1).all()
    single = dla_ref.single(case.q, case.k, case.v, backbone="gdn",
                            log_alpha=case.log_alpha, beta=case.beta)
    np.testing.assert_allclose(got.o.cpu().numpy(), single.o, rtol=1e-4,
                               atol=1e-4 * np.abs(single.o).max())


@pytest.mark.parametrize("tau", [float("inf"), float("-inf")], ids=["+inf", "-inf"])
def test_infinite_thresholds(tau):
    """tau = +inf: only the first token opens a slot; tau = -inf: every token does, and
    once the cache is full every token merges."""
    case = build_case(CaseSpec(tau=tau, capacity=3, B=1, H=2, T=7, seed=26))
    check_case(TRITON, case)
    got = run_candidate(TRITON, case)
    opened = got.trace.boundary.cpu().numpy()
    merged = got.trace.merged.cpu().numpy()
    if tau > 0:
        assert opened[:, 0].all() and not opened[:, 1:].any()
        assert (merged == -1).all()
    else:
        assert opened.all()
        assert (merged[:, :3] == -1).all() and (merged[:, 3:] >= 0).all()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_inputs(dtype):
    """Half-precision inputs: a float32 state, o in the input dtype, the tolerance row
    of (float32, dtype)."""
    case = build_case(CaseSpec(backbone="mamba2", B=1, H=2, T=8, capacity=3, tau=0.3,
                               seed=27))
    check_case(dataclasses.replace(TRITON, dtype=dtype), case)


# --- decode kernel against prefill kernel -------------------------------------------


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("forced", [False, True], ids=["own", "forced"])
def test_decode_loop_equals_prefill(backbone, forced):
    """T calls of one token each (the decode kernel, threading the cache) give what one
    call over the T tokens (the prefill kernel) gives; its own trace is admissible."""
    case = build_case(CaseSpec(backbone=backbone, B=2, H=1, T=7, Dk=3, Dv=5, capacity=3,
                               tau=0.3, forced_trace=forced, seed=28))
    x = tensors(case)
    opts = dict(case.options)
    trace = None if case.trace is None else on_device(case.trace)
    whole = triton_kernels.dla(**x, **opts, trace=trace)

    cache, steps = None, []
    for t in range(7):
        one = None if trace is None else dla_ref.Trace(*(a[:, t:t + 1] for a in trace))
        steps.append(triton_kernels.dla(**tokens(x, t, t + 1), **opts, trace=one,
                                        initial_cache=cache))
        cache = steps[-1].cache
    looped = dla_ref.Result(torch.cat([r.o for r in steps], dim=1), cache,
                            dla_ref.Trace(*(torch.cat(f, dim=1) for f in
                                            zip(*(r.trace for r in steps)))))
    assert_same_run(looped, whole)
    if forced:
        return
    as_given = {name: None if a is None else a.cpu().double().numpy()
                for name, a in x.items()}
    miss = dla_ref.check_trace(**as_given, **opts, trace=dla_ref.Trace(
        *(a.cpu().numpy() for a in whole.trace)), score_tol=1e-3, density_tol=1e-3)
    assert miss is None, str(miss)


def test_initial_cache_split_equals_whole_run():
    """dla(x[:s]) then dla(x[s:], initial_cache=...) equals dla(x), for a split that
    leaves one token (decode) and one that leaves several (prefill)."""
    case = build_case(CaseSpec(backbone="mamba2", B=1, H=2, T=8, capacity=3, tau=0.3,
                               seed=29))
    x, opts = tensors(case), case.options
    whole = triton_kernels.dla(**x, **opts)
    for s in (7, 3):
        head = triton_kernels.dla(**tokens(x, 0, s), **opts)
        tail = triton_kernels.dla(**tokens(x, s, 8), **opts, initial_cache=head.cache)
        joined = dla_ref.Result(torch.cat([head.o, tail.o], dim=1), tail.cache,
                                dla_ref.Trace(*(torch.cat([a, b], dim=1)
                                                for a, b in zip(head.trace, tail.trace))))
        assert_same_run(joined, whole)


# --- the host code ------------------------------------------------------------------


@pytest.mark.parametrize("T", [1, 5], ids=["decode", "prefill"])
def test_initial_cache_is_not_written(T):
    """Both kernels write a new cache and never the caller's, which they read as it is
    when it is float32 and contiguous (as here)."""
    case = build_case(CaseSpec(split=4, T=T, capacity=2, tau=0.3, B=1, H=2, seed=30))
    cache = on_device(case.initial_cache)
    before = [a.clone() for a in cache]
    triton_kernels.dla(**tensors(case), **case.options, initial_cache=cache)
    for a, b in zip(cache, before):
        assert torch.equal(a, b)


@pytest.mark.parametrize("T", [1, 4], ids=["decode", "prefill"])
def test_forced_trace_that_does_not_fit_raises_the_reference_error(T):
    """A forced trace that skips the first boundary: the reference's ValueError, word for
    word, from both entry paths."""
    case = build_case(CaseSpec(T=T, capacity=2, seed=31))
    bad = dla_ref.Trace(np.zeros((1, T, 1)), np.zeros((1, T, 1), dtype=bool),
                        np.full((1, T, 1), -1, dtype=np.int64))
    with pytest.raises(ValueError) as want:
        dla_ref.dla(case.q, case.k, case.v, case.lam, **case.options, trace=bad)
    with pytest.raises(ValueError) as got:
        triton_kernels.dla(**tensors(case), **case.options, trace=on_device(bad))
    assert str(got.value) == str(want.value)


def test_decode_step_takes_one_token():
    """The decode launcher refuses T > 1 rather than reading only the first token."""
    case = build_case(CaseSpec(T=2, seed=32))
    call = host.prepare(**tensors(case), **case.options, backend="triton")
    with pytest.raises(ValueError, match="one token"):
        triton_kernels.decode_step(call)
