"""Synthetic recall tasks, generated on the fly from a seed (NumPy, then torch tensors).

Both tasks return a ``Batch``: inputs [B, T] int64 tokens and targets [B, T] int64, where
targets are -1 (``IGNORE``) except at the positions the model is scored on.

- ``mqar``: multi-query associative recall as in the Zoology benchmark (Arora et al.,
  2023): P key-value pairs, then the keys queried again, in a random order, at random
  positions among filler tokens; each query key is followed by its value, and the
  target at the query key is that value. Difficulty: the number of pairs P.
- ``niah``: a single needle in a haystack in the style of RULER's S-NIAH (Hsieh et al.,
  2024): distractor tokens, a needle [NEEDLE, key, value] at a random depth, and at the
  end [QUERY, key]; the target at the final key is the needle's value. Difficulty: T.

Vocabulary (both tasks): 0 filler, 1 NEEDLE, 2 QUERY, then ``keys`` key tokens, then
``values`` value tokens, then ``noise`` distractor tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

IGNORE = -1
FILLER, NEEDLE, QUERY = 0, 1, 2
TASKS = ("mqar", "niah")


@dataclass(frozen=True)
class Vocab:
    """Token ranges: keys, values and noise follow the three special tokens."""

    keys: int = 32
    values: int = 32
    noise: int = 32

    @property
    def size(self) -> int:
        return 3 + self.keys + self.values + self.noise

    def key(self, i):
        return 3 + i

    def value(self, i):
        return 3 + self.keys + i

    def noise_token(self, i):
        return 3 + self.keys + self.values + i


@dataclass
class Batch:
    """inputs [B, T] int64; targets [B, T] int64, IGNORE where not scored."""

    inputs: np.ndarray
    targets: np.ndarray

    def torch(self):
        import torch

        return torch.as_tensor(self.inputs), torch.as_tensor(self.targets)


def mqar(rng, batch, T, pairs, vocab=Vocab()) -> Batch:
    """Zoology's MQAR: pairs k_1 v_1 ... k_P v_P, then P queries among filler.

    Keys are distinct within a sequence, values drawn with replacement. The P queries
    (each key once) take random distinct 2-token places in the T - 2P tokens after the
    pairs, so T >= 4P is required.
    """
    if pairs < 1 or pairs > vocab.keys or T < 4 * pairs:
        raise ValueError(f"mqar needs 1 <= pairs <= {vocab.keys} and T >= 4 * pairs, "
                         f"got pairs={pairs}, T={T}")
    inputs = np.full((batch, T), FILLER, dtype=np.int64)
    targets = np.full((batch, T), IGNORE, dtype=np.int64)
    places = (T - 2 * pairs) // 2
    for b in range(batch):
        keys = vocab.key(rng.choice(vocab.keys, pairs, replace=False))
        values = vocab.value(rng.integers(vocab.values, size=pairs))
        inputs[b, 0:2 * pairs:2], inputs[b, 1:2 * pairs:2] = keys, values
        order = rng.permutation(pairs)
        at = 2 * pairs + 2 * np.sort(rng.choice(places, pairs, replace=False))
        inputs[b, at], inputs[b, at + 1] = keys[order], values[order]
        targets[b, at] = values[order]
    return Batch(inputs, targets)


def niah(rng, batch, T, vocab=Vocab()) -> Batch:
    """S-NIAH: noise, [NEEDLE, key, value] at a random depth, noise, then [QUERY, key].

    The needle starts anywhere in [0, T - 5] (before the final two query tokens); T >= 6.
    """
    if T < 6:
        raise ValueError(f"niah needs T >= 6, got T={T}")
    inputs = vocab.noise_token(rng.integers(vocab.noise, size=(batch, T)))
    targets = np.full((batch, T), IGNORE, dtype=np.int64)
    keys = vocab.key(rng.integers(vocab.keys, size=batch))
    values = vocab.value(rng.integers(vocab.values, size=batch))
    depth = rng.integers(0, T - 4, size=batch)
    rows = np.arange(batch)
    inputs[rows, depth], inputs[rows, depth + 1], inputs[rows, depth + 2] = NEEDLE, keys, values
    inputs[:, -2], inputs[:, -1] = QUERY, keys
    targets[:, -1] = values
    return Batch(inputs.astype(np.int64), targets)


def make_batch(task, rng, batch, T, difficulty, vocab=Vocab()) -> Batch:
    """One batch of ``task``; difficulty = pairs (mqar) or is ignored (niah: set T)."""
    if task == "mqar":
        return mqar(rng, batch, T, difficulty, vocab)
    if task == "niah":
        return niah(rng, batch, T, vocab)
    raise ValueError(f"task must be one of {TASKS}, got {task!r}")
