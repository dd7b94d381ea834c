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
# # Training a tiny DLA model
#
# `dla_backends.nn.DLAAttention` is DLA as a token mixer: q/k/v projections, Mamba-2's
# gates, readout weights $\lambda_t = \mathrm{softplus}(L \odot W_\lambda x_t)$ and an
# output projection. Its `policy` swaps only the partition of the past into states —
# `dla` (content-driven boundaries), `fixed` (a block every $\lceil T/K \rceil$ tokens),
# `loglinear` (Log-Linear Attention's Fenwick levels) or `single` (one state) — so models
# built with different policies differ in nothing else.
#
# [docs/training.md](../training.md) trains a two-block model with each policy on two
# synthetic recall tasks (MQAR and a single needle in a haystack) at matched state counts.
# This notebook **does not retrain**: it loads the stored results from `docs/training/`
# and shows the learning curves, the boundaries a trained DLA layer draws, and how the
# straight-through soft gate gives the threshold $\tau$ a gradient.

# %%
import json
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from dla_backends.nn.report import summarise, table, token_kinds

results = json.loads(Path("../training/results.json").read_text())
runs = results["runs"]
print(f"{results['ran']} of {results['planned']} planned runs are stored")

# %% [markdown]
# ## The table: held-out accuracy, mean ± standard deviation over seeds
#
# Every run is scored on the same held-out sequences (8 batches of 16). `single-wide` is
# the single state with $K\times$ the key size (matched memory instead of matched state
# count); `dla-ste` is DLA trained with the soft gate.

# %%
summary = summarise(runs)
difficulties = list(dict.fromkeys(d for d, _ in results["plan"]))
variants = ["dla", "fixed", "loglinear", "single", "single-wide", "dla-ste"]
print(table(summary, difficulties, variants))

# %% [markdown]
# ## Learning curves
#
# Training accuracy on the batch of each logged step, averaged over seeds (and over three
# neighbouring logged steps).

# %%
shown = [d for d in difficulties if any(r["group"][1] == d for r in runs.values())]
fig, axes = plt.subplots(1, len(shown), figsize=(4.2 * len(shown), 3.4), squeeze=False)
for ax, difficulty in zip(axes[0], shown):
    for variant in variants:
        curves = [r["curve"] for r in runs.values() if r["group"][1:] == [difficulty, variant]]
        if curves:
            steps = [p["step"] for p in curves[0]]
            mean = np.mean([[p["accuracy"] for p in c] for c in curves], axis=0)
            ax.plot(steps[1:-1], np.convolve(mean, np.ones(3) / 3, mode="valid"), label=variant)
    ax.set(title=difficulty, xlabel="step", ylabel="training accuracy", ylim=(0, 1))
axes[0][0].legend(fontsize=7)
fig.tight_layout()

# %% [markdown]
# ## Where a trained DLA layer cuts
#
# The first DLA layer of each trained model (seed 0) on one held-out sequence. The
# coloured strip is the input (red: NEEDLE / QUERY markers, blue: keys, green: values,
# grey: noise or filler); each black tick is a boundary $b_t = 1$ of one head. Ticks at
# every token mean the layer's $\tau$ sits below almost every score: with $K$ states and
# density merges, DLA then keeps the most informative blocks rather than long ones.

# %%
names = sorted(n for n in runs if "_dla" in n and n.endswith("seed0")
               and "example_boundaries" in runs[n])
fig, axes = plt.subplots(len(names), 1, figsize=(10, 1.6 * len(names)), squeeze=False)
colours = np.array(["#dddddd", "#d62728", "#1f77b4", "#2ca02c", "#bbbbbb"])
for ax, name in zip(axes[:, 0], names):
    run = runs[name]
    kinds = token_kinds(run["example_tokens"])
    ax.bar(np.arange(len(kinds)), np.ones(len(kinds)), width=1.0, color=colours[kinds])
    for h, row in enumerate(run["example_boundaries"]):
        ax.vlines(np.flatnonzero(row) - 0.5, 1.1 + h, 1.9 + h, color="k", lw=1)
    ax.set_yticks([])
    ax.set_title(f"{name}   boundaries per head: "
                 f"{[int(sum(r)) for r in run['example_boundaries']]}   "
                 f"tau (layer 1): {np.round(run['tau'][0], 2).tolist()}", fontsize=8)
fig.tight_layout()

# %% [markdown]
# ## The soft gate
#
# A hard boundary $b_t = [I_t \ge \tau]$ has no gradient, so with `gate="hard"` the
# threshold $\tau$ never learns. `gate="ste"` keeps the forward pass exactly the hard one
# and, in the backward pass only, treats the boundary as
# $\tilde b_t = \sigma((I_t - \tau_h)/\mathrm{temp})$ splitting the token's contribution:
# $(1-\tilde b_t)$ of it into the slot that would absorb it, $\tilde b_t$ into the slot it
# would open. Written on the readout mask $\Lambda$ of the parallel form:
#
# $$\tilde\Lambda[t,s] = \Lambda[t,s] + (\tilde b_s - \mathrm{sg}(\tilde b_s))\,D[t,s],
# \quad D[t,s] = \begin{cases}\Lambda[t,s] - \Lambda[t,s-1] & b_s = 1\\
# -\Lambda[t,s] & b_s = 0\end{cases}$$
#
# ($\mathrm{sg}$ = stop-gradient, so the value is exactly $\Lambda$). The gradient that
# reaches $\tau_h$ is $-\sum_s g_s\,\tilde b_s(1-\tilde b_s)/\mathrm{temp}$ with
# $g_s = \sum_{t\ge s} D[t,s]\,(q_t\cdot k_s)\,e^{c_t-c_s}\,(dO_t\cdot v_s)$; only tokens
# whose score lies within a few temperatures of $\tau$ contribute.

# %%
score = np.linspace(0, 2, 400)
fig, axes = plt.subplots(1, 2, figsize=(9, 3))
for temp in (0.05, 0.1, 0.3):
    soft = 1 / (1 + np.exp(-(score - 0.6) / temp))
    axes[0].plot(score, soft, label=f"temp {temp}")
    axes[1].plot(score, soft * (1 - soft) / temp, label=f"temp {temp}")
axes[0].step(score, score >= 0.6, "k--", lw=1, label="hard gate")
axes[0].set(xlabel="score $I_t$", ylabel=r"$\tilde b_t$", title=r"$\tau = 0.6$")
axes[1].set(xlabel="score $I_t$", ylabel=r"$\partial \tilde b_t / \partial I_t$",
            title="where the gradient flows")
axes[0].legend(fontsize=7)
fig.tight_layout()

# %% [markdown]
# The forward pass of `gate="ste"` is bit-identical to `gate="hard"` (checked here on a
# small untrained layer), and only the soft-gated model's $\tau$ receives a gradient.

# %%
import torch  # noqa: E402

from dla_backends.nn import DLAAttention  # noqa: E402

x = torch.randn(2, 32, 16)
outputs = {}
for gate in ("hard", "ste"):
    torch.manual_seed(0)
    layer = DLAAttention(16, 2, capacity=6, tau=0.9, gate=gate)
    y, _ = layer(x)
    y.square().sum().backward()
    outputs[gate] = y
    print(f"gate={gate}: tau.grad = {layer.tau.grad}")
print("forward identical:", torch.equal(outputs["hard"], outputs["ste"]))

# %% [markdown]
# In the stored runs, the learned thresholds of the `dla-ste` models (per layer, per head)
# moved from their initial 0.6 as follows:

# %%
for name, run in sorted(runs.items()):
    if run["group"][2] == "dla-ste":
        print(name, np.round(run["tau"], 3).tolist(), f"accuracy {run['eval_accuracy']:.3f}")
