"""DLA on a built-in synthetic stream, against the fixed, Log-Linear and single-state baselines.

The stream is piecewise stationary: within a segment every key and value lies close to
the segment's own direction, so the information score stays low; at a change point
the direction jumps and the score crosses tau. A few needles (single tokens in a
direction of their own) are planted inside segments. The demo reports, per policy:

    states      slots in use at the end of the stream
    P / R       precision and recall of the final partition's block starts against
                the true change points (a start within +-window tokens counts)
    needles     share of needles recalled: reading the best single slot with the
                needle's key returns a vector within cos > 0.9 of the needle's value
    bound       Theorem 3.1's bound for the final partition, ||q|| = 1 (lower is better)

and writes a plot of I_t, tau, the boundaries and the merges.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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
    """Precision and recall of block starts (excluding token 0) against true change points."""
    found = [int(s) for s in starts if s > 0]
    hit = lambda x, ys: any(abs(x - y) <= window for y in ys)  # noqa: E731
    precision = sum(hit(s, change_points) for s in found) / len(found) if found else float("nan")
    recall = sum(hit(c, found) for c in change_points) / len(change_points)
    return precision, recall


def needle_recall(states, stream: Stream, threshold=0.9):
    """Share of needles whose value the best single slot returns: max_i cos(k_n^T S_i, v_n) > 0.9."""
    k, v = stream.k[0, :, 0], stream.v[0, :, 0]
    recalled = 0
    for t in stream.needles:
        reads = np.einsum("d,mde->me", k[t], states)
        cos = reads @ v[t] / (np.linalg.norm(reads, axis=1) * np.linalg.norm(v[t]) + 1e-12)
        recalled += bool(np.max(cos) > threshold)
    return recalled / len(stream.needles)


def theorem_bound(stream: Stream, starts):
    """Theorem 3.1's bound for the partition, u_t = vec(k_t v_t^T), ||q|| = 1."""
    k, v = stream.k[0, :, 0], stream.v[0, :, 0]
    u = np.einsum("td,te->tde", k, v).reshape(k.shape[0], -1)
    return float(dla_ref.deviation_bound(u, starts))


def report(stream, policies, window):
    """Rows of the demo table, one per policy."""
    rows = []
    for name, (starts, states, _) in policies.items():
        p, r = boundary_precision_recall(starts, stream.change_points, window)
        rows.append((name, len(starts), p, r, needle_recall(states, stream),
                     theorem_bound(stream, starts)))
    return rows


def print_table(rows, stream, dla_result, args):
    T = stream.q.shape[1]
    print(f"DLA demo: T={T}, D={stream.q.shape[3]}, K={args.capacity}, tau={args.tau}, "
          f"seed={args.seed}; {len(stream.change_points)} change points, "
          f"{len(stream.needles)} needles")
    print(f"DLA opened {int(dla_result.trace.boundary.sum())} slots and merged "
          f"{int((dla_result.trace.merged >= 0).sum())} times\n")
    header = f"{'policy':<10} {'states':>6} {'P':>6} {'R':>6} {'needles':>8} {'bound':>10}"
    print(header)
    print("-" * len(header))
    for name, states, p, r, nr, bound in rows:
        precision = "-" if math.isnan(p) else f"{p:.2f}"  # no block start, nothing to score
        print(f"{name:<10} {states:>6} {precision:>6} {r:>6.2f} {nr:>8.2f} {bound:>10.2f}")
    print(f"\nP/R: block starts of the final partition vs true change points (+-{args.window} "
          "tokens); needles: best single slot recovers the needle's value (cos > 0.9);\n"
          "bound: Theorem 3.1 for the final partition with ||q|| = 1.")


def plot(stream, dla_result, args):
    """I_t, tau, DLA's boundaries and merges, and the true change points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scores = dla_result.trace.scores[0, :, 0]
    boundary = np.flatnonzero(dla_result.trace.boundary[0, :, 0])
    merged = np.flatnonzero(dla_result.trace.merged[0, :, 0] >= 0)
    T = scores.shape[0]
    fig, ax = plt.subplots(figsize=(11, 4.4))
    ax.plot(np.arange(T), scores, lw=0.8, color="0.3", label="information score $I_t$")
    ax.axhline(args.tau, color="tab:red", ls="--", lw=1, label=fr"$\tau$ = {args.tau}")
    for i, c in enumerate(stream.change_points):
        ax.axvline(c, color="tab:green", lw=1, alpha=0.6, label="true change point" if i == 0 else None)
    ax.scatter(boundary, scores[boundary], s=14, color="tab:blue", zorder=3, label="boundary (new slot)")
    ax.scatter(merged, scores[merged], s=30, marker="x", color="tab:orange", zorder=4,
               label="merge before the new slot")
    ax.scatter(stream.needles, np.full(len(stream.needles), -0.08), marker="^", color="tab:purple",
               label="needle")
    ax.set_xlabel("token t")
    ax.set_ylabel("$I_t$")
    ax.set_title(f"DLA, K = {args.capacity}: boundaries follow the content")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), fontsize=8, ncol=5, frameon=False)
    fig.tight_layout()
    fig.savefig(args.output, dpi=120)
    plt.close(fig)


# --- the command --------------------------------------------------------------------


def add_arguments(parser):
    parser.add_argument("--length", "-T", type=int, default=1024, help="tokens (default 1024)")
    parser.add_argument("--dim", type=int, default=16, help="key/value size D (default 16)")
    parser.add_argument("--capacity", "-K", type=int, default=None,
                        help="K; default: Log-Linear's level count for T, so the state "
                             "counts match")
    parser.add_argument("--tau", type=float, default=0.6, help="boundary threshold (default 0.6)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--segments", type=int, default=6, help="stationary segments (default 6)")
    parser.add_argument("--needles", type=int, default=2, help="planted needles (default 2)")
    parser.add_argument("--window", type=int, default=2,
                        help="tolerance in tokens for a start to match a change point")
    parser.add_argument("--output", "-o", default="dla_demo.png", help="PNG plot path")


def run(args):
    if args.length < 64:
        raise SystemExit("dla demo: --length must be >= 64 to hold segments and needles")
    if args.capacity is None:
        args.capacity = dla_ref.fenwick_levels(args.length)
    stream = synthetic_stream(args.length, args.dim, args.segments, args.needles, seed=args.seed)
    policies = run_policies(stream, args.capacity, args.tau)
    dla_result = policies["dla"][2]
    print_table(report(stream, policies, args.window), stream, dla_result, args)
    plot(stream, dla_result, args)
    print(f"plot written to {args.output}")
    return 0
