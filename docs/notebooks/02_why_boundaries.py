# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Why boundaries matter
#
# A multi-state memory summarises each block of the past by one state. Theorem 3.1 of the
# paper says what that costs a readout: for token contributions $u_t$ summarised by block
# means $\bar u_i$, and any weights $|w_t| \le 1$,
#
# $$|y(q) - \tilde y_\pi(q)| \;\le\; \|q\|_2 \sum_i \sqrt{|C_i|}\,
#   \sqrt{\textstyle\sum_{t \in C_i} \|u_t - \bar u_i\|_2^2}.$$
#
# A block is cheap when its tokens are alike, expensive when it mixes different content.
# Corollary 3.2: a block that straddles a change point costs strictly more than cutting
# it there ([proof](../../proofs/corollary_3_2.md)). DLA cuts where the content changes;
# a fixed grid and Log-Linear's Fenwick tree cut by position.
#
# This notebook compares them at equal numbers of states on two measures:
#
# - the **bound** of Theorem 3.1 for the final partition ($u_t = \mathrm{vec}(k_t v_t^\top)$,
#   $\|q\| = 1$; lower is better), and
# - **needle recall**: a needle is a single token unlike its surroundings; it is recalled
#   when reading the best single state with the needle's key returns a vector within
#   $\cos > 0.9$ of the needle's value.

# %%
import math

import matplotlib.pyplot as plt
import numpy as np

import dla_ref
from dla_backends.cli.demo import (fenwick_partition, final_partition, needle_recall,
                               synthetic_stream, theorem_bound)

# %% [markdown]
# ## The stream
#
# Piecewise stationary: six segments, each with its own key and value directions plus a
# little noise, and four needles. (`synthetic_stream` is the generator of `dla demo`.)

# %%
T, D = 512, 16
stream = synthetic_stream(T=T, D=D, segments=6, needles=4, seed=0)
q, k, v = stream.q, stream.k, stream.v
print("change points:", stream.change_points, " needles:", stream.needles)

# %% [markdown]
# ## Every policy at several state budgets
#
# `dla_ref.dla` and `dla_ref.fixed` share the cache, the transition and the density merge;
# they differ only in where a block starts. `fixed` starts one every $\lceil T/K \rceil$
# tokens, so it ends with $K$ states. Log-Linear has no budget to set: at the last token
# it holds one state per set bit of $T - 1$, plus the current token.

# %%
def measure(starts, states):
    """(states, Theorem 3.1 bound, needle recall) of a final partition."""
    return len(starts), theorem_bound(stream, starts), needle_recall(states, stream)


budgets = [2, 4, 8, 16, 24, 32]
rows = {"dla": [], "fixed": []}
for K in budgets:
    lam = np.ones((1, T, 1, K))
    rows["dla"].append(measure(*final_partition(dla_ref.dla(q, k, v, lam, capacity=K, tau=0.6))))
    rows["fixed"].append(measure(*final_partition(
        dla_ref.fixed(q, k, v, lam, chunk=math.ceil(T / K), capacity=K))))
loglinear = measure(*fenwick_partition(k[0, :, 0], v[0, :, 0]))
single = measure(*final_partition(dla_ref.single(q, k, v)))

# The partition a reader would draw by hand: the change points, and each needle alone.
by_hand = sorted({0, *stream.change_points, *stream.needles, *(n + 1 for n in stream.needles)})
hand_states = np.stack([np.einsum("td,te->de", k[0, a:b, 0], v[0, a:b, 0])
                        for a, b in zip(by_hand, [*by_hand[1:], T])])
oracle = measure(np.array(by_hand), hand_states)

print(f"{'policy':<12}{'states':>7}{'bound':>10}{'needles':>9}")
for name, points in rows.items():
    for states, bound, recall in points:
        print(f"{name:<12}{states:>7}{bound:>10.1f}{recall:>9.2f}")
for name, (states, bound, recall) in (("loglinear", loglinear), ("single", single),
                                      ("by hand", oracle)):
    print(f"{name:<12}{states:>7}{bound:>10.1f}{recall:>9.2f}")

# %%
fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.2))
for name, marker in (("dla", "o-"), ("fixed", "s-")):
    states, bound, recall = np.array(rows[name]).T
    left.plot(states, bound, marker, label=name)
    right.plot(states, recall, marker, label=name)
for name, point, marker in (("loglinear", loglinear, "D"), ("single", single, "X"),
                            ("by hand", oracle, "*")):
    left.plot(point[0], point[1], marker, ms=10, label=name)
    right.plot(point[0], point[2], marker, ms=10, label=name)
left.set(xlabel="states at the last token", ylabel="Theorem 3.1 bound (||q|| = 1)",
         title="what the partition costs a readout (lower is better)")
right.set(xlabel="states at the last token", ylabel="needle recall", ylim=(-0.05, 1.05),
          title="needles recalled by the best single state")
left.legend()
fig.tight_layout()
plt.show()

# %% [markdown]
# Two regimes show up.
#
# - **Enough states to keep every boundary.** Then DLA's final partition is the one its
#   boundaries drew: aligned with the change points, every needle alone. At its state
#   count it has the lowest bound of all policies and recalls every needle, close to the
#   partition drawn by hand.
# - **Fewer states.** Then the density merge
#   ([docs/spec/merging.md](../spec/merging.md)) decides. It merges the adjacent
#   pair with the least information per token — and the long, quiet blocks of two
#   *different* segments are exactly that. The merged block straddles a change point, so
#   the bound rises, and at equal budgets a blind grid can have the lower bound. The
#   needles' blocks are dense in information and survive the longest, so DLA still
#   recalls needles that the grid and the Fenwick tree have mixed away.
#
# How many boundaries does DLA open on this stream, and where?

# %%
K = 8
run = dla_ref.dla(q, k, v, np.ones((1, T, 1, K)), capacity=K, tau=0.6)
opened = np.flatnonzero(run.trace.boundary[0, :, 0])
final_starts, _ = final_partition(run)
print(f"boundaries opened: {len(opened)} at {opened.tolist()}")
print(f"final blocks with K = {K}: {final_starts.tolist()}")

fig, ax = plt.subplots(figsize=(12, 3.4))
scores = run.trace.scores[0, :, 0]
ax.plot(scores, lw=0.7, color="0.4", label="$I_t$")
ax.axhline(0.6, color="tab:red", ls="--", lw=1, label=r"$\tau$ = 0.6")
ax.scatter(opened, scores[opened], s=14, color="tab:blue", zorder=3, label="boundary opened")
for i, c in enumerate(stream.change_points):
    ax.axvline(c, color="tab:green", alpha=0.6, label="true change point" if i == 0 else None)
for i, s in enumerate(final_starts):
    ax.axvline(s, color="tab:orange", ls=":", lw=1.5,
               label=f"final block start (K = {K})" if i == 0 else None)
ax.set(xlabel="token t", ylabel="information score", ylim=(-0.05, 1.9))
ax.legend(fontsize=8, ncol=5, loc="upper center")
fig.tight_layout()
plt.show()

# %% [markdown]
# The boundaries find every change point and every needle, plus extra ones just above
# $\tau$, mostly in bursts where the open state holds only one or two noisy tokens (at the
# start of the stream and just after a change): a rank-one open state is a poor reference
# for the next token of the same segment (see [choices.md](../choices.md), "doubts").
# Those short blocks are dense in information too, so with a small budget they outlive
# the long segment blocks; the final partition (orange) keeps few change points.
#
# ## Straddling, one block at a time
#
# Corollary 3.2 in miniature: take the partition drawn by hand and move one of its
# boundaries off its change point. Every move makes a block straddle the change, and
# the bound goes up.

# %%
c = stream.change_points[2]
print(f"partition by hand: {by_hand}, bound {theorem_bound(stream, np.array(by_hand)):.2f}")
for shift in (2, 8, 32, -8, -32):
    moved = np.array(sorted({*by_hand, c + shift} - {c}))
    print(f"boundary at {c + shift:>4} instead of {c}: bound {theorem_bound(stream, moved):7.2f}")
