"""What is specific to the torch backend (dla_backends.kernels.torch_scan): autograd, dtypes,
devices, memory layouts, and agreement with the reference on seeded cases.

The general differential suite (tests/test_differential.py) runs "torch" through every
backend-independent check; here the expected side is always dla_ref (float64), run on
the torch run's own trace, with the tolerances of dla_backends.testing.
"""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest

import dla_ref
from dla_backends.testing import tolerance

torch = pytest.importorskip("torch", reason="torch not installed")
from dla_backends.kernels.torch_scan import dla  # noqa: E402 -- after the torch check

BACKBONES = ("linear", "mamba2", "gdn")
cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                          reason="no CUDA device (the GPU script runs these)")


def make_case(backbone, seed=0, B=2, T=14, H=2, Dk=3, Dv=4, K=3, dtype=torch.float64,
              device="cpu"):
    """Seeded inputs as torch tensors: (arrays for dla's first four arguments, gates)."""
    rng = np.random.default_rng(seed)
    x = dict(q=rng.standard_normal((B, T, H, Dk)), k=rng.standard_normal((B, T, H, Dk)),
             v=rng.standard_normal((B, T, H, Dv)), lam=rng.random((B, T, H, K)))
    gates = {}
    if backbone != "linear":
        gates["log_alpha"] = -rng.random((B, T, H))
    if backbone == "gdn":
        gates["beta"] = rng.random((B, T, H))
    to = lambda a: torch.tensor(a, dtype=dtype, device=device)  # noqa: E731
    return {n: to(a) for n, a in x.items()}, {n: to(a) for n, a in gates.items()}


def as_float64(arrays):
    return {n: a.detach().cpu().double() for n, a in arrays.items()}


def compared(result):
    """The float fields of a Result that the agreement check compares."""
    return dict(o=result.o, S=result.cache.S, info=result.cache.info,
                scores=result.trace.scores)


def assert_agrees_with_reference(got, x, gates, opts, initial_cache=None):
    """The reference replaying ``got.trace`` gives the same outputs, cache and scores
    (within the tolerance row of the run's state and input dtypes), and every decision
    of the trace is admissible."""
    state, inputs = (str(t.dtype).split(".")[-1] for t in (got.cache.S, x["q"]))
    tol = tolerance(state, inputs)
    x64, gates64 = as_float64(x), as_float64(gates)
    if initial_cache is not None:
        initial_cache = dla_ref.Cache(*(a.detach().cpu() for a in initial_cache))
    trace = dla_ref.Trace(*(a.cpu() for a in got.trace))
    want = dla_ref.dla(**x64, **gates64, **opts, trace=trace, initial_cache=initial_cache)
    for name, a in compared(got).items():
        b = compared(want)[name]
        if name in ("o", "S"):
            budget = tol.atol + tol.rtol * float(b.abs().max())
        else:  # the decision tolerance, relative where I_t or J exceed 1
            budget = tol.decision * max(1.0, float(b.abs().max()))
        err = float((a.detach().cpu().double() - b).abs().max())
        assert err <= budget, f"{name}: max error {err:.3g} > budget {budget:.3g}"
    for name in ("n", "m"):
        assert torch.equal(getattr(got.cache, name).cpu(), getattr(want.cache, name))
    miss = dla_ref.check_trace(**x64, **gates64, **opts, trace=trace,
                               initial_cache=initial_cache, score_tol=tol.decision,
                               density_tol=tol.decision)
    assert miss is None, str(miss)


# Each with a threshold that gives absorbs and merges on these random inputs.
OPTIONS = [
    dict(tau=1.4),
    dict(tau=1.4, slots="newest-first"),
    dict(tau=0.4, score="state"),
    dict(tau=1.2, normalize=False),
    dict(tau=0.6, score="state", normalize=False, slots="newest-first"),
]


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("options", OPTIONS,
                         ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_agrees_with_the_reference(backbone, options, dtype):
    x, gates = make_case(backbone, seed=1, dtype=dtype)
    opts = dict(backbone=backbone, capacity=3, **options)
    got = dla(**x, **gates, **opts)
    absorbed = ~got.trace.boundary[:, 1:]
    assert bool(absorbed.any()) and bool((got.trace.merged >= 0).any()), \
        "the case should exercise absorbs and merges"
    assert_agrees_with_reference(got, x, gates, opts)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_decides_like_the_reference_in_float64(backbone):
    """Away from ties the float64 trace is the reference's."""
    x, gates = make_case(backbone, seed=7, T=20, K=4)
    opts = dict(backbone=backbone, capacity=4, tau=1.2)
    got = dla(**x, **gates, **opts)
    want = dla_ref.dla(**x, **gates, **opts)
    assert float((want.trace.scores - 1.2).abs().min()) > 1e-6, "a score at tau: not a clear case"
    assert torch.equal(got.trace.boundary, want.trace.boundary)
    assert torch.equal(got.trace.merged, want.trace.merged)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_continues_from_an_initial_cache(backbone):
    """dla(x[:t]) then dla(x[t:], initial_cache) equals dla(x), and the second half
    agrees with the reference started from the same cache."""
    x, gates = make_case(backbone, seed=3, T=12)
    opts = dict(backbone=backbone, capacity=3, tau=1.2)
    whole = dla(**x, **gates, **opts)
    half = lambda d, part: {n: a[:, part] for n, a in d.items()}  # noqa: E731
    first = dla(**half(x, slice(0, 5)), **half(gates, slice(0, 5)), **opts)
    second = dla(**half(x, slice(5, None)), **half(gates, slice(5, None)), **opts,
                 initial_cache=first.cache)
    torch.testing.assert_close(torch.cat([first.o, second.o], dim=1), whole.o)
    for a, b in zip(second.cache, whole.cache):
        torch.testing.assert_close(a, b)
    assert_agrees_with_reference(second, half(x, slice(5, None)), half(gates, slice(5, None)),
                                 opts, initial_cache=first.cache)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_capacity_one_is_the_single_state_backbone(backbone):
    x, gates = make_case(backbone, seed=5, K=1)
    got = dla(**x, **gates, backbone=backbone, capacity=1, tau=-float("inf"))
    assert got.trace.boundary.sum() == x["q"].shape[0] * x["q"].shape[2]  # t = 0 only
    assert bool((got.trace.merged == -1).all())
    want = dla_ref.single(x["q"], x["k"], x["v"], backbone=backbone, **gates)
    torch.testing.assert_close(got.o, want.o * x["lam"])  # o_t = lambda_t[0] q_t^T S_t


def forced_trace(B, H):
    """A hand-made trace for K = 3 and T = 6 that absorbs, merges the open pair
    (j = K-2) and the oldest pair (j = 0):  b = 1 1 1 1 0 1,  j = . . . 1 . 0."""
    b = torch.tensor([1, 1, 1, 1, 0, 1], dtype=torch.bool)
    j = torch.tensor([-1, -1, -1, 1, -1, 0])
    expand = lambda a: a[None, :, None].expand(B, 6, H).clone()  # noqa: E731
    return dla_ref.Trace(torch.zeros(B, 6, H, dtype=torch.float64), expand(b), expand(j))


@pytest.mark.parametrize("backbone,slots", [("linear", "oldest-first"),
                                            ("mamba2", "newest-first"),
                                            ("gdn", "oldest-first"), ("gdn", "newest-first")])
def test_gradients_under_a_forced_trace(backbone, slots):
    """torch.autograd.gradcheck of o and the final S w.r.t. every input, in float64."""
    x, gates = make_case(backbone, seed=11, B=1, T=6, H=1, Dk=2, Dv=3, K=3)
    names = list(x) + list(gates)
    trace = forced_trace(1, 1)
    if "log_alpha" in gates:  # keep log_alpha <= 0 under gradcheck's perturbations
        gates["log_alpha"] = gates["log_alpha"] - 0.1

    def f(*arrays):
        given = dict(zip(names, arrays))
        run = dla(**given, backbone=backbone, capacity=3, slots=slots, trace=trace)
        return run.o, run.cache.S

    inputs = tuple(a.clone().requires_grad_(True) for a in [*x.values(), *gates.values()])
    assert torch.autograd.gradcheck(f, inputs)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_recording_autograd_does_not_change_the_result(backbone):
    """With inputs that require grad the scan writes into fresh states instead of in
    place; both give the same numbers, and the gradients reach every input."""
    x, gates = make_case(backbone, seed=2)
    opts = dict(backbone=backbone, capacity=3, tau=1.2)
    plain = dla(**x, **gates, **opts)
    leaves = {n: a.clone().requires_grad_(True) for n, a in {**x, **gates}.items()}
    tracked = dla(**leaves, **opts)
    torch.testing.assert_close(tracked.o.detach(), plain.o, rtol=0, atol=0)
    torch.testing.assert_close(tracked.cache.S.detach(), plain.cache.S, rtol=0, atol=0)
    (tracked.o.sum() + tracked.cache.S.sum()).backward()
    for name, leaf in leaves.items():
        assert leaf.grad is not None and bool(leaf.grad.abs().sum() > 0), name


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16],
                         ids=["float16", "bfloat16"])
def test_half_precision_inputs_keep_a_float32_state(dtype):
    x, gates = make_case("mamba2", seed=4, dtype=dtype)
    opts = dict(backbone="mamba2", capacity=3, tau=1.2)
    got = dla(**x, **gates, **opts)
    assert got.o.dtype == dtype
    assert got.cache.S.dtype == got.cache.info.dtype == got.trace.scores.dtype == torch.float32
    assert got.cache.n.dtype == got.cache.m.dtype == got.trace.merged.dtype == torch.int64
    assert got.trace.boundary.dtype == torch.bool
    assert_agrees_with_reference(got, x, gates, opts)


def test_non_contiguous_inputs_give_the_contiguous_result():
    x, gates = make_case("gdn", seed=6, T=10)
    opts = dict(backbone="gdn", capacity=3, tau=1.2)
    want = dla(**x, **gates, **opts)
    # the same values behind other strides: stored as [B, H, T, ...], v every other entry
    strided = {n: a.transpose(1, 2).contiguous().transpose(1, 2)
               for n, a in {**x, **gates}.items()}
    strided["v"] = torch.stack([x["v"], torch.zeros_like(x["v"])], dim=-1)[..., 0]
    assert not any(a.is_contiguous() for a in strided.values())
    got = dla(**strided, **opts)
    for a, b in zip([got.o, *got.cache, *got.trace], [want.o, *want.cache, *want.trace]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_trace_that_does_not_fit_raises_the_reference_error():
    x, gates = make_case("linear", seed=1, B=1, T=6, H=2)
    trace = forced_trace(1, 2)
    bad = trace._replace(merged=trace.merged.clone())
    bad.merged[0, 4, 1] = 0  # a merge at a token that does not open a slot
    with pytest.raises(ValueError) as reference:
        dla_ref.dla(**x, capacity=3, trace=bad)
    with pytest.raises(ValueError, match=re.escape(str(reference.value))):
        dla(**x, capacity=3, trace=bad)


def test_outputs_stay_on_the_cpu_and_inputs_are_not_written():
    x, gates = make_case("gdn", seed=8)
    before = {n: a.clone() for n, a in {**x, **gates}.items()}
    first = dla(**x, **gates, backbone="gdn", capacity=3)
    cache = dla_ref.Cache(*(a.clone() for a in first.cache))
    dla(**x, **gates, backbone="gdn", capacity=3, initial_cache=first.cache)
    for a in [first.o, *first.cache, *first.trace]:
        assert a.device == x["q"].device
    for n, a in {**x, **gates}.items():
        assert torch.equal(a, before[n]), n
    for a, b in zip(first.cache, cache):
        assert torch.equal(a, b)


@cuda
@pytest.mark.parametrize("backbone", BACKBONES)
def test_runs_unchanged_on_cuda(backbone):
    """On CUDA tensors: results on the device that agree with the reference, a forced
    replay and a continuation from a CUDA cache, and gradients that reach the inputs."""
    x, gates = make_case(backbone, seed=9, dtype=torch.float32, device="cuda")
    opts = dict(backbone=backbone, capacity=3, tau=1.2)
    got = dla(**x, **gates, **opts)
    for a in [got.o, *got.cache, *got.trace]:
        assert a.device.type == "cuda"
    assert_agrees_with_reference(got, x, gates, opts)
    torch.testing.assert_close(dla(**x, **gates, **opts, trace=got.trace).o, got.o)
    more = dla(**x, **gates, **opts, initial_cache=got.cache)
    assert_agrees_with_reference(more, x, gates, opts, initial_cache=got.cache)
    leaves = {n: a.clone().requires_grad_(True) for n, a in {**x, **gates}.items()}
    dla(**leaves, **opts, trace=got.trace).o.sum().backward()
    assert all(bool(leaf.grad.abs().sum() > 0) for leaf in leaves.values())


def test_importing_the_backend_does_not_import_torch():
    code = ("import sys, dla_backends, dla_backends.kernels.torch_scan; "
            "sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
