"""Exact chunked prefill of DLA for the linear and mamba2 backbones ("torch-chunked").

Torch tensors on CPU or CUDA; the keywords and result of ``dla_ref.dla``, plus ``chunk``
(C tokens per chunk). gdn raises NotImplementedError: its transition is a Dk x Dk matrix
per token, so the open state's norm is no function of the chunk's Gram matrix. Each
stream's tokens are cut into chunks of C, taken in blocks of about BLOCK_TOKENS tokens:

1. decide (host, float64, compiled by Numba: ``chunked_decisions``): each token's score
   from three scalars (the chunk's decayed Gram matrix and the carried open state), each
   stream token by token, by the reference's rules (``dla_ref.step``);
2. apply (device, torch): each chunk's outputs as the masked C x C product of its own
   tokens plus one [C, K Dk] x [K Dk, Dv] product against the K states at its start,
   then the states moved to the chunk's end (paged slots: a merge adds one state).

Versions: v1, both phases per chunk, phase 1 reading the open state from phase 2's
float32 states (no longer in the tree); v2 (shipped, tested), phase 1 carries its own
float64 open state, so the token-only work runs batched over a block of chunks; v3,
phase 1's per-token walk compiled (it ran as NumPy operations over all streams at once).
Derivations: proofs/chunked_prefill.md; design notes and memory: docs/kernels.md.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import numpy as np
from array_api_compat import array_namespace

from dla_backends import host, registry
from dla_backends.host import to_host
from dla_backends.kernels import chunked_decisions
from dla_ref.fenwick import fenwick_levels, level
from dla_ref.recurrent import from_streams, to_streams, tokens_to_streams
from dla_ref.step import slot_weights
from dla_ref.validation import broadcast_lam, check_inputs, inputs_namespace

DEFAULT_CHUNK = 64
BLOCK_TOKENS = 1024


def dla(q, k, v, lam=None, *, chunk=DEFAULT_CHUNK, **options):
    """``dla_ref.dla`` by exact chunked prefill: the same keywords, checks and result.

    chunk: C >= 1 tokens per chunk (any T works; the last chunk may be shorter). The state
    is float64 for float64 inputs, else float32; decisions are made in float64 (the
    expanded score loses half its digits near I_t = 0); o in the inputs' dtype. Under a
    forced trace o and the final S are differentiable; decisions carry no gradient.
    """
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be an int >= 1, got {chunk!r}")
    return host.run(functools.partial(launch, chunk=chunk), q, k, v, lam,
                    backend="torch-chunked", **options)


def launch(call: host.Call, chunk: int) -> host.Launched:
    """The two phases, block by block, on the call's own cache (linear or mamba2: the
    registry's backbones, which the host enforces)."""
    streams = stream_inputs(call.tokens, call.log_alpha)
    state = initial_state(call.cache)
    outputs, decisions = [], []
    for part, nb, C in blocks(call.shape[1], chunk):
        x = block_of(streams, part, nb, C)
        made, state = decide_block(x, state, call)  # phase 1
        o, state = apply_block(x, made, state, call)  # phase 2
        outputs.append(o)
        decisions += [d for _, d in made]
    return finished(outputs, decisions, state)


# --- phase 0: the streams, the blocks, the state carried between them ---------------------


class State(NamedTuple):
    """What the phases carry from block to block.

    S        [N, K, Dk, Dv] the states on the device, in physical slots (phase 2)
    page     [N, K] the physical slot of each logical slot (host)
    carry    the counts (``Carry``, host), phase 1's
    open_now [N, Dk, Dv] float64 the open state (host), phase 1's
    """

    S: Any
    page: np.ndarray
    carry: Carry
    open_now: np.ndarray


class Block(NamedTuple):
    """nb whole chunks of C tokens of every stream (views of contiguous streams).

    q, k [N, nb, C, Dk], v [N, nb, C, Dv]; lam [N, nb C, K]; L [N, nb, C] float64, each
    chunk's cumulative log decay L_j = log alpha_{c0} + ... + log alpha_{c0+j}; part: the
    block's tokens.
    """

    part: slice
    nb: int
    C: int
    q: Any
    k: Any
    v: Any
    lam: Any
    L: Any


def stream_inputs(tokens, log_alpha):
    """(q, k, v, lam, log_alpha) as contiguous streams (so that a block's chunks are views),
    log_alpha in float64 (zeros for linear)."""
    import torch

    q, k, v, lam = (x.contiguous() for x in (tokens.q, tokens.k, tokens.v, tokens.lam))
    if log_alpha is None:
        return q, k, v, lam, torch.zeros(q.shape[:2], dtype=torch.float64, device=q.device)
    return q, k, v, lam, log_alpha.to(torch.float64).contiguous()


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


def block_of(streams, part, nb, C) -> Block:
    """The ``Block`` of tokens ``part`` (nb chunks of C) of the streams."""
    import torch

    q, k, v, lam, log_alpha = streams
    N = q.shape[0]
    chunks = lambda x: x[:, part].reshape(N, nb, C, x.shape[2])  # noqa: E731
    L = torch.cumsum(log_alpha[:, part].reshape(N, nb, C), dim=2)
    return Block(part, nb, C, chunks(q), chunks(k), chunks(v), lam[:, part], L)


def initial_state(cache) -> State:
    """The ``State`` before the first block, from the call's own cache (S written in place
    where autograd allows) and its host copies."""
    S, n, info, m = cache
    carry = Carry(*(to_host(x).astype(t) for x, t in
                    ((m, np.int64), (n, np.int64), (info, np.float64))))
    N, K = carry.n.shape
    return State(S, np.tile(np.arange(K), (N, 1)), carry,
                 open_state(to_host(S).astype(np.float64), carry.m))


def open_state(S, m):
    """The open state S_{m-1} of each stream, 0 where m = 0.   S [N, K, Dk, Dv] -> [N, Dk, Dv]"""
    rows = np.arange(S.shape[0])
    return np.where((m > 0)[:, None, None], S[rows, np.maximum(m - 1, 0)], 0.0)


def on_device(a, device):
    """A host array as a torch tensor on ``device``."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(a)).to(device)


# --- the phases of one block ---------------------------------------------------------------


def decide_block(x: Block, state: State, call: host.Call):
    """1. Phase 1 for the block's chunks, in order: a chunk's scalars from its Gram
    matrices and the carried open state, its decisions, then the open state at its end.
    -> ([(m at the chunk start, ChunkDecisions)] per chunk, the state after the block)"""
    Dk, Dv = call.shape[3:]
    grams = chunk_grams(x.k, x.v, x.L)
    k64, v64, L64 = (to_host(y).astype(np.float64) for y in (x.k, x.v, x.L))
    carry, open_now, made = state.carry, state.open_now, []
    for i in range(x.nb):
        tokens = slice(x.part.start + i * x.C, x.part.start + (i + 1) * x.C)
        forced = None if call.forced is None else tuple(f[:, tokens] for f in call.forced)
        scalars = grams.scalars(i, open_now, k64[:, i], v64[:, i], L64[:, i])
        m0 = carry.m
        carry, decided = decide_chunk(scalars, carry, call.opts, Dk * Dv, forced)
        open_now = open_state_at_end(open_now, decided.open_first, k64[:, i], v64[:, i],
                                     L64[:, i])
        made.append((m0, decided))
    return made, state._replace(carry=carry, open_now=open_now)


def apply_block(x: Block, made, state: State, call: host.Call, intra=None, start=None):
    """2. Phase 2 for the block: every chunk's own-token outputs at once, then chunk by
    chunk the outputs from the states at its start and the states moved to its end.
    -> (o [N, nb C, Dv], the state after the block)

    made: [(m at the chunk start, a record with ``first_item`` and ``used``)] per chunk;
    intra, start: the two readout products (default ``intra_outputs``, ``start_outputs``;
    triton-chunked passes its kernels).
    """
    import torch

    intra, start = intra or intra_outputs, start or start_outputs
    N, K = state.page.shape
    C, dev = x.C, call.device
    slot_of = slot_map(np.concatenate([d.first_item for _, d in made], axis=1), K, C)
    used = on_device(np.concatenate([d.used for _, d in made], axis=1), dev)
    weight = item_weights(x.lam, used, on_device(slot_of, dev), call.opts.slots)
    weight = weight.reshape(N, x.nb, C, K + C)
    ends = slot_of.reshape(N, x.nb, C, K + C)[:, :, -1]  # [N, nb, K + C]
    within = intra(x.q, x.k, x.v, x.L, weight[..., K:])
    S, page, outputs = state.S, state.page, []
    for i, (m0, _) in enumerate(made):
        present = np.arange(K)[None, :] < m0[:, None]
        outputs.append(within[:, i] + start(
            S, on_device(page, dev), on_device(present, dev), x.q[:, i], x.L[:, i],
            weight[:, i, :, :K]))
        page, src, dst = page_moves(page, present, ends[:, i, :K])
        S = advance_states(S, x.k[:, i], x.v[:, i], x.L[:, i],
                           *(on_device(a, dev) for a in (page, src, dst)),
                           on_device(ends[:, i, K:], dev), in_place=not call.recording)
    return torch.cat(outputs, dim=1), state._replace(S=S, page=page)


def finished(outputs, decisions, state: State) -> host.Launched:
    """3. The launch's result: o, the cache in logical slot order (S on the device, the
    counts on the host) and the trace (host); ``host.finish`` moves and casts them."""
    import torch

    S = torch.take_along_dim(state.S, on_device(state.page, state.S.device)[:, :, None, None],
                             dim=1)
    trace = tuple(np.concatenate([getattr(d, f) for d in decisions], axis=1)
                  for f in ("scores", "boundary", "merged"))
    carry = state.carry
    return host.Launched(torch.cat(outputs, dim=1), (S, carry.n, carry.info, carry.m), trace)


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
    return ChunkGrams(*(to_host(x) for x in grams))


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
    """DLA's decisions for one chunk.   -> (Carry, ChunkDecisions)

    x: the chunk's scalars; carry: (m, n, J) at the chunk start; size = Dk * Dv;
    forced: (boundary [N, C], merged [N, C]) of a forced trace, or None.

    Each stream walks its tokens in order in compiled code (``chunked_decisions``, which
    states the equations; plain Python where numba is missing): a token's score from the
    three scalars of the open slot, the boundary by the reference's rules (or the forced
    trace), J_{m-1} += I_t for an absorbed token, a merge of the least dense pair (or the
    forced index) before a token opens a slot in a full cache.
    """
    counts, decided = chunked_decisions.decide(x, carry, opts, size, forced)
    return Carry(*counts), ChunkDecisions(*decided)


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
    readout weight of the slot that holds item x after token j (docs/spec/readout.md, both slot
    orders). lam [N, C, K], used [N, C] (m_j), slot_of [N, C, K + C].
    """
    import torch

    N, C, K = lam.shape
    xp = array_namespace(lam)
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


def loglinear(q, k, v, lam=None, *, backbone="linear", log_alpha=None, beta=None,
              chunk=DEFAULT_CHUNK):
    """Log-Linear Attention (``dla_ref.loglinear``) by the same chunked products.   -> o

    Shapes as in ``dla_ref.loglinear``: lam broadcasting to [B, T, H, L] with
    L >= fenwick_levels(T) columns, indexed by level (None: ones); o in the inputs'
    dtype. Only the partition differs from DLA's (docs/spec/baselines.md): the Fenwick
    level of token s at time t is bit_length(t XOR s), so with C a power of two and
    chunks starting at multiples of C,
    every token before the chunk keeps the level it has at the chunk start c0 for the
    whole chunk, and the chunk's token s is at level bit_length((t - c0) XOR (s - c0)).
    Slots are levels (proofs/chunked_prefill.md). It prices the Log-Linear baseline in
    the same backend (``dla bench``).
    """
    import torch

    xp, out_dtype, streams, recording = loglinear_inputs(q, k, v, lam, backbone, log_alpha,
                                                         beta, chunk)
    (B, T, H, _), Dv = q.shape, v.shape[3]
    if B * H == 0:
        return xp.zeros((B, T, H, Dv), dtype=out_dtype, device=q.device)
    N, _, Dk = streams[0].shape
    levels = streams[3].shape[2]
    S = torch.zeros(N, levels, Dk, Dv, dtype=streams[0].dtype, device=q.device)
    page, outputs = np.tile(np.arange(levels), (N, 1)), []  # level -> physical slot of S
    for part, nb, C in blocks(T, chunk):
        o, S, page = loglinear_block(block_of(streams, part, nb, C), S, page, T, recording)
        outputs.append(o)
    return from_streams(xp, torch.cat(outputs, dim=1), B, H).to(out_dtype)


def loglinear_inputs(q, k, v, lam, backbone, log_alpha, beta, chunk):
    """Log-Linear's inputs checked (dla_ref's checks, chunk a power of two, enough levels;
    lam None or broadcasting) and laid out.   -> (xp, out_dtype, streams, recording)"""
    impl = registry.get("torch-chunked", "loglinear")
    xp = inputs_namespace(q=q, k=k, v=v, lam=lam, log_alpha=log_alpha, beta=beta)
    host.check_backend_takes(impl, q, backbone)
    B, T, H, _, _ = check_inputs(xp, q, k, v, lam, log_alpha, beta, backbone)
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1 or chunk & (chunk - 1):
        raise ValueError(f"chunk must be a power of two for Log-Linear, got {chunk!r}")
    levels = fenwick_levels(T)
    columns = levels if lam is None or lam.ndim == 0 or lam.shape[-1] == 1 else lam.shape[-1]
    if columns < levels:
        raise ValueError(f"lam must have at least {levels} columns (levels) for T={T}, "
                         f"got {columns}")
    lam = broadcast_lam(xp, lam, (B, T, H, columns), q)
    arrays = [x for x in (q, k, v, lam, log_alpha) if x is not None]
    out_dtype, dtype = host.dtypes(xp, impl, arrays)
    tokens = tokens_to_streams(xp, dtype, q, k, v, lam[..., :levels], None, None)
    decay = None if log_alpha is None else to_streams(xp, log_alpha)
    return xp, out_dtype, stream_inputs(tokens, decay), host.recording(arrays)


def loglinear_block(x: Block, S, page, T, recording):
    """Log-Linear's phase 2 for one block, the levels as slots.   -> (o, S, page)

    A chunk's own tokens read their levels within the chunk; the tokens before c0 sit in
    the levels l whose bit l-1 is set in c0; at c1 = c0 + C a level-l block of c0 lies in
    level bit_length(c1 XOR (c0 >> l << l)) and the chunk's tokens in bit_length(c1 XOR c0).
    """
    import torch

    N, L = page.shape
    C, dev = x.C, x.q.device
    lam = x.lam.reshape(N, x.nb, C, L)
    within = torch.tensor([[level(t, s) if s <= t else 0 for s in range(C)]
                           for t in range(C)], device=dev)  # [C(t), C(s)]
    own = intra_outputs(x.q, x.k, x.v, x.L,
                        torch.take_along_dim(lam, within.expand(N, x.nb, C, C), dim=3))
    outputs = []
    for i in range(x.nb):
        c0, c1 = x.part.start + i * C, x.part.start + (i + 1) * C
        held = np.array([l >= 1 and bool(c0 >> (l - 1) & 1) for l in range(L)])
        present = on_device(held, dev)
        outputs.append(own[:, i] + start_outputs(S, on_device(page, dev), present.expand(N, L),
                                                 x.q[:, i], x.L[:, i], lam[:, i] * present))
        if c1 < T:
            home = np.array([level(c1, c0 >> l << l) for l in range(L)])
            page, src, dst = page_moves(page, np.broadcast_to(held, (N, L)),
                                        np.broadcast_to(home, (N, L)))
            group = torch.full((N, C), level(c1, c0), device=dev)
            S = advance_states(S, x.k[:, i], x.v[:, i], x.L[:, i],
                               *(on_device(a, dev) for a in (page, src, dst)), group,
                               in_place=not recording)
    return torch.cat(outputs, dim=1), S, page
