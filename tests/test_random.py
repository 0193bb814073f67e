"""gpuconv.manual_seed takes the seeds torch.manual_seed takes, negative ones included."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import gpuconv
from gpuconv import random


def draws(seed) -> np.ndarray:
    gpuconv.manual_seed(seed)
    return random.generator().random(4)


@pytest.mark.parametrize("seed", [0, 1, -1, -2**63, 2**63, 2**64 - 1, np.int64(-7)])
def test_seeds_map_to_the_64_bit_value_pytorch_uses(seed):
    torch.manual_seed(int(seed))
    assert random.normalize_seed(seed) == torch.initial_seed()


def test_a_negative_seed_is_deterministic_and_its_own_seed():
    np.testing.assert_array_equal(draws(-1), draws(-1))
    np.testing.assert_array_equal(draws(-1), draws(2**64 - 1))  # the same 64-bit value, as in PyTorch
    assert not np.array_equal(draws(-1), draws(1))


@pytest.mark.parametrize("seed,error,message", [
    (2**64, ValueError, "seed must be in \\[-0x8000_0000_0000_0000, 0xffff_ffff_ffff_ffff\\], got 18446744073709551616"),
    (-2**63 - 1, ValueError, "seed must be in"),
    (1.5, TypeError, "seed must be an int, got float 1.5"),
    ("3", TypeError, "seed must be an int, got str '3'"),
])
def test_seeds_outside_pytorchs_range_are_refused(seed, error, message):
    with pytest.raises(error, match=message):
        gpuconv.manual_seed(seed)


def test_epoch_order_takes_negative_seeds():
    from gpuconv import data

    order = data.epoch_order(10, shuffle=True, seed=-1, epoch=3)
    np.testing.assert_array_equal(order, data.epoch_order(10, shuffle=True, seed=2**64 - 1, epoch=3))
    assert sorted(order) == list(range(10))
