"""The Triton backend: a decode-step kernel and a full-sequence (prefill) kernel for DLA.

Registered as "triton" (``dla_backends.kernels.triton_kernels:dla``): the signature, semantics
and result of ``dla_ref.dla``. Inputs of any float dtype; the state (cache S and info,
trace scores) is float32 whatever the inputs; o comes back in the inputs' promoted
dtype. ``dla`` runs the decode kernel when T == 1 (decoding from an initial cache, token
by token) and the prefill kernel when T > 1. Both are ports of ``dla_ref.step.step`` and
share its pieces below, so a loop of T == 1 calls that threads the cache through gives
what one call over the T tokens gives.

Kernels and their versions (llm.c style; each validated against dla_ref by
tests/test_triton_backend.py, the shipped version is the tested one):

    decode   v1 (shipped)  ``dla_decode_kernel``: one token for every stream, the cache
                           in global memory, read once and written once (out of place).
    prefill  v1            the decode kernel launched T times, threading the cache (no
                           code of its own; tests/test_triton_backend.py checks that v2
                           equals it). Every token re-reads and re-writes the whole cache.
             v2 (shipped)  ``dla_prefill_kernel``: one launch, the loop over t inside.
                           Each program keeps its column block of all K slots in
                           registers for the whole sequence; the cache is read once at
                           the start and written once at the end.

Both kernels use the grid (N, cdiv(Dv, BLOCK_DV)): program (n, c) owns column block c
of every slot of stream n (N = B*H streams, stream n = b*H + h). Ideas for later
versions, not done: a chunked prefill for linear/mamba2 over the partition history
(SPEC §5); lazy decay for mamba2.

Memory layout:

    cache S  [N, K, Dk, Dv] float32, row-major: exactly the public Cache.S [B, H, K, Dk,
             Dv], so nothing is permuted on the way in or out. Program (n, c) reads, per
             slot, Dk rows of BLOCK_DV contiguous floats (128 bytes for BLOCK_DV = 32).
    n, info  [N, K] int64 / float32;  m [N] int64.
    tokens   q, k [B, T, H, Dk], v [B, T, H, Dv], lam [B, T, H, K], log_alpha and beta
             [B, T, H], contiguous (flash-linear-attention's layout): token t of stream n
             is row r = (b*T + t)*H + h, e.g. q_t = q[r*Dk : (r+1)*Dk].
    outputs  o [B, T, H, Dv] (row r), trace scores / boundary / merged [B, T, H] (index r).

Why the decision is duplicated rather than made by a separate decide kernel: the score
needs the whole open state (all Dv columns), but program (n, c) owns only columns c.
So every program of stream n computes the three scalars of the score (SPEC §7:
||s_t||^2, ||S_open||^2, <S_open, s_t>) over all Dv columns itself, with the same
instructions on the same data in the same order: all of them get bit-identical
scores and counts, and make the same boundary and merge decision, with no
communication and one launch per token. The price is one extra read of the open slot
per extra column block, (Dv / BLOCK_DV - 1) / K of the cache traffic; a decide kernel
plus an apply kernel would cost a second launch (microseconds, the scale of a whole
decode step) and a round trip of the decision through global memory. In the prefill
kernel the other programs of the stream do not share their columns of the open slot,
so each program keeps a private copy of the whole open state (``open_copies``
[N, cdiv(Dv, BLOCK_DV), Dk, Dv]) and scores against it; the open state evolves from
token data alone (G_t S_open + s_t, or s_t after a boundary), so the copies need
nothing from the other programs.

Options that only steer scalar arithmetic (K, score, normalize, slots, tau, eps) are
runtime arguments, so one compilation serves them all; the backbone, a forced trace
and the tile sizes are compile-time constants.

Limits: a [BLOCK_DK, BLOCK_DV] block and, in the prefill kernel, BLOCK_K such blocks
live in registers, so the prefill kernel narrows BLOCK_DV as K * Dk grows (down to one
column; see ``prefill_block_dv``). The score comes from three float32 scalars, in the
form of ``dla_ref.step.information_score_from_scalars``: in state mode it is free of
cancellation, in token mode it is off by up to about sqrt(float32 epsilon) where R(s_t)
is close to R(S_open); ``dla_ref.step.score_error_bound`` states both.
"""

from __future__ import annotations

from functools import reduce
from typing import NamedTuple

import array_api_compat
import torch
import triton
import triton.language as tl

from dla_ref.parallel import partition_history
from dla_ref.records import Cache, Result, Trace
from dla_ref.recurrent import cache_to_streams, empty_cache, to_streams
from dla_ref.step import open_state
from dla_ref.validation import check_cache, check_inputs, check_options, check_trace_shape

INF = tl.constexpr(float("inf"))


# --- one idea per function: the pieces of dla_ref.step, on tiles ------------------------
#
# A "block" is a program's BLOCK_DV columns of a [Dk, Dv] state, a [BLOCK_DK, BLOCK_DV]
# tile; a stack of blocks is [S, BLOCK_DK, BLOCK_DV] (S slots, or 1 for the open state).
# Per-stream vectors (n, info) are [BLOCK_K]. Everything is zero beyond Dk, Dv, K and the
# used slots, so padding adds nothing to any sum.


@triton.jit
def load_token(q, k, v, log_alpha, beta, row, rows, row_mask, cols, col_mask, Dk, Dv,
               BACKBONE: tl.constexpr):
    """Token ``row``: q_t, k_t [BLOCK_DK], v_t on the block [BLOCK_DV] (float32), and
    alpha_t = exp(log_alpha_t), beta_t (1 where the backbone has none)."""
    q_t = tl.load(q + row * Dk + rows, mask=row_mask, other=0.0).to(tl.float32)
    k_t = tl.load(k + row * Dk + rows, mask=row_mask, other=0.0).to(tl.float32)
    v_t = tl.load(v + row * Dv + cols, mask=col_mask, other=0.0).to(tl.float32)
    alpha = 1.0
    beta_t = 1.0
    if BACKBONE != "linear":
        alpha = tl.exp(tl.load(log_alpha + row).to(tl.float32))
    if BACKBONE == "gdn":
        beta_t = tl.load(beta + row).to(tl.float32)
    return q_t, k_t, v_t, alpha, beta_t


@triton.jit
def transition(X, k, alpha, beta, BACKBONE: tl.constexpr):
    """G_t X for a stack of blocks X [S, BLOCK_DK, BLOCK_DV] (SPEC §2).

    linear: X;  mamba2: alpha X;  gdn: alpha (X - beta k (k^T X)).   k [BLOCK_DK].
    Columns transition independently, so a program can transition its block alone.
    """
    if BACKBONE == "mamba2":
        X = alpha * X
    elif BACKBONE == "gdn":
        k3 = k[None, :, None]
        kX = tl.sum(k3 * X, axis=1)
        X = alpha * (X - beta * (k3 * kX[:, None, :]))
    return X


@triton.jit
def contribution(k, v, beta, BACKBONE: tl.constexpr):
    """s_t = k_t v_t^T (times beta_t for gdn) on one block: [BLOCK_DK, BLOCK_DV]."""
    s = k[:, None] * v[None, :]
    if BACKBONE == "gdn":
        s = beta * s
    return s


@triton.jit
def open_state_scalars(S_open, has_open, k, v_row, alpha, beta, rows, row_mask, Dv,
                       BACKBONE: tl.constexpr, WRITE_BACK: tl.constexpr,
                       BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr):
    """The three scalars of the score (SPEC §7) over all Dv columns:
    (||s_t||^2, ||S_open||^2, <S_open, s_t>), with S_open after the transition.

    S_open points at a [Dk, Dv] row-major state, read as zero unless has_open (an
    empty cache scores against nothing). It is read in blocks of BLOCK_DV columns in a
    fixed order, so every program that calls this on the same data gets bit-identical
    scalars. WRITE_BACK stores the transitioned state in place.
    """
    ss = tl.zeros([1, BLOCK_DK, BLOCK_DV], dtype=tl.float32)
    SS = tl.zeros([1, BLOCK_DK, BLOCK_DV], dtype=tl.float32)
    sS = tl.zeros([1, BLOCK_DK, BLOCK_DV], dtype=tl.float32)
    for c0 in range(0, Dv, BLOCK_DV):
        cols = c0 + tl.arange(0, BLOCK_DV)
        col_mask = cols < Dv
        offsets = (rows[:, None] * Dv + cols[None, :])[None, :, :]
        mask = (row_mask[:, None] & col_mask[None, :])[None, :, :]
        X = transition(tl.load(S_open + offsets, mask=mask & has_open, other=0.0),
                       k, alpha, beta, BACKBONE)
        if WRITE_BACK:
            tl.store(S_open + offsets, X, mask=mask)
        v = tl.load(v_row + cols, mask=col_mask, other=0.0).to(tl.float32)
        s = contribution(k, v, beta, BACKBONE)[None, :, :]
        ss += s * s
        SS += X * X
        sS += X * s
    return tl.sum(ss), tl.sum(SS), tl.sum(sS)


@triton.jit
def information_score(ss, SS, sS, size, eps, score_state, normalize):
    """I_t from ss = ||s_t||^2, SS = ||S_open||^2, sS = <S_open, s_t>; size = Dk*Dv;
    score_state, normalize: 0 or 1 (score="state", normalize=True).

    ``dla_ref.step.information_score_from_scalars`` term for term (``score_terms``):
        r_X = 1 / sqrt(||X||^2 / size + eps)   (1 if not normalize)
        token: r_A^2 ss - 2 r_A r_B sS + r_B^2 SS                       (A = s_t)
        state: d^2 SS + 2 d r_A sS + r_A^2 ss, P = 2 sS + ss = ||A||^2 - SS,
               d = r_A - r_B = -(P / size) r_A^2 r_B^2 / (r_A + r_B)    (A = S_open + s_t)
        I_t = min(sqrt(max(radicand, 0)) / (r_B ||S_open|| + eps), 2)   (no clamp if not
              normalize)
    """
    P = 2 * sS + ss
    AA = tl.where(score_state != 0, SS + P, ss)
    rA = tl.where(normalize != 0, 1.0 / tl.sqrt(AA / size + eps), 1.0)
    rB = tl.where(normalize != 0, 1.0 / tl.sqrt(SS / size + eps), 1.0)
    d = tl.where(normalize != 0, -(P / size) * (rA * rA) * (rB * rB) / (rA + rB), 0.0)
    token = rA * rA * ss - 2 * rA * rB * sS + rB * rB * SS
    state = d * d * SS + 2 * d * rA * sS + rA * rA * ss
    radicand = tl.where(score_state != 0, state, token)
    score = tl.sqrt(tl.maximum(radicand, 0.0)) / (rB * tl.sqrt(SS) + eps)
    return tl.where((normalize != 0) & (score > 2.0), 2.0, score)


@triton.jit
def zero_contribution(k, v_row, beta, Dv, BACKBONE: tl.constexpr, BLOCK_DV: tl.constexpr):
    """1 if s_t = beta_t k_t v_t^T is exactly zero (beta_t = 0 for gdn, k_t = 0 or
    v_t = 0, tested on the inputs: ``dla_ref.step.zero_contribution``), else 0.
    k [BLOCK_DK] (0 past Dk); v_row points at v_t, read in blocks of BLOCK_DV."""
    nonzero_v = 0
    for c0 in range(0, Dv, BLOCK_DV):
        cols = c0 + tl.arange(0, BLOCK_DV)
        v = tl.load(v_row + cols, mask=cols < Dv, other=0.0)
        nonzero_v += tl.sum((v != 0).to(tl.int32))
    zero = (tl.sum((k != 0).to(tl.int32)) == 0) | (nonzero_v == 0)
    if BACKBONE == "gdn":
        zero = zero | (beta == 0)
    return zero.to(tl.int32)


@triton.jit
def next_slot(x, slot):
    """x shifted left by one slot: result[i] = x[i+1], 0 for the last.   [BLOCK_K]

    A one-hot reduction, since a register vector cannot be indexed.
    """
    pick = slot[None, :] == slot[:, None] + 1
    return tl.sum(tl.where(pick, x[None, :], 0), axis=1)


@triton.jit
def pair_density(n, info, n_next, info_next, slot, K):
    """(J_j + J_{j+1}) / (n_j + n_{j+1}) for j in 0 .. K-2, +inf for a pair that involves
    an unused slot or does not exist.   [BLOCK_K]; x_next = next_slot(x)."""
    count = n + n_next
    pair = (slot < K - 1) & (count > 0)
    return tl.where(pair, (info + info_next) / tl.where(pair, count, 1).to(tl.float32), INF)


@triton.jit
def decide(score, silent, m, n, info, n_next, info_next, slot, K, tau, forced_boundary,
           forced_merged, row, FORCED: tl.constexpr):
    """The boundary b_t and the merged pair j (-1: none) of one stream (SPEC §3.3, §3.5).

    b_t = [m = 0] or [I_t >= tau] (note >=; with K = 1 only [m = 0]); a zero
    contribution (silent = 1) is absorbed whenever m > 0, whatever tau.
    j = argmin_j pair_density if b_t and m = K >= 2; ties go to the smallest j
    (tie_break_left). FORCED reads both from the trace at ``row`` instead (the host
    has checked that they fit the cache).
    """
    if FORCED:
        boundary = tl.load(forced_boundary + row) != 0
        merged = tl.load(forced_merged + row).to(tl.int32)
    else:
        boundary = (m == 0) | ((K > 1) & (silent == 0) & (score >= tau))
        densest = tl.argmin(pair_density(n, info, n_next, info_next, slot, K), axis=0,
                            tie_break_left=True)
        merged = tl.where(boundary & (m == K) & (K > 1), densest.to(tl.int32), -1)
    return boundary, merged


@triton.jit
def merge_adjacent(x, x_next, j, slot):
    """Slot j <- x_j + x_{j+1}, the slots after j shift left (the last gets x_next's 0).

    x [BLOCK_K] (n, info) or a stack of blocks [S, BLOCK_DK, BLOCK_DV] with slot
    [S, 1, 1]; x_next: slot i holds x_{i+1}; j scalar (-1: x unchanged).
    """
    merged = tl.where(slot < j, x, tl.where(slot == j, x + x_next, x_next))
    return tl.where(j >= 0, merged, x)


@triton.jit
def write_token(x, target, value, slot):
    """Add ``value`` to slot ``target`` = m - 1 + b_t (after a merge): absorb into the
    open slot, or append to a fresh (zero) one. Shapes as in ``merge_adjacent``."""
    return tl.where(slot == target, x + value, x)


@triton.jit
def decide_token(S_open, n, info, m, k, v_row, alpha, beta, row, K, tau, eps,
                 score_state, normalize, forced_boundary, forced_merged, rows, row_mask,
                 Dk, Dv, BACKBONE: tl.constexpr, FORCED: tl.constexpr,
                 WRITE_BACK: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DK: tl.constexpr,
                 BLOCK_DV: tl.constexpr):
    """Steps 2, 3 and 5a of SPEC §3 for one stream, computed alike by all its programs:
    score the token against the open state, decide, and update the counts.

    n [BLOCK_K] int64, info [BLOCK_K] float32, m int32: the counts before the token;
    S_open as in ``open_state_scalars``. Returns (score, boundary, merged, target,
    n, info, m) with target = m - 1 + b_t after the merge and the counts after the token.
    """
    ss, SS, sS = open_state_scalars(S_open, m > 0, k, v_row, alpha, beta, rows,
                                    row_mask, Dv, BACKBONE, WRITE_BACK, BLOCK_DK, BLOCK_DV)
    score = information_score(ss, SS, sS, Dk * Dv, eps, score_state, normalize)
    silent = zero_contribution(k, v_row, beta, Dv, BACKBONE, BLOCK_DV)
    # I_0 := 0 for an empty cache, I_t := 0 for a zero contribution
    score = tl.where((m > 0) & (silent == 0), score, 0.0)
    slot = tl.arange(0, BLOCK_K)
    n_next = next_slot(n, slot)
    info_next = next_slot(info, slot)
    boundary, merged = decide(score, silent, m, n, info, n_next, info_next, slot, K, tau,
                              forced_boundary, forced_merged, row, FORCED)
    m = m - (merged >= 0).to(tl.int32)
    target = m - 1 + boundary.to(tl.int32)
    n = write_token(merge_adjacent(n, n_next, merged, slot), target, 1, slot)
    info = write_token(merge_adjacent(info, info_next, merged, slot), target, score, slot)
    return score, boundary, merged, target, n, info, m + boundary.to(tl.int32)


@triton.jit
def slot_weights(lam_row, slots, m, newest_first):
    """Readout weight of each slot in ``slots``: lam[i] ("oldest-first") or lam[m-1-i]
    (newest_first = 1) for a used slot i < m, else 0.   [len(slots)] float32"""
    column = tl.where(newest_first != 0, m - 1 - slots, slots)
    return tl.load(lam_row + column, mask=slots < m, other=0.0).to(tl.float32)


@triton.jit
def store_step(o, scores, boundaries, merges, row, Dv, cols, col_mask, o_t, score, boundary,
               merged, first):
    """Store o_t on the block and, from the stream's ``first`` program, the trace."""
    tl.store(o + row * Dv + cols, o_t.to(o.dtype.element_ty), mask=col_mask)
    tl.store(scores + row, score, mask=first)
    tl.store(boundaries + row, boundary.to(tl.int8), mask=first)
    tl.store(merges + row, merged.to(tl.int64), mask=first)


@triton.jit
def load_counts(n_in, info_in, m_in, stream, K, BLOCK_K: tl.constexpr):
    """A stream's (n [BLOCK_K] int64, info [BLOCK_K] float32, m int32) from the cache."""
    slot = tl.arange(0, BLOCK_K)
    n = tl.load(n_in + stream * K + slot, mask=slot < K, other=0)
    info = tl.load(info_in + stream * K + slot, mask=slot < K, other=0.0)
    return n, info, tl.load(m_in + stream).to(tl.int32)


@triton.jit
def store_counts(n_out, info_out, m_out, stream, n, info, m, K, first,
                 BLOCK_K: tl.constexpr):
    """Write a stream's counts, from one program of the stream (``first``)."""
    slot = tl.arange(0, BLOCK_K)
    tl.store(n_out + stream * K + slot, n, mask=(slot < K) & first)
    tl.store(info_out + stream * K + slot, info, mask=(slot < K) & first)
    tl.store(m_out + stream, m.to(tl.int64), mask=first)


# --- decode v1 ----------------------------------------------------------------------------


@triton.jit
def update_slots(src, dst, lam_row, q, k, s, alpha, beta, m, merged, target, m_new, K,
                 newest_first, offsets, mask, slot_size, BACKBONE: tl.constexpr,
                 SLOT_BLOCK: tl.constexpr):
    """Steps 1 and 4-6 of SPEC §3 on this program's block of all K slots, from the
    cache src to the cache dst, SLOT_BLOCK slots at a time. Returns o_t on the block.

    Slot i of dst, from the slots of src (transitioned as they are loaded):
        no merge or i < j: S_i;   i = j: S_j + S_{j+1};   i > j: S_{i+1}   (0 past m)
        + s_t if i = target;   o_t = sum_i w_i q_t^T S_i   (``slot_weights``)
    The neighbour S_{i+1} is loaded only when a merge happens. Unused slots of dst are
    written too (as 0), so dst needs no clearing.
    q, k [BLOCK_DK], s [BLOCK_DK, BLOCK_DV]; offsets, mask: the block within a slot.
    """
    weighted = tl.zeros(s.shape, dtype=tl.float32)  # sum_i w_i S_i on the block
    for first in range(0, K, SLOT_BLOCK):
        slots = first + tl.arange(0, SLOT_BLOCK)
        slot3 = slots[:, None, None]
        here = slot3 * slot_size + offsets[None, :, :]
        block = mask[None, :, :]
        current = tl.load(src + here, mask=block & (slot3 < m), other=0.0)
        neighbour = (slot3 + 1 < m) & (merged >= 0)
        following = tl.load(src + here + slot_size, mask=block & neighbour, other=0.0)
        X = merge_adjacent(transition(current, k, alpha, beta, BACKBONE),
                           transition(following, k, alpha, beta, BACKBONE), merged, slot3)
        X = write_token(X, target, s[None, :, :], slot3)
        tl.store(dst + here, X, mask=block & (slot3 < K))
        w = slot_weights(lam_row, slots, m_new, newest_first)
        weighted += tl.sum(w[:, None, None] * X, axis=0)
    return tl.sum(q[:, None] * weighted, axis=0)


@triton.jit
def dla_decode_kernel(q, k, v, lam, log_alpha, beta, forced_boundary, forced_merged,
                      S_in, n_in, info_in, m_in, S_out, n_out, info_out, m_out,
                      o, scores, boundaries, merges, K, Dk, Dv, tau, eps, score_state,
                      normalize, newest_first, BACKBONE: tl.constexpr,
                      FORCED: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DK: tl.constexpr,
                      BLOCK_DV: tl.constexpr, SLOT_BLOCK: tl.constexpr):
    """One token (T = 1) for every stream: (S_in, n_in, info_in, m_in) -> (S_out, ...).

    Grid (N, cdiv(Dv, BLOCK_DV)): program (n, c) writes column block c of every slot of
    S_out[n] and of o; block 0 writes the counts and the trace. Out of place, since
    every program reads the whole open slot of S_in.
    """
    stream = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1)
    row = stream  # with T = 1, token row (b*T + t)*H + h is b*H + h
    rows = tl.arange(0, BLOCK_DK)
    row_mask = rows < Dk
    cols = block * BLOCK_DV + tl.arange(0, BLOCK_DV)
    col_mask = cols < Dv
    slot_size = Dk * Dv
    src = S_in + stream * K * slot_size

    n, info, m = load_counts(n_in, info_in, m_in, stream, K, BLOCK_K)
    q_t, k_t, v_t, alpha, beta_t = load_token(q, k, v, log_alpha, beta, row, rows, row_mask,
                                              cols, col_mask, Dk, Dv, BACKBONE)
    score, boundary, merged, target, n, info, m_new = decide_token(
        src + tl.maximum(m - 1, 0) * slot_size, n, info, m, k_t, v + row * Dv, alpha,
        beta_t, row, K, tau, eps, score_state, normalize, forced_boundary, forced_merged,
        rows, row_mask, Dk, Dv, BACKBONE, FORCED, False, BLOCK_K, BLOCK_DK, BLOCK_DV)
    o_t = update_slots(src, S_out + stream * K * slot_size, lam + row * K, q_t, k_t,
                       contribution(k_t, v_t, beta_t, BACKBONE), alpha, beta_t, m, merged,
                       target, m_new, K, newest_first, rows[:, None] * Dv + cols[None, :],
                       row_mask[:, None] & col_mask[None, :], slot_size, BACKBONE,
                       SLOT_BLOCK)
    first = block == 0
    store_step(o, scores, boundaries, merges, row, Dv, cols, col_mask, o_t, score, boundary,
               merged, first)
    store_counts(n_out, info_out, m_out, stream, n, info, m_new, K, first, BLOCK_K)


# --- prefill v2 --------------------------------------------------------------------------


@triton.jit
def absorb_or_open(S_open, k, v_row, beta, boundary, rows, row_mask, Dv,
                   BACKBONE: tl.constexpr, BLOCK_DV: tl.constexpr):
    """The open state after the token, in place: s_t if b_t (it opens a slot), else
    S_open + s_t.   S_open: [Dk, Dv] row-major, all columns (a private copy)."""
    for c0 in range(0, Dv, BLOCK_DV):
        cols = c0 + tl.arange(0, BLOCK_DV)
        col_mask = cols < Dv
        offsets = rows[:, None] * Dv + cols[None, :]
        mask = row_mask[:, None] & col_mask[None, :]
        v = tl.load(v_row + cols, mask=col_mask, other=0.0).to(tl.float32)
        s = contribution(k, v, beta, BACKBONE)
        X = tl.load(S_open + offsets, mask=mask, other=0.0)
        tl.store(S_open + offsets, tl.where(boundary, s, X + s), mask=mask)


@triton.jit
def following_slots(S, scratch, here, block, slot3, K, slot_size):
    """The stack shifted by one slot (slot i holds S_{i+1}, 0 past K), through the
    program's own part of ``scratch``: registers cannot be indexed by slot."""
    tl.store(scratch + here, S, mask=block & (slot3 < K))
    tl.debug_barrier()  # other threads read what this one stored
    following = tl.load(scratch + here + slot_size, mask=block & (slot3 + 1 < K), other=0.0)
    tl.debug_barrier()  # all read before the next merge overwrites
    return following


@triton.jit
def dla_prefill_kernel(q, k, v, lam, log_alpha, beta, forced_boundary, forced_merged,
                       S_in, n_in, info_in, m_in, S_out, n_out, info_out, m_out,
                       open_copies, o, scores, boundaries, merges, T, H, K, Dk, Dv, tau,
                       eps, score_state, normalize, newest_first, BACKBONE: tl.constexpr,
                       FORCED: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DK: tl.constexpr,
                       BLOCK_DV: tl.constexpr):
    """All T tokens of every stream, the loop over t inside (prefill v2).

    Grid (N, cdiv(Dv, BLOCK_DV)): program (n, c) loads column block c of all K slots of
    S_in[n] into registers ([BLOCK_K, BLOCK_DK, BLOCK_DV]), runs the T steps on them and
    writes them to S_out[n] at the end; a merge shifts them through S_out. It scores
    against its own copy open_copies[n, c] [Dk, Dv] of the whole open state. The counts
    stay in registers, the same in every program of the stream, and block 0 writes
    them and the trace.
    """
    stream = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1)
    rows = tl.arange(0, BLOCK_DK)
    row_mask = rows < Dk
    cols = block * BLOCK_DV + tl.arange(0, BLOCK_DV)
    col_mask = cols < Dv
    slot_size = Dk * Dv
    slot3 = tl.arange(0, BLOCK_K)[:, None, None]
    here = slot3 * slot_size + (rows[:, None] * Dv + cols[None, :])[None, :, :]
    block_mask = (row_mask[:, None] & col_mask[None, :])[None, :, :]
    scratch = S_out + stream * K * slot_size
    open_copy = open_copies + (stream * tl.num_programs(1) + block) * slot_size

    n, info, m = load_counts(n_in, info_in, m_in, stream, K, BLOCK_K)
    S = tl.load(S_in + stream * K * slot_size + here, mask=block_mask & (slot3 < K),
                other=0.0)
    batch = stream // H
    head = stream % H
    for t in range(0, T):
        row = (batch * T + t) * H + head
        q_t, k_t, v_t, alpha, beta_t = load_token(q, k, v, log_alpha, beta, row, rows,
                                                  row_mask, cols, col_mask, Dk, Dv,
                                                  BACKBONE)
        score, boundary, merged, target, n, info, m = decide_token(
            open_copy, n, info, m, k_t, v + row * Dv, alpha, beta_t, row, K, tau, eps,
            score_state, normalize, forced_boundary, forced_merged, rows, row_mask, Dk, Dv,
            BACKBONE, FORCED, True, BLOCK_K, BLOCK_DK, BLOCK_DV)
        tl.debug_barrier()  # absorb_or_open reads the transitioned copy in another layout
        absorb_or_open(open_copy, k_t, v + row * Dv, beta_t, boundary, rows, row_mask, Dv,
                       BACKBONE, BLOCK_DV)
        S = transition(S, k_t, alpha, beta_t, BACKBONE)
        if merged >= 0:  # rare: only a boundary at a full cache
            S = merge_adjacent(S, following_slots(S, scratch, here, block_mask, slot3, K,
                                                  slot_size), merged, slot3)
        s = contribution(k_t, v_t, beta_t, BACKBONE)
        S = write_token(S, target, s[None, :, :], slot3)
        w = slot_weights(lam + row * K, tl.arange(0, BLOCK_K), m, newest_first)
        o_t = tl.sum(q_t[:, None] * tl.sum(w[:, None, None] * S, axis=0), axis=0)
        store_step(o, scores, boundaries, merges, row, Dv, cols, col_mask, o_t, score,
                   boundary, merged, block == 0)
        # the next token reads the open copy as other threads of this program stored it
        tl.debug_barrier()
    tl.store(S_out + stream * K * slot_size + here, S, mask=block_mask & (slot3 < K))
    store_counts(n_out, info_out, m_out, stream, n, info, m, K, block == 0, BLOCK_K)


# --- the host side ------------------------------------------------------------------------


class Tokens(NamedTuple):
    """The token inputs on one device, contiguous [B, T, H, ...] (None where unused)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    lam: torch.Tensor
    log_alpha: torch.Tensor | None
    beta: torch.Tensor | None


class Forced(NamedTuple):
    """A forced trace as the kernels read it: boundary int8, merged int64, [B, T, H]."""

    boundary: torch.Tensor
    merged: torch.Tensor


def dla(q, k, v, lam, *, backbone="linear", log_alpha=None, beta=None, tau=0.6,
        capacity=30, score="token", normalize=True, slots="oldest-first", eps=1e-6,
        trace=None, initial_cache=None) -> Result:
    """Dynamic Linear Attention on torch tensors by the Triton kernels (``dla_ref.dla``).

    q, k [B, T, H, Dk]; v [B, T, H, Dv]; lam [B, T, H, K] >= 0; log_alpha [B, T, H] <= 0
    (mamba2, gdn); beta [B, T, H] in [0, 1] (gdn). trace: a Trace to replay (its scores
    are recomputed); initial_cache: a Cache to continue from. T == 1 runs the decode
    kernel, T > 1 the prefill kernel.

    Returns Result(o [B, T, H, Dv] in the inputs' promoted dtype, cache (S, info float32;
    n, m int64), trace (scores float32, boundary bool, merged int64)), on q's device.
    """
    opts = check_options(capacity=capacity, tau=tau, backbone=backbone, score=score,
                         normalize=normalize, slots=slots, eps=eps)
    if not isinstance(q, torch.Tensor):
        raise TypeError("q must be a torch.Tensor for the triton backend, got "
                        f"{type(q).__name__}")
    xp = array_api_compat.array_namespace(q, k, v, lam)
    B, T, H, Dk, Dv = check_inputs(xp, q, k, v, lam, log_alpha, beta, backbone,
                                   lam_columns=capacity)
    if trace is not None:
        check_trace_shape(xp, trace, B, T, H)
    if initial_cache is not None:
        check_cache(xp, initial_cache, B, H, capacity, Dk, Dv)
    cache = stream_cache(xp, initial_cache, B * H, capacity, Dk, Dv, q.device)
    forced = None if trace is None else forced_trace(xp, trace, cache, capacity, q.device)
    tokens = Tokens(*(None if x is None else x.to(q.device).contiguous()
                      for x in (q, k, v, lam, log_alpha, beta)))
    run = decode_step if T == 1 else prefill
    o, (S, n, info, m), decisions = run(tokens, cache, opts, forced)
    K = capacity
    return Result(o, Cache(S.view(B, H, K, Dk, Dv), n.view(B, H, K), info.view(B, H, K),
                           m.view(B, H)), Trace(*decisions))


def stream_cache(xp, initial_cache, N, K, Dk, Dv, device):
    """The cache over streams on ``device``: (S [N, K, Dk, Dv] float32, n [N, K] int64,
    info [N, K] float32, m [N] int64), contiguous. It may share memory with
    ``initial_cache``: the kernels only read it."""
    if initial_cache is None:
        return empty_cache(xp, N, K, Dk, Dv, torch.float32, device)
    return tuple(x.to(device).contiguous()
                 for x in cache_to_streams(xp, initial_cache, torch.float32))


def forced_trace(xp, trace, cache, K, device) -> Forced:
    """A trace's decisions as the kernels read them, after checking that they fit.

    ``dla_ref.parallel.partition_history`` replays them on the cache's slot counts and
    raises the reference's ValueError for the first decision that does not fit. It
    runs on host copies: T small steps, with no device synchronisation in each.
    """
    boundary = trace.boundary.to(device)
    merged = trace.merged.to(device, torch.int64)
    _, n, _, m = cache
    partition_history(xp, to_streams(xp, boundary).cpu(), to_streams(xp, merged).cpu(), K,
                      n=n.cpu(), m=m.cpu())
    return Forced(boundary.to(torch.int8).contiguous(), merged.contiguous())


def decode_step(tokens: Tokens, cache, opts, forced: Forced | None = None,
                block_dv: int | None = None, slot_block: int | None = None):
    """One token (T = 1) for every stream by ``dla_decode_kernel`` (decode v1).

    cache: (S, n, info, m) over N = B*H streams (see ``stream_cache``), only read.
    Returns (o [B, 1, H, Dv], the new cache over streams, (scores, boundary, merged)
    [B, 1, H]). block_dv, slot_block: the tiling, powers of two (None: the defaults).
    """
    B, T, H, Dk = tokens.q.shape
    Dv = tokens.v.shape[3]
    if T != 1:
        raise ValueError(f"the decode kernel takes one token (T = 1), got T = {T}")
    new = tuple(torch.empty_like(x) for x in cache)
    o, decisions = allocate_outputs(tokens)
    block_dv = block_dv or decode_block_dv(Dk, Dv)
    dla_decode_kernel[(B * H, triton.cdiv(Dv, block_dv))](
        *tokens, *(forced or (None, None)), *cache, *new, o, *decisions,
        *runtime_options(opts, Dk, Dv), **compile_options(opts, forced, Dk),
        BLOCK_DV=block_dv,
        SLOT_BLOCK=slot_block or decode_slot_block(opts.capacity, tokens.q.device))
    return o, new, finished(decisions)


def prefill(tokens: Tokens, cache, opts, forced: Forced | None = None,
            block_dv: int | None = None):
    """All T tokens of every stream by ``dla_prefill_kernel`` (prefill v2).

    cache: (S, n, info, m) over N = B*H streams, only read. Returns (o [B, T, H, Dv],
    the final cache over streams, (scores, boundary, merged) [B, T, H]). block_dv: the
    columns per program, a power of two (None: ``prefill_block_dv``).
    """
    B, T, H, Dk = tokens.q.shape
    Dv = tokens.v.shape[3]
    S, _, _, m = cache
    block_dv = block_dv or prefill_block_dv(opts.capacity, Dk, Dv)
    blocks = triton.cdiv(Dv, block_dv)
    xp = array_api_compat.array_namespace(S)
    open_copies = open_state(xp, S, m)[:, None].expand(B * H, blocks, Dk, Dv).contiguous()
    new = tuple(torch.empty_like(x) for x in cache)
    o, decisions = allocate_outputs(tokens)
    dla_prefill_kernel[(B * H, blocks)](
        *tokens, *(forced or (None, None)), *cache, *new, open_copies, o, *decisions, T, H,
        *runtime_options(opts, Dk, Dv), **compile_options(opts, forced, Dk),
        BLOCK_DV=block_dv, num_warps=PREFILL_WARPS)
    return o, new, finished(decisions)


# The prefill kernel's register stack needs the registers of 8 warps (see prefill_block_dv).
PREFILL_WARPS = 8


def allocate_outputs(tokens: Tokens):
    """o [B, T, H, Dv] in the inputs' promoted dtype, and the trace buffers [B, T, H]:
    scores float32, boundary int8 (triton stores bytes), merged int64."""
    B, T, H, _ = tokens.q.shape
    dtype = reduce(torch.promote_types, (x.dtype for x in tokens if x is not None))
    device = tokens.q.device
    o = torch.empty((B, T, H, tokens.v.shape[3]), dtype=dtype, device=device)
    decisions = (torch.empty((B, T, H), dtype=torch.float32, device=device),
                 torch.empty((B, T, H), dtype=torch.int8, device=device),
                 torch.empty((B, T, H), dtype=torch.int64, device=device))
    return o, decisions


def finished(decisions):
    """The trace buffers as the Trace fields: boundary as bool."""
    scores, boundary, merged = decisions
    return scores, boundary.to(torch.bool), merged


def runtime_options(opts, Dk, Dv):
    """The kernels' trailing runtime arguments: K, Dk, Dv, tau, eps, and the flags
    score_state, normalize, newest_first as 0 or 1 (the interpreter takes no bools)."""
    return (opts.capacity, Dk, Dv, opts.tau, opts.eps, int(opts.score == "state"),
            int(opts.normalize), int(opts.slots == "newest-first"))


def compile_options(opts, forced, Dk):
    """The compile-time arguments both kernels share."""
    return dict(BACKBONE=opts.backbone, FORCED=forced is not None,
                BLOCK_K=tile(opts.capacity), BLOCK_DK=tile(Dk))


def tile(size: int) -> int:
    """A tile dimension for ``size`` elements: a power of two (tl.arange) and at least
    16 (smaller tiles save nothing: a program's threads outnumber their elements)."""
    return max(16, triton.next_power_of_2(size))


def decode_block_dv(Dk: int, Dv: int) -> int:
    """Decode's columns per program: up to 32, so that small batches still fill the GPU
    with N * Dv / 32 programs while each tile row is one 128-byte line, and fewer for
    Dk > 64, so that a block stays within 2^11 floats (no register spills at 4 warps)."""
    return max(1, min(tile(Dv), 32, 2**11 // tile(Dk)))


def decode_slot_block(K: int, device: torch.device) -> int:
    """Decode's slots per iteration of its slot loop: one on a GPU (few registers, the
    loads of consecutive slots pipelined); all of them on CPU tensors, which run under
    the interpreter, where every triton operation costs about the same whatever its size."""
    return 1 if device.type == "cuda" else tile(K)


def prefill_block_dv(K: int, Dk: int, Dv: int) -> int:
    """Prefill's columns per program: as many as keep its BLOCK_K x BLOCK_DK x BLOCK_DV
    register stack within 2^13 floats (no register spills at 8 warps, measured with
    ptxas for K = 30, Dk = 64), at most all of Dv."""
    return max(1, min(tile(Dv), 2**13 // (tile(K) * tile(Dk))))
