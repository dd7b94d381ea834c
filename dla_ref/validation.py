"""Checks at the public boundary: every bad input raises an error that names it.

Nothing is clipped or repaired: an input is accepted as it is or rejected with a
ValueError (bad value or shape) or TypeError (bad type, dtype or namespace). Two
conveniences are part of the contract: ``lam`` may be omitted (all ones) or given in
any shape that broadcasts to [B, T, H, K]; NumPy scalars count as Python numbers.
gdn keys far from unit norm are accepted with a RuntimeWarning. The pages:
docs/spec/backbones.md (gates, keys) and docs/spec/readout.md (lam).
"""

from __future__ import annotations

import math
import numbers
import warnings

from ._xp import array_namespace, device, is_array, namespace_name, to_host
from .records import BACKBONES, SCORES, SLOT_ORDERS, Cache, Options, Trace

# --- scalars ------------------------------------------------------------------------


def check_int(name, x, minimum):
    """An integer (Python or NumPy, not bool) >= minimum, as a Python int."""
    if isinstance(x, bool) or not isinstance(x, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(x).__name__}")
    if x < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {x}")
    return int(x)


def check_real(name, x):
    """A real number (Python or NumPy int or float, not bool), as a Python float."""
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(x).__name__}")
    return float(x)


def check_options(*, capacity, tau, backbone, score, normalize, slots, eps) -> Options:
    """Validate the scalar options and return them as one ``Options`` record."""
    capacity = check_int("capacity", capacity, 1)
    tau = check_real("tau", tau)
    if math.isnan(tau):
        raise ValueError("tau must not be NaN (+inf and -inf are allowed)")
    for name, value, allowed in (
        ("backbone", backbone, BACKBONES),
        ("score", score, SCORES),
        ("slots", slots, SLOT_ORDERS),
    ):
        if not isinstance(value, str) or value not in allowed:
            raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    if not isinstance(normalize, bool):
        raise TypeError(f"normalize must be a bool, got {type(normalize).__name__}")
    eps = check_real("eps", eps)
    if not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps must be finite and > 0, got {eps}")
    return Options(capacity, tau, backbone, score, normalize, slots, eps)


# --- arrays -------------------------------------------------------------------------


def inputs_namespace(**arrays):
    """The namespace of the token inputs, given by name (None = not given).

    Each must be an array, and all of one namespace: a TypeError names the first
    argument that is not, with the two namespaces (checked before anything else).
    """
    first = None
    for name, x in arrays.items():
        if x is None:
            continue
        if not is_array(x):
            raise TypeError(f"{name} must be an array, got {type(x).__name__}")
        if first is None:
            first = name, x
        elif array_namespace(x) is not array_namespace(first[1]):
            raise TypeError(f"{name} is a {namespace_name(x)} array but {first[0]} is a "
                            f"{namespace_name(first[1])} array; pass the inputs in one "
                            "namespace")
    return array_namespace(first[1])


def is_floating(xp, x) -> bool:
    return xp.isdtype(x.dtype, "real floating")


def check_float_array(xp, name, x, shape):
    """x must be a real floating array of the given shape (None = any size) with finite values."""
    if not is_array(x):
        raise TypeError(f"{name} must be an array, got {type(x).__name__}")
    if not is_floating(xp, x):
        raise TypeError(f"{name} must have a real floating dtype, got {x.dtype}")
    if shape is not None:
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

    q, k [B, T, H, Dk]; v [B, T, H, Dv]; lam None or >= 0 of a shape that broadcasts
    to [B, T, H, lam_columns] (None: any number of columns); log_alpha [B, T, H] <= 0
    (mamba2, gdn; must be None for linear); beta [B, T, H] in [0, 1] (gdn only).
    B = 0 or H = 0 are allowed (no stream); T >= 1, Dk >= 1 and Dv >= 1 are required.
    """
    check_float_array(xp, "q", q, (None, None, None, None))
    B, T, H, Dk = q.shape
    if T < 1:
        raise ValueError("q must hold at least one token (T >= 1)")
    check_float_array(xp, "k", k, (B, T, H, Dk))
    check_float_array(xp, "v", v, (B, T, H, None))
    Dv = v.shape[3]
    for name, size in (("Dk (the last axis of q and k)", Dk), ("Dv (the last axis of v)", Dv)):
        if size < 1:  # a state with no entries has no RMS, so I_t is undefined
            raise ValueError(f"{name} must be >= 1, got {size}")
    check_lam(xp, lam, (B, T, H, lam_columns))
    check_gates(xp, log_alpha, beta, backbone, (B, T, H))
    if backbone == "gdn":
        warn_if_keys_expand(xp, k, beta)
    return B, T, H, Dk, Dv


def check_lam(xp, lam, shape):
    """lam: None, or finite and >= 0 with a shape that broadcasts to ``shape`` [B, T, H, K]."""
    if lam is None:
        return
    check_float_array(xp, "lam", lam, None)
    got = tuple(lam.shape)
    fits = len(got) <= 4 and all(g == 1 or w is None or g == w
                                 for g, w in zip(got[::-1], shape[::-1]))
    if not fits:
        pretty = ", ".join("K" if w is None else str(w) for w in shape)
        raise ValueError(f"lam must have a shape that broadcasts to [B, T, H, K] = "
                         f"[{pretty}], got {list(got)}")
    if not bool(xp.all(lam >= 0)):
        raise ValueError("lam must be >= 0 (readout weights)")


def broadcast_lam(xp, lam, shape, like):
    """lam as a full [B, T, H, K] array: ones (of ``like``'s dtype and device) if None."""
    if lam is None:
        return xp.ones(shape, dtype=like.dtype, device=device(like))
    return xp.broadcast_to(lam, shape)


def check_gates(xp, log_alpha, beta, backbone, shape):
    """log_alpha [B, T, H] <= 0 for mamba2 and gdn, beta [B, T, H] in [0, 1] for gdn only."""
    if backbone == "linear":
        for name, x in (("log_alpha", log_alpha), ("beta", beta)):
            if x is not None:
                raise ValueError(f"{name} is not used by backbone='linear'; pass None")
        return
    if log_alpha is None:
        raise ValueError(f"log_alpha [B, T, H] is required for backbone={backbone!r}")
    check_float_array(xp, "log_alpha", log_alpha, shape)
    if not bool(xp.all(log_alpha <= 0)):
        raise ValueError("log_alpha must be <= 0 (alpha = exp(log_alpha) in (0, 1])")
    if backbone != "gdn":
        if beta is not None:
            raise ValueError(f"beta is only used by backbone='gdn'; pass None for {backbone!r}")
        return
    if beta is None:
        raise ValueError("beta [B, T, H] is required for backbone='gdn'")
    check_float_array(xp, "beta", beta, shape)
    if not bool(xp.all((beta >= 0) & (beta <= 1))):
        raise ValueError("beta must lie in [0, 1]")


def warn_if_keys_expand(xp, k, beta):
    """One RuntimeWarning when some gdn transition I - beta k k^T expands a state.

    Its eigenvalue along k is 1 - beta ||k||^2, of magnitude > 1 iff beta ||k||^2 > 2;
    gdn assumes unit-norm keys (docs/spec/backbones.md), and then beta ||k||^2 <= 1.
    """
    if k.shape[0] * k.shape[1] * k.shape[2] == 0:
        return
    worst = float(to_host(xp.max(beta * xp.sum(k * k, axis=-1))))  # detached from autograd
    if worst > 2:
        warnings.warn(f"gdn expects unit-norm keys: max beta*||k||^2 = {worst:.3g} > 2, so "
                      "the transition I - beta k k^T has an eigenvalue 1 - beta*||k||^2 < -1 "
                      "and the states grow without bound; normalize k", RuntimeWarning,
                      stacklevel=4)


# --- records ------------------------------------------------------------------------


def check_trace_shape(xp, trace, B, T, H):
    """A forced trace must be a Trace with boundary [B,T,H] bool and merged [B,T,H] int.

    Its scores are not read (they are recomputed); whether its decisions fit the
    cache (a boundary at an empty cache, merges only when full) is checked token by
    token during the scan, by ``forced_decision``. Convert a trace of another
    namespace first (``_xp.to_namespace``).
    """
    if not isinstance(trace, Trace):
        raise TypeError(f"trace must be a dla_ref.Trace, got {type(trace).__name__}")
    for name, x in (("trace.boundary", trace.boundary), ("trace.merged", trace.merged)):
        if not is_array(x):
            raise TypeError(f"{name} must be an array, got {type(x).__name__}")
        check_shape(name, x, (B, T, H))
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
    for name, x in (("initial_cache.n", cache.n), ("initial_cache.m", cache.m)):
        if not is_array(x):
            raise TypeError(f"{name} must be an array, got {type(x).__name__}")
        check_shape(name, x, (B, H, K) if name.endswith("n") else (B, H))
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
