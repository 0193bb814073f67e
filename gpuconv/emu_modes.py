"""How the emulated device runs the next launch: thread order, block order, race detection.

Each is set for a ``with`` statement (:func:`thread_order`, :func:`block_order`,
:func:`racecheck`) or, outside any, by an environment variable read at every launch
(``$GPUCONV_EMU_ORDER``, ``$GPUCONV_EMU_BLOCK_ORDER``, ``$GPUCONV_EMU_RACECHECK``). The
statement wins over the variable; statements nest. :mod:`gpuconv.emu` re-exports all of them.
"""
from __future__ import annotations

import contextlib
import os

import numpy as np

ORDER_ENV = "GPUCONV_EMU_ORDER"
BLOCK_ORDER_ENV = "GPUCONV_EMU_BLOCK_ORDER"
RACECHECK_ENV = "GPUCONV_EMU_RACECHECK"
ORDERS = ("forward", "reverse", "random")

# The statement currently in force for each setting; None: read the environment.
_overrides: dict[str, object] = {ORDER_ENV: None, BLOCK_ORDER_ENV: None, RACECHECK_ENV: None}


def _parse_order(variable: str, text: str) -> tuple[str, int]:
    name, _, seed = text.strip().lower().partition(":")
    if name not in ORDERS or (seed and (name != "random" or not seed.isdigit())):
        raise ValueError(f"${variable} must be 'forward', 'reverse', 'random' or 'random:SEED', got {text!r}")
    return name, int(seed or 0)


def _order(variable: str) -> tuple[str, int]:
    override = _overrides[variable]
    if override is not None:
        return override
    return _parse_order(variable, os.environ.get(variable, "forward"))


def current_order() -> tuple[str, int]:
    """The (order, seed) of the threads of a block in the next launch: :func:`thread_order`'s,
    else ``$GPUCONV_EMU_ORDER``'s, else ('forward', 0)."""
    return _order(ORDER_ENV)


def current_block_order() -> tuple[str, int]:
    """The (order, seed) of the blocks of the next launch: :func:`block_order`'s, else
    ``$GPUCONV_EMU_BLOCK_ORDER``'s, else ('forward', 0)."""
    return _order(BLOCK_ORDER_ENV)


def racecheck_enabled() -> bool:
    """Whether the next launch runs under the race detector: :func:`racecheck`'s choice, else
    ``$GPUCONV_EMU_RACECHECK`` ('1'/'0', also 'true'/'false', 'yes'/'no', 'on'/'off')."""
    override = _overrides[RACECHECK_ENV]
    if override is not None:
        return override
    text = os.environ.get(RACECHECK_ENV, "0").strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("", "0", "false", "no", "off"):
        return False
    raise ValueError(f"${RACECHECK_ENV} must be 1 or 0, got {text!r}")


@contextlib.contextmanager
def _override(variable: str, value):
    previous, _overrides[variable] = _overrides[variable], value
    try:
        yield
    finally:
        _overrides[variable] = previous


def _checked_order(order: str, seed: int) -> tuple[str, int]:
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise TypeError(f"seed must be a non-negative int, got {seed!r}")
    return order, int(seed)


def thread_order(order: str, seed: int = 0):
    """Within the ``with`` statement, launches resume the threads of each block between barriers
    in ``order``: 'forward' (thread 0 first), 'reverse', or 'random' (a new permutation every
    round, drawn from ``seed``)."""
    return _override(ORDER_ENV, _checked_order(order, seed))


def block_order(order: str, seed: int = 0):
    """Within the ``with`` statement, launches run their blocks in ``order``: 'forward' (block
    (0,0,0) first, x fastest), 'reverse', or 'random' (a permutation of the whole grid drawn from
    ``seed``). A GPU promises no order between blocks: a kernel whose answer changes with it
    reads what another block writes, or sums floats atomically in an order-dependent way."""
    return _override(BLOCK_ORDER_ENV, _checked_order(order, seed))


def racecheck(enabled: bool = True):
    """Within the ``with`` statement, launches run under the race detector
    (:mod:`gpuconv.emu_racecheck`): any two accesses to the same byte of shared or global memory,
    at least one a write, that no barrier, warp intrinsic or atomic orders raise
    :class:`gpuconv.emu.EmuRaceError`. ``racecheck(False)`` turns it off inside."""
    if not isinstance(enabled, (bool, np.bool_)):
        raise TypeError(f"enabled must be a bool, got {enabled!r}")
    return _override(RACECHECK_ENV, bool(enabled))
