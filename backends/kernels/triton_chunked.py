"""A chunked Triton prefill of DLA for the linear and mamba2 backbones ("triton-chunked").

Torch tensors; the keywords and result of ``dla_ref.dla`` through ``dla_backends.host``;
the state (S, info, scores) in float32, o in the inputs' dtype. It computes what
torch-chunked computes (proofs/chunked_prefill.md), with the work on the device:

1. decide (``decide_kernel``, one program per stream): every token's score from three
   scalars (||s_t||^2, ||S_open||^2, <S_open, s_t>) against the stream's carried open
   state, the boundary and merge decisions and the counts, by the tile functions of the
   Triton backend (``triton_kernels.decide_on_open_copy``), so both backends decide alike;
2. the partition each chunk's tokens read, replayed on the host from the decisions
   (``chunk_partition``: item counts only, O(C K) per token);
3. apply, torch-chunked's phase 2 with its two readout products as Triton kernels of
   ``tl.dot`` matmuls with float32 accumulation: the intra-chunk causal product
   (``intra_kernel``) and the readout against the K slot states (``start_kernel``).

Versions: v1 (this file): float32 ``tl.dot`` in IEEE precision (exact to float32
rounding, no TF32), the states advanced by torch-chunked's torch products. Design
notes and what a v2 would change: docs/triton.md.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np
import torch
import triton
import triton.language as tl

from dla_backends import host
from dla_ref.step import merge_adjacent, open_state, write_token

from . import torch_chunked as chunked
from .triton_kernels import (decide_on_open_copy, load_counts, load_token, runtime_options,
                             store_counts, tile)

DEFAULT_CHUNK = 16  # tl.dot needs tiles of at least 16 rows
npx = host.npx


def dla(q, k, v, lam=None, *, chunk=DEFAULT_CHUNK, **options):
    """``dla_ref.dla`` by a chunked prefill on the device: the same keywords, checks and
    result; chunk: C >= 1 tokens per chunk (any T works; the last chunk may be shorter)."""
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be an int >= 1, got {chunk!r}")
    return host.run(functools.partial(launch, chunk=chunk), q, k, v, lam,
                    backend="triton-chunked", **options)


def launch(call: host.Call, chunk: int) -> host.Launched:
    """Decide on the device, then each block's partitions (host) and products (device)."""
    trace, counts = decide(call)  # 1.
    boundary, merged = (host.to_host(x) for x in trace[1:])
    streams = chunked.stream_inputs(call.tokens, call.log_alpha)
    (N, T), K = call.streams, call.opts.capacity
    m = host.to_host(call.cache[3]).astype(np.int64)
    state = chunked.State(call.cache[0], np.tile(np.arange(K), (N, 1)), None, None)
    outputs = []
    for part, nb, C in chunked.blocks(T, chunk):
        made = []
        for i in range(nb):  # 2.
            tokens = slice(part.start + i * C, part.start + (i + 1) * C)
            made.append((m, chunk_partition(boundary[:, tokens], merged[:, tokens], m, K)))
            m = made[-1][1].used[:, -1]
        x = chunked.block_of(streams, part, nb, C)
        o, state = chunked.apply_block(x, made, state, call, intra=intra_outputs,  # 3.
                                       start=start_outputs)
        outputs.append(o)
    page = torch.from_numpy(state.page).to(call.device)
    S = torch.take_along_dim(state.S, page[:, :, None, None], dim=1)  # logical slot order
    return host.Launched(torch.cat(outputs, dim=1), (S, *counts), trace)


# --- 1. decide, on the device ---------------------------------------------------------------


@triton.jit
def decide_kernel(k, v, alpha, beta, forced_boundary, forced_merged, n_in, info_in, m_in,
                  n_out, info_out, m_out, open_copies, scores, boundaries, merges, T, K, Dk,
                  Dv, tau, eps, score_state, normalize, newest_first, BACKBONE: tl.constexpr,
                  FORCED: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DK: tl.constexpr,
                  BLOCK_DV: tl.constexpr):
    """Every token's score, boundary and merge for one stream per program (grid (N,)).

    The open state open_copies[n] [Dk, Dv] evolves from token data alone (G_t S_open +
    s_t, or s_t after a boundary); the counts stay in registers. Token t of stream n is
    row n T + t of the streams [N, T, ...]; the trace is written at the same rows.
    """
    stream = tl.program_id(0).to(tl.int64)
    rows = tl.arange(0, BLOCK_DK)
    row_mask = rows < Dk
    cols = tl.arange(0, BLOCK_DV)
    col_mask = cols < Dv
    open_copy = open_copies + stream * Dk * Dv
    n, info, m = load_counts(n_in, info_in, m_in, stream, K, BLOCK_K)
    for t in range(0, T):
        row = stream * T + t
        _, k_t, _, alpha_t, beta_t = load_token(k, k, v, alpha, beta, row, rows, row_mask,
                                                cols, col_mask, Dk, Dv, BACKBONE)
        score, boundary, merged, _, n, info, m = decide_on_open_copy(
            open_copy, n, info, m, k_t, v + row * Dv, alpha_t, beta_t, row, K, tau, eps,
            score_state, normalize, forced_boundary, forced_merged, rows, row_mask, Dk, Dv,
            BACKBONE, FORCED, BLOCK_K, BLOCK_DK, BLOCK_DV)
        tl.store(scores + row, score)
        tl.store(boundaries + row, boundary.to(tl.int8))
        tl.store(merges + row, merged.to(tl.int64))
        tl.debug_barrier()  # the next token reads the open copy as other threads stored it
    store_counts(n_out, info_out, m_out, stream, n, info, m, K, True, BLOCK_K)


def decide(call: host.Call):
    """``decide_kernel`` on the call.   -> ((scores, boundary int8, merged) [N, T], the
    final counts (n, info, m))"""
    (N, T), (_, _, _, Dk, Dv), dev = call.streams, call.shape, call.device
    _, k, v, _, alpha, beta = (None if x is None else x.contiguous() for x in call.tokens)
    S, n, info, m = call.cache
    counts = tuple(torch.empty_like(x) for x in (n, info, m))
    open_copies = open_state(call.xp, S, m).contiguous()
    trace = (torch.empty((N, T), dtype=torch.float32, device=dev),
             torch.empty((N, T), dtype=torch.int8, device=dev),
             torch.empty((N, T), dtype=torch.int64, device=dev))
    forced = (None, None) if call.forced is None else (
        torch.from_numpy(call.forced.boundary.astype(np.int8)).to(dev),
        torch.from_numpy(call.forced.merged).to(dev))
    decide_kernel[(N,)](
        k, v, alpha, beta, *forced, n, info, m, *counts, open_copies, *trace, T,
        *runtime_options(call.opts, Dk, Dv), BACKBONE=call.opts.backbone,
        FORCED=call.forced is not None, BLOCK_K=tile(call.opts.capacity), BLOCK_DK=tile(Dk),
        BLOCK_DV=min(tile(Dv), 64))
    return trace, counts


# --- 2. the partition of a chunk, replayed from its decisions ---------------------------------


class Partition(NamedTuple):
    """Which slot holds what after each token of a chunk (N streams, C tokens, K slots).

    used [N, C]: slots in use after token j; first_item [N, C, K]: the first item of each
    slot after token j in the chunk's item numbering (``torch_chunked.ChunkDecisions``).
    """

    used: np.ndarray
    first_item: np.ndarray


def chunk_partition(boundary, merged, m, K) -> Partition:
    """The chunk's ``Partition`` from its decisions (boundary, merged [N, C]) and the slots
    in use at its start, m [N]: the reference's merge_adjacent and write_token on the item
    counts (a chunk-start slot is one item, a token another)."""
    N, C = boundary.shape
    m0 = m
    items = (np.arange(K)[None, :] < m[:, None]).astype(np.int64)
    used = np.empty((N, C), dtype=np.int64)
    first = np.empty((N, C, K), dtype=np.int64)
    for j in range(C):
        b, pair = boundary[:, j].astype(bool), merged[:, j]
        items = merge_adjacent(npx, items, pair)
        m = m - (pair >= 0)
        items = write_token(npx, items, m, b, np.ones_like(m))  # absorb at m-1, or append
        m = m + b
        used[:, j] = m
        first[:, j] = chunked.first_items(items, m, m0, K, C)
    return Partition(used, first)


# --- 3. the readout products, on the device ----------------------------------------------------


@triton.jit
def chunk_tile(C, BLOCK_C: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr):
    """The token rows j of a chunk, the columns a (of Dk) and b (of Dv), the valid rows."""
    j = tl.arange(0, BLOCK_C)
    return j, tl.arange(0, BLOCK_DK), tl.arange(0, BLOCK_DV), j < C


@triton.jit
def load_rows(x, j, rows, a, width):
    """Rows j of a row-major [C, width] matrix, columns a: [BLOCK_C, len(a)], 0 outside."""
    return tl.load(x + j[:, None] * width + a[None, :],
                   mask=rows[:, None] & (a[None, :] < width), other=0.0)


@triton.jit
def store_rows(x, j, rows, b, width, value):
    """Store ``value`` [BLOCK_C, len(b)] as rows j, columns b of a [C, width] matrix."""
    tl.store(x + j[:, None] * width + b[None, :], value,
             mask=rows[:, None] & (b[None, :] < width))


@triton.jit
def intra_kernel(q, k, v, L, weight, o, C, Dk, Dv, BLOCK_C: tl.constexpr,
                 BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr):
    """One chunk's own-token outputs (grid: one program per chunk of every stream):

        o_j = sum_{s <= j} weight[j, s] exp(L_j - L_s) (q_j . k_s) v_s

    as two ``tl.dot`` matmuls, [C, Dk] x [Dk, C] then [C, C] x [C, Dv], float32 accumulation
    in IEEE precision. q, k [., C, Dk], v, o [., C, Dv], L [., C], weight [., C, C].
    """
    chunk = tl.program_id(0).to(tl.int64)
    j, a, b, rows = chunk_tile(C, BLOCK_C, BLOCK_DK, BLOCK_DV)
    Q = load_rows(q + chunk * C * Dk, j, rows, a, Dk)
    K_ = load_rows(k + chunk * C * Dk, j, rows, a, Dk)
    V = load_rows(v + chunk * C * Dv, j, rows, b, Dv)
    Lc = tl.load(L + chunk * C + j, mask=rows, other=0.0)
    causal = (j[:, None] >= j[None, :]) & rows[:, None] & rows[None, :]
    W = tl.load(weight + chunk * C * C + j[:, None] * C + j[None, :], mask=causal, other=0.0)
    decay = tl.where(causal, tl.exp(Lc[:, None] - Lc[None, :]), 0.0)
    A = tl.dot(Q, tl.trans(K_), input_precision="ieee") * decay * W
    out = tl.dot(A, V, input_precision="ieee")
    store_rows(o + chunk * C * Dv, j, rows, b, Dv, out)


def intra_outputs(q, k, v, L, weight):
    """``torch_chunked.intra_outputs`` by ``intra_kernel``.   [N, nb, C, Dv]"""
    N, nb, C, Dk = q.shape
    Dv = v.shape[3]
    q, k, v = (x.to(torch.float32).contiguous() for x in (q, k, v))
    o = torch.empty((N, nb, C, Dv), dtype=torch.float32, device=q.device)
    intra_kernel[(N * nb,)](q, k, v, L.to(torch.float32).contiguous(),
                            weight.to(torch.float32).contiguous(), o, C, Dk, Dv,
                            BLOCK_C=tile(C), BLOCK_DK=tile(Dk), BLOCK_DV=tile(Dv))
    return o


@triton.jit
def start_kernel(S, page, coef, q, o, K, C, Dk, Dv, BLOCK_C: tl.constexpr,
                 BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr):
    """One chunk's outputs from the K states at its start (grid: one program per stream):

        o_j = sum_i coef[j, i] q_j^T S_{page[i]}

    one [C, Dk] x [Dk, Dv] ``tl.dot`` per slot, float32 accumulation in IEEE precision.
    S [N, K, Dk, Dv] physical slots; page [N, K]; coef [N, C, K]; q [N, C, Dk]; o [N, C, Dv].
    """
    stream = tl.program_id(0).to(tl.int64)
    j, a, b, rows = chunk_tile(C, BLOCK_C, BLOCK_DK, BLOCK_DV)
    Q = load_rows(q + stream * C * Dk, j, rows, a, Dk)
    acc = tl.zeros((BLOCK_C, BLOCK_DV), dtype=tl.float32)
    state = (a[:, None] < Dk) & (b[None, :] < Dv)
    for i in range(0, K):
        slot = tl.load(page + stream * K + i)
        X = tl.load(S + ((stream * K + slot) * Dk + a[:, None]) * Dv + b[None, :], mask=state,
                    other=0.0)
        c = tl.load(coef + (stream * C + j) * K + i, mask=rows, other=0.0)
        acc += tl.dot(Q * c[:, None], X, input_precision="ieee")
    store_rows(o + stream * C * Dv, j, rows, b, Dv, acc)


def start_outputs(S, page, present, q, L, weight):
    """``torch_chunked.start_outputs`` by ``start_kernel``.   [N, C, Dv]

    coef[j, i] = weight[j, i] exp(L_j) for the logical slots i present at the chunk start,
    in logical order (the kernel reads slot i's state at page[i]).
    """
    N, C, Dk = q.shape
    K, Dv = S.shape[1], S.shape[3]
    coef = (weight * present[:, None, :] * torch.exp(L)[..., None]).to(torch.float32)
    o = torch.empty((N, C, Dv), dtype=torch.float32, device=q.device)
    start_kernel[(N,)](S.contiguous(), page.contiguous(), coef.contiguous(),
                       q.to(torch.float32).contiguous(), o, K, C, Dk, Dv, BLOCK_C=tile(C),
                       BLOCK_DK=tile(Dk), BLOCK_DV=tile(Dv))
    return o
