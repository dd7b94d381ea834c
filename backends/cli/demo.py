"""``dla demo``: DLA on a built-in synthetic stream, against fixed, Log-Linear and one state.

The stream is piecewise stationary: within a segment every key and value lies close to
the segment's own direction, so the information score stays low; at a change point the
direction jumps and the score crosses tau. Needles (single tokens in a direction of
their own) are planted inside segments. The table, per policy at matched state counts:

    states   slots in use at the end       P / R    block starts vs true change points
    needles  needles whose value the best single slot returns (cos > 0.9)
    bound    Theorem 3.1's bound for the final partition, ||q|| = 1 (lower is better)

Under the table, one line per surprising figure says why, from this run's numbers. The
plot shows I_t, tau and DLA's decisions, and below it the final partition (a band per
block) and each merge (the two blocks it joined).

docs/notebooks/02_why_boundaries.py walks through the same comparison step by step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

import dla_ref

@dataclass
class Stream:
    """A synthetic stream, one batch element and one head.

    q, k [1, T, 1, D], v [1, T, 1, D]; change_points: first token of every segment
    after the first; needles: token positions of the planted needles.
    """

    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    change_points: list[int]
    needles: list[int]


def synthetic_stream(T=1024, D=16, segments=6, needles=2, noise=0.08, seed=0) -> Stream:
    """Piecewise-stationary keys and values with planted needles (seeded).

    Segment boundaries are drawn uniformly (each segment >= T / (4 segments) tokens).
    Token t of segment c: k_t = unit(mu_c + noise * z), v_t = unit(nu_c + noise * z').
    A needle replaces one token inside a segment (not within 8 tokens of its ends)
    by a fresh random direction. Queries equal keys.
    """
    rng = np.random.default_rng(seed)
    min_len = max(1, T // (4 * segments))
    while True:
        cuts = np.sort(rng.choice(np.arange(min_len, T - min_len), segments - 1, replace=False))
        if np.all(np.diff(np.concatenate([[0], cuts, [T]])) >= min_len):
            break
    change_points = [int(c) for c in cuts]
    seg = np.searchsorted(cuts, np.arange(T), side="right")
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    mu, nu = unit(rng.standard_normal((segments, D))), unit(rng.standard_normal((segments, D)))
    k = unit(mu[seg] + noise * rng.standard_normal((T, D)))
    v = unit(nu[seg] + noise * rng.standard_normal((T, D)))

    edges = np.concatenate([[0], cuts, [T]])
    allowed = [t for t in range(T) if np.min(np.abs(edges - t)) > 8]
    planted = sorted(int(t) for t in rng.choice(allowed, needles, replace=False))
    k[planted] = unit(rng.standard_normal((needles, D)))
    v[planted] = unit(rng.standard_normal((needles, D)))

    shape = lambda x: x[None, :, None, :]  # noqa: E731  [T, D] -> [1, T, 1, D]
    return Stream(shape(k.copy()), shape(k), shape(v), change_points, planted)


# --- the policies, at matched state counts -------------------------------------


def run_policies(stream: Stream, capacity: int, tau: float):
    """Final partition (block starts) and per-block states of each policy.

    dla: DLA with K = capacity and tau; fixed: a new block every ceil(T / K) tokens with
    the same K; loglinear: the Fenwick partition at the last token; single: one block.
    Returns {policy: (starts, states [M, D, D], dla_result or None)}.
    """
    q, k, v = stream.q, stream.k, stream.v
    T = q.shape[1]
    lam = np.ones((1, T, 1, capacity))
    dla = dla_ref.dla(q, k, v, lam, tau=tau, capacity=capacity)
    fixed = dla_ref.fixed(q, k, v, lam, chunk=math.ceil(T / capacity), capacity=capacity)
    out = {"dla": final_partition(dla) + (dla,), "fixed": final_partition(fixed) + (None,)}
    out["loglinear"] = fenwick_partition(k[0, :, 0], v[0, :, 0]) + (None,)
    single = dla_ref.single(q, k, v)
    out["single"] = final_partition(single) + (None,)
    return out


def final_partition(result):
    """(starts [M], states [M, Dk, Dv]) of the used slots of stream (0, 0)."""
    m = int(result.cache.m[0, 0])
    n = result.cache.n[0, 0, :m]
    starts = np.concatenate([[0], np.cumsum(n)[:-1]]).astype(np.int64)
    return starts, result.cache.S[0, 0, :m]


def fenwick_partition(k, v):
    """(starts, states) of the Fenwick blocks at the last token (T-1), linear backbone.

    Block of level l >= 1 holds the tokens s with bit_length((T-1) XOR s) = l.
    """
    T = k.shape[0]
    t = T - 1
    levels = np.array([(t ^ s).bit_length() for s in range(T)])
    starts = [s for s in range(T) if s == 0 or levels[s] != levels[s - 1]]
    bounds = starts + [T]
    states = [np.einsum("td,te->de", k[a:b], v[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
    return np.array(starts, dtype=np.int64), np.stack(states)


# --- the metrics ------------------------------------------------------------------


def boundary_precision_recall(starts, change_points, window):
    """Precision and recall of block starts (excluding token 0) against true change points.

    A start within +-window tokens of a change point counts. NaN where nothing is there
    to score (no start but token 0, or no change point).
    """
    found = [int(s) for s in starts if s > 0]
    hit = lambda x, ys: any(abs(x - y) <= window for y in ys)  # noqa: E731
    precision = sum(hit(s, change_points) for s in found) / len(found) if found else math.nan
    recall = (sum(hit(c, found) for c in change_points) / len(change_points)
              if change_points else math.nan)
    return precision, recall


def needle_recall(states, stream: Stream, threshold=0.9):
    """Share of needles whose value the best single slot returns: max_i cos(k_n^T S_i, v_n).

    A needle counts when that cosine exceeds ``threshold``. NaN without needles.
    """
    if not stream.needles:
        return math.nan
    k, v = stream.k[0, :, 0], stream.v[0, :, 0]
    recalled = 0
    for t in stream.needles:
        reads = np.einsum("d,mde->me", k[t], states)
        cos = reads @ v[t] / (np.linalg.norm(reads, axis=1) * np.linalg.norm(v[t]) + 1e-12)
        recalled += bool(np.max(cos) > threshold)
    return recalled / len(stream.needles)


def outer_products(stream: Stream) -> np.ndarray:
    """u_t = vec(k_t v_t^T) [T, D * D], the vectors Theorem 3.1 is stated on."""
    k, v = stream.k[0, :, 0], stream.v[0, :, 0]
    return np.einsum("td,te->tde", k, v).reshape(k.shape[0], -1)


def theorem_bound(stream: Stream, starts):
    """Theorem 3.1's bound for the partition, u_t = vec(k_t v_t^T), ||q|| = 1."""
    return float(dla_ref.deviation_bound(outer_products(stream), starts))


def bound_terms(stream: Stream, starts) -> np.ndarray:
    """Each block's share of the bound, sqrt(|C_i|) * sqrt(sum_{t in C_i} ||u_t - u_bar_i||^2).

    The terms sum to ``theorem_bound``: each is the bound of its block alone.
    """
    u = outer_products(stream)
    edges = [int(s) for s in starts] + [u.shape[0]]
    return np.array([float(dla_ref.deviation_bound(u[a:b], np.zeros(1, dtype=np.int64)))
                     for a, b in zip(edges[:-1], edges[1:])])


class Row(NamedTuple):
    """One policy's line of the table."""

    policy: str
    states: int
    precision: float
    recall: float
    needles: float
    bound: float


def report(stream, policies, window) -> list[Row]:
    """Rows of the demo table, one per policy."""
    rows = []
    for name, (starts, states, _) in policies.items():
        p, r = boundary_precision_recall(starts, stream.change_points, window)
        rows.append(Row(name, len(starts), p, r, needle_recall(states, stream),
                        theorem_bound(stream, starts)))
    return rows


# --- what DLA did, in words -------------------------------------------------------


class Merge(NamedTuple):
    """A merge DLA made: at token t the adjacent blocks [a, b) and [b, c) became one."""

    t: int
    a: int
    b: int
    c: int


def merges(result, capacity: int) -> list[Merge]:
    """Every merge of stream (0, 0), with the token spans of the two blocks it joined.

    trace.merged[t] = j joins slots j and j + 1 of the partition after token t - 1
    (``dla_ref.slot_starts``); the last slot ends at t, where the new slot opens.
    """
    starts = dla_ref.slot_starts(result.trace, capacity)[0, :, 0]  # [T, K], -1 = unused
    merged = result.trace.merged[0, :, 0]
    out = []
    for t in (int(t) for t in np.flatnonzero(merged >= 0)):
        j = int(merged[t])
        edges = [int(s) for s in starts[t - 1] if s >= 0] + [t]
        out.append(Merge(t, edges[j], edges[j + 1], edges[j + 2]))
    return out


def explanations(stream, policies, rows, merge_list, window) -> list[str]:
    """One plain sentence per surprising figure of this run (none if nothing surprises)."""
    result = policies["dla"][2]
    dla_row = next(r for r in rows if r.policy == "dla")
    lines = [why_pairs(result), why_precision(stream, policies["dla"][0], dla_row, window),
             why_recall(stream, merge_list, dla_row, window), why_bound(stream, policies, rows)]
    return [line for line in lines if line]


def why_pairs(result) -> str:
    """Boundaries at consecutive tokens: the token after a jump opens a slot too."""
    boundary = result.trace.boundary[0, :, 0]
    followers = int(np.sum(boundary[1:] & boundary[:-1]))
    if not followers:
        return ""
    return (f"Boundaries come in pairs ({followers} of DLA's {int(boundary.sum())} follow one "
            "at the token before): a needle or a change opens a one-token slot, and the next "
            "token, which that one token does not describe, opens another.")


def why_precision(stream, starts, row, window) -> str:
    """Block starts that are not change points: where the needles' blocks went."""
    at_needles = sum(any(0 <= s - n <= 2 for n in stream.needles) for s in starts)
    if math.isnan(row.precision) or row.precision == 1 or not at_needles:
        return ""
    return (f"P = {row.precision:.2f} for DLA: {at_needles} of its block starts mark needles "
            f"(and the token after each), which are not change points; they are what lets "
            f"it recall the needles.")


def why_recall(stream, merge_list, row, window) -> str:
    """Change points DLA found (a boundary there) that a later merge removed."""
    lost = [c for c in stream.change_points
            if any(abs(m.b - c) <= window for m in merge_list)]
    if not lost:
        return ""
    return (f"R = {row.recall:.2f} for DLA: it found the change at {listed(lost)} too (a "
            "boundary there), but with all K slots in use a later merge joined the block it "
            "opened to its neighbour (the plot's lower panel).")


def why_bound(stream, policies, rows) -> str:
    """A baseline with a lower Theorem 3.1 bound than DLA: which DLA block costs most."""
    bounds = {r.policy: r.bound for r in rows}
    better = [name for name, b in bounds.items() if name != "dla" and b < bounds["dla"]]
    if not better:
        return ""
    starts = policies["dla"][0]
    terms = bound_terms(stream, starts)
    i = int(np.argmax(terms))
    a = int(starts[i])
    b = int(starts[i + 1]) if i + 1 < len(starts) else stream.q.shape[1]
    inside = [c for c in stream.change_points if a < c < b]
    across = f", across the change at {listed(inside)}" if inside else ""
    rival = min(better, key=bounds.get)
    worst = float(np.max(bound_terms(stream, policies[rival][0])))
    return (f"{rival} beats DLA on the bound: Theorem 3.1 charges each block sqrt(length) "
            f"x its spread, and DLA's block [{a}, {b}) ({b - a} tokens{across}) costs "
            f"{terms[i]:.0f} of its {bounds['dla']:.0f}, while {rival}'s costliest block "
            f"costs {worst:.0f}.")


def listed(tokens, most=4) -> str:
    """'302' or '14, 77, 92, 111 and 8 more': token positions for a sentence."""
    shown = ", ".join(map(str, tokens[:most]))
    return shown + (f" and {len(tokens) - most} more" if len(tokens) > most else "")


def print_table(rows, stream, result, lines, args):
    """The run's settings, the table, and the explanations under it."""
    import textwrap

    print(f"DLA demo: T={stream.q.shape[1]}, D={stream.q.shape[3]}, K={args.capacity}, "
          f"tau={args.tau}, seed={args.seed}; {len(stream.change_points)} change points, "
          f"{len(stream.needles)} needles")
    print(f"DLA opened {int(result.trace.boundary.sum())} slots and merged "
          f"{int((result.trace.merged >= 0).sum())} times\n")
    header = f"{'policy':<10} {'states':>6} {'P':>6} {'R':>6} {'needles':>8} {'bound':>10}"
    print(header)
    print("-" * len(header))
    shown = lambda x: "-" if math.isnan(x) else f"{x:.2f}"  # noqa: E731  (nothing to score)
    for r in rows:
        print(f"{r.policy:<10} {r.states:>6} {shown(r.precision):>6} {shown(r.recall):>6} "
              f"{shown(r.needles):>8} {r.bound:>10.2f}")
    print(f"\nP/R: block starts of the final partition vs true change points (+-{args.window} "
          "tokens);\nneedles: the best single slot returns the needle's value (cos > 0.9); "
          "bound: Theorem 3.1, ||q|| = 1.\n")
    for line in lines:
        print(textwrap.fill(line, width=100, subsequent_indent="  "))


# --- the plot ---------------------------------------------------------------------

MERGES_DRAWN = 10  # the latest ones; more rows would not be readable at the default size


def plot(stream, result, merge_list, args):
    """Upper panel: I_t, tau, DLA's decisions. Lower: the final partition and the merges."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    drawn = merge_list[-MERGES_DRAWN:]
    fig, (top, bottom) = plt.subplots(
        2, 1, sharex=True, figsize=(11, 6.4),
        gridspec_kw=dict(height_ratios=[2.2, 0.9 + 0.22 * len(drawn)]))
    draw_scores(top, stream, result, args.tau)
    draw_partition(bottom, stream, final_partition(result)[0], drawn, len(merge_list))
    top.set_title(f"DLA, K = {args.capacity}, tau = {args.tau}: where it cut, and what it "
                  "merged when its slots were full")
    handles, labels = (a + b for a, b in zip(top.get_legend_handles_labels(),
                                               bottom.get_legend_handles_labels()))
    fig.legend(handles, labels, loc="lower center", ncol=7, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(args.output, dpi=120)
    plt.close(fig)


def draw_scores(ax, stream, result, tau):
    """I_t against tau; change points, boundaries, merges and needles on it."""
    scores = result.trace.scores[0, :, 0]
    boundary = np.flatnonzero(result.trace.boundary[0, :, 0])
    merged = np.flatnonzero(result.trace.merged[0, :, 0] >= 0)
    ax.plot(np.arange(scores.shape[0]), scores, lw=0.8, color="0.3",
            label="information score $I_t$")
    if math.isfinite(tau):
        ax.axhline(tau, color="tab:red", ls="--", lw=1, label=fr"$\tau$ = {tau}")
    for i, c in enumerate(stream.change_points):
        ax.axvline(c, color="tab:green", lw=1, alpha=0.6,
                   label="true change point" if i == 0 else None)
    ax.scatter(boundary, scores[boundary], s=14, color="tab:blue", zorder=3,
               label="boundary (opens a slot)")
    ax.scatter(merged, scores[merged], s=40, marker="x", color="tab:orange", zorder=4,
               label="a merge made room")
    ax.scatter(stream.needles, np.full(len(stream.needles), -0.08), marker="^",
               color="tab:purple", label="needle")
    ax.set_ylabel("$I_t$")


def draw_partition(ax, stream, starts, drawn, total):
    """Row 0: a band per surviving block, one-token blocks as red ticks. Below: the merges.

    A merge's row shows the two blocks it joined (two shades, spans in its label) and,
    dotted up to an x, the token whose new slot it made room for.
    """
    T = stream.q.shape[1]
    edges = [int(s) for s in starts] + [T]
    spans = [(a, b - a) for a, b in zip(edges[:-1], edges[1:])]
    wide = [span for span in spans if span[1] > 1]  # alternate shades among visible bands
    ax.broken_barh(wide, (-0.4, 0.8), facecolors=["tab:blue", "lightsteelblue"] * len(wide))
    ones = [a for a, n in spans if n == 1]
    ax.vlines(ones, -0.45, 0.45, color="tab:red", lw=2, label="one-token block")
    for row, m in enumerate(drawn, 1):
        ax.broken_barh([(m.a, m.b - m.a), (m.b, m.c - m.b)], (-row - 0.3, 0.6),
                       facecolors=["tab:orange", "saddlebrown"])
        ax.plot([m.c, m.t], [-row, -row], ls=":", color="0.4", lw=0.8)
        ax.scatter([m.t], [-row], marker="x", color="tab:orange", s=30, zorder=3)
    for c in stream.change_points:
        ax.axvline(c, color="tab:green", lw=1, alpha=0.6)
    labels = [f"t={m.t}: [{m.a},{m.b}) + [{m.b},{m.c})" for m in drawn]
    if total > len(drawn):
        labels[0] = f"({total - len(drawn)} earlier) " + labels[0]
    ax.set_yticks(range(0, -len(drawn) - 1, -1), [f"final: {len(spans)} blocks"] + labels,
                  fontsize=7)
    ax.set_ylim(-len(drawn) - 0.6, 0.6)
    ax.set_xlim(-T * 0.01, T * 1.01)
    ax.set_xlabel("token t")


# --- the command ------------------------------------------------------------------

MAX_SEGMENTS = 16  # drawing cuts by rejection stays fast up to here (accepts (3/4)^(s-1))


def add_arguments(parser):
    from . import count, number, output_path

    parser.add_argument("--length", "-T", type=count(64), default=1024,
                        help="tokens, >= 64 (default 1024)")
    parser.add_argument("--dim", type=count(1), default=16, help="key/value size D (default 16)")
    parser.add_argument("--capacity", "-K", type=count(1), default=None,
                        help="K >= 1; default: Log-Linear's level count for T, so the state "
                             "counts match")
    parser.add_argument("--tau", type=number(), default=0.6,
                        help="boundary threshold, any number but NaN (default 0.6)")
    parser.add_argument("--seed", type=count(0), default=0)
    parser.add_argument("--segments", type=count(2), default=None,
                        help=f"stationary segments, 2 to min({MAX_SEGMENTS}, T / 32) "
                             "(default 6, fewer if T < 192)")
    parser.add_argument("--needles", type=count(0), default=2,
                        help="planted needles, 0 to T / 16 (default 2)")
    parser.add_argument("--window", type=count(0), default=2,
                        help="tolerance in tokens for a start to match a change point")
    parser.add_argument("--output", "-o", type=output_path(".png"), default="dla_demo.png",
                        help="where to write the plot (a .png in an existing directory)")


def check_request(args) -> None:
    """What the option types cannot see alone: counts that must fit the stream's length.

    Segments: each is at least T / (4 segments) tokens, drawn by rejection; needles sit
    more than 8 tokens from every segment edge. Within these limits the stream exists.
    """
    from . import UsageError

    most = min(MAX_SEGMENTS, args.length // 32)
    if args.segments is None:
        args.segments = min(6, most)
    if args.segments > most:
        raise UsageError(f"--segments {args.segments}: at most {most} for --length "
                         f"{args.length} (min({MAX_SEGMENTS}, T / 32))")
    if args.needles > args.length // 16:
        raise UsageError(f"--needles {args.needles}: at most {args.length // 16} for "
                         f"--length {args.length} (T / 16)")
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        raise UsageError("the plot needs matplotlib: pip install matplotlib")


def run(args):
    check_request(args)
    if args.capacity is None:
        args.capacity = dla_ref.fenwick_levels(args.length)
    stream = synthetic_stream(args.length, args.dim, args.segments, args.needles, seed=args.seed)
    policies = run_policies(stream, args.capacity, args.tau)
    result = policies["dla"][2]
    merge_list = merges(result, args.capacity)
    rows = report(stream, policies, args.window)
    print_table(rows, stream, result,
                explanations(stream, policies, rows, merge_list, args.window), args)
    plot(stream, result, merge_list, args)
    print(f"\nplot written to {args.output}")
    return 0
