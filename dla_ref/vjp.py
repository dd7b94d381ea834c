"""The gradient of DLA under a fixed trace: the reverse scan of the step's adjoints.

The decisions (b_t, j) are piecewise constant in the inputs and carry no gradient.
Under a fixed trace the forward pass is a polynomial in q, k, v, lambda, alpha =
exp(log alpha), beta and the initial cache, and ``vjp`` returns its vector-Jacobian
product: given do = dL/do (and optionally dL/d final cache), the adjoint of every
input. It runs ``adjoint.step_adjoint`` from t = T-1 down to 0 on the states of the
forward pass, which it recomputes from checkpoints instead of keeping T caches
(docs/spec/gradient.md):

    forward, once:      cache(0), cache(C), cache(2C), ...     kept (T/C caches)
    backward, chunk c:  cache(cC) ... cache(cC + C)             recomputed (C caches)
                        step_adjoint for t = cC + C - 1 ... cC

so the memory is O(T/C K Dk Dv + C K Dk Dv) per stream; C = ceil(sqrt(T)) by default.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

from ._xp import array_namespace
from .adjoint import step_adjoint
from .records import Tokens
from .recurrent import forced_decision, from_streams, prepare, to_streams, trace_to_streams
from .step import step
from .validation import check_float_array, check_options, check_trace_shape


class Gradients(NamedTuple):
    """The adjoints of ``dla``'s inputs, each of its input's shape, in the computing dtype.

    dq, dk [B, T, H, Dk]; dv [B, T, H, Dv]; dlam of lam's shape ([B, T, H, K] when given
    in full; None when lam was omitted);
    dlog_alpha [B, T, H] (mamba2, gdn; None for linear); dbeta [B, T, H] (gdn; else None);
    dinitial_S [B, H, K, Dk, Dv]: the adjoint of the initial cache's states (zero in its
    unused slots; n, info and m are integers or decisions and carry none).
    """

    dq: Any
    dk: Any
    dv: Any
    dlam: Any
    dlog_alpha: Any
    dbeta: Any
    dinitial_S: Any


def vjp(q, k, v, lam, do, *, trace, dcache=None, initial_cache=None, backbone="linear",
        log_alpha=None, beta=None, tau=0.6, capacity=30, score="token", normalize=True,
        slots="oldest-first", eps=1e-6, dtype=None, checkpoint=None) -> Gradients:
    """The gradient of ``dla`` under ``trace``: dL/d inputs for given dL/do (and dL/dS).

    q, k, v, lam, log_alpha, beta, initial_cache and the options are ``dla``'s (lam may
    broadcast, or be None for all ones).
    do [B, T, H, Dv]: the adjoint of the outputs, a real floating array of q's namespace.
    trace: the ``Trace`` the forward pass ran under (required: the gradient is defined
        only for fixed decisions); its scores are not read.
    dcache: the adjoint of the final cache's states S [B, H, K, Dk, Dv], or None (zero).
    dtype: the computing dtype (float64 by default, as in ``dla``).
    checkpoint: C, the distance between kept caches (default ceil(sqrt(T))); the
        result does not depend on it.

    tau, score, normalize and eps do not change the gradient under a trace; they are
    accepted so that ``vjp`` takes the same options as ``dla``.
    Returns ``Gradients``.
    """
    opts = check_options(capacity=capacity, tau=tau, backbone=backbone, score=score,
                         normalize=normalize, slots=slots, eps=eps)
    if trace is None:
        raise ValueError("trace is required: the gradient of DLA is defined under a fixed "
                         "trace (pass dla(...).trace)")
    xp, (B, T, H), tokens, cache = prepare(q, k, v, lam, log_alpha, beta, opts,
                                           initial_cache, dtype)
    check_trace_shape(xp, trace, B, T, H)
    K, Dk, Dv = cache[0].shape[1:]
    do = check_adjoint(xp, "do", do, (B, T, H, Dv), cache[0].dtype)
    dS = cache[0] * 0 if dcache is None else cache_adjoint(xp, dcache, B, H, K, Dk, Dv,
                                                           cache[0].dtype)
    C = checkpoint_interval(T, checkpoint)
    per_token, dS = reverse_scan(xp, tokens, cache, trace_to_streams(xp, trace),
                                 to_streams(xp, do), dS, opts, C)
    grads = assemble(xp, per_token, tokens, dS, B, H, opts.backbone)
    return grads._replace(dlam=unbroadcast(xp, grads.dlam, lam))


def unbroadcast(xp, dlam, lam):
    """dlam [B, T, H, K] summed back to lam's own shape (lam broadcasts, docs/spec/readout.md);
    None when lam was omitted (all ones: no input to differentiate)."""
    if lam is None:
        return None
    extra = dlam.ndim - lam.ndim
    axes = tuple(range(extra)) + tuple(
        extra + i for i, n in enumerate(lam.shape) if n == 1 and dlam.shape[extra + i] != 1)
    if axes:
        dlam = xp.sum(dlam, axis=axes, keepdims=True)
    return xp.reshape(dlam, tuple(lam.shape))


def reverse_scan(xp, tokens, cache, decisions, do, dS, opts, C):
    """step_adjoint from t = T-1 down to 0, on states recomputed chunk by chunk.

    decisions (boundary, merged) [N, T]; do [N, T, Dv]; dS [N, K, Dk, Dv] the adjoint
    of the final cache. Returns (the TokenGrads of t = 0 ... T-1, the adjoint of the
    initial cache's states).
    """
    T = tokens.q.shape[1]
    kept = checkpoints(xp, tokens, cache, decisions, opts, C)
    per_token = []
    for c in reversed(range(len(kept))):
        t0, t1 = c * C, min(c * C + C, T)
        states = recompute(xp, tokens, kept[c], decisions, opts, t0, t1)
        for t in reversed(range(t0, t1)):
            decision = (decisions[0][:, t], decisions[1][:, t])
            dS, grads = step_adjoint(xp, states[t - t0], states[t - t0 + 1],
                                     token_at(tokens, t), decision, do[:, t, ...], dS, opts)
            per_token.append(grads)
    return per_token[::-1], dS


def check_adjoint(xp, name, x, shape, ftype):
    """An adjoint must be a finite real floating array of the inputs' namespace and shape."""
    if hasattr(x, "shape") and array_namespace(x) is not xp:
        raise TypeError(f"{name} must be an array of the inputs' namespace ({xp.__name__}), "
                        f"got {type(x).__name__}")
    check_float_array(xp, name, x, shape)
    return xp.astype(x, ftype)


def cache_adjoint(xp, dcache, B, H, K, Dk, Dv, ftype):
    """dcache [B, H, K, Dk, Dv] (K = the capacity) as streams [N, K, Dk, Dv]."""
    dS = check_adjoint(xp, "dcache", dcache, (B, H, K, Dk, Dv), ftype)
    return xp.reshape(dS, (B * H, K, Dk, Dv))


def checkpoint_interval(T, checkpoint):
    """C: the given interval, or ceil(sqrt(T)), which balances T/C kept and C recomputed."""
    if checkpoint is None:
        return max(1, math.isqrt(T - 1) + 1)
    if isinstance(checkpoint, bool) or not isinstance(checkpoint, int) or checkpoint < 1:
        raise ValueError(f"checkpoint must be an int >= 1, got {checkpoint!r}")
    return checkpoint


def token_at(tokens, t):
    """Token t of every stream: the ``Tokens`` fields without the T axis."""
    return Tokens(*(None if x is None else x[:, t, ...] for x in tokens))


def forward_step(xp, cache, tokens, decisions, opts, t):
    """The cache after token t, under the trace's decisions (checked to fit the cache)."""
    decide = forced_decision(xp, decisions[0][:, t], decisions[1][:, t], t, opts)
    return step(xp, cache, token_at(tokens, t), opts, decide)[0]


def checkpoints(xp, tokens, cache, decisions, opts, C):
    """The caches before tokens 0, C, 2C, ...: one forward pass, T/C caches kept."""
    T = tokens.q.shape[1]
    kept = []
    for t in range(T):
        if t % C == 0:
            kept.append(cache)
        cache = forward_step(xp, cache, tokens, decisions, opts, t)
    return kept


def recompute(xp, tokens, cache, decisions, opts, t0, t1):
    """The caches before tokens t0 ... t1 - 1 and after t1 - 1 (t1 - t0 + 1 caches)."""
    states = [cache]
    for t in range(t0, t1):
        states.append(forward_step(xp, states[-1], tokens, decisions, opts, t))
    return states


def assemble(xp, per_token, tokens, dS, B, H, backbone):
    """Stack the per-token adjoints over T and lay them out as [B, T, H, ...] again.

    d log alpha = alpha d alpha (the chain rule through alpha = exp(log alpha)).
    """
    stack = lambda name: xp.stack([getattr(g, name) for g in per_token], axis=1)  # noqa: E731
    out = {name: from_streams(xp, stack(name), B, H) for name in ("dq", "dk", "dv", "dlam")}
    dlog_alpha = dbeta = None
    if backbone != "linear":
        dlog_alpha = from_streams(xp, tokens.alpha * stack("dalpha"), B, H)
    if backbone == "gdn":
        dbeta = from_streams(xp, stack("dbeta"), B, H)
    dinitial_S = xp.reshape(dS, (B, H) + tuple(dS.shape[1:]))
    return Gradients(out["dq"], out["dk"], out["dv"], out["dlam"], dlog_alpha, dbeta,
                     dinitial_S)

