"""The gradient layer: a candidate's backward pass against ``dla_ref.vjp``.

Under a fixed trace DLA is a polynomial in its inputs, and ``dla_ref.vjp`` is its
gradient (docs/spec/gradient.md). ``check_grads`` runs a candidate forward under the
reference's trace on the case (forced, so that the two compute the same function), takes
L = <do, o> + <dS, S_final> for seeded random adjoints do and dS, runs the candidate's
backward (torch autograd: ``L.backward()``) and compares the gradient of every input
that requires grad — q, k, v, lam, log_alpha, beta and the initial cache's S — with
``vjp``'s, using the forward layer's tolerance table and reproducer printing.
``assert_grads_match_reference`` does so for any callable and its own tensors.

The initial cache's S is compared on its used slots only: the unused slots hold zero by
definition, ``vjp`` gives them no gradient, and autograd through a kernel may (it is the
derivative along a direction that leaves the valid caches).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import numpy as np

import dla_ref

from .. import registry
from .backends import BACKENDS, Candidate, candidate_for
from .cases import TOKEN_INPUTS, Case
from .layers import case_from_arrays
from .tolerances import Context, assert_close, tolerance


class GradientContext(Context):
    """A failure of the gradient layer: its reproducer reruns ``check_grads``."""

    def reproducer(self) -> str:
        return (super().reproducer().replace("check_case(", "check_grads(")
                .replace("runs it and dla_ref.dla", "runs its backward and dla_ref.vjp"))


def gradient_backends() -> tuple[str, ...]:
    """The test backends (``BACKENDS`` names) whose implementation declares gradients
    in the registry and takes torch tensors: what ``check_grads`` can run."""
    return tuple(name for name, (implementation, namespace) in BACKENDS.items()
                 if namespace == "torch" and registry.get(implementation).gradients)


def why_no_gradients(candidate: Candidate) -> str:
    """Why the gradient layer cannot check ``candidate`` ("" if it can)."""
    if candidate.namespace != "torch":
        return f"its arrays are {candidate.namespace}; gradients are taken by torch autograd"
    if candidate.implementation is not None \
            and not registry.get(candidate.implementation).gradients:
        return f"{candidate.implementation} declares no gradients in the registry"
    return ""


def check_grads(candidate: Candidate, case: Case, seed: int = 0) -> float:
    """Run the candidate's forward and backward under the reference's trace; compare.

    The reference sees the inputs as the candidate received them (rounded to its
    dtype); the trace is the case's forced one, else the reference's own on those
    inputs. Returns the largest share of a tolerance budget used; AssertionError with
    a reproducer on a failure (a gradient missing, of the wrong shape, namespace or
    device, or too far from ``dla_ref.vjp``'s); NotImplementedError propagates (the
    candidate does not support the case's options).
    """
    why = why_no_gradients(candidate)
    if why:
        raise ValueError(f"check_grads cannot check {candidate.label}: {why}")
    given = case.as_given_to(candidate)
    if given.trace is None:
        given = replace(given, trace=dla_ref.dla(**given.arguments()).trace)
    context = GradientContext(candidate, given)
    rng = np.random.default_rng(seed)
    B, T, H = given.shape
    K, Dk, Dv = given.options["capacity"], given.q.shape[3], given.v.shape[3]
    do = rng.standard_normal((B, T, H, Dv))
    dS = rng.standard_normal((B, H, K, Dk, Dv))
    got = candidate_gradients(candidate, given, do, dS, context)
    want = dla_ref.vjp(**given.arguments(), do=do, dcache=dS)
    return compare(candidate, given, got, want, context)


def candidate_gradients(candidate: Candidate, case: Case, do, dS, context) -> dict:
    """The gradients of L = <do, o> + <dS, S_final> that reach the candidate's leaves.

    Every floating token input and the initial cache's S are fresh leaf tensors that
    require grad. Returns {input name (or "initial_cache.S"): its .grad}; a leaf that no
    gradient reached fails.
    """
    import torch

    args = case.native(candidate)
    leaves = {name: args[name].detach().requires_grad_(True) for name in TOKEN_INPUTS
              if args[name] is not None}
    args.update(leaves)
    if args["initial_cache"] is not None:
        S = args["initial_cache"].S.detach().requires_grad_(True)
        leaves["initial_cache.S"] = S
        args["initial_cache"] = args["initial_cache"]._replace(S=S)
    try:
        result = candidate.load()(**args)
    except NotImplementedError:
        raise
    except Exception as exc:  # valid input: any other exception is a failure
        context.fail(f"raised {type(exc).__name__}: {exc}")
    like = lambda x, ref: torch.as_tensor(x, dtype=ref.dtype, device=ref.device)  # noqa: E731
    loss = (result.o * like(do, result.o)).sum() + (result.cache.S * like(dS, result.cache.S)).sum()
    try:
        loss.backward()
    except RuntimeError as exc:
        context.fail(f"its outputs carry no gradient ({exc})")
    missing = [name for name, leaf in leaves.items() if leaf.grad is None]
    if missing:
        context.fail(f"no gradient reached {', '.join(missing)}")
    return {name: leaf.grad for name, leaf in leaves.items()}


def compare(candidate: Candidate, case: Case, got: dict, want: dla_ref.Gradients,
            context) -> float:
    """Each gradient within the values tolerance of the candidate's row (atol + rtol
    max |want| over the array); the initial cache's S on its used slots."""
    state = candidate.state_dtype or candidate.dtype
    tol = tolerance(state, candidate.dtype)
    expected = {"q": want.dq, "k": want.dk, "v": want.dv, "lam": want.dlam,
                "log_alpha": want.dlog_alpha, "beta": want.dbeta,
                "initial_cache.S": want.dinitial_S}
    shares = []
    for name, grad in got.items():
        wanted = expected[name]
        if name == "initial_cache.S":
            used = np.arange(wanted.shape[2])[None, None, :] < case.initial_cache.m[..., None]
            wanted = np.where(used[..., None, None], wanted, 0.0)
            grad = grad * used_like(grad, used[..., None, None])
        budget = tol.atol + tol.rtol * (np.max(np.abs(wanted)) if wanted.size else 0)
        shares.append(assert_close(grad, wanted, budget, f"d{name}", context))
    return max(shares, default=0.0)


def used_like(x, mask: np.ndarray):
    """The NumPy bool ``mask`` as a tensor of x's dtype on x's device (broadcastable to x
    when shapes agree; a wrong shape is left for ``assert_close`` to report)."""
    import torch

    if tuple(x.shape)[:3] != mask.shape[:3]:
        return 1
    return torch.as_tensor(mask, dtype=x.dtype, device=x.device)


def assert_grads_match_reference(fn: Callable, q, k, v, lam, *, state_dtype: str | None = None,
                                 seed: int = 0, **options) -> float:
    """Check the backward pass of any callable with the dla signature against ``dla_ref.vjp``.

    q, k, v, lam (and log_alpha, beta, trace, initial_cache in ``options``) are torch
    tensors as the callable takes them; ``options`` are the keyword arguments of
    ``dla_ref.dla``; ``state_dtype`` as in ``assert_matches_reference``; ``seed`` draws
    the adjoints do and dS. Returns the largest share of a tolerance budget used;
    AssertionError with a reproducer on failure.
    """
    case = case_from_arrays(q, k, v, lam, options)
    return check_grads(candidate_for(fn, q, state_dtype), case, seed)

