"""The adjoint of one step of DLA (docs/spec/gradient.md), one function per forward step.

Under a fixed trace (docs/spec/trace.md) a step is a polynomial map of the cache and the
token's inputs. Each function here is the transpose of the Jacobian of one function
of ``step.py``: given the adjoint of what that function returned (the gradient of the
loss with respect to it), it returns the adjoints of what the function read. Read
them next to step.py and docs/spec/gradient.md, which derives each equation.

Shapes use the names of ``records``: N streams, K slots, Dk, Dv. An adjoint is
written d<name>: dS is dL/dS, of S's shape. As in step.py, per-stream choices are
``where`` over fixed-shape arrays, so the code runs on NumPy, array_api_strict and
torch tensors.

The step and its adjoint, read bottom-up (the reverse scan runs them in this order):

    forward                                  adjoint
    S1 = G_t S0              transition      dS0 = G_t^T dS1,  dalpha, dbeta, dk
    s  = beta k v^T          contribution    dk, dv, dbeta from ds
    S2 = merge_j(S1)         merge_adjacent  dS1 = copy dS2_j into slots j, j+1; unshift
    S3 = S2 + e_target s^T   write_token     ds = dS3_target,  dS2 = dS3
    o  = sum_i w_i q^T S3_i  readout         dq, dw, and dS3 += w_i q do^T
    w  = lambda[l(i)]        slot_weights    dlambda
"""

from __future__ import annotations

from typing import NamedTuple

from ._xp import device
from .step import slot_mask, slot_weights


class TokenGrads(NamedTuple):
    """The adjoints of one token's inputs for N streams.

    dq, dk [N, Dk]; dv [N, Dv]; dlam [N, K]; dalpha, dbeta [N] (zeros where the
    backbone has no such input). dalpha is dL/d alpha, not dL/d log alpha.
    """

    dq: object
    dk: object
    dv: object
    dlam: object
    dalpha: object
    dbeta: object


# --- 6. readout ---------------------------------------------------------------


def readout_adjoint(xp, q, S, w, do):
    """Adjoint of o = sum_i w_i q^T S_i, for a given do [N, Dv]:

        dq   = sum_i w_i S_i do        [N, Dk]
        dw_i = q^T S_i do              [N, K]
        dS_i = w_i q do^T              [N, K, Dk, Dv]   (to be added to the cache's adjoint)

    q [N, Dk], S [N, K, Dk, Dv] (the cache after the write), w [N, K].
    """
    S_do = xp.matmul(S, do[:, None, :, None])[..., 0]  # S_i do: [N, K, Dk]
    dq = xp.sum(w[:, :, None] * S_do, axis=1)
    dw = xp.sum(q[:, None, :] * S_do, axis=-1)
    dS = w[:, :, None, None] * (q[:, None, :, None] * do[:, None, None, :])
    return dq, dw, dS


def slot_weights_adjoint(xp, dw, m, slots):
    """Adjoint of w_i = lambda[l(i)] (i < m), w_i = 0 (i >= m):

        dlambda_c = sum_{i < m, l(i) = c} dw_i        [N, K]

    l(i) = i (slots="oldest-first") or m - 1 - i ("newest-first"); each column is
    read by at most one slot, so the sum has at most one term. dw [N, K], m [N] is the
    slot count after the write.
    """
    K = dw.shape[1]
    slot = xp.arange(K, dtype=m.dtype, device=device(m))
    dw = xp.where(slot[None, :] < m[:, None], dw, xp.zeros_like(dw))
    if slots == "oldest-first":
        return dw
    # column c is read by slot m-1-c: the same one-hot as the forward gather, transposed
    col = m[:, None] - 1 - slot[None, :]  # [N, K]: the lambda column of slot i
    onehot = xp.astype(col[:, :, None] == slot[None, None, :], dw.dtype)  # [N, i, c]
    return xp.sum(onehot * dw[:, :, None], axis=1)


# --- 4 / 5b. write --------------------------------------------------------------


def write_adjoint(xp, dS, m, boundary):
    """Adjoint of S' = S + e_target s^T, target = m - 1 + b_t (m after any merge):

        ds  = dS'_target     [N, Dk, Dv]
        dS  = dS'            (the write adds; it passes the cache's adjoint through)

    Only ds is returned. dS [N, K, Dk, Dv], m [N], boundary [N] bool.
    """
    target = m - 1 + xp.astype(boundary, m.dtype)
    hit = slot_mask(xp, target, dS.shape[1])[:, :, None, None]
    return xp.sum(xp.where(hit, dS, xp.zeros_like(dS)), axis=1)


# --- 5a. merge --------------------------------------------------------------------


def merge_adjoint(xp, dx, j):
    """Adjoint of ``merge_adjacent``: copy dS_j into both merged slots, unshift the rest.

    The merge maps x to y with y_i = x_i (i < j), y_j = x_j + x_{j+1},
    y_i = x_{i+1} (j < i < K-1) and y_{K-1} = 0. Its transpose is

        dx_i = dy_i (i <= j),   dx_{j+1} = dy_j,   dx_i = dy_{i-1} (i > j+1),

    i.e. dx_i = dy_i for i <= j and dy_{i-1} after: the merged slot's adjoint reaches
    both halves whole (a sum's adjoint is a copy, not a split). j [N] = -1 leaves dx
    as it is. dx [N, K, ...].
    """
    head = xp.zeros_like(dx[:, :1, ...])
    shifted = xp.concat([head, dx[:, :-1, ...]], axis=1)  # slot i holds dy_{i-1}
    extra = (1,) * (dx.ndim - 2)
    slot = xp.reshape(xp.arange(dx.shape[1], dtype=j.dtype, device=device(j)), (1, -1) + extra)
    jj = xp.reshape(j, (-1, 1) + extra)
    return xp.where((jj < 0) | (slot <= jj), dx, shifted)


# --- 1. transition, and the contribution ------------------------------------------


def transition_adjoint(xp, dS1, S0, k, alpha, beta, backbone):
    """Adjoint of S1_i = G_t S0_i for every slot.   -> (dS0, dk, dalpha, dbeta)

        linear: dS0 = dS1
        mamba2: dS0 = alpha dS1,  dalpha = sum_i <dS1_i, S0_i>
        gdn:    with u_i = S0_i^T k, g_i = dS1_i^T k  (both [Dv]) and P = I - beta k k^T,
                dS0_i  = alpha P dS1_i = alpha (dS1_i - beta k g_i^T)
                dalpha = sum_i <dS1_i, P S0_i> = sum_i <dS1_i, S0_i> - beta g_i . u_i
                dbeta  = -alpha sum_i g_i . u_i
                dk     = -alpha beta sum_i (dS1_i u_i + S0_i g_i)

    dS1, S0 [N, K, Dk, Dv]; k [N, Dk]; alpha, beta [N]. dk, dalpha, dbeta are zero
    where the backbone does not read them.
    """
    zero = xp.zeros(S0.shape[:1], dtype=S0.dtype, device=device(S0))
    if backbone == "linear":
        return dS1, xp.zeros_like(k), zero, zero
    inner = xp.sum(dS1 * S0, axis=(1, 2, 3))  # sum_i <dS1_i, S0_i>
    if backbone == "mamba2":
        return alpha[:, None, None, None] * dS1, xp.zeros_like(k), inner, zero
    kk = k[:, None, None, :]  # [N, 1, 1, Dk]
    u = xp.matmul(kk, S0)[:, :, 0, :]  # S0_i^T k: [N, K, Dv]
    g = xp.matmul(kk, dS1)[:, :, 0, :]  # dS1_i^T k: [N, K, Dv]
    gu = xp.sum(g * u, axis=(1, 2))
    a, b = alpha[:, None, None, None], beta[:, None, None, None]
    dS0 = a * (dS1 - b * (k[:, None, :, None] * g[:, :, None, :]))
    back = xp.matmul(dS1, u[..., None])[..., 0] + xp.matmul(S0, g[..., None])[..., 0]
    dk = -(alpha * beta)[:, None] * xp.sum(back, axis=1)
    return dS0, dk, inner - beta * gu, -alpha * gu


def contribution_adjoint(xp, ds, k, v, beta, backbone):
    """Adjoint of s = beta k v^T (beta = 1 for linear and mamba2).   -> (dk, dv, dbeta)

        dk = beta ds v,   dv = beta ds^T k,   dbeta = k^T ds v  (gdn; zero otherwise)

    ds [N, Dk, Dv]; k [N, Dk]; v [N, Dv]; beta [N] (gdn).
    """
    ds_v = xp.matmul(ds, v[:, :, None])[..., 0]  # [N, Dk]
    dsT_k = xp.matmul(k[:, None, :], ds)[:, 0, :]  # [N, Dv]
    if backbone != "gdn":
        return ds_v, dsT_k, xp.zeros(ds.shape[:1], dtype=ds.dtype, device=device(ds))
    b = beta[:, None]
    return b * ds_v, b * dsT_k, xp.sum(k * ds_v, axis=1)


# --- the whole step -------------------------------------------------------------


def step_adjoint(xp, before, after, token, decision, do, dS, opts):
    """The adjoint of ``step.step`` under a forced decision.   -> (dS_before, TokenGrads)

    before, after: the caches (S, n, info, m) before and after the step; token:
    (q, k, v, lam, alpha, beta) as ``step`` takes it; decision: (boundary [N] bool,
    merged [N] int) of this token; do [N, Dv] the output's adjoint; dS [N, K, Dk, Dv]
    the adjoint of the cache's states after the step.

    The adjoints run in reverse order of the forward step: readout, write (and the
    contribution it wrote), merge, transition. The slot counts and the decisions
    carry no adjoint. dS_before is zero in the slots unused before the step: they
    hold no state (an unused slot is zero by the cache's definition), so no
    gradient is assigned to them.
    """
    S0, m0 = before[0], before[3]
    S3, m3 = after[0], after[3]
    q, k, v, lam, alpha, beta = token
    boundary, merged = decision
    backbone = opts.backbone

    w = slot_weights(xp, lam, m3, opts.slots)
    dq, dw, dS_read = readout_adjoint(xp, q, S3, w, do)
    dS = dS + dS_read
    dlam = slot_weights_adjoint(xp, dw, m3, opts.slots)

    m2 = m0 - xp.astype(merged >= 0, m0.dtype)  # slots in use after the merge
    ds = write_adjoint(xp, dS, m2, boundary)
    dk_write, dv, dbeta_write = contribution_adjoint(xp, ds, k, v, beta, backbone)

    dS = merge_adjoint(xp, dS, merged)
    dS, dk_carry, dalpha, dbeta_carry = transition_adjoint(xp, dS, S0, k, alpha, beta,
                                                           backbone)
    slot = xp.arange(dS.shape[1], dtype=m0.dtype, device=device(m0))
    dS = xp.where((slot[None, :] < m0[:, None])[:, :, None, None], dS, xp.zeros_like(dS))
    return dS, TokenGrads(dq, dk_write + dk_carry, dv, dlam, dalpha, dbeta_write + dbeta_carry)

