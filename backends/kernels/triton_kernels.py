"""The Triton backend ("triton"): a decode-step kernel and a prefill kernel for DLA.

Torch tensors; the keywords and result of ``dla_ref.dla`` through ``dla_backends.host``.
Inputs of any float dtype; the state (S, info, scores) is float32 whatever the inputs; o
comes back in the inputs' dtype. ``dla`` runs the decode kernel when T == 1 and the
prefill kernel when T > 1; both are ports of ``dla_ref.step.step`` built from the tile
functions below, so a loop of T == 1 calls that threads the cache gives what one call
over the T tokens gives. Grid (N, cdiv(Dv, BLOCK_DV)): program (n, c) owns column block c
of every slot of stream n, and every program of a stream computes the score's three
scalars over all Dv columns itself, so all make the same decision with no communication.

Kernels and their versions (llm.c style; the shipped version is the tested one):

    decode   v1 (shipped)  ``dla_decode_kernel``: one token for every stream, the cache
                           read once and written once (out of place).
    prefill  v1            the decode kernel launched T times, threading the cache (no code
                           of its own; the tests check that v2 equals it).
             v2 (shipped)  ``dla_prefill_kernel``: one launch, the loop over t inside, each
                           program's column block of all K slots in registers throughout.

Memory layout, tiling, register budgets, precision and GPU status: docs/triton.md.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dla_backends import host
from dla_ref.step import open_state

INF = tl.constexpr(float("inf"))


# --- one idea per function: the pieces of dla_ref.step, on tiles ------------------------
#
# A "block" is a program's BLOCK_DV columns of a [Dk, Dv] state, a [BLOCK_DK, BLOCK_DV]
# tile; a stack of blocks is [S, BLOCK_DK, BLOCK_DV] (S slots, or 1 for the open state).
# Per-stream vectors (n, info) are [BLOCK_K]. Everything is zero beyond Dk, Dv, K and the
# used slots, so padding adds nothing to any sum.


@triton.jit
def load_token(q, k, v, alpha, beta, row, rows, row_mask, cols, col_mask, Dk, Dv,
               BACKBONE: tl.constexpr):
    """Token ``row``: q_t, k_t [BLOCK_DK], v_t on the block [BLOCK_DV] (float32), and
    alpha_t, beta_t (1 where the backbone has none)."""
    q_t = tl.load(q + row * Dk + rows, mask=row_mask, other=0.0).to(tl.float32)
    k_t = tl.load(k + row * Dk + rows, mask=row_mask, other=0.0).to(tl.float32)
    v_t = tl.load(v + row * Dv + cols, mask=col_mask, other=0.0).to(tl.float32)
    alpha_t = 1.0
    beta_t = 1.0
    if BACKBONE != "linear":
        alpha_t = tl.load(alpha + row).to(tl.float32)
    if BACKBONE == "gdn":
        beta_t = tl.load(beta + row).to(tl.float32)
    return q_t, k_t, v_t, alpha_t, beta_t


@triton.jit
def transition(X, k, alpha, beta, BACKBONE: tl.constexpr):
    """G_t X for a stack of blocks X [S, BLOCK_DK, BLOCK_DV] (docs/spec/backbones.md).

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
    """The three scalars of the score (docs/spec/information-score.md) over all Dv columns:
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
    P = tl.maximum(2 * sS + ss, -SS)  # ||A||^2 = SS + P >= 0 despite rounding
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
    """The boundary b_t and the merged pair j (-1: none) of one stream
    (docs/spec/boundaries.md, docs/spec/merging.md).

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
    """Steps 2, 3 and 5a of docs/index.md's step for one stream, computed alike by all its programs:
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
    """Steps 1 and 4-6 of docs/index.md's step on this program's block of all K slots, from the
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
def dla_decode_kernel(q, k, v, lam, alpha, beta, forced_boundary, forced_merged,
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
    row = stream  # with T = 1, token row n T + t is the stream
    rows = tl.arange(0, BLOCK_DK)
    row_mask = rows < Dk
    cols = block * BLOCK_DV + tl.arange(0, BLOCK_DV)
    col_mask = cols < Dv
    slot_size = Dk * Dv
    src = S_in + stream * K * slot_size

    n, info, m = load_counts(n_in, info_in, m_in, stream, K, BLOCK_K)
    q_t, k_t, v_t, alpha_t, beta_t = load_token(q, k, v, alpha, beta, row, rows, row_mask,
                                                cols, col_mask, Dk, Dv, BACKBONE)
    score, boundary, merged, target, n, info, m_new = decide_token(
        src + tl.maximum(m - 1, 0) * slot_size, n, info, m, k_t, v + row * Dv, alpha_t,
        beta_t, row, K, tau, eps, score_state, normalize, forced_boundary, forced_merged,
        rows, row_mask, Dk, Dv, BACKBONE, FORCED, False, BLOCK_K, BLOCK_DK, BLOCK_DV)
    o_t = update_slots(src, S_out + stream * K * slot_size, lam + row * K, q_t, k_t,
                       contribution(k_t, v_t, beta_t, BACKBONE), alpha_t, beta_t, m, merged,
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
def decide_on_open_copy(open_copy, n, info, m, k, v_row, alpha, beta, row, K, tau, eps,
                        score_state, normalize, forced_boundary, forced_merged, rows, row_mask,
                        Dk, Dv, BACKBONE: tl.constexpr, FORCED: tl.constexpr,
                        BLOCK_K: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr):
    """``decide_token`` against a private copy of the open state [Dk, Dv] (transitioned in
    place), then the copy after the token (``absorb_or_open``). Returns what
    ``decide_token`` returns."""
    score, boundary, merged, target, n, info, m = decide_token(
        open_copy, n, info, m, k, v_row, alpha, beta, row, K, tau, eps, score_state,
        normalize, forced_boundary, forced_merged, rows, row_mask, Dk, Dv, BACKBONE, FORCED,
        True, BLOCK_K, BLOCK_DK, BLOCK_DV)
    tl.debug_barrier()  # absorb_or_open reads the transitioned copy in another layout
    absorb_or_open(open_copy, k, v_row, beta, boundary, rows, row_mask, Dv, BACKBONE, BLOCK_DV)
    return score, boundary, merged, target, n, info, m


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
def advance_stack(S, k, v, alpha, beta, merged, target, scratch, here, block, slot3, K,
                  slot_size, BACKBONE: tl.constexpr):
    """Steps 1, 5 and 4 on the program's register stack [BLOCK_K, BLOCK_DK, BLOCK_DV]:
    transition every slot, merge slots j and j+1 (through ``scratch``, only at a merge),
    add s_t to slot ``target``."""
    S = transition(S, k, alpha, beta, BACKBONE)
    if merged >= 0:  # rare: only a boundary at a full cache
        S = merge_adjacent(S, following_slots(S, scratch, here, block, slot3, K, slot_size),
                           merged, slot3)
    return write_token(S, target, contribution(k, v, beta, BACKBONE)[None, :, :], slot3)


@triton.jit
def read_stack(q, S, lam_row, m, newest_first, BLOCK_K: tl.constexpr):
    """Step 6 on the stack: o_t = q_t^T sum_i w_i S_i on the program's columns."""
    w = slot_weights(lam_row, tl.arange(0, BLOCK_K), m, newest_first)
    return tl.sum(q[:, None] * tl.sum(w[:, None, None] * S, axis=0), axis=0)


@triton.jit
def dla_prefill_kernel(q, k, v, lam, alpha, beta, forced_boundary, forced_merged,
                       S_in, n_in, info_in, m_in, S_out, n_out, info_out, m_out,
                       open_copies, o, scores, boundaries, merges, T, K, Dk, Dv, tau,
                       eps, score_state, normalize, newest_first, BACKBONE: tl.constexpr,
                       FORCED: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DK: tl.constexpr,
                       BLOCK_DV: tl.constexpr):
    """All T tokens of every stream, the loop over t inside (prefill v2).

    Grid (N, cdiv(Dv, BLOCK_DV)): program (n, c) keeps column block c of all K slots of
    stream n in registers from S_in to S_out (a merge shifts them through S_out), and
    scores against its own copy open_copies[n, c] [Dk, Dv] of the whole open state. The
    counts are the same in every program of the stream; block 0 writes them and the trace.
    """
    # 0. the program's tile: column block c of every slot of stream n
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

    # 1. the cache into registers
    n, info, m = load_counts(n_in, info_in, m_in, stream, K, BLOCK_K)
    S = tl.load(S_in + stream * K * slot_size + here, mask=block_mask & (slot3 < K),
                other=0.0)

    # 2. the tokens in order: decide (alike in every program), the open copy, the stack
    for t in range(0, T):
        row = stream * T + t
        q_t, k_t, v_t, alpha_t, beta_t = load_token(q, k, v, alpha, beta, row, rows,
                                                    row_mask, cols, col_mask, Dk, Dv,
                                                    BACKBONE)
        score, boundary, merged, target, n, info, m = decide_on_open_copy(
            open_copy, n, info, m, k_t, v + row * Dv, alpha_t, beta_t, row, K, tau, eps,
            score_state, normalize, forced_boundary, forced_merged, rows, row_mask, Dk, Dv,
            BACKBONE, FORCED, BLOCK_K, BLOCK_DK, BLOCK_DV)
        S = advance_stack(S, k_t, v_t, alpha_t, beta_t, merged, target, scratch, here,
                          block_mask, slot3, K, slot_size, BACKBONE)
        o_t = read_stack(q_t, S, lam + row * K, m, newest_first, BLOCK_K)
        store_step(o, scores, boundaries, merges, row, Dv, cols, col_mask, o_t, score,
                   boundary, merged, block == 0)
        # the next token reads the open copy as other threads of this program stored it
        tl.debug_barrier()

    # 3. the cache back
    tl.store(S_out + stream * K * slot_size + here, S, mask=block_mask & (slot3 < K))
    store_counts(n_out, info_out, m_out, stream, n, info, m, K, block == 0, BLOCK_K)


# --- the host side ------------------------------------------------------------------------


def dla(q, k, v, lam=None, **options):
    """``dla_ref.dla`` on torch tensors by the Triton kernels: the same keywords, checks
    and result. T == 1 runs the decode kernel, T > 1 the prefill kernel."""
    return host.run(launch, q, k, v, lam, backend="triton", **options)


def launch(call: host.Call) -> host.Launched:
    """The decode kernel for one token, the prefill kernel for more."""
    return decode_step(call) if call.shape[1] == 1 else prefill(call)


def decode_step(call: host.Call, block_dv: int | None = None, slot_block: int | None = None):
    """One token (T = 1) for every stream by ``dla_decode_kernel`` (decode v1), from the
    call's cache into a new one. block_dv, slot_block: the tiling, powers of two (None:
    ``decode_block_dv``, ``decode_slot_block``)."""
    (N, T), (_, _, _, Dk, Dv) = call.streams, call.shape
    if T != 1:
        raise ValueError(f"the decode kernel takes one token (T = 1), got T = {T}")
    cache = tuple(x.contiguous() for x in call.cache)
    new = tuple(torch.empty_like(x) for x in cache)
    o, decisions = allocate_outputs(call)
    block_dv = block_dv or decode_block_dv(Dk, Dv)
    dla_decode_kernel[(N, triton.cdiv(Dv, block_dv))](
        *kernel_tokens(call), *kernel_forced(call), *cache, *new, o, *decisions,
        *runtime_options(call.opts, Dk, Dv), **compile_options(call, Dk), BLOCK_DV=block_dv,
        SLOT_BLOCK=slot_block or decode_slot_block(call.opts.capacity, call.device))
    return host.Launched(o, new, decisions)


def prefill(call: host.Call, block_dv: int | None = None):
    """All T tokens of every stream by ``dla_prefill_kernel`` (prefill v2), from the call's
    cache into a new one. block_dv: columns per program, a power of two (None:
    ``prefill_block_dv``)."""
    (N, T), (_, _, _, Dk, Dv) = call.streams, call.shape
    cache = tuple(x.contiguous() for x in call.cache)
    S, _, _, m = cache
    block_dv = block_dv or prefill_block_dv(call.opts.capacity, Dk, Dv)
    blocks = triton.cdiv(Dv, block_dv)
    open_copies = open_state(call.xp, S, m)[:, None].expand(N, blocks, Dk, Dv).contiguous()
    new = tuple(torch.empty_like(x) for x in cache)
    o, decisions = allocate_outputs(call)
    dla_prefill_kernel[(N, blocks)](
        *kernel_tokens(call), *kernel_forced(call), *cache, *new, open_copies, o, *decisions,
        T, *runtime_options(call.opts, Dk, Dv), **compile_options(call, Dk),
        BLOCK_DV=block_dv, num_warps=PREFILL_WARPS)
    return host.Launched(o, new, decisions)


# The prefill kernel's register stack needs the registers of 8 warps (see prefill_block_dv).
PREFILL_WARPS = 8


def kernel_tokens(call: host.Call):
    """(q, k, v, lam, alpha, beta) as the kernels read them: contiguous streams [N, T, ...]
    in float32, token t of stream n at row n T + t (None where the backbone has none)."""
    return tuple(None if x is None else x.contiguous() for x in call.tokens)


def kernel_forced(call: host.Call):
    """A forced trace on the device as the kernels read it: boundary int8 (triton stores
    bytes) and merged int64, [N, T]; (None, None) without one."""
    if call.forced is None:
        return None, None
    boundary, merged = call.forced
    return (torch.from_numpy(boundary.astype("int8")).to(call.device),
            torch.from_numpy(merged).to(call.device))


def allocate_outputs(call: host.Call):
    """o [N, T, Dv] in the inputs' dtype, and the trace buffers [N, T]: scores float32,
    boundary int8, merged int64 (``host.finish`` makes boundary bool)."""
    (N, T), Dv, dev = call.streams, call.shape[4], call.device
    o = torch.empty((N, T, Dv), dtype=call.out_dtype, device=dev)
    decisions = (torch.empty((N, T), dtype=torch.float32, device=dev),
                 torch.empty((N, T), dtype=torch.int8, device=dev),
                 torch.empty((N, T), dtype=torch.int64, device=dev))
    return o, decisions


def runtime_options(opts, Dk, Dv):
    """The kernels' trailing runtime arguments: K, Dk, Dv, tau, eps, and the flags
    score_state, normalize, newest_first as 0 or 1 (the interpreter takes no bools)."""
    return (opts.capacity, Dk, Dv, opts.tau, opts.eps, int(opts.score == "state"),
            int(opts.normalize), int(opts.slots == "newest-first"))


def compile_options(call: host.Call, Dk):
    """The compile-time arguments both kernels share."""
    return dict(BACKBONE=call.opts.backbone, FORCED=call.forced is not None,
                BLOCK_K=tile(call.opts.capacity), BLOCK_DK=tile(Dk))


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
