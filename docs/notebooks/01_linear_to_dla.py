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
# # From linear attention to DLA
#
# Linear attention keeps **one** matrix state and adds every token to it:
#
# $$S_t = G_t S_{t-1} + k_t v_t^\top, \qquad o_t = q_t^\top S_t .$$
#
# Everything the past said is summed into one $d_k \times d_v$ matrix. Multi-state methods
# keep several states, each summarising a *contiguous block* of the past, and read them
# with one weight per state. They differ in **where the blocks are cut**:
#
# | method | blocks | states |
# |---|---|---|
# | linear attention | one block: the whole past | 1 |
# | Log-Linear Attention | Fenwick: power-of-two blocks by position | $1 + \mathrm{popcount}(t)$ |
# | DLA | cut where the content changes, at most $K$, merged by information density | $\le K$ |
#
# This notebook runs all three on one stream and draws their partitions over time.
# Everything is computed by the project (`dla_ref`, the executable spec); the notebook
# only plots.

# %%
import matplotlib.pyplot as plt
import numpy as np

import dla_ref
from dla_backends.cli.demo import synthetic_stream

# %% [markdown]
# ## The stream
#
# A piecewise-stationary stream: inside a segment every key and value lies close to the
# segment's own direction; at a change point the directions jump. Two *needles* — single
# tokens in a direction of their own — are planted inside segments. (`synthetic_stream`
# comes from the `dla demo` command; queries equal keys.)

# %%
T, D = 256, 8
stream = synthetic_stream(T=T, D=D, segments=6, needles=2, seed=1)
q, k, v = stream.q, stream.k, stream.v  # [B=1, T, H=1, D]
print("change points:", stream.change_points, " needles:", stream.needles)

# %% [markdown]
# ## 1. One state: linear attention
#
# `dla_ref.single` is the plain backbone (here `linear`: $G_t = 1$). Its cache has one
# slot holding all $T$ tokens.

# %%
one = dla_ref.single(q, k, v)
print("slots used:", int(one.cache.m[0, 0]), " tokens in it:", int(one.cache.n[0, 0, 0]))

# %% [markdown]
# ## 2. Fenwick states: Log-Linear Attention
#
# At time $t$, token $s \le t$ sits at level $\ell(t, s) = \mathrm{bit\_length}(t \oplus s)$:
# level 0 is the current token, level $\ell \ge 1$ a block of $2^{\ell-1}$ tokens. The
# blocks are fixed by the *positions*, whatever the tokens say. `dla_ref.loglinear` runs
# it with one weight per level.

# %%
L = dla_ref.fenwick_levels(T)
fenwick = np.array([[dla_ref.fenwick.level(t, s) if s <= t else -1 for s in range(T)]
                    for t in range(T)])
ll_out = dla_ref.loglinear(q, k, v, np.ones((1, T, 1, L)))
print(f"{L} levels for T = {T}; non-empty levels at the last token:",
      len(set(fenwick[-1].tolist())))

# %% [markdown]
# ## 3. Dynamic states: DLA
#
# DLA scores every token against the newest (open) state, $I_t \in [0, 2]$ (0: same
# direction, $\sqrt 2$: unrelated). At $I_t \ge \tau$ the token starts a new block; when
# the $K$ slots are full, the two adjacent blocks with the least information per token
# are merged first. We give DLA as many states as Log-Linear's levels, $K = L$.

# %%
K, tau = L, 0.6
dyn = dla_ref.dla(q, k, v, np.ones((1, T, 1, K)), capacity=K, tau=tau)
trace = dyn.trace
print("boundaries:", int(trace.boundary.sum()), " merges:", int((trace.merged >= 0).sum()),
      " slots used at the end:", int(dyn.cache.m[0, 0]))

# %% [markdown]
# The trace says what DLA decided at every token. `dla_ref.slot_starts` turns it into the
# partition history: the first token of every slot after every token $t$.

# %%
starts = dla_ref.slot_starts(trace, K)[0, :, 0]  # [T, K], -1 for unused slots
tokens = np.arange(T)
slot_of = np.sum((starts[:, None, :] <= tokens[None, :, None]) & (starts[:, None, :] >= 0),
                 axis=2) - 1  # [t, s]: the slot holding token s after token t
slot_of = np.where(tokens[None, :] <= tokens[:, None], slot_of, -1)
# name a block by its first token, which, unlike its slot index, survives other merges
block_start = np.where(slot_of >= 0, np.take_along_axis(starts, slot_of.clip(0), axis=1), -1)
print("blocks at the end start at tokens", starts[-1][starts[-1] >= 0].tolist())

# %% [markdown]
# ## The partitions over time
#
# Row $t$ is the memory after token $t$; along it, token $s \le t$ is coloured by the block
# that holds it (Log-Linear: by level). A vertical run of one colour is a block that
# persists. Dashed lines are the true change points, triangles the needles.

# %%
def show_partition(ax, blocks, title):
    """Colour each (t, s <= t) by its block label (>= 0); blank above the diagonal."""
    labels = np.unique(blocks[blocks >= 0], return_inverse=True)[1]
    colours = np.full(blocks.shape, -1)
    colours[blocks >= 0] = labels % 20
    ax.imshow(np.ma.masked_less(colours, 0), cmap="tab20", vmin=0, vmax=19,
              interpolation="nearest", origin="upper", aspect="auto")
    for c in stream.change_points:
        ax.axvline(c, color="k", ls="--", lw=0.8)
    ax.plot(stream.needles, [T + 6] * len(stream.needles), "^", color="k", ms=7,
            clip_on=False)
    ax.set(title=title, xlabel="token s", ylabel="time t", ylim=(T - 0.5, -0.5))


fig, axes = plt.subplots(1, 3, figsize=(15, 4.8), sharey=True)
show_partition(axes[0], np.where(tokens[None, :] <= tokens[:, None], 0, -1),
               "linear attention: one state")
show_partition(axes[1], fenwick, f"Log-Linear: Fenwick levels ({L})")
show_partition(axes[2], block_start, f"DLA: K = {K}, tau = {tau}")
fig.tight_layout()
plt.show()

# %% [markdown]
# Log-Linear's blocks have power-of-two sizes and straddle change points freely. DLA's
# blocks start at the change points (vertical edges on the dashed lines), and each needle
# gets a block of its own: it scores high against the open state, and so does the first
# token after it. When the tenth block arrives, the $K = 9$ slots are full and the two
# adjacent blocks with the least information per token — long, quiet ones — are merged
# (the change of colour near the bottom). The needles' blocks are dense in information and
# are the last to go.
#
# ## Scores, boundaries and merges

# %%
scores = trace.scores[0, :, 0]
opened = np.flatnonzero(trace.boundary[0, :, 0])
merged = np.flatnonzero(trace.merged[0, :, 0] >= 0)
fig, ax = plt.subplots(figsize=(12, 3.4))
ax.plot(tokens, scores, lw=0.8, color="0.3", label="$I_t$")
ax.axhline(tau, color="tab:red", ls="--", label=fr"$\tau$ = {tau}")
ax.scatter(opened, scores[opened], s=16, color="tab:blue", zorder=3, label="boundary")
ax.scatter(merged, scores[merged], s=40, marker="x", color="tab:orange", zorder=4,
           label="merge before the new slot")
for i, c in enumerate(stream.change_points):
    ax.axvline(c, color="tab:green", lw=1, alpha=0.6, label="true change point" if i == 0 else None)
ax.set(xlabel="token t", ylabel="information score", ylim=(-0.05, 1.9))
ax.legend(fontsize=8, ncol=5, loc="upper center")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## How many states each method holds

# %%
used = np.sum(starts >= 0, axis=1)
fig, ax = plt.subplots(figsize=(12, 3))
ax.step(tokens, np.ones(T), where="post", label="linear attention")
ax.step(tokens, [1 + bin(t).count("1") for t in range(T)], where="post",
        label="Log-Linear: 1 + popcount(t)")
ax.step(tokens, used, where="post", label=f"DLA (K = {K})")
ax.set(xlabel="token t", ylabel="states")
ax.legend(fontsize=8)
fig.tight_layout()
plt.show()

# %% [markdown]
# ## The same memory, split differently
#
# DLA never adds or loses anything: its slots always sum to the single state
# (*conservation*, [proof](../../proofs/conservation.md)). So with every readout weight
# $\lambda = 1$, DLA *is* linear attention; all that DLA changes goes through the weights
# with which the states are read.

# %%
print("sum of DLA's slots vs the single state:",
      np.max(np.abs(dyn.cache.S.sum(axis=2) - one.cache.S[:, :, 0])))
print("DLA with lambda = 1 vs linear attention, largest output difference:",
      np.max(np.abs(dyn.o - one.o)))
print("Log-Linear with lambda = 1 vs linear attention:", np.max(np.abs(ll_out - one.o)))

# %% [markdown]
# With other weights the states are read differently. Reading only the newest state
# (a one-hot $\lambda$ with `slots="newest-first"`) gives an output that forgets everything
# before the current block:

# %%
newest = np.zeros((1, T, 1, K))
newest[..., 0] = 1.0
local = dla_ref.dla(q, k, v, newest, capacity=K, tau=tau, slots="newest-first")
t = T - 1
print(f"token {t}: its block starts at {starts[t][starts[t] >= 0].max()}; "
      f"|o_t| all states {np.linalg.norm(one.o[0, t, 0]):.2f}, "
      f"newest state only {np.linalg.norm(local.o[0, t, 0]):.2f}")
