"""Time the CuPy kernel (backends/kernels/cuda/dla_scan.cu) at several block sizes, each checked.

A development tool for choosing DLA_BLOCK (the shipped value is cuda_model.BLOCK), in
the llm.c dev/cuda manner: every variant is validated against dla_ref on a paper-sized
case before it is timed. The workloads of docs/benchmarks.md, on random tokens (so nearly every
token opens a slot and, once the cache is full, merges: the decision path's worst case):

    W-prefill  B=2, H=8, T=4096, Dk=Dv=64, K=30, mamba2 and linear
    W-gdn      B=1, H=4, T=1024, Dk=Dv=64, K=30, gdn
    W-decode   B=1, H=8, Dk=Dv=64, K=30, mamba2, decode_step per token (host included)

usage (on the GPU machine, with dla_ref and dla_backends importable):
    python3 scripts/gpu_kernel_timing.py [--blocks 128 256 512 1024] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import time

import cupy
import numpy as np

import dla_ref
from dla_backends.kernels import cuda_model, cupy_kernels
from dla_backends.testing import assert_matches_reference


def tokens(rng, B, T, H, D, K, backbone):
    """Random float32 inputs on the GPU (unit keys for gdn, mild decay)."""
    g = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    k = g(B, T, H, D)
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    x = dict(q=g(B, T, H, D), k=k, v=g(B, T, H, D), lam=rng.random((B, T, H, K), np.float32))
    if backbone != "linear":
        x["log_alpha"] = -0.1 * rng.random((B, T, H), np.float32)
    if backbone == "gdn":
        x["beta"] = rng.random((B, T, H), np.float32)
    return {name: cupy.asarray(a) for name, a in x.items()}


def use_block(block):
    """Compile and launch with `block` threads (the model's BLOCK is what the tests check)."""
    cuda_model.BLOCK = cupy_kernels.BLOCK = block
    cupy_kernels.kernel.cache_clear()


def seconds(run, repeat=3):
    """Best wall time of `run()` over `repeat` runs, after one warm-up, device synchronized."""
    run()
    cupy.cuda.Device().synchronize()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        cupy.cuda.Device().synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def measure(rng):
    """tokens/s per workload for the current block size."""
    rates = {}
    for name, (B, T, H, backbone) in {"W-prefill mamba2": (2, 4096, 8, "mamba2"),
                                       "W-prefill linear": (2, 4096, 8, "linear"),
                                       "W-gdn": (1, 1024, 4, "gdn")}.items():
        x = tokens(rng, B, T, H, 64, 30, backbone)
        rates[name] = B * T / seconds(lambda x=x, backbone=backbone: cupy_kernels.dla(
            **x, backbone=backbone, capacity=30))
    x = tokens(rng, 1, 65, 8, 64, 30, "mamba2")
    cache = cupy_kernels.dla(**{n: a[:, :1] for n, a in x.items()}, backbone="mamba2",
                             capacity=30).cache

    def decode():
        state = cache
        for t in range(1, 65):
            state = cupy_kernels.decode_step(**{n: a[:, t] for n, a in x.items()},
                                             cache=state, backbone="mamba2", capacity=30).cache

    rates["W-decode (decode_step, host included)"] = 64 / seconds(decode, repeat=2)
    return rates


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--blocks", type=int, nargs="+", default=[128, 256, 512, 1024])
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    results = {}
    for block in args.blocks:
        use_block(block)
        for backbone in dla_ref.BACKBONES:  # checked before timed
            assert_matches_reference(cupy_kernels.dla, **tokens(rng, 1, 48, 2, 64, 30, backbone),
                                     state_dtype="float32", backbone=backbone, capacity=30)
        results[block] = measure(rng)
        print(f"BLOCK={block:5d} checked; " + "; ".join(
            f"{name} {rate:,.0f} tok/s" for name, rate in results[block].items()), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": cupy.cuda.runtime.getDeviceProperties(0)["name"].decode(),
                       "tokens_per_second": results}, f, indent=1)


if __name__ == "__main__":
    main()
