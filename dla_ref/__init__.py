"""dla_ref: the executable specification of Dynamic Linear Attention.

Pure functions over the array API: NumPy, array_api_strict and torch tensors all
work; nothing optional is imported. Start reading at ``step.py`` (one token, one
function per equation), then ``recurrent.py`` (the scan and the public ``dla``).
The prose spec, with a link from every equation to its function: docs/index.md.
"""

from .admissibility import Inadmissible, check_trace
from .fenwick import fenwick_levels, fenwick_mask, loglinear
from .parallel import masked_form, materialized, partition, partition_history, slot_starts
from .records import (BACKBONES, SCORES, SLOT_ORDERS, Cache, Options, Partition, Result, Tokens,
                      Trace)
from .recurrent import dla, fixed, single
from .theory import deviation, deviation_bound
from .vjp import Gradients, vjp

__all__ = [
    "BACKBONES", "SCORES", "SLOT_ORDERS", "Cache", "Gradients", "Inadmissible", "Options",
    "Partition", "Result", "Tokens", "Trace", "check_trace", "deviation", "deviation_bound",
    "dla", "fenwick_levels", "fenwick_mask", "fixed", "loglinear", "masked_form",
    "materialized", "partition", "partition_history", "single", "slot_starts", "vjp",
]
__version__ = "0.1.0"
