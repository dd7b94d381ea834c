"""Train ``TinyLM`` on a synthetic recall task: the loop behind ``dla train``.

One ``Config`` fixes a run; ``train(config)`` returns a JSON-ready dict with the
configuration, the learning curve, the held-out accuracy, the learned thresholds and the
boundaries the first DLA layer draws on one test sequence. Everything is seeded: torch's
initialisation from ``seed``, training batches from ``seed``, the held-out set from a
generator that does not depend on ``seed`` (every run is scored on the same sequences).
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np

from .tasks import Vocab, make_batch

EVAL_SEED = 12345


@dataclass(frozen=True)
class Config:
    """One training run. capacity None = Log-Linear's level count at T (matched)."""

    task: str = "mqar"
    policy: str = "dla"
    seed: int = 0
    T: int = 128
    pairs: int = 8
    d_model: int = 64
    n_heads: int = 2
    head_k_dim: int | None = None
    capacity: int | None = None
    backbone: str = "mamba2"
    gate: str = "hard"
    tau: float = 0.6
    temperature: float = 0.1
    steps: int = 300
    batch: int = 32
    lr: float = 3e-3
    weight_decay: float = 0.1
    eval_batches: int = 4
    log_every: int = 10

    def layer_options(self):
        from dla_ref import fenwick_levels

        return dict(backbone=self.backbone, capacity=self.capacity or fenwick_levels(self.T),
                    tau=self.tau, policy=self.policy, gate=self.gate,
                    temperature=self.temperature, head_k_dim=self.head_k_dim)


def build_model(config: Config):
    from .model import TinyLM

    return TinyLM(Vocab().size, config.d_model, config.n_heads, **config.layer_options())


def train(config: Config, progress=sys.stderr) -> dict:
    """Run one configuration; returns the results record (see the module docstring)."""
    import torch

    from .model import loss_and_accuracy

    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    model = build_model(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr,
                                  weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(config.steps))
    curve, start = [], time.perf_counter()
    for step in range(1, config.steps + 1):
        inputs, targets = make_batch(config.task, rng, config.batch, config.T,
                                     config.pairs).torch()
        loss, accuracy = loss_and_accuracy(model(inputs), targets)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % config.log_every == 0 or step == 1 or step == config.steps:
            curve.append({"step": step, "loss": loss.item(), "accuracy": accuracy.item(),
                          "seconds": time.perf_counter() - start})
            show_progress(progress, step, config.steps, curve[-1])
    if progress is not None:
        progress.write("\n")
    return {"config": asdict(config), "curve": curve, **evaluate(model, config),
            "train_seconds": time.perf_counter() - start}


def warmup_cosine(steps, warmup_share=0.1):
    """lr multiplier: linear warm-up over the first 10% of steps, then cosine to 0.1."""
    warmup = max(1, int(steps * warmup_share))

    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        done = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * done))
    return factor


def evaluate(model, config: Config) -> dict:
    """Held-out loss and accuracy, learned taus, and the first layer's boundaries."""
    import torch

    from .model import loss_and_accuracy

    rng = np.random.default_rng(EVAL_SEED)
    losses, accuracies = [], []
    with torch.no_grad():
        for _ in range(config.eval_batches):
            inputs, targets = make_batch(config.task, rng, config.batch, config.T,
                                         config.pairs).torch()
            loss, accuracy = loss_and_accuracy(model(inputs), targets)
            losses.append(loss.item())
            accuracies.append(accuracy.item())
        example = inputs[:1]
        model(example)
    first = model.mixers()[0]
    record = {"eval_loss": float(np.mean(losses)), "eval_accuracy": float(np.mean(accuracies)),
              "tau": [[float(t) for t in m.tau.detach()] for m in model.mixers()],
              "example_tokens": example[0].tolist()}
    if first.last_trace is not None:  # [1, T, H] of the example, per head
        record["example_boundaries"] = first.last_trace[0][0].T.astype(int).tolist()
    return record


def show_progress(stream, step, steps, point):
    """One self-overwriting line on ``stream``: step, loss, accuracy, elapsed time."""
    if stream is None:
        return
    width = 24
    done = int(width * step / steps)
    stream.write(f"\r[{'#' * done}{'.' * (width - done)}] {step}/{steps} "
                 f"loss {point['loss']:.3f} acc {point['accuracy']:.3f} "
                 f"{point['seconds']:.0f}s")
    stream.flush()
