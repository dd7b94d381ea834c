"""Checks at the public boundary: every bad input raises an error that names it.

Nothing is clipped or repaired: an input is accepted as it is or rejected with a
ValueError (bad value or shape) or TypeError (bad type or dtype).
"""

from __future__ import annotations

import math

from ._xp import device
from .records import BACKBONES, SCORES, SLOT_ORDERS, Cache, Options, Trace


def check_options(*, capacity, tau, backbone, score, normalize, slots, eps) -> Options:
    """Validate the scalar options and return them as one ``Options`` record."""
    if isinstance(capacity, bool) or not isinstance(capacity, int):
        raise TypeError(f"capacity must be an int, got {type(capacity).__name__}")
    if capacity < 1:
        raise ValueError(f"capacity must be >= 1, got {capacity}")
    if isinstance(tau, bool) or not isinstance(tau, (int, float)):
        raise TypeError(f"tau must be a real number, got {type(tau).__name__}")
    if math.isnan(tau):
        raise ValueError("tau must not be NaN (+inf and -inf are allowed)")
    for name, value, allowed in (
        ("backbone", backbone, BACKBONES),
        ("score", score, SCORES),
        ("slots", slots, SLOT_ORDERS),
    ):
        if value not in allowed:
            raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    if not isinstance(normalize, bool):
        raise TypeError(f"normalize must be a bool, got {type(normalize).__name__}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"eps must be a real number, got {type(eps).__name__}")
    if not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps must be finite and > 0, got {eps}")
    return Options(capacity, float(tau), backbone, score, normalize, slots, float(eps))


def is_floating(xp, x) -> bool:
    return xp.isdtype(x.dtype, "real floating")


def check_float_array(xp, name, x, shape):
    """x must be a real floating array of the given shape (None = any size) with finite values."""
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"{name} must be an array, got {type(x).__name__}")
    if not is_floating(xp, x):
        raise TypeError(f"{name} must have a real floating dtype, got {x.dtype}")
    check_shape(name, x, shape)
    if not bool(xp.all(xp.isfinite(x))):
        raise ValueError(f"{name} contains NaN or inf")


def check_shape(name, x, shape):
    want = tuple(shape)
    got = tuple(x.shape)
    if len(got) != len(want) or any(w is not None and w != g for w, g in zip(want, got)):
        pretty = "[" + ", ".join("?" if w is None else str(w) for w in want) + "]"
        raise ValueError(f"{name} must have shape {pretty}, got {list(got)}")


def check_inputs(xp, q, k, v, lam, log_alpha, beta, backbone, lam_columns=None):
    """Validate the token inputs; returns (B, T, H, Dk, Dv).

    q, k [B, T, H, Dk]; v [B, T, H, Dv]; lam [B, T, H, lam_columns] >= 0;
    log_alpha [B, T, H] <= 0 (mamba2, gdn; must be None for linear);
    beta [B, T, H] in [0, 1] (gdn; must be None otherwise).
    """
    check_float_array(xp, "q", q, (None, None, None, None))
    B, T, H, Dk = q.shape
    if T < 1:
        raise ValueError("q must hold at least one token (T >= 1)")
    check_float_array(xp, "k", k, (B, T, H, Dk))
    check_float_array(xp, "v", v, (B, T, H, None))
    Dv = v.shape[3]
    check_float_array(xp, "lam", lam, (B, T, H, lam_columns))
    if not bool(xp.all(lam >= 0)):
        raise ValueError("lam must be >= 0 (readout weights)")
    if backbone == "linear":
        for name, x in (("log_alpha", log_alpha), ("beta", beta)):
            if x is not None:
                raise ValueError(f"{name} is not used by backbone='linear'; pass None")
    else:
        if log_alpha is None:
            raise ValueError(f"log_alpha [B, T, H] is required for backbone={backbone!r}")
        check_float_array(xp, "log_alpha", log_alpha, (B, T, H))
        if not bool(xp.all(log_alpha <= 0)):
            raise ValueError("log_alpha must be <= 0 (alpha = exp(log_alpha) in (0, 1])")
    if backbone == "gdn":
        if beta is None:
            raise ValueError("beta [B, T, H] is required for backbone='gdn'")
        check_float_array(xp, "beta", beta, (B, T, H))
        if not bool(xp.all((beta >= 0) & (beta <= 1))):
            raise ValueError("beta must lie in [0, 1]")
    elif beta is not None and backbone != "linear":
        raise ValueError(f"beta is only used by backbone='gdn'; pass None for {backbone!r}")
    return B, T, H, Dk, Dv


def check_trace_shape(xp, trace, B, T, H):
    """A forced trace must be a Trace with boundary [B,T,H] bool and merged [B,T,H] int.

    Its scores are not read (they are recomputed); whether its decisions fit the
    cache (a boundary at an empty cache, merges only when full) is checked token by
    token during the scan, by ``forced_decision``.
    """
    if not isinstance(trace, Trace):
        raise TypeError(f"trace must be a dla_ref.Trace, got {type(trace).__name__}")
    check_shape("trace.boundary", trace.boundary, (B, T, H))
    check_shape("trace.merged", trace.merged, (B, T, H))
    if not xp.isdtype(trace.boundary.dtype, "bool"):
        raise TypeError(f"trace.boundary must be bool, got {trace.boundary.dtype}")
    if not xp.isdtype(trace.merged.dtype, "integral"):
        raise TypeError(f"trace.merged must be an integer array, got {trace.merged.dtype}")


def check_cache(xp, cache, B, H, K, Dk, Dv):
    """An initial cache must be a consistent Cache of this shape and capacity."""
    if not isinstance(cache, Cache):
        raise TypeError(f"initial_cache must be a dla_ref.Cache, got {type(cache).__name__}")
    check_float_array(xp, "initial_cache.S", cache.S, (B, H, K, Dk, Dv))
    check_float_array(xp, "initial_cache.info", cache.info, (B, H, K))
    check_shape("initial_cache.n", cache.n, (B, H, K))
    check_shape("initial_cache.m", cache.m, (B, H))
    for name, x in (("initial_cache.n", cache.n), ("initial_cache.m", cache.m)):
        if not xp.isdtype(x.dtype, "integral"):
            raise TypeError(f"{name} must be an integer array, got {x.dtype}")
    m, n = cache.m, cache.n
    if not bool(xp.all((m >= 0) & (m <= K))):
        raise ValueError(f"initial_cache.m must lie in [0, {K}] (the capacity)")
    used = xp.arange(K, device=device(m))[None, None, :] < m[..., None]
    if not bool(xp.all(xp.where(used, n >= 1, n == 0))):
        raise ValueError("initial_cache.n must be >= 1 in the m used slots and 0 in the others")
    if not bool(xp.all(cache.info >= 0)):
        raise ValueError("initial_cache.info must be >= 0")
    unused_S = xp.where(used[..., None, None], xp.zeros_like(cache.S), cache.S)
    if not bool(xp.all(unused_S == 0)):
        raise ValueError("initial_cache.S must be zero in the unused slots")
