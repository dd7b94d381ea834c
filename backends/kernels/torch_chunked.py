"""Exact chunked prefill of DLA for the linear and mamba2 backbones (torch, CPU or CUDA).

Same signature, semantics and result as ``dla_ref.dla``, plus ``chunk`` (C, the chunk
length); registered as "torch-chunked". backbone="gdn" raises NotImplementedError: its
transition is a Dk x Dk matrix per token, so the open state's norm is no longer a
function of a Gram matrix of the chunk's tokens.

The recurrent form touches all K states (K Dk Dv numbers) at every token. Here each
stream's tokens are cut into chunks of C, and the work is done in two phases
(proofs/chunked_prefill.md derives every formula used here):

1. decide (host, NumPy, float64). The score needs three scalars (SPEC §7):
   ||s_t||^2 = ||k_t||^2 ||v_t||^2, ||S_open||^2 and <S_open, s_t> = k_t^T S_open v_t;
   merges need only the counts n and score sums J. Inside a chunk the open state is
   always "the open state at the chunk start, decayed (until the chunk's first
   boundary), plus the decayed contributions of a range [a, t) of the chunk's tokens".
   So <S_open, s_t> is k_t^T S_0 v_t (one product per chunk) plus a row range of the
   chunk's decayed Gram matrix Gd[t, s] = exp(L_t - L_s)(k_t . k_s)(v_t . v_s), and
   ||S_open||^2 follows ||S||^2 <- alpha_t^2 (||S||^2 + 2 <S, s_t> + ||s_t||^2). Between
   two boundaries nothing discrete happens, so the scores of all tokens up to the
   next boundary are computed at once; the boundary token then goes through the
   reference's own rules (``dla_ref.step``) on (n, J). The open slot only ever holds
   the tokens since its last boundary (and perhaps an initial cache's open state), so
   this phase carries its own open state from chunk to chunk and needs no other state.
2. apply (device, torch). Knowing the slot of every token at every time, each chunk's
   outputs are the masked C x C product of its own tokens (all chunks of a block at
   once) plus one [C, K Dk] x [K Dk, Dv] product against the K states at the chunk
   start (each query weighted per slot); then the states move to the chunk's end
   (decay, the merges of chunk-start slots, the chunk's tokens added to their slots).

Tokens go through in blocks of about BLOCK_TOKENS (whole chunks): phase 1, then phase 2.
Memory per stream: the K states, O(BLOCK_TOKENS (C + K)) for a block's Gram matrices and
slot maps, O(T K) for the trace; no T x T matrix.

State dtype: float64 for float64 inputs, float32 otherwise; o comes back in the input
dtype. Decisions are computed in float64 whatever the state dtype (the expanded score
loses half its digits where I_t is near 0). Under a forced trace the outputs and the
final S are differentiable (phase 2 is torch, out of place while autograd records);
decisions carry no gradient.

Versions: v1: both phases per chunk, phase 1 reading the open state from phase 2's
float32 states. v2 (this file, shipped and tested): phase 1 carries its own float64
open state, so the token-only work (Gram matrices, intra-chunk products, slot maps,
weights) runs batched over a block of chunks and the sequential loop of phase 2 keeps
only the products with the states.
"""

from __future__ import annotations

from functools import reduce
from typing import NamedTuple

import array_api_compat
import numpy as np

from dla_ref.parallel import partition_history
from dla_ref.records import Cache, Result, Trace
from dla_ref.recurrent import cache_to_streams, empty_cache, from_streams, to_streams
from dla_ref.step import (absorb_zero_contributions, information_score_from_scalars,
                          is_boundary, merge_adjacent, merge_choice, slot_weights, write_token)
from dla_ref.validation import check_cache, check_inputs, check_options, check_trace_shape

DEFAULT_CHUNK = 64
BLOCK_TOKENS = 1024
npx = array_api_compat.array_namespace(np.zeros(0))  # NumPy as the reference's code expects it


def dla(q, k, v, lam, *, backbone="linear", log_alpha=None, beta=None, tau=0.6,
        capacity=30, score="token", normalize=True, slots="oldest-first", eps=1e-6,
        trace=None, initial_cache=None, chunk=DEFAULT_CHUNK) -> Result:
    """Dynamic Linear Attention by exact chunked prefill (see ``dla_ref.dla``).

    q, k [B, T, H, Dk]; v [B, T, H, Dv]; lam [B, T, H, K] >= 0; log_alpha [B, T, H] <= 0
    (mamba2). trace: a Trace to replay (its scores are recomputed); initial_cache: a
    Cache to continue from; chunk: C >= 1 tokens per chunk (any T works; the last
    chunk may be shorter).

    Returns Result(o [B, T, H, Dv] in the input dtype, cache (S, info in the state
    dtype; n, m int64), trace (scores in the state dtype, boundary bool, merged
    int64)), all on q's device.
    """
    import torch

    opts = check_options(capacity=capacity, tau=tau, backbone=backbone, score=score,
                         normalize=normalize, slots=slots, eps=eps)
    if not isinstance(q, torch.Tensor):
        raise TypeError(f"q must be a torch.Tensor for torch-chunked, got {type(q).__name__}")
    xp = array_api_compat.array_namespace(q, k, v, lam)
    B, T, H, Dk, Dv = check_inputs(xp, q, k, v, lam, log_alpha, beta, backbone,
                                   lam_columns=capacity)
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be an int >= 1, got {chunk!r}")
    if backbone == "gdn":
        raise NotImplementedError(
            "torch-chunked covers backbone='linear' and 'mamba2': gdn's transition "
            "(I - beta k k^T) makes the open state's norm depend on more than the "
            "chunk's Gram matrix; use the 'torch' backend")
    inputs = [x for x in (q, k, v, lam, log_alpha) if x is not None]
    in_dtype = reduce(torch.promote_types, (x.dtype for x in inputs))
    dtype = torch.float64 if in_dtype == torch.float64 else torch.float32

    N, K = B * H, capacity
    if initial_cache is None:
        S, n, info, m = empty_cache(xp, N, K, Dk, Dv, dtype)
    else:
        check_cache(xp, initial_cache, B, H, K, Dk, Dv)
        S, n, info, m = cache_to_streams(xp, initial_cache, dtype)
    S = S.to(q.device, copy=True)  # the states are updated in place where autograd allows
    recording = torch.is_grad_enabled() and any(
        x.requires_grad for x in inputs + ([] if initial_cache is None else [initial_cache.S]))
    carry = Carry(*(x.detach().cpu().numpy().astype(t) for x, t in
                    ((m, np.int64), (n, np.int64), (info, np.float64))))
    open_now = open_state(S.detach().cpu().numpy().astype(np.float64), carry.m)
    forced = None if trace is None else forced_trace(xp, trace, carry, B, T, H, K)

    # contiguous streams, so that a block's chunks are views
    q, k, v, lam = (to_streams(xp, x.to(dtype)).contiguous() for x in (q, k, v, lam))
    log_alpha = (torch.zeros(N, T, dtype=torch.float64, device=q.device) if log_alpha is None
                 else to_streams(xp, log_alpha.to(torch.float64)).contiguous())

    page = np.tile(np.arange(K), (N, 1))  # logical slot -> physical slot of S
    outputs, decisions = [], []
    for part, nb, C in blocks(T, chunk):
        # the chunk-local cumulative log decay L_j = log alpha_{c0} + ... + log alpha_{c0+j}
        L = torch.cumsum(log_alpha[:, part].reshape(N, nb, C), dim=2)
        qc, kc, vc = (x[:, part].reshape(N, nb, C, x.shape[2]) for x in (q, k, v))
        grams = chunk_grams(kc, vc, L)
        k64, v64, L64 = (x.detach().to(torch.float64).cpu().numpy() for x in (kc, vc, L))
        made = []
        for i in range(nb):  # phase 1
            tokens = slice(part.start + i * C, part.start + (i + 1) * C)
            scalars = grams.scalars(i, open_now, k64[:, i], v64[:, i], L64[:, i])
            m0 = carry.m
            carry, decided = decide_chunk(scalars, carry, opts, Dk * Dv, None if forced is None
                                          else (forced[0][:, tokens], forced[1][:, tokens]))
            open_now = open_state_at_end(open_now, decided.open_first, k64[:, i], v64[:, i],
                                         L64[:, i])
            made.append((m0, decided))
        decisions += [d for _, d in made]

        # phase 2
        to_device = lambda x: torch.from_numpy(np.ascontiguousarray(x)).to(q.device)  # noqa: E731
        slot_of = slot_map(np.concatenate([d.first_item for _, d in made], axis=1), K, C)
        used = to_device(np.concatenate([d.used for _, d in made], axis=1))
        weight = item_weights(lam[:, part], used, to_device(slot_of), slots)
        weight = weight.reshape(N, nb, C, K + C)
        ends = slot_of.reshape(N, nb, C, K + C)[:, :, -1]  # [N, nb, K + C]
        within = intra_outputs(qc, kc, vc, L, weight[..., K:])
        for i, (m0, _) in enumerate(made):
            present = np.arange(K)[None, :] < m0[:, None]
            outputs.append(within[:, i] + start_outputs(
                S, to_device(page), to_device(present), qc[:, i], L[:, i], weight[:, i, :, :K]))
            page, src, dst = page_moves(page, present, ends[:, i, :K])
            S = advance_states(S, kc[:, i], vc[:, i], L[:, i], *map(to_device, (page, src, dst)),
                               to_device(ends[:, i, K:]), in_place=not recording)

    scores, boundary, merged = (np.concatenate([getattr(d, f) for d in decisions], axis=1)
                                for f in ("scores", "boundary", "merged"))
    device = q.device
    host = lambda x, t: torch.from_numpy(np.ascontiguousarray(x)).to(device, t)  # noqa: E731
    o = from_streams(xp, torch.cat(outputs, dim=1), B, H).to(in_dtype)
    S = torch.take_along_dim(S, host(page, torch.int64)[:, :, None, None], dim=1)  # logical order
    cache = Cache(S.reshape(B, H, K, Dk, Dv), host(carry.n, torch.int64).reshape(B, H, K),
                  host(carry.info, dtype).reshape(B, H, K),
                  host(carry.m, torch.int64).reshape(B, H))
    found = Trace(from_streams(xp, host(scores, dtype), B, H),
                  from_streams(xp, host(boundary, torch.bool), B, H),
                  from_streams(xp, host(merged, torch.int64), B, H))
    return Result(o, cache, found)


def blocks(T, chunk):
    """(tokens, nb, C) for each block: nb whole chunks of C tokens, about BLOCK_TOKENS in
    all; a last chunk shorter than ``chunk`` is a block of its own (nb = 1, C < chunk)."""
    whole = T // chunk * chunk
    per_block = max(1, BLOCK_TOKENS // chunk) * chunk
    for b0 in range(0, whole, per_block):
        b1 = min(b0 + per_block, whole)
        yield slice(b0, b1), (b1 - b0) // chunk, chunk
    if whole < T:
        yield slice(whole, T), 1, T - whole


def open_state(S, m):
    """The open state S_{m-1} of each stream, 0 where m = 0.   S [N, K, Dk, Dv] -> [N, Dk, Dv]"""
    rows = np.arange(S.shape[0])
    return np.where((m > 0)[:, None, None], S[rows, np.maximum(m - 1, 0)], 0.0)


def forced_trace(xp, trace, carry, B, T, H, K):
    """A forced trace as host arrays (boundary [N, T] bool, merged [N, T] int64).

    ``partition_history`` replays it on the counts of the initial cache and raises
    the reference's ValueError where a decision does not fit the cache.
    """
    check_trace_shape(xp, trace, B, T, H)
    boundary = to_streams(npx, np.asarray(trace.boundary.detach().cpu()))
    merged = to_streams(npx, np.asarray(trace.merged.detach().cpu()).astype(np.int64))
    partition_history(npx, boundary, merged, K, n=carry.n, m=carry.m)
    return boundary, merged


# --- phase 1: decide ---------------------------------------------------------------------


class Carry(NamedTuple):
    """The decision state between chunks (host): m [N], n [N, K] int, info (J) [N, K] float64."""

    m: np.ndarray
    n: np.ndarray
    info: np.ndarray


class ChunkScalars(NamedTuple):
    """Everything the decisions of one chunk read (host, float64; N streams, C tokens).

    Token j of the chunk is t = c0 + j; L_j = sum_{u=c0}^{t} log alpha_u (L_{-1} = 0);
    S_0 is the open state at the chunk start (zero if the cache is empty).

    token_norm   [N, C]       ||s_j||^2 = ||k_j||^2 ||v_j||^2
    start_norm   [N]          ||S_0||^2
    start_dot    [N, C]       exp(L_j) k_j^T S_0 v_j = <S_0 decayed to token j, s_j>
    start_decay2 [N, C]       exp(2 L_j): how ||S_0||^2 decays until token j
    gram_prefix  [N, C, C+1]  sum_{s < i} Gd[j, s] at [., j, i]; Gd[j, s] = exp(L_j - L_s)
                              (k_j . k_s)(v_j . v_s) for s < j, else 0
    gram_before  [N, C]       sum_{s < j} Gd[j, s] (gram_prefix at i = j)
    decay2       [N, C, C]    exp(2 (L_j - L_s)) for s < j, else 0
    silent       [N, C] bool  k_j = 0 or v_j = 0 (on the inputs): a zero contribution
    """

    token_norm: np.ndarray
    start_norm: np.ndarray
    start_dot: np.ndarray
    start_decay2: np.ndarray
    gram_prefix: np.ndarray
    gram_before: np.ndarray
    decay2: np.ndarray
    silent: np.ndarray


class ChunkGrams(NamedTuple):
    """The token-only part of ``ChunkScalars`` for nb chunks (host, float64).

    token_norm, start_decay2, gram_before, silent [N, nb, C]; gram_prefix [N, nb, C, C+1];
    decay2 [N, nb, C, C]. ``scalars`` completes one chunk's with its open state.
    """

    token_norm: np.ndarray
    start_decay2: np.ndarray
    gram_prefix: np.ndarray
    gram_before: np.ndarray
    decay2: np.ndarray
    silent: np.ndarray

    def scalars(self, i, S0, k, v, L) -> ChunkScalars:
        """Chunk i's scalars, its open state at the start being S0 [N, Dk, Dv].

        k [N, C, Dk], v [N, C, Dv], L [N, C] of that chunk (float64).
        """
        start_dot = np.exp(L) * np.sum(np.matmul(k, S0) * v, axis=2)
        return ChunkScalars(self.token_norm[:, i], np.sum(S0 * S0, axis=(1, 2)), start_dot,
                            self.start_decay2[:, i], self.gram_prefix[:, i],
                            self.gram_before[:, i], self.decay2[:, i], self.silent[:, i])


def chunk_grams(k, v, L) -> ChunkGrams:
    """The ``ChunkGrams`` of nb chunks at once: O(C^2 (Dk + Dv)) per chunk and stream.

    k [N, nb, C, Dk], v [N, nb, C, Dv] (any float dtype, any device), L [N, nb, C]
    float64, each chunk's cumulative log decay. Computed in float64.
    """
    import torch

    f64 = torch.float64
    k, v = k.detach().to(f64), v.detach().to(f64)
    L = L.detach()
    j = torch.arange(L.shape[2], device=L.device)
    earlier = j[:, None] > j[None, :]  # [C(j), C(s)]: s < j
    decay = torch.exp(torch.where(earlier, L[..., :, None] - L[..., None, :], -torch.inf))
    prefix = torch.nn.functional.pad(torch.cumsum((k @ k.mT) * (v @ v.mT) * decay, dim=-1),
                                     (1, 0))
    start_decay = torch.exp(L)
    silent = (k == 0).all(-1) | (v == 0).all(-1)  # on the inputs: ||k||^2 can underflow
    grams = ((k * k).sum(-1) * (v * v).sum(-1), start_decay * start_decay, prefix,
             prefix.diagonal(dim1=-2, dim2=-1), decay * decay, silent)
    return ChunkGrams(*(x.cpu().numpy() for x in grams))


def open_state_at_end(S0, open_first, k, v, L):
    """The open state after the chunk's last token (Lemma 1 at its end).   [N, Dk, Dv]

        [open_first < 0] exp(L_end) S0 + sum_{s >= max(open_first, 0)} exp(L_end - L_s) k_s v_s^T

    S0 [N, Dk, Dv] the open state at the chunk start; open_first [N] the first chunk
    token of the open slot at the end (-1: it still holds S0); k [N, C, Dk], v [N, C, Dv],
    L [N, C] (float64, host).
    """
    C = L.shape[1]
    held = np.where(open_first < 0, np.exp(L[:, -1]), 0.0)
    weight = np.where(np.arange(C)[None, :] >= np.maximum(open_first, 0)[:, None],
                      np.exp(L[:, -1:] - L), 0.0)
    return held[:, None, None] * S0 + np.matmul((k * weight[..., None]).transpose(0, 2, 1), v)


class ChunkDecisions(NamedTuple):
    """What phase 1 decided for one chunk (host; N streams, C tokens, K slots).

    scores [N, C] float64, boundary [N, C] bool, merged [N, C] int64: the trace.
    used [N, C] int64: slots in use after token j (m_t).
    first_item [N, C, K] int64: after token j, the first item of each used slot, in
        the chunk's item numbering (item i < K: chunk-start slot i; item K + s: the
        chunk's token s); K + C for an unused slot.
    open_first [N] int64: the open slot's first chunk token after the chunk, -1 if it
        still holds the chunk-start open state (no token of the chunk opened a slot).
    """

    scores: np.ndarray
    boundary: np.ndarray
    merged: np.ndarray
    used: np.ndarray
    first_item: np.ndarray
    open_first: np.ndarray


def decide_chunk(x: ChunkScalars, carry: Carry, opts, size, forced=None):
    """DLA's decisions for one chunk, boundary to boundary.   -> (Carry, ChunkDecisions)

    x: the chunk's scalars; carry: (m, n, J) at the chunk start; size = Dk * Dv;
    forced: (boundary [N, C], merged [N, C]) of a forced trace, or None.

    Each round, every stream that has tokens left assumes its open slot goes on
    absorbing: its scores up to the chunk's end follow in closed form
    (``scores_while_absorbing``); its first token that opens a slot (I_t >= tau, an
    empty cache, or the forced trace's boundary) ends the round. The tokens before
    it are absorbed (J_{m-1} += I_t in token order, as the reference adds), and that
    token is decided by the reference's functions: ``merge_choice`` (or the forced
    index), ``merge_adjacent``, ``write_token``. It is the open slot's first token
    in the next round. Rounds per chunk: 1 + the most boundaries any stream has in it.
    """
    N, C = x.token_norm.shape
    K = opts.capacity
    rows, cols = np.arange(N), np.arange(C)
    m, n, info = carry.m.copy(), carry.n.copy(), carry.info.copy()
    m0 = m.copy()
    items = (np.arange(K)[None, :] < m[:, None]).astype(np.int64)  # one per chunk-start slot
    holds_start = m > 0  # the open slot still holds the chunk-start open state
    first = np.zeros(N, dtype=np.int64)  # else its first chunk token
    open_norm = x.start_norm.copy()  # ||S_open||^2 after token p - 1
    p = np.zeros(N, dtype=np.int64)  # the first undecided token
    scores, merges = np.zeros((N, C)), np.full((N, C), -1, dtype=np.int64)
    boundary = np.zeros((N, C), dtype=bool)
    # the partition changes only at a boundary: the r-th boundary of a stream in this
    # chunk happens in round r and starts its partition r + 1
    partitions = [(m, first_items(items, m, m0, K, C))]

    while True:
        live = cols[None, :] >= p[:, None]
        score = scores_while_absorbing(x, p, holds_start, first, open_norm, live, opts, size)
        # I := 0 at an empty cache and for a zero contribution, which DLA absorbs
        score = np.where((m[:, None] > 0) & ~x.silent, score, 0.0)
        opens = forced[0] if forced is not None else absorb_zero_contributions(
            npx, is_boundary(npx, score, m[:, None], opts), m[:, None], x.silent)
        opens = opens & live
        nxt = np.where(opens.any(axis=1), np.argmax(opens, axis=1), C)
        absorbed = live & (cols[None, :] < nxt[:, None])
        scores = np.where(live & (cols[None, :] <= nxt[:, None]), score, scores)

        last = np.maximum(m - 1, 0)  # streams with m = 0 absorb nothing
        sums = np.cumsum(np.concatenate([info[rows, last][:, None],
                                         np.where(absorbed, score, 0.0)], axis=1), axis=1)
        info[rows, last] = sums[:, -1]  # adding 0.0 is exact: the reference's sum
        n[rows, last] += absorbed.sum(axis=1)
        items[rows, last] += absorbed.sum(axis=1)

        at = nxt < C
        if not at.any():
            break
        j = np.minimum(nxt, C - 1)
        if forced is not None:
            merged = np.where(at, forced[1][rows, j], -1)
        else:
            merged = merge_choice(npx, n, info, m, at, K)
        if (merged >= 0).any():  # merge_adjacent with j = -1 everywhere is the identity
            n, items, info = (merge_adjacent(npx, y, merged) for y in (n, items, info))
            m = m - (merged >= 0)
        n = write_token(npx, n, m, at, at.astype(np.int64))
        items = write_token(npx, items, m, at, at.astype(np.int64))
        info = write_token(npx, info, m, at, np.where(at, score[rows, j], 0.0))
        m = m + at

        boundary[rows[at], j[at]] = True
        merges[rows[at], j[at]] = merged[at]
        partitions.append((m, first_items(items, m, m0, K, C)))
        holds_start &= ~at
        first = np.where(at, j, first)
        open_norm = np.where(at, x.token_norm[rows, j], open_norm)
        p = np.where(at, j + 1, C)

    which = np.cumsum(boundary, axis=1)  # [N, C]: the partition each token reads
    used = np.stack([u for u, _ in partitions], axis=1)  # [N, R, ...]
    starts = np.stack([f for _, f in partitions], axis=1)
    made = ChunkDecisions(scores, boundary, merges, np.take_along_axis(used, which, axis=1),
                          np.take_along_axis(starts, which[..., None], axis=1),
                          np.where(holds_start, -1, first))
    return Carry(m, n, info), made


def scores_while_absorbing(x: ChunkScalars, p, holds_start, first, open_norm, live, opts,
                           size):
    """I_j for every token j >= p, if the open slot absorbs tokens p ... j-1.   [N, C]

    The open slot holds S_0 (if ``holds_start``) and the chunk's tokens first ... p-1,
    and ||S_open||^2 = open_norm after token p - 1. Then, for j >= p (SPEC §7):

        <S_open, s_j>   = [holds_start] exp(L_j) k_j^T S_0 v_j + sum_{s=first}^{j-1} Gd[j, s]
        ||S_open||^2    = exp(2 (L_j - L_{p-1})) open_norm
                          + sum_{r=p}^{j-1} exp(2 (L_j - L_r)) (2 <S_open, s_r> + ||s_r||^2)

    (the second is the recurrence ||S||^2 <- alpha^2 (||S||^2 + 2 <S, s> + ||s||^2)
    unrolled). Entries with j < p (``live`` False) are computed as if the open state were 0.
    """
    N, C = x.token_norm.shape
    rows = np.arange(N)
    at_first = np.take_along_axis(x.gram_prefix, np.broadcast_to(first[:, None, None], (N, C, 1)),
                                  axis=2)[..., 0]
    dot = np.where(holds_start[:, None], x.start_dot, 0.0) + x.gram_before - at_first
    dot = np.where(live, dot, 0.0)
    grow = np.where(live, 2 * dot + x.token_norm, 0.0)
    since = np.where(p[:, None] == 0, x.start_decay2,
                     x.decay2[rows, :, np.maximum(p - 1, 0)])  # exp(2 (L_j - L_{p-1}))
    open_norms = since * open_norm[:, None] + np.matmul(x.decay2, grow[..., None])[..., 0]
    open_norms = np.where(live, np.maximum(open_norms, 0.0), 0.0)
    return information_score_from_scalars(npx, x.token_norm, open_norms, dot,
                                          size, opts)


def first_items(items, m, m0, K, C):
    """The first item of each used slot, in the chunk's item numbering.   [N, K]

    items [N, K]: items per slot (a chunk-start slot is one item, a token another);
    m [N] slots in use; m0 [N] slots in use at the chunk start. Counted in packed
    order (chunk-start slots 0 ... m0-1, then the tokens), a slot starts at the
    number of items before it; token s is packed item m0 + s and numbered K + s.
    Unused slots get K + C.
    """
    packed = np.cumsum(items, axis=1) - items
    numbered = np.where(packed < m0[:, None], packed, packed - m0[:, None] + K)
    return np.where(np.arange(K)[None, :] < m[:, None], numbered, K + C)


def slot_map(first_item, K, C):
    """slot_of[n, j, x]: the slot that holds item x after token j.   [N, J, K + C]

    first_item [N, J, K] for J tokens of chunks of C (see ``ChunkDecisions``). An item
    is in the last used slot that starts at or before it: mark every slot start,
    count the marks up to x, minus one. Entries of absent items (chunk-start slots
    >= m0, tokens after j) are meaningless; the readout masks them.
    """
    N, J, _ = first_item.shape
    marks = np.zeros((N, J, K + C + 1), dtype=np.int64)  # the last column takes unused slots
    np.put_along_axis(marks, first_item, 1, axis=2)
    return np.cumsum(marks[..., :-1], axis=2) - 1


# --- phase 2: apply ------------------------------------------------------------------------


def item_weights(lam, used, slot_of, slots):
    """Lambda of every item for every token of one or more chunks.   [N, C, K + C]

    weight[n, j, x] = w_j[slot_of[j, x]], w_j = slot_weights(lam_j, m_j, slots): the
    readout weight of the slot that holds item x after token j (SPEC §3.6, both slot
    orders). lam [N, C, K], used [N, C] (m_j), slot_of [N, C, K + C].
    """
    import torch

    N, C, K = lam.shape
    xp = array_api_compat.array_namespace(lam)
    w = slot_weights(xp, lam.reshape(N * C, K), used.reshape(N * C), slots).reshape(N, C, K)
    return torch.take_along_dim(w, slot_of.clamp(min=0, max=K - 1), dim=2)


def intra_outputs(q, k, v, L, weight):
    """The chunks' own tokens' part of their outputs, every chunk at once.   [N, nb, C, Dv]

        o_j += sum_{s <= j} weight[j, s] exp(L_j - L_s) (q_j . k_s) v_s

    q, k [N, nb, C, Dk], v [N, nb, C, Dv], L [N, nb, C] float64, weight [N, nb, C, C]
    the lambda of the slot that holds token s after token j: the masked C x C form of
    chunked linear attention.
    """
    import torch

    j = torch.arange(q.shape[2], device=q.device)
    causal = j[:, None] >= j[None, :]
    decay = torch.exp(torch.where(causal, L[..., :, None] - L[..., None, :], -torch.inf))
    return (weight * decay.to(q.dtype) * (q @ k.mT)) @ v


def start_outputs(S, page, present, q, L, weight):
    """One chunk's outputs from the states at its start.   [N, C, Dv]

        o_j += sum_{i present} weight[j, i] exp(L_j) q_j^T S_{page[i]}

    S [N, K, Dk, Dv] the states at the chunk start in physical slots, page [N, K] the
    physical slot of each logical one, present [N, K] the logical slots in use;
    q [N, C, Dk]; L [N, C] float64; weight [N, C, K] the lambda of the slot that holds
    logical slot i after token j. One [C, K Dk] x [K Dk, Dv] product per stream, each
    query scaled per (physical) slot.
    """
    import torch

    N, C, Dk = q.shape
    K, Dv = S.shape[1], S.shape[3]
    to_start = weight * (present[:, None, :] * torch.exp(L).to(q.dtype)[..., None])
    to_start = torch.zeros_like(to_start).scatter(2, page[:, None, :].expand(N, C, K), to_start)
    scaled = (to_start[..., None] * q[:, :, None, :]).reshape(N, C, K * Dk)
    return scaled @ S.reshape(N, K * Dk, Dv)


def page_moves(page, present, home):
    """How a chunk moves the states between physical slots (host).   -> (page', src, dst)

    The states live in physical slots, like the blocks of a paged KV cache, so that a
    merge adds one state into another instead of shifting every later slot.
    page [N, K]: the physical slot of each logical slot at the chunk start (a
    permutation per stream); present [N, K]: the logical slots in use there; home [N, K]:
    the logical slot each of them is in at the chunk's end. The chunk-start states that
    end in one slot g are added into the physical slot of the first of them (src ->
    dst, flat indices n K + physical slot), which becomes g's; the others are freed. An
    end slot that holds no chunk-start state (the chunk's tokens only, or unused)
    takes a free physical slot, in order. Returns page' [N, K] (a permutation) and
    src, dst [M].
    """
    N, K = page.shape
    rows = np.arange(N)[:, None]
    slot = np.broadcast_to(np.arange(K)[None, :], (N, K))
    home = np.where(present, home, K)  # absent slots end nowhere
    keep = np.full((N, K + 1), K)  # keep[g]: the first chunk-start slot that ends in g
    np.minimum.at(keep, (np.broadcast_to(rows, (N, K)), home), slot)
    keep = keep[:, :K]
    first = np.take_along_axis(keep, np.minimum(home, K - 1), axis=1)
    moving = present & (first != slot)
    flat = rows * K + page
    src = flat[moving]
    dst = np.take_along_axis(flat, np.minimum(first, K - 1), axis=1)[moving]

    kept = keep < K
    kept_page = np.take_along_axis(page, np.minimum(keep, K - 1), axis=1)
    taken = np.zeros((N, K + 1), dtype=bool)
    np.put_along_axis(taken, np.where(kept, kept_page, K), True, axis=1)
    free = np.argsort(taken[:, :K], axis=1, kind="stable")  # free physical slots first
    rank = np.maximum(np.cumsum(~kept, axis=1) - 1, 0)
    return np.where(kept, kept_page, np.take_along_axis(free, rank, axis=1)), src, dst


def advance_states(S, k, v, L, page, src, dst, group, in_place):
    """The states at the chunk's end from those at its start, in physical slots.

        S'_{page'[g]} = exp(L_end) sum_{i present: home[i] = g} S_{page[i]}
                      + sum_{s: group[s] = g} exp(L_end - L_s) k_s v_s^T

    S [N, K, Dk, Dv]; k [N, C, Dk], v [N, C, Dv], L [N, C] float64; page [N, K] = page'
    and src, dst [M] from ``page_moves``; group [N, C]: the logical slot each of the
    chunk's tokens ends in, non-decreasing by consecutive slots (G per stream): one
    [Dk, C] x [C, G Dv] product (v spread to its group's columns) gives every group's
    state. in_place: overwrite S (when autograd does not need it) instead of a fresh
    tensor, which costs page faults on a CPU.
    """
    import torch

    N, K, Dk, Dv = S.shape
    C = k.shape[1]
    end = L[:, -1:]
    decay = torch.exp(end).to(S.dtype)[:, :, None, None]
    moved = S.mul_(decay) if in_place else S * decay
    # in place from here: on S itself, or on a tensor made here that autograd has not saved
    flat = moved.reshape(N * K, Dk, Dv)
    if len(src):
        flat.index_put_((dst,), flat[src], accumulate=True)
        flat.index_fill_(0, src, 0.0)

    rank = group - group[:, :1]
    G = int(rank.max()) + 1
    spread = torch.nn.functional.one_hot(rank, G).to(v.dtype)  # [N, C, G]
    kw = k * torch.exp(end - L).to(k.dtype)[..., None]
    states = kw.mT @ (spread[..., None] * v[:, :, None, :]).reshape(N, C, G * Dv)
    states = states.reshape(N, Dk, G, Dv).permute(0, 2, 1, 3)  # [N, G, Dk, Dv]
    groups = (group[:, :1] + torch.arange(G, device=S.device)).clamp(max=K - 1)
    rows = torch.arange(N, device=S.device)[:, None] * K + torch.take_along_dim(page, groups, 1)
    # the padded groups of streams with fewer than G add 0
    flat.index_put_((rows.reshape(-1),), states.reshape(N * G, Dk, Dv), accumulate=True)
    return moved


# --- Log-Linear Attention through the same phase 2 -----------------------------------------


def loglinear(q, k, v, lam, *, backbone="linear", log_alpha=None, beta=None,
              chunk=DEFAULT_CHUNK):
    """Log-Linear Attention (``dla_ref.loglinear``) by the same chunked products.   -> o

    Shapes as in ``dla_ref.loglinear``: lam [B, T, H, L] with L >= fenwick_levels(T)
    columns, indexed by level. Only the partition differs from DLA's (SPEC §6): the
    Fenwick level of token s at time t is bit_length(t XOR s), so with C a power of
    two and chunks starting at multiples of C, every token before the chunk keeps
    the level it has at the chunk start c0 for the whole chunk (t and c0 agree on
    the bits that decide it), and the chunk's token s is at level
    bit_length((t - c0) XOR (s - c0)). Slots are levels; at the next chunk start
    c1 = c0 + C a level-l block of c0 lies in level bit_length(c1 XOR (c0 >> l << l))
    and the chunk's tokens all in level bit_length(c1 XOR c0). Here it prices the
    Log-Linear baseline in the same backend (``dla bench``). o in the input dtype.
    """
    import torch

    from dla_ref.fenwick import fenwick_levels, level

    if not isinstance(q, torch.Tensor):
        raise TypeError(f"q must be a torch.Tensor for torch-chunked, got {type(q).__name__}")
    xp = array_api_compat.array_namespace(q, k, v, lam)
    B, T, H, Dk, Dv = check_inputs(xp, q, k, v, lam, log_alpha, beta, backbone)
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1 or chunk & (chunk - 1):
        raise ValueError(f"chunk must be a power of two for Log-Linear, got {chunk!r}")
    if backbone == "gdn":
        raise NotImplementedError("torch-chunked covers backbone='linear' and 'mamba2'")
    L = fenwick_levels(T)
    if lam.shape[3] < L:
        raise ValueError(f"lam must have at least {L} columns (levels) for T={T}, "
                         f"got {lam.shape[3]}")
    in_dtype = reduce(torch.promote_types, (x.dtype for x in (q, k, v, lam, log_alpha)
                                            if x is not None))
    dtype = torch.float64 if in_dtype == torch.float64 else torch.float32
    N, device = B * H, q.device
    q, k, v = (to_streams(xp, x.to(dtype)).contiguous() for x in (q, k, v))
    lam = to_streams(xp, lam[..., :L].to(dtype)).contiguous()
    log_alpha = (torch.zeros(N, T, dtype=torch.float64, device=device) if log_alpha is None
                 else to_streams(xp, log_alpha.to(torch.float64)).contiguous())

    S = torch.zeros(N, L, Dk, Dv, dtype=dtype, device=device)
    recording = torch.is_grad_enabled() and any(
        x.requires_grad for x in (q, k, v, lam, log_alpha) if x is not None)
    page = np.tile(np.arange(L), (N, 1))  # level -> physical slot of S
    to_device = lambda x: torch.from_numpy(np.ascontiguousarray(x)).to(device)  # noqa: E731
    outputs = []
    for part, nb, C in blocks(T, chunk):
        qc, kc, vc, lam_c = (x[:, part].reshape(N, nb, C, x.shape[2]) for x in (q, k, v, lam))
        decay = torch.cumsum(log_alpha[:, part].reshape(N, nb, C), dim=2)
        within = torch.tensor([[level(t, s) if s <= t else 0 for s in range(C)]
                               for t in range(C)], device=device)  # [C(t), C(s)]
        own = intra_outputs(qc, kc, vc, decay,
                            torch.take_along_dim(lam_c, within.expand(N, nb, C, C), dim=3))
        for i in range(nb):
            c0 = part.start + i * C
            # the levels that hold the tokens before c0
            held = np.array([l >= 1 and bool(c0 >> (l - 1) & 1) for l in range(L)])
            present = torch.from_numpy(held).to(device)
            outputs.append(own[:, i] + start_outputs(S, to_device(page), present.expand(N, L),
                                                     qc[:, i], decay[:, i], lam_c[:, i] * present))
            c1 = c0 + C
            if c1 < T:
                home = np.array([level(c1, c0 >> l << l) for l in range(L)])
                page, src, dst = page_moves(page, np.broadcast_to(held, (N, L)),
                                            np.broadcast_to(home, (N, L)))
                group = torch.full((N, C), level(c1, c0), device=device)
                S = advance_states(S, kc[:, i], vc[:, i], decay[:, i],
                                   *map(to_device, (page, src, dst)), group,
                                   in_place=not recording)
    return from_streams(xp, torch.cat(outputs, dim=1), B, H).to(in_dtype)
