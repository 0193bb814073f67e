"""A lane of the batch in a helper process: the executor's second lane without the GIL.

Two lanes on two Python threads overlap their large NumPy calls, but a LeNet-sized lane makes
hundreds of short ones a step, and each time a thread comes back from one while the other holds
the GIL it waits to be woken: on a 2-CPU VM that wait costs more than the call, and two threaded
lanes of 128 LeNet images ran 1.6x slower each than one alone (benchmarks/NOTES.md). So the second
lane runs in a helper process with its own interpreter, one per process that uses the executor,
started on first use (``python -m gpuconv.cpu.lane_worker``: a fresh interpreter, not a fork, so
it neither inherits the parent's threads nor re-runs the user's script).

The helper holds a replica of each model it runs lanes for: the model's layers pickled once,
without their parameters' values. Everything that changes from step to step goes through one
shared-memory arena per model and lane size (a ``memfd`` passed over the socket): the lane's
input rows, the parameters' values (copied in at every forward: an optimizer or the user may have
changed them), its output, the incoming gradient, its parameter gradients and its input
gradient. A step is two messages each way (forward, backward), about 0.1 ms on the 2-CPU VM.

Where the helper cannot run (no ``send_fds``: not POSIX; it failed to start; it died), the
executor falls back to lanes on threads. ``GPUCONV_CPU_LANES=thread`` asks for threads,
``GPUCONV_CPU_LANES=one`` for a single lane.
"""
from __future__ import annotations

import atexit
import io
import mmap
import os
import pickle
import socket
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from multiprocessing.connection import Connection

import numpy as np

__all__ = ["LANES_SWITCH", "lane_mode", "LaneProcess", "ProcessLane", "LaneProcessError", "Arena"]

LANES_SWITCH = "GPUCONV_CPU_LANES"
_MODES = ("process", "thread", "one")
# The helper's first message (it imports NumPy and gpuconv): a slow disk or a loaded machine may
# take a few seconds; past this the executor gives up on it and uses threads.
_START_SECONDS = 60.0
_ALIGN = 64
# How long a side polls for the other's next message before it sleeps: waking a process that
# sleeps costs 0.1-0.2 ms on a 2-CPU VM (a round trip: 31 us between polling processes, 154 us
# after 3 ms asleep), and a step's messages mostly come within a millisecond or two of each other.
SPIN_SECONDS = 0.002


def wait_for_message(connection) -> None:
    """Return once ``connection`` has something to read, polling for up to ``SPIN_SECONDS``
    before blocking on it."""
    deadline = time.perf_counter() + SPIN_SECONDS
    while time.perf_counter() < deadline:
        if connection.poll(0):
            return
        os.sched_yield()  # a busy machine's other work (the other lane, say) goes first
    connection.poll(None)


def lane_mode() -> str:
    """How the executor runs a second lane: ``GPUCONV_CPU_LANES`` (process, thread or one;
    process by default)."""
    mode = os.environ.get(LANES_SWITCH, "process").strip().lower() or "process"
    if mode not in _MODES:
        raise ValueError(f"{LANES_SWITCH} must be one of {', '.join(_MODES)}, got {mode!r}")
    return mode


class LaneProcessError(RuntimeError):
    """The helper process failed a request (its error text) or is gone."""


class Arena:
    """Named arrays in one shared mapping, laid out the same way in both processes from
    ``entries`` ``[(name, shape, dtype string), ...]``."""

    def __init__(self, entries, fd: int):
        self.entries = [(name, tuple(shape), np.dtype(dtype).str) for name, shape, dtype in entries]
        offsets, size = [], 0
        for _, shape, dtype in self.entries:
            offsets.append(size)
            nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
            size += -(-max(nbytes, 1) // _ALIGN) * _ALIGN
        self.size = size
        if os.fstat(fd).st_size < size:
            os.ftruncate(fd, size)
        self._map = mmap.mmap(fd, size)
        self.views = {}
        for (name, shape, dtype), offset in zip(self.entries, offsets):
            count = int(np.prod(shape, dtype=np.int64))
            self.views[name] = np.frombuffer(self._map, dtype, count, offset).reshape(shape)

    def __getitem__(self, name: str) -> np.ndarray:
        return self.views[name]


def _shared_file() -> int:
    if hasattr(os, "memfd_create"):
        return os.memfd_create("gpuconv-lane", getattr(os, "MFD_CLOEXEC", 0))
    with tempfile.TemporaryFile() as backing:  # unlinked: it goes when both processes close it
        return os.dup(backing.fileno())


class _ReplicaPickler(pickle.Pickler):
    def __init__(self, file, parameters):
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self._index = {id(p): i for i, p in enumerate(parameters)}

    def persistent_id(self, obj):
        index = self._index.get(id(obj))
        if index is None:
            return None
        return ("parameter", index, obj.shape, obj.dtype.str, obj.requires_grad)


def pickle_replica(model, parameters) -> bytes:
    """The model's layers and input shape, each of ``parameters`` by reference, not by value."""
    buffer = io.BytesIO()
    _ReplicaPickler(buffer, parameters).dump((model.features, model.flatten, model.classifier, model.input_shape))
    return buffer.getvalue()


class LaneProcess:
    """The helper process of this process (at most one), and the socket to it."""

    _current: "LaneProcess | None" = None
    _failure: str | None = None  # why the helper cannot run here, once known
    _guard = threading.Lock()

    @classmethod
    def get(cls) -> "LaneProcess | None":
        """The running helper, started on first use; None where it cannot run (``_failure`` says why)."""
        with cls._guard:
            current = cls._current
            if current is not None and current.pid == os.getpid() and current.alive:
                return current
            if cls._failure is not None:
                return None
            if not hasattr(socket, "send_fds") or os.name != "posix":
                cls._failure = "this platform cannot pass a shared-memory file to a helper process"
                return None
            if getattr(sys, "frozen", False) or not sys.executable:
                cls._failure = "no Python interpreter to start (a frozen application)"
                return None
            try:
                cls._current = LaneProcess()
            except (OSError, ValueError, LaneProcessError, EOFError) as exc:
                cls._failure = f"the helper process did not start: {exc}"
                cls._current = None
            return cls._current

    def __init__(self):
        ours, theirs = socket.socketpair()
        package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
                   PYTHONPATH=os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])))
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "gpuconv.cpu.lane_worker", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),), env=env, stdin=subprocess.DEVNULL,
                start_new_session=True)  # a Ctrl-C stops the parent, whose exit then ends the helper
        finally:
            theirs.close()
        self.pid = os.getpid()
        self._socket = ours
        self._connection = Connection(os.dup(ours.fileno()))
        self.alive = True
        self._lock = threading.Lock()  # one request in flight: held from its send to its reply
        self._next_replica = 0
        self._next_arena = 0
        self._dropped = []  # replicas whose executor is gone, told to the helper with the next request
        if not self._connection.poll(_START_SECONDS):
            self._fail("it sent nothing within %d s" % _START_SECONDS)
        self._receive()
        atexit.register(self.close)

    # -- requests -----------------------------------------------------------------------------

    def begin(self, message, fd: int | None = None) -> None:
        """Send a request (and a file descriptor after it); the reply is ``end``'s. Holds the
        lock until then."""
        self._lock.acquire()
        if not self.alive:
            self._lock.release()
            raise LaneProcessError("the helper process is gone")
        try:
            dropped, self._dropped = self._dropped, []
            self._connection.send((dropped, message))
            if fd is not None:
                socket.send_fds(self._socket, [b"f"], [fd])
        except OSError as exc:
            self._lock.release()
            self._fail(f"sending failed: {exc}")
        except BaseException:  # interrupted mid-request (Ctrl-C): the two sides are out of step
            self._lock.release()
            self._abandon("a request was interrupted")
            raise

    def end(self):
        """The reply to the request ``begin`` sent (raising its error)."""
        try:
            return self._receive()
        finally:
            self._lock.release()

    def request(self, message, fd: int | None = None):
        self.begin(message, fd)
        return self.end()

    def _receive(self):
        try:
            wait_for_message(self._connection)
            status, value = self._connection.recv()
        except (EOFError, OSError) as exc:
            self._fail(f"it ended (exit code {self.process.poll()}): {exc or 'connection closed'}")
        except BaseException:  # interrupted while waiting (Ctrl-C): the next request would read this reply
            self._abandon("waiting for a reply was interrupted")
            raise
        if status != "ok":  # the helper raised, and serves on
            raise LaneProcessError(f"the executor's helper process raised: {value}")
        return value

    def _fail(self, why: str):
        """The helper is gone or out of step with this side: not used again by this process."""
        self._abandon(why)
        raise LaneProcessError(f"the executor's helper process failed: {why}")

    def _abandon(self, why: str) -> None:
        self.alive = False
        LaneProcess._failure = why
        self.process.kill()
        self.process.wait()

    # -- replicas -----------------------------------------------------------------------------

    def add_replica(self, owner, model, parameters, lane_stages: int) -> int:
        """Build a replica of ``model`` in the helper, its lanes running its first ``lane_stages``
        stages; dropped there when ``owner`` (the executor) is collected."""
        replica = self._next_replica
        self._next_replica += 1
        try:
            payload = pickle_replica(model, parameters)
        except (pickle.PicklingError, TypeError, AttributeError) as exc:  # a layer holding what cannot be pickled
            raise LaneProcessError(f"the model's layers cannot be sent to the helper process: {exc}") from exc
        self.request(("replica", replica, payload, lane_stages))
        self.forget_with(owner, replica)
        return replica

    def new_arena_number(self) -> int:
        self._next_arena += 1
        return self._next_arena

    def forget_with(self, owner, key) -> None:
        """Drop ``key`` (a replica, or a replica's arena) in the helper once ``owner`` is
        collected: told with the next request, as a finalizer may run in the middle of one."""
        weakref.finalize(owner, self._dropped.append, key)

    def close(self) -> None:
        if not self.alive:
            return
        self.alive = False
        try:
            self._connection.close()
            self._socket.close()
            self.process.wait(timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            self.process.kill()


def _forget_after_fork() -> None:
    """A forked child must start a helper of its own (or none), and not hold the parent's socket
    open: the parent's helper ends when the parent closes it."""
    inherited, LaneProcess._current = LaneProcess._current, None
    LaneProcess._guard = threading.Lock()
    if inherited is not None:
        inherited.alive = False
        inherited._connection.close()
        inherited._socket.close()


os.register_at_fork(after_in_child=_forget_after_fork)


class ProcessLane:
    """The rows ``rows`` of a batch, run by the helper process on ``replica``'s stages.

    ``start_forward``/``finish_forward`` and ``start_backward``/``finish_backward`` bracket the
    parent's own lane: the helper works on its rows meanwhile.
    """

    def __init__(self, process: LaneProcess, replica: int, index: int, rows: slice, parameters: dict,
                 input_shape, output_shape, dtype):
        """``parameters``: ``{index in the replica: parameter}`` of the stages the lane runs (a
        large model's classifier runs here, on the whole batch: its weights stay out of the arena)."""
        self.process, self.replica, self.index, self.rows = process, replica, index, rows
        self.parameters = parameters
        self.written = {}
        count = rows.stop - rows.start
        entries = [("x", (count, *input_shape), dtype), ("y", (*output_shape, count), dtype),
                   ("grad_y", (*output_shape, count), dtype), ("grad_x", (count, *input_shape), dtype)]
        for i, p in parameters.items():
            entries += [(f"parameter {i}", p.shape, p.dtype), (f"gradient {i}", p.shape, p.dtype)]
        fd = _shared_file()
        try:
            self.arena = Arena(entries, fd)
            self.key = (replica, process.new_arena_number())  # never reused: a late drop of an old one is harmless
            process.request(("arena", self.key, self.arena.entries), fd)
        finally:
            os.close(fd)
        process.forget_with(self, self.key)

    @property
    def usable(self) -> bool:
        return self.process.alive and self.process.pid == os.getpid()

    def start_forward(self, x, step_arrays) -> None:
        """Send the lane's rows of ``x`` (NCHW), every parameter's value and each stage's step
        arrays (their rows) to the helper, which starts its forward."""
        arena = self.arena
        np.copyto(arena["x"], x[self.rows])
        for i, p in self.parameters.items():
            np.copyto(arena[f"parameter {i}"], p.data)
        rows = {stage: {name: array[self.rows] for name, array in arrays.items()}
                for stage, arrays in step_arrays.items()}
        self.process.begin(("forward", self.key, rows))

    def finish_forward(self) -> np.ndarray:
        """The lane's output ((F, n) features or (classes, n) logits), a view of the arena."""
        self.process.end()
        return self.arena["y"]

    def start_backward(self, grad, requires_input_grad: bool) -> None:
        """Send the gradient of the lane's output ((F, n) or (classes, n)); the helper starts its
        backward with each parameter's ``requires_grad`` as the parent has it now."""
        np.copyto(self.arena["grad_y"], grad)
        flags = {i: p.requires_grad for i, p in self.parameters.items()}
        self.process.begin(("backward", self.key, requires_input_grad, flags))

    def finish_backward(self):
        """The lane's input gradient (n, C, H, W) or None; ``written`` maps each parameter the
        helper wrote a gradient for to it (arena views)."""
        written, has_input_grad = self.process.end()
        self.written = {self.parameters[i]: self.arena[f"gradient {i}"] for i in written}
        return self.arena["grad_x"] if has_input_grad else None
