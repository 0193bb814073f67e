"""How a row is timed: warm-up, then each repeat on its own -- a pair of device events around
the call on the GPU, ``time.perf_counter`` on the CPU -- summarised as the median and the spread
(quartiles, min/max); input sets rotated so that together they exceed twice the cache."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

MAX_BUFFER_SETS = 8


@dataclass(frozen=True)
class Stats:
    """Summary of repeated timings (seconds); quartiles by linear interpolation (NumPy's default)."""

    median: float
    q1: float
    q3: float
    min: float
    max: float
    n: int

    @property
    def iqr(self) -> float:
        return self.q3 - self.q1


def summarize(samples) -> Stats:
    values = np.asarray(samples, dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"samples must be a non-empty 1-D sequence, got shape {values.shape}")
    q1, median, q3 = np.percentile(values, [25, 50, 75])
    return Stats(float(median), float(q1), float(q3), float(values.min()), float(values.max()), int(values.size))


class CpuTimer:
    """``time.perf_counter`` around each call."""

    def __init__(self):
        self._start, self._times = 0.0, []

    def start(self):
        self._start = time.perf_counter()

    def stop(self):
        self._times.append(time.perf_counter() - self._start)

    def seconds(self) -> list[float]:
        return self._times


class EventTimer:
    """A pair of device events around each call, read once at the end, so calls queue back to
    back and the host never waits between them. ``elapsed(start, stop)`` is in milliseconds."""

    def __init__(self, make_event, elapsed):
        self._make, self._elapsed, self._pairs = make_event, elapsed, []

    def _record(self):
        event = self._make()
        event.record()
        return event

    def start(self):
        self._pairs.append((self._record(), None))

    def stop(self):
        self._pairs[-1] = (self._pairs[-1][0], self._record())

    def seconds(self) -> list[float]:
        self._pairs[-1][1].synchronize()
        return [self._elapsed(start, stop) / 1e3 for start, stop in self._pairs]


def cupy_timer() -> EventTimer:
    """CUDA events on CuPy's current stream."""
    import cupy

    return EventTimer(cupy.cuda.Event, cupy.cuda.get_elapsed_time)


def cupy_sync() -> None:
    import cupy

    cupy.cuda.get_current_stream().synchronize()


def buffer_sets(set_bytes: int, cache_bytes: int, memory_bytes: int) -> int:
    """How many input sets to rotate: enough to exceed twice the cache, at most MAX_BUFFER_SETS,
    and no more than a quarter of the free memory holds."""
    wanted = math.ceil(2 * cache_bytes / max(set_bytes, 1))
    fits = memory_bytes // 4 // max(set_bytes, 1)
    return int(max(1, min(wanted, MAX_BUFFER_SETS, fits)))


def time_calls(run, sets, timer, sync, warmup: int, repeats: int, max_seconds: float) -> list[float]:
    """Time ``run(*sets[i % len(sets)])``: up to ``warmup`` untimed calls (fewer once half of
    ``max_seconds`` is spent), then up to ``repeats`` timed ones, stopping early (after at least
    3) once ``max_seconds`` of wall time are spent."""
    began = time.perf_counter()
    for i in range(warmup):
        run(*sets[i % len(sets)])
        if time.perf_counter() - began > max_seconds / 2:  # a slow row needs little warming
            break
    sync()
    began = time.perf_counter()
    for i in range(repeats):
        timer.start()
        run(*sets[(warmup + i) % len(sets)])
        timer.stop()
        if i >= 2 and time.perf_counter() - began > max_seconds:
            break
    return timer.seconds()


def nbytes(arrays) -> int:
    return sum(int(a.nbytes) for a in arrays)
