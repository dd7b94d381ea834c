"""The experiment of docs/training.md: every policy at matched state counts, seeds, two
difficulties per task, plus the matched-memory single state and the soft gate.

    python -m dla_backends.nn.experiment run --out docs/training      # trains (resumable)
    python -m dla_backends.nn.experiment report --out docs/training   # table, JSON, PNG

``run`` trains each configuration of ``grid()`` once, in worker processes, and writes
OUT/runs/NAME.json as each finishes (an existing file is kept, so an interrupted run
resumes). ``report`` reads those files and writes OUT/results.json (every run and the
summary per group), OUT/curves.png (held-out-free training accuracy, mean over seeds)
and OUT/boundaries.png (where the first DLA layer cuts a test sequence), and prints
the table as markdown.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace
from pathlib import Path

from .training import Config

SEEDS = (0, 1, 2)
BASE = Config(d_model=64, n_heads=2, steps=300, batch=16, lr=3e-3, eval_batches=8,
              log_every=10)
TASKS = {  # difficulty label -> config changes; K = Log-Linear's level count at T for all
    "mqar pairs=4": dict(task="mqar", T=64, pairs=4),
    "mqar pairs=8": dict(task="mqar", T=64, pairs=8),
    "niah T=64": dict(task="niah", T=64),
    "niah T=32": dict(task="niah", T=32),
}
VARIANTS = {  # the first four are the core comparison
    "dla": dict(policy="dla"),
    "fixed": dict(policy="fixed"),
    "loglinear": dict(policy="loglinear"),
    "single": dict(policy="single"),
    "single-wide": dict(policy="single", wide=True),  # K x the key size: matched memory
    "dla-ste": dict(policy="dla", gate="ste"),
}
CORE = ("dla", "fixed", "loglinear", "single")
EXTRA = ("single-wide", "dla-ste")
# What runs, in order of priority: the 2-core machine this was sized for trains about
# 30 of these in 45 minutes, so the grid is cut where the budget ends (docs/training.md).
PLAN = (
    ("mqar pairs=4", CORE), ("niah T=64", CORE), ("mqar pairs=4", EXTRA),
    ("mqar pairs=8", CORE), ("niah T=64", EXTRA), ("niah T=32", CORE),
)


def grid(plan=PLAN):
    """[(run name, (task, difficulty, variant), Config)] in the order of ``plan``."""
    from dla_ref import fenwick_levels

    runs = []
    for difficulty, variants in plan:
        for seed in SEEDS:
            for variant in variants:
                changes = dict(VARIANTS[variant])
                config = replace(BASE, seed=seed, **TASKS[difficulty])
                if changes.pop("wide", False):
                    changes["head_k_dim"] = fenwick_levels(config.T) * (
                        config.d_model // config.n_heads)
                config = replace(config, **changes)
                name = f"{difficulty.replace(' ', '_').replace('=', '')}_{variant}_seed{seed}"
                runs.append((name, (config.task, difficulty, variant), config))
    return runs


def train_one(item):
    """Worker: train one configuration and write its JSON (one torch thread each)."""
    name, group, config, out = item
    import torch

    from .training import train

    torch.set_num_threads(1)
    with open(out / "logs" / f"{name}.log", "w") as log:
        result = train(config, progress=log)
    result["group"] = list(group)
    path = out / "runs" / f"{name}.json"
    path.with_suffix(".tmp").write_text(json.dumps(result))
    path.with_suffix(".tmp").rename(path)
    return name, result["eval_accuracy"]


def run(out: Path, workers: int) -> None:
    import multiprocessing

    (out / "runs").mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(exist_ok=True)
    todo = [(name, group, config, out) for name, group, config in grid()
            if not (out / "runs" / f"{name}.json").exists()]
    print(f"{len(todo)} runs to train with {workers} workers", flush=True)
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        for name, accuracy in pool.imap(train_one, todo):
            print(f"{name}: held-out accuracy {accuracy:.3f}", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dla_backends.nn.experiment")
    parser.add_argument("action", choices=("run", "report"))
    parser.add_argument("--out", type=Path, default=Path("docs/training"))
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    os.environ.setdefault("NUMBA_NUM_THREADS", "1")
    if args.action == "run":
        run(args.out, args.workers)
    else:
        from .report import report

        print(report(args.out, [(name, group) for name, group, _ in grid()]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
