"""The library's one seeded random source: parameter initialisation, dropout seeds, shuffling."""
from __future__ import annotations

import numpy as np

_generator = np.random.default_rng()


def manual_seed(seed: int) -> None:
    """Seed every random choice gpuconv makes (as ``torch.manual_seed`` does)."""
    global _generator
    _generator = np.random.default_rng(seed)


def generator() -> np.random.Generator:
    return _generator


def next_seed() -> int:
    """A fresh 32-bit seed, e.g. for one dropout mask of the counter-based RNG."""
    return int(_generator.integers(0, 2**32 - 1))
