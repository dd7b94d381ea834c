"""The experiment's report: a table (mean ± std over seeds), results.json and two figures.

Reads OUT/runs/*.json written by ``experiment run``; a configuration without its file
is reported as not run. Needs matplotlib for the figures.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .tasks import FILLER, NEEDLE, QUERY, Vocab


def load_runs(out: Path, grid):
    """{name: result} for the runs of ``grid`` [(name, group)] that have a file."""
    runs = {}
    for name, _ in grid:
        path = out / "runs" / f"{name}.json"
        if path.exists():
            runs[name] = json.loads(path.read_text())
    return runs


def summarise(runs):
    """{(difficulty, variant): {mean, std, seeds, accuracies}} of held-out accuracy."""
    groups = {}
    for result in runs.values():
        _, difficulty, variant = result["group"]
        groups.setdefault((difficulty, variant), []).append(result["eval_accuracy"])
    return {key: {"mean": float(np.mean(a)), "std": float(np.std(a)), "seeds": len(a),
                  "accuracies": a} for key, a in groups.items()}


def table(summary, difficulties, variants):
    """Markdown: one row per difficulty, one column per variant, mean ± std (seeds)."""
    lines = ["| task | " + " | ".join(variants) + " |",
             "|---|" + "---|" * len(variants)]
    for difficulty in difficulties:
        cells = []
        for variant in variants:
            s = summary.get((difficulty, variant))
            cells.append("not run" if s is None else
                         f"{s['mean']:.3f} ± {s['std']:.3f} ({s['seeds']})")
        lines.append(f"| {difficulty} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_curves(runs, difficulties, variants, path):
    """Training accuracy against step, mean over seeds, one panel per difficulty."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [d for d in difficulties if any(r["group"][1] == d for r in runs.values())]
    fig, axes = plt.subplots(1, len(shown), figsize=(4.2 * len(shown), 3.4), squeeze=False)
    for ax, difficulty in zip(axes[0], shown):
        for variant in variants:
            curves = [r["curve"] for r in runs.values() if r["group"][1:] == [difficulty, variant]]
            if not curves:
                continue
            steps = [p["step"] for p in curves[0]]
            accuracy = np.mean([[p["accuracy"] for p in c] for c in curves], axis=0)
            smooth = np.convolve(accuracy, np.ones(3) / 3, mode="valid")  # 3-point mean
            ax.plot(steps[1:-1], smooth, label=f"{variant} ({len(curves)})")
        ax.set_title(difficulty)
        ax.set_xlabel("step")
        ax.set_ylabel("training accuracy (mean over seeds)")
        ax.set_ylim(0, 1)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def token_kinds(tokens):
    """0 filler, 1 marker (NEEDLE/QUERY), 2 key, 3 value, 4 noise, per token."""
    vocab, tokens = Vocab(), np.asarray(tokens)
    kinds = np.full(tokens.shape, 4)
    kinds[tokens == FILLER] = 0
    kinds[(tokens == NEEDLE) | (tokens == QUERY)] = 1
    kinds[(tokens >= vocab.key(0)) & (tokens < vocab.value(0))] = 2
    kinds[(tokens >= vocab.value(0)) & (tokens < vocab.noise_token(0))] = 3
    return kinds


def plot_boundaries(runs, names, path):
    """The tokens of one test sequence, coloured by kind, and the boundaries that the
    first DLA layer of each trained model draws on it (one row per head)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in names if n in runs and "example_boundaries" in runs[n]]
    fig, axes = plt.subplots(len(names), 1, figsize=(10, 1.6 * len(names)), squeeze=False)
    colours = np.array(["#dddddd", "#d62728", "#1f77b4", "#2ca02c", "#bbbbbb"])
    for ax, name in zip(axes[:, 0], names):
        result = runs[name]
        kinds = token_kinds(result["example_tokens"])
        T = len(kinds)
        ax.bar(np.arange(T), np.ones(T), width=1.0, color=colours[kinds], bottom=0)
        for h, row in enumerate(result["example_boundaries"]):
            cuts = np.flatnonzero(row)
            ax.vlines(cuts - 0.5, 1.1 + h, 1.9 + h, color="k", lw=1.2)
        ax.set_yticks([0.5] + [1.5 + h for h in range(len(result["example_boundaries"]))])
        ax.set_yticklabels(["tokens"] + [f"head {h}" for h in
                                         range(len(result["example_boundaries"]))])
        ax.set_xlim(-0.5, T - 0.5)
        tau = ", ".join(f"{t:.2f}" for t in result["tau"][0])
        ax.set_title(f"{name}: tau of layer 1 = {tau}; held-out accuracy "
                     f"{result['eval_accuracy']:.2f}", fontsize=8)
    axes[-1, 0].set_xlabel("token (red: NEEDLE/QUERY, blue: key, green: value, "
                           "grey: noise/filler); black ticks: boundaries")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(out: Path, grid) -> str:
    """Write OUT/results.json, OUT/curves.png, OUT/boundaries.png; return the table."""
    from .experiment import PLAN, VARIANTS

    runs = load_runs(out, grid)
    summary = summarise(runs)
    difficulties = list(dict.fromkeys(d for d, _ in PLAN))
    variants = list(VARIANTS)
    (out / "results.json").write_text(json.dumps({
        "plan": PLAN, "planned": len(grid), "ran": len(runs),
        "summary": [{"difficulty": d, "variant": v, **s} for (d, v), s in summary.items()],
        "runs": runs}, indent=None))
    plot_curves(runs, difficulties, variants, out / "curves.png")
    dla_runs = [n for n in runs if "_dla" in n and n.endswith("seed0")]
    plot_boundaries(runs, sorted(dla_runs), out / "boundaries.png")
    return table(summary, difficulties, variants) + f"\n\n{len(runs)} of {len(grid)} runs"
