"""The library's one seeded random source: parameter initialisation, dropout seeds, shuffling."""
from __future__ import annotations

import operator

import numpy as np

_generator = np.random.default_rng()

SEED_MIN = -0x8000_0000_0000_0000
SEED_MAX = 0xFFFF_FFFF_FFFF_FFFF


def normalize_seed(seed) -> int:
    """``seed`` as the unsigned 64-bit value PyTorch uses: any int in ``[-2**63, 2**64 - 1]``, a
    negative one taken as its 64-bit two's complement (``torch.manual_seed(-1)`` seeds with
    ``2**64 - 1``). Unlike PyTorch, a float is refused rather than truncated."""
    try:
        seed = operator.index(seed)
    except TypeError:
        raise TypeError(f"seed must be an int, got {type(seed).__name__} {seed!r}") from None
    if not SEED_MIN <= seed <= SEED_MAX:
        raise ValueError(f"seed must be in [-0x8000_0000_0000_0000, 0xffff_ffff_ffff_ffff], got {seed}")
    return seed % (1 << 64)


def manual_seed(seed: int) -> None:
    """Seed every random choice gpuconv makes (as ``torch.manual_seed`` does, negative seeds
    included: the same seed always gives the same choices)."""
    global _generator
    _generator = np.random.default_rng(normalize_seed(seed))


def generator() -> np.random.Generator:
    return _generator


def next_seed() -> int:
    """A fresh 32-bit seed, e.g. for one dropout mask of the counter-based RNG."""
    return int(_generator.integers(0, 2**32 - 1))
