"""dla_backends.nn: DLA as a trainable torch layer, a small model, synthetic recall tasks.

    from dla_backends.nn import DLAAttention
    layer = DLAAttention(64, 2, backbone="mamba2", capacity=9, policy="dla")
    y, _ = layer(x)                      # x [B, T, 64]

Importing this package imports torch. docs/training.md describes the layer, the soft
gate and the experiment run with ``dla train``.
"""

from .layer import GATES, POLICIES, DLAAttention, LayerCache

__all__ = ["GATES", "POLICIES", "DLAAttention", "LayerCache"]
