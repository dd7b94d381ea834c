"""torch-chunked (backends/kernels/torch_chunked.py) against the reference, chunk by chunk.

The differential suite runs torch-chunked at its default chunk length, where its
short cases fit in one chunk. Here the chunk length C is part of the case: C = 1
(every token its own chunk), C dividing T, T not a multiple of C, T < C, and long
streams whose open slots and merges straddle chunk boundaries. Each case goes
through ``dla_backends.testing.check_case``: the trace is admissible and equals
the reference's where its decisions are clear, and under that trace outputs,
cache and scores match ``dla_ref.dla`` within the tolerance of the state dtype.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import dla_ref
from dla_backends.testing import Candidate, Case, CaseSpec, build_case, case_specs, check_case

torch = pytest.importorskip("torch", reason="torch-chunked needs torch")
from dla_backends.kernels import torch_chunked  # noqa: E402

CHUNKS = (1, 2, 3, 4, 5, 7, 64)


def chunked(chunk: int, dtype: str = "float64") -> Candidate:
    """torch-chunked with chunk length ``chunk``, fed ``dtype`` inputs on the CPU."""
    return Candidate(label=f"torch-chunked(chunk={chunk})@cpu",
                     load=lambda: functools.partial(torch_chunked.dla, chunk=chunk),
                     namespace="torch", device="cpu", dtype=dtype, state_dtype=dtype,
                     rebuild=f"chunked({chunk}, {dtype!r})  # tests/test_torch_chunked.py")


@pytest.mark.parametrize("chunk, T", [(1, 9), (4, 12), (5, 12), (64, 12), (3, 1)],
                         ids=["C=1", "T=3C", "T not a multiple of C", "T<C", "T=1"])
@pytest.mark.parametrize("backbone", ["linear", "mamba2"])
def test_chunk_edges(chunk, T, backbone):
    check_case(chunked(chunk), build_case(CaseSpec(T=T, B=2, H=2, capacity=3, tau=0.3,
                                                   backbone=backbone, seed=chunk + T)))


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("spec", [
    CaseSpec(forced_trace=True, capacity=3, T=16, B=2, H=2, seed=7),
    CaseSpec(split=7, capacity=3, T=13, tau=0.3, seed=8, backbone="mamba2"),
    CaseSpec(tokens="repeated", tau=-np.inf, capacity=3, T=12, seed=4),
    CaseSpec(capacity=1, T=10, tau=0.0, backbone="mamba2", decay="extreme"),
    CaseSpec(slots="newest-first", score="state", normalize=False, T=14, capacity=2,
             tau=0.1, backbone="mamba2", decay="mixed", seed=3),
], ids=["forced", "initial cache", "ties", "K=1", "newest-first state"])
def test_named_cases_across_chunks(spec, dtype):
    for chunk in (1, 3, 5):
        check_case(chunked(chunk, dtype), build_case(spec))


def piecewise_stream(seed, B=1, T=160, H=2, D=6, segment=12, K=5):
    """q, k, v, lam for piecewise-stationary streams: boundaries every ~segment tokens."""
    rng = np.random.default_rng(seed)
    cuts = np.cumsum(rng.integers(segment // 2, 2 * segment, size=T))
    seg = np.searchsorted(cuts, np.arange(T), side="right")
    directions = lambda: rng.standard_normal((B, seg.max() + 1, H, D))[:, seg]  # noqa: E731
    k = rng.standard_normal((B, T, H, D)) * 0.1 + directions()
    v = rng.standard_normal((B, T, H, D)) * 0.1 + directions()
    return dict(q=rng.standard_normal((B, T, H, D)), k=k, v=v, lam=rng.random((B, T, H, K)))


@pytest.mark.parametrize("chunk, block", [(7, 1024), (16, 1024), (50, 1024), (7, 21), (4, 8)])
@pytest.mark.parametrize("backbone", ["linear", "mamba2"])
def test_long_streams_straddle_chunks(chunk, block, backbone, monkeypatch):
    """Open slots span several chunks (and blocks of chunks: BLOCK_TOKENS) and the cache
    overflows (merges) mid-chunk."""
    monkeypatch.setattr(torch_chunked, "BLOCK_TOKENS", block)
    rng = np.random.default_rng(chunk)
    arrays = piecewise_stream(chunk)
    log_alpha = -0.1 * rng.random(arrays["q"].shape[:3]) if backbone == "mamba2" else None

    case = Case(**arrays, log_alpha=log_alpha,
                options=dict(backbone=backbone, tau=0.6, capacity=5, score="token",
                             normalize=True, slots="oldest-first"))
    reference = dla_ref.dla(**case.arguments())
    assert int(np.sum(reference.trace.merged >= 0)) > 4  # the case has teeth: merges happen
    check_case(chunked(chunk), case)


@settings(deadline=None)
@given(spec=case_specs("linear") | case_specs("mamba2"), chunk=st.sampled_from(CHUNKS),
       dtype=st.sampled_from(["float64", "float32"]))
def test_drawn_cases_any_chunk(spec, chunk, dtype):
    check_case(chunked(chunk, dtype), build_case(spec))


def test_gdn_is_not_applicable():
    case = build_case(CaseSpec(backbone="gdn"))
    with pytest.raises(NotImplementedError, match="gdn"):
        check_case(chunked(4), case)


def test_forced_trace_that_does_not_fit_raises_the_reference_error():
    """A merge forced while the cache is not full: the reference's own ValueError."""
    case = build_case(CaseSpec(T=4, capacity=3))
    boundary = np.ones((1, 4, 1), dtype=bool)
    merged = np.array([-1, 0, -1, -1])[None, :, None]
    trace = dla_ref.Trace(np.zeros((1, 4, 1)), boundary, merged)
    arrays = {name: torch.from_numpy(getattr(case, name)) for name in ("q", "k", "v", "lam")}
    with pytest.raises(ValueError) as want:
        dla_ref.dla(**{**case.arguments(), "trace": trace})
    torch_trace = dla_ref.Trace(*(torch.from_numpy(x) for x in trace))
    with pytest.raises(ValueError) as got:
        torch_chunked.dla(**arrays, capacity=3, trace=torch_trace, chunk=2)
    assert str(got.value) == str(want.value)


@pytest.mark.parametrize("chunk", [0, 2.0, True])
def test_chunk_must_be_a_positive_int(chunk):
    case = build_case(CaseSpec())
    arrays = {name: torch.from_numpy(getattr(case, name)) for name in ("q", "k", "v", "lam")}
    with pytest.raises(ValueError, match="chunk"):
        torch_chunked.dla(**arrays, capacity=4, chunk=chunk)


def test_gradients_match_the_reference_under_a_forced_trace():
    """Phase 2 is differentiable: d(sum o + sum S)/d inputs equal the reference's
    (dla_ref on float64 torch tensors) when both replay the same trace."""
    rng = np.random.default_rng(0)
    B, T, H, D, K = 1, 11, 2, 3, 3
    shapes = dict(q=(B, T, H, D), k=(B, T, H, D), v=(B, T, H, D), lam=(B, T, H, K),
                  log_alpha=(B, T, H))
    values = {name: rng.standard_normal(shape) for name, shape in shapes.items()}
    values["lam"], values["log_alpha"] = np.abs(values["lam"]), -np.abs(values["log_alpha"])
    trace = dla_ref.dla(**values, backbone="mamba2", capacity=K, tau=0.3).trace
    assert int(np.sum(trace.merged >= 0)) > 0

    def gradients(fn, **extra):
        leaves = {name: torch.tensor(x, requires_grad=True) for name, x in values.items()}
        forced = dla_ref.Trace(*(torch.from_numpy(x) for x in trace))
        result = fn(**leaves, backbone="mamba2", capacity=K, tau=0.3, trace=forced, **extra)
        (result.o.sum() + result.cache.S.sum()).backward()
        return {name: leaf.grad.numpy() for name, leaf in leaves.items()}

    want = gradients(dla_ref.dla)
    got = gradients(torch_chunked.dla, chunk=4)
    for name in shapes:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-9, atol=1e-12, err_msg=name)


@pytest.mark.parametrize("T, chunk", [(1, 4), (7, 4), (37, 8), (64, 16), (40, 1), (33, 64)])
@pytest.mark.parametrize("backbone", ["linear", "mamba2"])
def test_loglinear_matches_the_reference(T, chunk, backbone, monkeypatch):
    """The chunked Log-Linear (the bench's baseline) equals dla_ref.loglinear."""
    monkeypatch.setattr(torch_chunked, "BLOCK_TOKENS", 2 * chunk)  # several blocks
    rng = np.random.default_rng(T * chunk)
    B, H, D = 2, 2, 3
    arrays = {name: rng.standard_normal((B, T, H, D)) for name in ("q", "k", "v")}
    arrays["lam"] = rng.random((B, T, H, dla_ref.fenwick_levels(T) + 1))
    log_alpha = -2 * rng.random((B, T, H)) if backbone == "mamba2" else None
    want = dla_ref.loglinear(**arrays, backbone=backbone, log_alpha=log_alpha)
    native = {name: torch.from_numpy(x) for name, x in arrays.items()}
    decay = None if log_alpha is None else torch.from_numpy(log_alpha)
    got = torch_chunked.loglinear(**native, backbone=backbone, chunk=chunk, log_alpha=decay)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-10, atol=1e-12)


def test_loglinear_needs_a_power_of_two_chunk():
    x = torch.zeros(1, 4, 1, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="power of two"):
        torch_chunked.loglinear(x, x, x, torch.zeros(1, 4, 1, 3, dtype=torch.float64), chunk=3)


def test_the_initial_cache_is_not_written():
    """The states are advanced in place: on a copy, never on the caller's cache."""
    case = build_case(CaseSpec(split=5, T=9, capacity=3, tau=0.3, backbone="mamba2"))
    native = chunked(2).load
    arrays = {name: None if getattr(case, name) is None else torch.from_numpy(getattr(case, name))
              for name in ("q", "k", "v", "lam", "log_alpha")}
    cache = dla_ref.Cache(*(torch.from_numpy(x.copy()) for x in case.initial_cache))
    native()(**arrays, **case.options, initial_cache=cache)
    for got, want in zip(cache, case.initial_cache):
        assert np.array_equal(got.numpy(), want)
