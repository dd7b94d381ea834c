"""The gradient (docs/spec/gradient.md): ``dla_ref.vjp`` is the derivative of ``dla_ref.dla``.

Statement. For every backbone, slot order, capacity K >= 1, initial cache and trace
that fits it, with L = <do, o> + <dS, S_final> (o and the final cache's S computed by
``dla`` under that trace),

    vjp(..., do, trace, dcache=dS) = (dL/dq, dL/dk, dL/dv, dL/dlam, dL/dlog_alpha,
                                      dL/dbeta, dL/dS_initial on the used slots),

checked against torch autograd of ``dla`` (float64) and against central finite
differences along random directions. Consequences checked too: with K = 1, or with
lam = 1 for any K and trace (conservation), the gradient is the plain backbone's,
computed here by an independent recurrence S_t = G_t S_{t-1} + s_t; the gradient of a
sequence split into a prefix and a suffix (the suffix's initial-cache adjoint fed to
the prefix as its dcache) is the unsplit one; and it does not depend on the checkpoint
interval. Traces are drawn (not decided), so that merges at the first and last pair,
K = 1 and full caches all occur.

Derivation: vjp.md.
"""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import dla_ref
from dla_ref import adjoint

from ._cases import counterexample, dla_inputs, relative_error

# The adjoint is a sum of O(T K) terms of rounding error each; central differences of a
# polynomial of degree <= T + 2 with h = 1e-5 leave O(h^2) times its third derivative.
TOL = 1e-9
FD_TOL = 1e-5
GRADIENTS = ("dq", "dk", "dv", "dlam", "dlog_alpha", "dbeta")
INPUTS = ("q", "k", "v", "lam", "log_alpha", "beta")


@st.composite
def forced_traces(draw, B, T, H, K, m0):
    """A Trace [B, T, H] that fits a cache of capacity K holding m0 [B, H] slots.

    Boundaries where the rules leave the choice (m > 0, K >= 2) are drawn; a merge
    (when a boundary meets a full cache) is the first pair, the last pair or any,
    so both ends occur often.
    """
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    p_boundary = draw(st.sampled_from([0.3, 0.7, 1.0]))
    boundary = np.zeros((B, T, H), bool)
    merged = np.full((B, T, H), -1, np.int64)
    for b in range(B):
        for h in range(H):
            m = int(m0[b, h])
            for t in range(T):
                opens = m == 0 or (K > 1 and rng.random() < p_boundary)
                boundary[b, t, h] = opens
                if opens and m == K:
                    merged[b, t, h] = rng.choice([0, K - 2, rng.integers(0, K - 1)])
                    m -= 1
                m += opens
    return dla_ref.Trace(np.zeros((B, T, H)), boundary, merged)


@st.composite
def initial_caches(draw, B, H, K, Dk, Dv):
    """None, or a valid Cache with a drawn number of used slots per stream."""
    if draw(st.booleans()):
        return None
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    m = rng.integers(0, K + 1, (B, H))
    used = np.arange(K)[None, None, :] < m[..., None]
    n = np.where(used, rng.integers(1, 4, (B, H, K)), 0)
    info = np.where(used, rng.random((B, H, K)), 0.0)
    S = np.where(used[..., None, None], rng.standard_normal((B, H, K, Dk, Dv)), 0.0)
    return dla_ref.Cache(S, n, info, m)


@st.composite
def gradient_cases(draw, max_T=7):
    """(case, trace, do, dS): dla_inputs with an initial cache, a forced trace and the
    adjoints of the outputs and of the final cache."""
    case = draw(dla_inputs(max_T=max_T))
    B, T, H, Dk = case["q"].shape
    Dv, K = case["v"].shape[3], case["capacity"]
    cache = draw(initial_caches(B, H, K, Dk, Dv))
    if cache is not None:
        case["initial_cache"] = cache
    m0 = np.zeros((B, H), np.int64) if cache is None else cache.m
    trace = draw(forced_traces(B, T, H, K, m0))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    return case, trace, rng.standard_normal((B, T, H, Dv)), rng.standard_normal((B, H, K, Dk, Dv))


def autograd(case, trace, do, dS):
    """dL/d inputs by torch autograd through ``dla_ref.dla`` on float64 tensors."""
    tensors = {name: torch.tensor(x, requires_grad=True) for name, x in case.items()
               if name in INPUTS}
    options = {name: x for name, x in case.items() if name not in INPUTS}
    cache = options.pop("initial_cache", None)
    if cache is not None:
        cache = dla_ref.Cache(*(torch.tensor(x) for x in cache))
        cache.S.requires_grad_(True)
    result = dla_ref.dla(**tensors, **options, initial_cache=cache,
                         trace=dla_ref.Trace(*(torch.tensor(x) for x in trace)))
    loss = (result.o * torch.tensor(do)).sum() + (result.cache.S * torch.tensor(dS)).sum()
    loss.backward()
    grads = {"d" + name: x.grad.numpy() for name, x in tensors.items()}
    if cache is not None:
        grads["dinitial_S"] = cache.S.grad.numpy()
    return grads


def used_slots(case):
    """[B, H, K, 1, 1] bool: the initial cache's used slots (all False without one)."""
    cache = case.get("initial_cache")
    K = case["capacity"]
    m = np.zeros(case["q"].shape[0:3:2], np.int64) if cache is None else cache.m
    return (np.arange(K)[None, None, :] < m[..., None])[..., None, None]


def autograd_error(case, trace, do, dS):
    """Largest relative error of vjp against autograd over every gradient; vjp's
    initial-cache adjoint must be zero in the unused slots (which hold no state)."""
    ours = dla_ref.vjp(**case, do=do, trace=trace, dcache=dS)
    theirs = autograd(case, trace, do, dS)
    errors = [relative_error(getattr(ours, name), theirs[name]) for name in theirs
              if name != "dinitial_S"]
    used = used_slots(case)
    if "dinitial_S" in theirs:
        errors.append(relative_error(np.where(used, ours.dinitial_S, 0),
                                     np.where(used, theirs["dinitial_S"], 0)))
    errors.append(float(np.max(np.abs(np.where(used, 0, ours.dinitial_S)), initial=0.0)))
    return max(errors)


@settings(max_examples=60)
@given(gradient_cases())
def test_vjp_equals_autograd_of_dla(drawn):
    assert autograd_error(*drawn) <= TOL


# --- central finite differences -------------------------------------------------------


def loss(case, trace, do, dS):
    """L = <do, o> + <dS, S_final> under the trace, in float64."""
    result = dla_ref.dla(**case, trace=trace)
    return float(np.sum(result.o * do) + np.sum(result.cache.S * dS))


def direction(case, rng):
    """A random direction that keeps every input valid for small steps: relative for
    lam >= 0 and log_alpha <= 0, proportional to beta (1 - beta) for beta in [0, 1], and
    only in the used slots of an initial cache's S."""
    d = {name: rng.uniform(-1, 1, case[name].shape) for name in ("q", "k", "v")}
    d["lam"] = rng.uniform(-1, 1, case["lam"].shape) * case["lam"]
    if "log_alpha" in case:
        d["log_alpha"] = rng.uniform(-1, 1, case["log_alpha"].shape) * case["log_alpha"]
    if "beta" in case:
        beta = case["beta"]
        d["beta"] = rng.uniform(-1, 1, beta.shape) * beta * (1 - beta)
    if "initial_cache" in case:
        d["S"] = np.where(used_slots(case), rng.standard_normal(case["initial_cache"].S.shape),
                          0.0)
    return d


def moved(case, d, h):
    """The case with every input moved by h along d."""
    out = dict(case)
    for name, step in d.items():
        if name == "S":
            out["initial_cache"] = case["initial_cache"]._replace(
                S=case["initial_cache"].S + h * step)
        else:
            out[name] = case[name] + h * step
    return out


def finite_difference_error(case, trace, do, dS, seed=0):
    """|central difference - <vjp, d>| / max(1, scale) along one random direction d."""
    d = direction(case, np.random.default_rng(seed))
    h = 1e-5
    numeric = (loss(moved(case, d, h), trace, do, dS)
               - loss(moved(case, d, -h), trace, do, dS)) / (2 * h)
    grads = dla_ref.vjp(**case, do=do, trace=trace, dcache=dS)
    named = dict(zip(GRADIENTS, grads[:6]), dS=grads.dinitial_S)
    terms = [np.sum(named["d" + name] * step) for name, step in d.items() if name != "S"]
    if "S" in d:
        terms.append(np.sum(named["dS"] * d["S"]))
    analytic = float(np.sum(terms))
    scale = max(1.0, float(np.sum(np.abs(terms))))
    return abs(numeric - analytic) / scale


@settings(max_examples=60)
@given(gradient_cases(), st.integers(0, 2**16))
def test_vjp_equals_central_differences(drawn, seed):
    assert finite_difference_error(*drawn, seed=seed) <= FD_TOL


# --- the plain backbone -----------------------------------------------------------------


def backbone_grads(case, do, weighted=False):
    """dL/d(q, k, v, log_alpha, beta) of the single-state backbone, L = <do, o>, by autograd
    of its own recurrence S_t = G_t S_{t-1} + s_t, o_t = q_t^T S_t (no dla_ref code).
    weighted: o_t = lam_t q_t^T S_t with lam [B, T, H, 1], and dL/dlam too."""
    names = INPUTS if weighted else tuple(n for n in INPUTS if n != "lam")
    x = {name: torch.tensor(case[name], requires_grad=True) for name in names if name in case}
    q, k, v = x["q"], x["k"], x["v"]
    B, T, H, Dk = q.shape
    S = torch.zeros(B, H, Dk, v.shape[3], dtype=torch.float64)
    outputs = []
    for t in range(T):
        kt, vt = k[:, t], v[:, t]
        if case["backbone"] != "linear":
            alpha = torch.exp(x["log_alpha"][:, t])[..., None, None]
            if case["backbone"] == "gdn":
                beta = x["beta"][:, t][..., None, None]
                S = S - beta * kt[..., :, None] * (kt[..., None, :] @ S)
                vt = beta[..., 0] * vt
            S = alpha * S
        S = S + kt[..., :, None] * vt[..., None, :]
        o = (q[:, t, :, None, :] @ S)[..., 0, :]
        outputs.append(x["lam"][:, t] * o if weighted else o)
    (torch.stack(outputs, 1) * torch.tensor(do)).sum().backward()
    return {"d" + name: t.grad.numpy() for name, t in x.items()}


def backbone_error(case, trace, do):
    """Largest relative error of vjp against the backbone's gradient (dlam too if K = 1)."""
    ours = dla_ref.vjp(**case, do=do, trace=trace)
    theirs = backbone_grads(case, do, weighted=case["capacity"] == 1)
    return max(relative_error(getattr(ours, name), grad) for name, grad in theirs.items())


@st.composite
def backbone_cases(draw, capacity_one):
    """(case, trace, do), no initial cache, a drawn trace: K = 1 (any lam), or any K with
    lam = 1 (where DLA's output is the backbone's, conservation)."""
    case = draw(dla_inputs(max_capacity=1 if capacity_one else 4))
    if not capacity_one:
        case["lam"] = np.ones_like(case["lam"])
    B, T, H, _ = case["q"].shape
    trace = draw(forced_traces(B, T, H, case["capacity"], np.zeros((B, H), np.int64)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    return case, trace, rng.standard_normal(case["v"].shape)


@settings(max_examples=40)
@given(backbone_cases(capacity_one=True))
def test_capacity_one_gives_the_backbone_gradient(drawn):
    assert backbone_error(*drawn) <= TOL


@settings(max_examples=40)
@given(backbone_cases(capacity_one=False))
def test_unit_weights_give_the_backbone_gradient_for_any_trace(drawn):
    assert backbone_error(*drawn) <= TOL


# --- splitting and checkpoints --------------------------------------------------------------


def split_error(case, trace, do, dS, cut):
    """The gradient of prefix + suffix (the suffix's dinitial_S as the prefix's dcache)
    against the unsplit gradient, relative error."""
    per_token = ("q", "k", "v", "lam", "log_alpha", "beta")
    part = lambda sl: {name: (x[:, sl] if name in per_token else x)  # noqa: E731
                       for name, x in case.items()}
    trace_part = lambda sl: dla_ref.Trace(*(x[:, sl] for x in trace))  # noqa: E731
    head, tail = slice(0, cut), slice(cut, None)
    prefix_cache = dla_ref.dla(**part(head), trace=trace_part(head)).cache
    suffix = dla_ref.vjp(**dict(part(tail), initial_cache=prefix_cache), do=do[:, tail],
                         trace=trace_part(tail), dcache=dS)
    prefix = dla_ref.vjp(**part(head), do=do[:, head], trace=trace_part(head),
                         dcache=suffix.dinitial_S)
    whole = dla_ref.vjp(**case, do=do, trace=trace, dcache=dS)
    errors = [relative_error(np.concatenate([a, b], axis=1), c)
              for a, b, c in zip(prefix[:6], suffix[:6], whole[:6]) if c is not None]
    return max(errors + [relative_error(prefix.dinitial_S, whole.dinitial_S)])


@settings(max_examples=40)
@given(gradient_cases(), st.data())
def test_split_sequence_gives_the_unsplit_gradient(drawn, data):
    case, trace, do, dS = drawn
    T = case["q"].shape[1]
    if T >= 2:
        assert split_error(case, trace, do, dS, data.draw(st.integers(1, T - 1))) <= TOL


@settings(max_examples=30)
@given(gradient_cases(), st.integers(1, 8))
def test_the_checkpoint_interval_does_not_change_the_gradient(drawn, C):
    case, trace, do, dS = drawn
    default = dla_ref.vjp(**case, do=do, trace=trace, dcache=dS)
    other = dla_ref.vjp(**case, do=do, trace=trace, dcache=dS, checkpoint=C)
    assert all(np.array_equal(a, b) for a, b in zip(default, other) if a is not None)


# --- a wrong adjoint is caught ------------------------------------------------------------------


real_merge_adjoint = adjoint.merge_adjoint


def halving_merge_adjoint(xp, dx, j):
    """A plausible misreading: the merged slot's adjoint is split in halves between the
    two merged slots, as if the merge averaged them (a sum's adjoint is a copy)."""
    out = real_merge_adjoint(xp, dx, j)
    extra = (1,) * (dx.ndim - 2)
    slot = xp.reshape(xp.arange(dx.shape[1]), (1, -1) + extra)
    jj = xp.reshape(j, (-1, 1) + extra)
    pair = (jj >= 0) & ((slot == jj) | (slot == jj + 1))
    return xp.where(pair, out / 2, out)


def test_the_check_catches_a_merge_adjoint_that_splits(monkeypatch):
    monkeypatch.setattr(adjoint, "merge_adjoint", halving_merge_adjoint)
    counterexample(gradient_cases(), lambda drawn: autograd_error(*drawn) > TOL)
