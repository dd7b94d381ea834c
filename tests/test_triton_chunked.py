"""triton-chunked (backends/kernels/triton_chunked.py) against the reference, chunk by chunk.

The differential suite runs it at its default chunk length. Here the chunk length C is
part of the case (C = 1, C dividing T, T not a multiple of C, T < C), with forced traces,
an initial cache, ties and K = 1, through ``dla_backends.testing.check_case`` (the trace
admissible and equal to the reference's where its decisions are clear; under it, outputs,
cache and scores within the float32 tolerance). Its own decisions also equal those of the
Triton backend's recurrent kernel, which decides with the same tile functions. Without
CUDA the kernels run under TRITON_INTERPRET=1 (slow), so the cases are small.
"""

from __future__ import annotations

import functools
import os

import numpy as np
import pytest

import dla_ref

torch = pytest.importorskip("torch", reason="triton-chunked runs on torch tensors")
CUDA = torch.cuda.is_available()
if not CUDA:  # triton reads it when it is imported (tests/conftest.py sets it too)
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton", reason="triton not installed")

from dla_backends import registry  # noqa: E402 -- after the environment is set
from dla_backends.testing import Candidate, CaseSpec, build_case, check_case  # noqa: E402

available, why = registry.get("triton-chunked").available()
if not available:
    pytest.skip(f"triton-chunked unavailable: {why}", allow_module_level=True)

from dla_backends.kernels import triton_chunked, triton_kernels  # noqa: E402

DEVICE = "cuda" if CUDA else "cpu"


def chunked(chunk: int, dtype: str = "float32") -> Candidate:
    """triton-chunked with chunk length ``chunk``, fed ``dtype`` inputs on DEVICE."""
    return Candidate(label=f"triton-chunked(chunk={chunk})@{DEVICE}",
                     load=lambda: functools.partial(triton_chunked.dla, chunk=chunk),
                     namespace="torch", device=DEVICE, dtype=dtype, state_dtype="float32",
                     rebuild=f"chunked({chunk}, {dtype!r})  # tests/test_triton_chunked.py")


@pytest.mark.parametrize("chunk, T", [(1, 5), (4, 8), (3, 8), (16, 6)],
                         ids=["C=1", "T=2C", "T not a multiple of C", "T<C"])
@pytest.mark.parametrize("backbone", ["linear", "mamba2"])
def test_chunk_edges(chunk, T, backbone):
    check_case(chunked(chunk), build_case(CaseSpec(T=T, B=1, H=2, capacity=3, tau=0.3,
                                                   backbone=backbone, seed=chunk + T)))


@pytest.mark.parametrize("spec", [
    CaseSpec(forced_trace=True, capacity=3, T=9, B=1, H=2, seed=7),
    CaseSpec(split=5, capacity=3, T=9, tau=0.3, seed=8, backbone="mamba2"),
    CaseSpec(tokens="repeated", tau=-np.inf, capacity=3, T=8, seed=4),
    CaseSpec(capacity=1, T=7, tau=0.0, backbone="mamba2", decay="extreme"),
    CaseSpec(slots="newest-first", score="state", normalize=False, T=9, capacity=2,
             tau=0.1, backbone="mamba2", decay="mixed", seed=3),
], ids=["forced", "initial cache", "ties", "K=1", "newest-first state"])
def test_named_cases(spec):
    check_case(chunked(4), build_case(spec))


@pytest.mark.parametrize("dtype", ["float64", "bfloat16"])
def test_other_input_dtypes(dtype):
    """A float32 state whatever the inputs; o in the inputs' dtype."""
    check_case(chunked(4, dtype), build_case(CaseSpec(backbone="mamba2", B=1, H=2, T=8,
                                                      capacity=3, tau=0.3, seed=27)))


def test_decides_like_the_recurrent_triton_kernel():
    """Both decide with the same tile functions on the same float32 open state."""
    case = build_case(CaseSpec(backbone="mamba2", B=1, H=2, T=10, capacity=3, tau=0.3,
                               seed=11))
    x = {name: None if getattr(case, name) is None else
         torch.tensor(getattr(case, name), dtype=torch.float32, device=DEVICE)
         for name in ("q", "k", "v", "lam", "log_alpha", "beta")}
    got = triton_chunked.dla(**x, **case.options, chunk=4).trace
    want = triton_kernels.dla(**x, **case.options).trace
    assert torch.equal(got.boundary, want.boundary) and torch.equal(got.merged, want.merged)
    torch.testing.assert_close(got.scores, want.scores, rtol=1e-5, atol=1e-6)


def test_gdn_is_not_implemented():
    x = torch.zeros(1, 2, 1, 2)
    with pytest.raises(NotImplementedError, match="gdn"):
        triton_chunked.dla(x, x, x, torch.ones(1, 2, 1, 2), backbone="gdn", capacity=2,
                           log_alpha=torch.zeros(1, 2, 1), beta=torch.zeros(1, 2, 1))


@pytest.mark.parametrize("chunk", [0, 2.0, True])
def test_chunk_must_be_a_positive_int(chunk):
    x = torch.zeros(1, 2, 1, 2)
    with pytest.raises(ValueError, match="chunk"):
        triton_chunked.dla(x, x, x, torch.ones(1, 2, 1, 2), capacity=2, chunk=chunk)


def test_the_initial_cache_is_not_written():
    case = build_case(CaseSpec(split=4, T=8, capacity=3, tau=0.3, backbone="mamba2"))
    x = {name: None if getattr(case, name) is None else torch.from_numpy(getattr(case, name))
         for name in ("q", "k", "v", "lam", "log_alpha")}
    cache = dla_ref.Cache(*(torch.from_numpy(a.copy()) for a in case.initial_cache))
    triton_chunked.dla(**x, **case.options, initial_cache=cache, chunk=4)
    for got, want in zip(cache, case.initial_cache):
        assert np.array_equal(got.numpy(), want)
