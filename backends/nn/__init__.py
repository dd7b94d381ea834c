"""dla_backends.nn: DLA as a trainable torch layer, a small model, synthetic recall tasks.

    from dla_backends.nn import DLAAttention
    layer = DLAAttention(64, 2, backbone="mamba2", capacity=9, policy="dla")
    y, _ = layer(x)                      # x [B, T, 64]

Importing this package imports torch. docs/training.md describes the layer, the soft
gate and the experiment run with ``dla train``.
"""

import os

# The decision scan (Numba) takes milliseconds per step; a parallel Numba region leaves
# its worker threads spinning afterwards, and on a small CPU they then take the cores
# from torch for the rest of the training step (measured on 2 cores: 1.1 s instead of
# 0.28 s of CPU per step). One Numba thread avoids that; it must be set before numba is
# imported, and an explicit NUMBA_NUM_THREADS wins.
os.environ.setdefault("NUMBA_NUM_THREADS", "1")

from .layer import GATES, POLICIES, DLAAttention, LayerCache

__all__ = ["GATES", "POLICIES", "DLAAttention", "LayerCache"]
