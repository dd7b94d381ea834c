"""Forward + backward of the compiled CPU path against numba's forward alone, in one run.

    python scripts/train_ratio.py [--shapes small,prefill] [--repeat 3]

The gradient issue's target: at B 4, T 256, H 2, d 32, K 8 (mamba2, float32, tau 0.6),
forward + backward through ``numba-autograd`` (``dla_backends.dla`` on CPU torch tensors
that require grad) reaches >= 0.3 x the tokens/s of numba's forward alone, on white-noise
inputs (every token a boundary) and on the piecewise-stationary inputs of ``dla bench``.
Prints one line per (shape, inputs) with both rates and their ratio; the least of
``--repeat`` calls is kept. docs/benchmarks.md records a run.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import dla_backends
from dla_backends.cli.bench import Workload, piecewise_inputs

SHAPES = {"small": Workload(4, 2, 256, 32, 8, "mamba2"),
          "prefill": Workload(2, 8, 4096, 64, 30, "mamba2")}


def white_noise(w: Workload, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    shape = (w.B, w.T, w.H, w.D)
    return dict(q=rng.standard_normal(shape), k=rng.standard_normal(shape),
                v=rng.standard_normal(shape), lam=rng.random((w.B, w.T, w.H, w.K)),
                log_alpha=-0.1 * rng.random((w.B, w.T, w.H)), beta=None)


def least(call, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        begun = time.perf_counter()
        call()
        times.append(time.perf_counter() - begun)
    return min(times)


def rates(w: Workload, arrays: dict, repeat: int) -> tuple[float, float]:
    """(numba forward tokens/s, numba-autograd forward + backward tokens/s)."""
    import torch

    host = {n: None if x is None else x.astype(np.float32) for n, x in arrays.items()}
    options = dict(capacity=w.K, tau=0.6, backbone=w.backbone)
    forward = least(lambda: dla_backends.dla(**host, **options, backend="numba"), repeat)

    def train_step():
        leaves = {n: None if x is None else torch.tensor(x, requires_grad=True)
                  for n, x in host.items()}
        o = dla_backends.dla(**leaves, **options, backend="numba-autograd").o
        o.backward(torch.ones_like(o))

    both = least(train_step, repeat)
    tokens = w.B * w.T * w.H
    return tokens / forward, tokens / both


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="small,prefill")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    for name in args.shapes.split(","):
        w = SHAPES[name]
        for kind, arrays in (("white noise", white_noise(w, 0)),
                             ("piecewise", piecewise_inputs(w, w.T, 0))):
            dla_backends.dla(**{n: None if x is None else x[:, :16].astype(np.float32)
                                for n, x in arrays.items()}, capacity=w.K, tau=0.6,
                             backbone=w.backbone, backend="numba")  # compile first
            fwd, both = rates(w, arrays, args.repeat)
            print(f"{name:8s} {kind:12s} numba forward {fwd:10.0f} tok/s   "
                  f"numba-autograd fwd+bwd {both:10.0f} tok/s   ratio {both / fwd:.2f}",
                  flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
