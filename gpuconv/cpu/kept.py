"""Views of a lane's buffers built once and kept from step to step.

A stage called every step with the same arrays (its workspace's and its neighbours') reads them
through the same reshaped and strided views each time; at a lane of 8 images building those views
(and re-deriving their geometry) costs about as much as the arithmetic on them.
"""
from __future__ import annotations

__all__ = ["KeptViews"]


class KeptViews:
    """``get(name, arrays, build)``: ``build(*arrays)``, kept and given again while the call names
    the same array objects (by identity: a new array, even an equal one, builds anew). For one
    thread at a time, as a lane's workspace is."""

    def __init__(self):
        self._kept = {}

    def get(self, name: str, arrays: tuple, build):
        kept = self._kept.get(name)
        if kept is not None:
            previous, views = kept
            if len(previous) == len(arrays) and all(a is b for a, b in zip(previous, arrays)):
                return views
        views = build(*arrays)
        self._kept[name] = (arrays, views)
        return views
