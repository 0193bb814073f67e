"""CUDA graphs: capture a training step once, replay it with one call (``torch.cuda.CUDAGraph``'s names).

::

    static_x, static_y = gpuconv.to_device(x0, dev), gpuconv.to_device(y0, dev)
    step(static_x, static_y)                    # one eager step first: the optimizer's state
    g = gpuconv.CUDAGraph()
    with gpuconv.graph(g):
        static_loss = step(static_x, static_y)  # recorded, not run
    for x, y in batches:
        static_x[...] = x; static_y[...] = y    # the caller copies into the static inputs
        g.replay()                              # static_loss now holds this step's loss

On 'cuda' this is CuPy's stream capture (``Stream.begin_capture``/``end_capture`` and
``Graph.launch``). On 'emu' the graph records every device operation the step issues (the kernel
with its launch shape and its argument arrays by reference, and the library calls) and
:meth:`CUDAGraph.replay` issues them again in order, so the capture discipline is tested without
a GPU. As with a real capture, nothing runs while capturing.

The rules a captured region keeps, checked on 'emu' (each broken one a :class:`GraphCaptureError`):

* no device allocation: the buffers a layer needs are its *static buffers*, made the first time
  the layer is captured with an input of that shape and kept by the layer (so a replay writes
  the same arrays: keep the outputs of the capture, they are the graph's static outputs). Any
  other allocation, a NumPy operation on device arrays that would run once rather than on
  every replay, or a copy, raises;
* no host round trip: reading a device value (``float(loss)``, ``to_numpy``) or copying a host
  array in raises;
* every value that changes from step to step is read by the kernels from device memory and
  written there by a host update that the graph runs again before each replay
  (:func:`host_update`): the learning rate, Adam's bias corrections, dropout seeds.
"""
from __future__ import annotations

import contextlib

from . import device as _device
from . import dispatch

__all__ = ["CUDAGraph", "graph", "GraphedStep", "GraphCaptureError", "host_update", "capturing"]


class GraphCaptureError(RuntimeError):
    """A captured region broke the capture rules, or a graph was used wrongly."""


_capturing: "CUDAGraph | None" = None
# The layer whose static buffers serve allocations inside a capture: (owner, key) or None.
_scope: tuple | None = None


def capturing() -> "CUDAGraph | None":
    """The graph being captured, if any."""
    return _capturing


class CUDAGraph:
    """One captured sequence of device operations; :meth:`replay` issues it again."""

    def __init__(self):
        self.device: str | None = None
        self._nodes: list = []       # 'emu': (name, run) in issue order
        self._updates: list = []     # host updates, run before each replay
        self._cupy_graph = None
        self._stream = None
        self._captured = False

    # -- capture ------------------------------------------------------------------------------

    def capture_begin(self) -> None:
        global _capturing
        if _capturing is not None:
            raise GraphCaptureError("a graph is already being captured: captures do not nest")
        if self._captured:
            raise GraphCaptureError("this CUDAGraph holds a capture already; call reset() to capture again")
        _capturing = self
        dispatch.capture = self._record
        _device.capture = self

    def capture_end(self) -> None:
        global _capturing
        _capturing = None
        dispatch.capture = None
        _device.capture = None
        if self._stream is not None:
            self._cupy_graph = self._stream.end_capture()
            self._stream_context.__exit__(None, None, None)
        self._captured = True

    def _record(self, name: str, device: str, run) -> None:
        if self.device is None:
            self.device = device
            if device == "cuda":
                self._begin_cuda()
        elif device != self.device:
            raise GraphCaptureError(f"{name} on {device!r} inside a graph captured on {self.device!r}: "
                                    "a graph holds the operations of one device")
        if device == "cuda":
            run()  # onto the capturing stream, which records it
        else:
            self._nodes.append((name, run))

    def _begin_cuda(self) -> None:
        cupy = _device.array_module("cuda")
        self._stream = cupy.cuda.Stream(non_blocking=True)
        self._stream_context = self._stream
        self._stream_context.__enter__()
        # Relaxed: a layer's first capture makes its static buffers, which may reach cudaMalloc.
        relaxed = getattr(cupy.cuda.runtime, "streamCaptureModeRelaxed", None)
        self._stream.begin_capture() if relaxed is None else self._stream.begin_capture(relaxed)

    # Called by gpuconv.device inside a capture.
    def allocate(self, shape, dtype, device: str, fresh):
        if _scope is None:
            raise GraphCaptureError(
                f"a device allocation ({device}, shape {tuple(shape)}, {dtype}) inside graph capture, outside any "
                "layer: a captured region allocates nothing but the layers' static buffers; allocate inputs and "
                "state before capturing (run one eager step first)")
        owner, key = _scope
        buffers, used = owner._static_buffers.setdefault(key, ([], [0]))
        index = used[0]
        used[0] += 1
        if index == len(buffers):
            buffers.append(fresh(shape, dtype, device))
        buffer = buffers[index]
        if tuple(buffer.shape) != tuple(shape) or buffer.dtype != dtype:
            raise GraphCaptureError(f"{type(owner).__name__} asked for buffer {index} of {tuple(shape)} {dtype} where "
                                    f"an earlier capture made {tuple(buffer.shape)} {buffer.dtype}")
        return buffer

    def refuse(self, what: str):
        raise GraphCaptureError(f"{what} inside graph capture: a captured region makes no host round trip and "
                                "runs no host-side array operation (it would run once, not on every replay)")

    # -- replay -------------------------------------------------------------------------------

    def replay(self) -> None:
        """Run the host updates, then every captured operation, in capture order."""
        if not self._captured:
            raise GraphCaptureError("replay() before a capture: capture with `with gpuconv.graph(g):` first")
        if _capturing is not None:
            raise GraphCaptureError("replay() inside a graph capture")
        for update in self._updates:
            update()
        if self._cupy_graph is not None:
            self._cupy_graph.launch()
            return
        if dispatch.dry_run_launches is not None:
            dispatch.dry_run_launches.append(("graph", None, None, len(self._nodes)))
            return
        for name, run in self._nodes:
            dispatch.issue(name, self.device, run)

    def reset(self) -> None:
        """Forget the capture (the layers keep their static buffers)."""
        self.__init__()

    @property
    def num_operations(self) -> int | None:
        """Device operations one replay issues ('emu'; None on 'cuda', where CUDA holds the graph)."""
        return len(self._nodes) if self.device != "cuda" else None


@contextlib.contextmanager
def graph(cuda_graph: CUDAGraph):
    """Capture the device operations of the ``with`` block into ``cuda_graph`` (not running them)."""
    cuda_graph.capture_begin()
    try:
        yield cuda_graph
    finally:
        cuda_graph.capture_end()


@contextlib.contextmanager
def static_buffers(owner, key):
    """Within the block, allocations inside a capture are ``owner``'s static buffers for ``key``.

    ``owner`` needs a ``_static_buffers`` dict. Outside a capture this costs one test.
    """
    global _scope
    if _capturing is None:
        yield
        return
    previous, _scope = _scope, (owner, key)
    entry = owner._static_buffers.get(key)
    if entry is not None:
        entry[1][0] = 0
    try:
        yield
    finally:
        _scope = previous


def host_update(update) -> None:
    """Run ``update()``, a host write of a per-step value into device memory (and whatever host
    state it advances: Adam's step count, the seed generator), now; inside a capture, instead,
    before every replay of the graph, in capture order (a capture is not a step)."""
    if _capturing is None:
        update()
    else:
        _capturing._updates.append(update)


class GraphedStep:
    """``fn`` captured once for inputs like ``sample_args``, then replayed per call.

    Construction runs ``fn`` eagerly once on copies of ``sample_args`` (the warm-up, which makes
    the optimizer's state; its result is ``warmup_result``: the step for those inputs), then
    captures it on those copies, the static inputs. A call checks that each argument matches its
    static input in shape, dtype and device (a clear error otherwise, never a replay over the
    wrong buffers), copies it in, replays, and returns the captured outputs, which the next
    call overwrites.
    """

    def __init__(self, fn, *sample_args):
        self._static = tuple(a.copy() for a in sample_args)  # C-contiguous, on their device
        self.warmup_result = fn(*self._static)
        self.graph = CUDAGraph()
        with graph(self.graph):
            self.outputs = fn(*self._static)

    def _check(self, args) -> None:
        if len(args) != len(self._static):
            raise ValueError(f"the captured step takes {len(self._static)} arguments, got {len(args)}")
        for index, (arg, static) in enumerate(zip(args, self._static)):
            got = (tuple(arg.shape), arg.dtype, _device.device_of(arg))
            want = (tuple(static.shape), static.dtype, _device.device_of(static))
            if got != want:
                raise ValueError(f"argument {index} of the captured step is {got[1]} {got[0]} on {got[2]!r}, but "
                                 f"the graph was captured for {want[1]} {want[0]} on {want[2]!r}: capture another "
                                 "graph for this shape (or run it eagerly)")

    def __call__(self, *args):
        self._check(args)
        for arg, static in zip(args, self._static):
            if arg is not static:
                dispatch.device_call("copy", _device.device_of(static), lambda a=arg, s=static: s.__setitem__(Ellipsis, a))
        self.graph.replay()
        return self.outputs
