"""DLA on the GPU through CuPy ("cupy"): the CUDA kernel backends/kernels/cuda/dla_scan.cu.

CuPy arrays on a CUDA device. ``dla`` has the keywords and result of ``dla_ref.dla``;
the state (S, info, scores) is kept in float32, o comes back in the inputs' dtype. Two
entry points, one kernel:

    dla(q, k, v, lam, ...)                prefill: every token of every stream
    decode_step(q, k, v, lam, cache, ...) one token of every stream ([B, H, ...] inputs)

The host side is ``dla_backends.host`` (as for the kernel's NumPy model,
``dla_backends.kernels.cuda_model``); this module adds only the launch. CuPy is imported
when a kernel is first launched, never at import. Versions, layout, timings: docs/cuda.md
and the header of dla_scan.cu.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from dla_backends import host

from .cuda_model import BLOCK, one_token

SOURCE = Path(__file__).with_name("cuda") / "dla_scan.cu"
BACKBONE_CODES = {"linear": 0, "mamba2": 1, "gdn": 2}  # dla::Backbone
KERNELS = {"float32": "dla_scan<float>", "float64": "dla_scan<double>"}

__all__ = ["decode_step", "dla"]


def dla(q, k, v, lam=None, **options):
    """``dla_ref.dla`` (same keywords, same result) on the GPU; state in float32."""
    return host.run(launch, q, k, v, lam, backend="cupy", **options)


def decode_step(q, k, v, lam, cache, **options):
    """One token of every stream, continuing ``cache``: dla_scan launched with T = 1.

    q, k [B, H, Dk], v [B, H, Dv], lam [B, H, K], log_alpha / beta [B, H]; options as
    ``dla``. Returns Result(o [B, H, Dv], cache, trace with [B, H] fields).
    """
    return one_token(dla, q, k, v, lam, cache, **options)


@functools.cache
def kernel(state_dtype):
    """The compiled dla_scan for a state dtype ("float32" or "float64"), built once."""
    import cupy

    module = cupy.RawModule(code=SOURCE.read_text(), name_expressions=tuple(KERNELS.values()),
                            options=("--std=c++17", f"-DDLA_BLOCK={BLOCK}"))
    return module.get_function(KERNELS[state_dtype])


def shared_bytes(K, Dv, itemsize):
    """dla_scan's dynamic shared memory: n_s int64[K] | info_s[K] | red[2 BLOCK] | col[G Dv]."""
    G = BLOCK // min(Dv, BLOCK)
    return 8 * K + itemsize * (K + 2 * BLOCK + G * Dv)


def launch(call: host.Call) -> host.Launched:
    """One launch of dla_scan: grid = N blocks (one per stream), BLOCK threads each.

    The kernel updates the call's own cache in place; the forced trace goes to the device.
    """
    import cupy

    q, k, v, lam, alpha, beta = (None if x is None else cupy.ascontiguousarray(x)
                                 for x in call.tokens)
    S, n, info, m = (cupy.ascontiguousarray(x) for x in call.cache)
    opts, forced = call.opts, call.forced
    N, T, Dk = q.shape
    Dv, K, dtype = v.shape[2], opts.capacity, S.dtype
    unused = cupy.zeros(1, dtype)  # stands for alpha / beta where the backbone has none
    forced_b, forced_j = ((cupy.zeros(1, bool), cupy.zeros(1, np.int64)) if forced is None else
                          (cupy.asarray(x) for x in forced))
    o = cupy.empty((N, T, Dv), dtype)
    scores = cupy.empty((N, T), dtype)
    boundary = cupy.empty((N, T), bool)
    merged = cupy.empty((N, T), np.int64)

    scan = kernel(dtype.name)
    shared = shared_bytes(K, Dv, dtype.itemsize)
    if shared > 48 * 1024:  # above the default limit a kernel must opt in
        scan.max_dynamic_shared_size_bytes = shared
    scan((N,), (BLOCK,), (
        q, k, v, lam, unused if alpha is None else alpha, unused if beta is None else beta,
        forced_b, forced_j, S, n, info, m, o, scores, boundary, merged,
        np.int32(T), np.int32(K), np.int32(Dk), np.int32(Dv),
        np.int32(BACKBONE_CODES[opts.backbone]), np.int32(opts.score == "state"),
        np.int32(opts.normalize), np.int32(opts.slots == "newest-first"),
        np.int32(forced is not None), np.float64(opts.tau), dtype.type(opts.eps),
    ), shared_mem=shared)
    return host.Launched(o, (S, n, info, m), (scores, boundary, merged))
