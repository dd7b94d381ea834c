"""The gradient layer on every backend that declares gradients, and the compiled CPU path.

Written once against the ``backend`` fixture (tests/conftest.py, DLA_BACKENDS): a backend
whose registry entry declares gradients and takes torch tensors (reference/torch, torch,
torch-chunked, numba-autograd) runs ``check_grads`` — its backward under the reference's
trace against ``dla_ref.vjp`` — on the named cases and on Hypothesis-drawn ones; the
others are skipped with the reason. Then the compiled path on its own: torch's gradcheck
in float64, None for inputs that do not require grad, its NumPy entry against ``vjp``,
the dispatch, and the gradient layer catching a wrong backward.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, note, reject, settings

import dla_ref
from dla_backends.testing import NAMED_CASES, CaseSpec, build_case, case_specs
from dla_backends.testing.gradients import (assert_grads_match_reference, check_grads,
                                            gradient_backends, why_no_gradients)

torch = pytest.importorskip("torch", reason="the gradient layer runs torch autograd")


def grads_or_skip(backend, spec):
    why = why_no_gradients(backend)
    if why:
        pytest.skip(f"{backend.label}: {why}")
    try:
        check_grads(backend, build_case(spec))
    except NotImplementedError as exc:
        pytest.skip(f"{backend.label}: not applicable to {spec!r}: {exc}")


@pytest.mark.parametrize("name", NAMED_CASES)
def test_named_case_gradients(backend, name):
    grads_or_skip(backend, NAMED_CASES[name])


@pytest.mark.parametrize("backbone", dla_ref.BACKBONES)
def test_drawn_case_gradients(backend, backbone, examples):
    grads_or_skip(backend, CaseSpec(backbone=backbone))

    @settings(max_examples=examples)
    @given(spec=case_specs(backbone))
    def check(spec):
        try:
            check_grads(backend, build_case(spec))
        except NotImplementedError as exc:
            note(f"not applicable: {exc}")
            reject()

    check()


def test_the_registry_declares_the_differentiable_backends():
    assert {"reference/torch", "torch", "torch-chunked", "numba-autograd"} \
        <= set(gradient_backends())
    assert "numba" not in gradient_backends()  # NumPy arrays: autograd cannot record


# --- the compiled CPU path -----------------------------------------------------------------

pytest.importorskip("numba", reason="the compiled CPU path is built with Numba")
from dla_backends import autograd  # noqa: E402
from dla_backends.kernels import numba_backward  # noqa: E402


def inputs(backbone, K, T=7, B=1, H=2, Dk=3, Dv=2, dtype=torch.float64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.rand(*shape, generator=generator, dtype=dtype)  # noqa: E731
    normal = lambda *shape: torch.randn(*shape, generator=generator, dtype=dtype)  # noqa: E731
    x = dict(q=normal(B, T, H, Dk), k=normal(B, T, H, Dk) / Dk, v=normal(B, T, H, Dv),
             lam=rand(B, T, H, K))
    if backbone != "linear":
        x["log_alpha"] = -rand(B, T, H)
    if backbone == "gdn":
        x["beta"] = rand(B, T, H)
    return x


@pytest.mark.parametrize("backbone", dla_ref.BACKBONES)
@pytest.mark.parametrize("slots", dla_ref.SLOT_ORDERS)
def test_gradcheck_float64(backbone, slots):
    """torch.autograd.gradcheck of the compiled forward and backward, every input (the
    initial cache's S included), under the trace of the unperturbed inputs (the
    decisions are piecewise constant; gradcheck's steps must not flip them)."""
    K, x = 2, inputs(backbone, 2)
    options = dict(backbone=backbone, capacity=K, tau=0.3, slots=slots)
    prefix = dla_ref.dla(**{name: t[:, :3] for name, t in x.items()}, **options).cache
    rest = {name: t[:, 3:] for name, t in x.items()}
    trace = dla_ref.dla(**rest, **options, initial_cache=prefix).trace
    names = list(rest)

    def f(*tensors):
        result = autograd.dla(**dict(zip(names, tensors)), **options, trace=trace,
                              initial_cache=prefix._replace(S=tensors[-1]), checkpoint=2)
        return result.o, result.cache.S

    leaves = [t.clone().requires_grad_(True) for t in (*rest.values(), prefix.S)]
    assert torch.autograd.gradcheck(f, leaves)


def test_inputs_without_grad_get_none_and_the_rest_is_not_differentiable():
    x = inputs("gdn", 3)
    x["q"].requires_grad_(True)
    x["beta"].requires_grad_(True)
    result = autograd.dla(**x, backbone="gdn", capacity=3)
    result.o.sum().backward()
    assert x["q"].grad is not None and x["beta"].grad is not None
    assert all(x[name].grad is None for name in ("k", "v", "lam", "log_alpha"))
    assert not any(t.requires_grad for t in (*result.trace, result.cache.n, result.cache.info))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("backbone", dla_ref.BACKBONES)
def test_numba_vjp_equals_the_reference(backbone, dtype):
    """The compiled adjoint scan (NumPy entry) against dla_ref.vjp, checkpoints 1, 3, T."""
    x = {name: t.numpy().astype(dtype) for name, t in inputs(backbone, 3, T=11).items()}
    trace = dla_ref.dla(**x, backbone=backbone, capacity=3, tau=0.3).trace
    rng = np.random.default_rng(1)
    do = rng.standard_normal((1, 11, 2, 2)).astype(dtype)
    dS = rng.standard_normal((1, 2, 3, 3, 2)).astype(dtype)
    want = dla_ref.vjp(**x, do=do, trace=trace, dcache=dS, backbone=backbone, capacity=3)
    rtol = 1e-12 if dtype == np.float64 else 1e-4
    for C in (1, 3, 11):
        got = numba_backward.vjp(**x, do=do, trace=trace, dcache=dS, backbone=backbone,
                                 capacity=3, checkpoint=C)
        for g, w in zip(got, want):
            assert (g is None) == (w is None)
            if w is not None:
                assert g.dtype == dtype
                np.testing.assert_allclose(g, w, rtol=0, atol=rtol * max(1, np.abs(w).max()))


def test_the_dispatch_routes_requires_grad_cpu_tensors_to_the_compiled_path():
    import dla_backends

    x = inputs("mamba2", 4)
    x["q"].requires_grad_(True)
    assert dla_backends.dla(**x, backbone="mamba2", capacity=4).backend == "numba-autograd"


def test_the_gradient_layer_catches_a_wrong_backward():
    """A backward that returns half of every gradient fails; the right one passes."""
    class Halving(torch.autograd.Function):
        @staticmethod
        def forward(ctx, o):
            return o.clone()

        @staticmethod
        def backward(ctx, do):
            return do * 0.5

    def wrong(q, k, v, lam, **options):
        result = autograd.dla(q, k, v, lam, **options)
        return result._replace(o=Halving.apply(result.o))

    x = inputs("linear", 2, T=6)
    with pytest.raises(AssertionError, match="differs from the reference"):
        assert_grads_match_reference(wrong, **x, capacity=2, tau=0.3)
    assert assert_grads_match_reference(autograd.dla, **x, capacity=2, tau=0.3) <= 1



def test_a_broadcast_lam_gets_a_gradient_of_its_own_shape():
    """lam [H, K] (one weight per head and slot): vjp and the compiled backward sum dlam
    over the axes it was broadcast along, as autograd of dla_ref.dla does."""
    x = inputs("mamba2", 3)
    lam = x.pop("lam")[0, 0].clone().requires_grad_(True)  # [H, K]
    result = autograd.dla(**x, lam=lam, backbone="mamba2", capacity=3, tau=0.3)
    result.o.sum().backward()
    reference = lam.detach().clone().requires_grad_(True)
    dla_ref.dla(**x, lam=reference, backbone="mamba2", capacity=3,
                trace=result.trace).o.sum().backward()
    ours = dla_ref.vjp(**x, lam=lam.detach(), do=torch.ones_like(result.o),
                       trace=result.trace, backbone="mamba2", capacity=3)
    assert lam.grad.shape == ours.dlam.shape == (2, 3)
    torch.testing.assert_close(lam.grad, reference.grad)
    torch.testing.assert_close(ours.dlam, reference.grad)
    assert dla_ref.vjp(**x, lam=None, do=torch.ones_like(result.o), trace=result.trace,
                       backbone="mamba2", capacity=3).dlam is None
