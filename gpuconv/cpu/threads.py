"""Threads of the executor: OpenBLAS's thread count, and the worker threads that run lanes of a batch.

OpenBLAS's thread count is set through threadpoolctl, which finds whatever BLAS this NumPy loaded
(the bundled ``scipy_openblas`` symbol names differ between NumPy wheels) and restores the count
it found when the ``with`` block ends.
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

_lock = threading.Lock()
_controller = None
_workers: ThreadPoolExecutor | None = None
_worker_count = 0


def _blas_controller():
    global _controller
    with _lock:
        if _controller is None:
            from threadpoolctl import ThreadpoolController

            _controller = ThreadpoolController()
        return _controller


def blas_threads() -> int:
    """How many threads the BLAS runs a matrix product on now (1 where none was found)."""
    counts = [info["num_threads"] for info in _blas_controller().info() if info["user_api"] == "blas"]
    return max(counts, default=1)


def single_threaded_blas():
    """A ``with`` block in which every BLAS call runs on its caller's thread alone."""
    return _blas_controller().limit(limits=1, user_api="blas")


def run_each(function, items) -> None:
    """``function(item)`` for every item, the first on this thread and the others on worker
    threads at the same time; returns when all have ended, raising the first error met."""
    if len(items) == 1:
        function(items[0])
        return
    futures = [_pool(len(items) - 1).submit(function, item) for item in items[1:]]
    error = None
    try:
        function(items[0])
    except BaseException as exc:  # the others still run on buffers this call owns: wait for them
        error = exc
    for future in futures:
        try:
            future.result()
        except BaseException as exc:
            error = error or exc
    if error is not None:
        raise error


def _pool(count: int) -> ThreadPoolExecutor:
    global _workers, _worker_count
    with _lock:
        if _workers is None or _worker_count < count:
            if _workers is not None:
                _workers.shutdown(wait=False)
            _workers, _worker_count = ThreadPoolExecutor(count, thread_name_prefix="gpuconv-cpu"), count
        return _workers


def _forget_workers() -> None:
    """In a forked child: the parent's worker threads do not exist there, so a submit would wait
    forever; the child starts its own on first use."""
    global _lock, _workers, _worker_count
    _lock, _workers, _worker_count = threading.Lock(), None, 0


os.register_at_fork(after_in_child=_forget_workers)
