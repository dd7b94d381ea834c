"""DLA on CPU torch tensors with a compiled forward and a compiled backward ("numba-autograd").

One ``torch.autograd.Function``: its forward runs numba's compiled scan and keeps a
checkpoint of the cache every C tokens (``kernels.numba_backward.forward``); its backward
runs the compiled adjoint scan under the forward's trace (``kernels.numba_backward.
backward``), the gradient that ``dla_ref.vjp`` defines (docs/spec/gradient.md).

    result = dla(q, k, v, lam, backbone="mamba2", log_alpha=log_alpha)  # tensors with grad
    (result.o * target).sum().backward()      # q.grad, k.grad, v.grad, lam.grad, ...

Differentiable outputs: o and the final cache's S. The rest of the result (n, info, m and
the trace) is marked non-differentiable: the decisions are piecewise constant, and the
scores and J only steer them (the hard gate: no gradient reaches tau).
Gradients reach every input that requires grad (q, k, v, lam, log_alpha, beta and the
initial cache's S), in that input's dtype; the others get None. The state is in the
inputs' dtype, float32 or float64.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import torch

from dla_ref.records import Cache, Result, Trace

from . import host
from .kernels import numba_backward


class Static(NamedTuple):
    """The arguments of a call that are not differentiable tensors."""

    options: dict
    cache_counts: Any  # the initial Cache with S = None (n, info, m), or None
    checkpoint: int | None


def dla(q, k, v, lam=None, *, log_alpha=None, beta=None, initial_cache=None, checkpoint=None,
        **options) -> Result:
    """``dla_ref.dla`` on CPU torch tensors, differentiable through compiled code.

    The arguments, checks and result of ``dla_ref.dla`` (``dtype`` excepted: the state is
    in the inputs' dtype); checkpoint: C for the backward's recompute (default
    ceil(sqrt(T))).
    """
    for name, x in (("q", q), ("k", k), ("v", v), ("lam", lam)):
        if not isinstance(x, torch.Tensor) and not (name == "lam" and x is None):
            raise TypeError(f"{name} must be a torch.Tensor for the numba-autograd backend, "
                            f"got {type(x).__name__}")
    S0, counts = None, None
    if initial_cache is not None:
        if not isinstance(initial_cache, Cache):
            raise TypeError(f"initial_cache must be a dla_ref.Cache, "
                            f"got {type(initial_cache).__name__}")
        S0, counts = initial_cache.S, initial_cache._replace(S=None)
    o, S, n, info, m, scores, boundary, merged = DLAFunction.apply(
        Static(options, counts, checkpoint), q, k, v, lam, log_alpha, beta, S0)
    return Result(o=o, cache=Cache(S, n, info, m), trace=Trace(scores, boundary, merged),
                  backend="numba-autograd")


class DLAFunction(torch.autograd.Function):
    """(static, q, k, v, lam, log_alpha, beta, S0) -> (o, S, n, info, m, scores, boundary,
    merged), forward and backward compiled (kernels.numba_backward)."""

    @staticmethod
    def forward(ctx, static, q, k, v, lam, log_alpha, beta, S0):
        inputs = (q, k, v, lam, log_alpha, beta, S0)
        cache = None if static.cache_counts is None else static.cache_counts._replace(
            S=on_host(S0))
        result, saved = numba_backward.forward(
            *(on_host(x) for x in (q, k, v, lam)), log_alpha=on_host(log_alpha),
            beta=on_host(beta), initial_cache=cache, checkpoint=static.checkpoint,
            **static.options)
        ctx.saved = saved
        ctx.like = tuple(None if x is None else (x.dtype, x.shape) for x in inputs)
        outputs = tuple(torch.from_numpy(np.asarray(x)) for x in
                        (result.o, *result.cache, *result.trace))
        ctx.mark_non_differentiable(*outputs[2:])
        return outputs

    @staticmethod
    def backward(ctx, do, dS, *_not_differentiable):
        grads = numba_backward.backward(ctx.saved, on_host(do), on_host(dS))
        out = [None]  # static
        for needed, grad, like in zip(ctx.needs_input_grad[1:], grads, ctx.like):
            out.append(as_input(grad, *like) if needed and grad is not None else None)
        return tuple(out)


def as_input(grad, dtype, shape):
    """A gradient (NumPy, [B, T, H, ...]) as a tensor of its input's dtype and shape: summed
    over the axes a broadcast input (lam of shape [H, K], ...) was expanded along."""
    grad = torch.from_numpy(np.ascontiguousarray(grad)).to(dtype)
    return grad if grad.shape == shape else grad.sum_to_size(shape)


def on_host(x):
    """A NumPy view of a CPU tensor's values (``host.to_host``); None stays None."""
    return None if x is None else host.to_host(x)
