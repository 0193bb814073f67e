"""Data-parallel training: the process group of an MPI job, the gradient all-reduce, each rank's shard.

A job is started by MPI's launcher, ``mpiexec -n N gpuconv train ...`` (any MPI that mpi4py is
built against: the ``mpich`` wheel of ``gpuconv[mpi]``, or the system's). Every rank holds the
whole model and optimizer; per step, each trains on its own part of the global batch and the
gradients are summed over the ranks in ONE all-reduce per step, in place, of the optimizer's
flat gradient buffer (which the layers write into): over MPI on 'cpu' and 'emu' (host memory),
over NCCL on 'cuda' (``cupy.cuda.nccl``; its unique id is broadcast over MPI; this path awaits a
run on a machine with several GPUs). After it, every rank applies the same update to the same weights, so the model and the
optimizer stay identical on every rank without ever being sent again.

Conventions (decided here, as PyTorch's ``DistributedDataParallel`` and ``DistributedSampler``):

* ``--batch-size`` is per rank; the global batch is ``batch_size * world_size``.
* :class:`DistributedSampler` splits each epoch's permutation (``data.epoch_order(seed, epoch)``,
  the same on every rank) by striding: rank r takes positions r, r + W, r + 2W, ... The shards are
  disjoint and cover the epoch, without the padding PyTorch's sampler adds. Global step k then
  consumes exactly permutation positions ``[kBW, (k+1)BW)``: the batch one process with batch
  ``B * W`` trains on. The last global batch may be short; a rank whose shard has run out takes
  part in that step with an empty batch (a zero gradient).
* Each rank's gradient is weighted by its share of the global batch (its samples over the global
  batch's) before the sum, so the result is the gradient of the mean loss over the global batch,
  also for a short last batch (where DDP's plain average would weight samples unequally).
* Rank 0 alone logs, writes metrics, curves and checkpoints. A checkpoint holds the full model and
  optimizer state (identical on every rank) and so resumes on any number of ranks; rank 0 reads it
  and broadcasts it, so other machines need no copy of the file.
* A stop (Ctrl-C: ``mpiexec`` passes SIGINT to every rank) takes effect at the first step where
  the ranks sum their metrics (every ``sync_every`` steps) and so agree on it: every rank stops
  at that step, and rank 0 saves the checkpoint there. A mid-epoch position is counted in samples
  of the epoch's permutation, so it resumes on any number of ranks. No clock-driven syncs.
* Dropout draws the same mask seeds on every rank (one generator, seeded alike everywhere): the
  random state in a checkpoint is then that of every rank, whatever their number.

Failures stop the job instead of hanging it:

* a rank that raises prints ``rank R of W: <error>`` and calls ``MPI_Abort``, which makes the
  launcher stop every rank at once (:func:`abort_on_error`; a Python process that merely exits
  would leave the others waiting in their next collective forever);
* a rank that dies (killed, out of memory) is noticed by the launcher, which stops the others and
  names the dead process's PID; rank 0 prints each rank's PID and host at the start, to map it;
* a rank that hangs, or a lost machine: every collective here is non-blocking and polled against
  a deadline (``timeout``, the CLI's ``--dist-timeout``). On expiry, the ranks that are waiting
  tell each other so; the lowest of them names the ranks that never arrived and aborts the job.

Checkpoints are written atomically (:func:`gpuconv.data.atomic_write`), so a job aborted in the
middle of a save leaves the previous checkpoint whole. Polling (after a short spin, where MPI's
blocking calls spin throughout) also leaves the cores to the ranks that still compute, and lets
Ctrl-C through.
"""
from __future__ import annotations

import contextlib
import os
import pickle
import socket
import sys
import time
import traceback

import numpy as np

from .data import epoch_order
from .device import device_of

__all__ = ["ProcessGroup", "DistributedSampler", "DistributedError", "init_process_group", "launched_by_mpi",
           "abort_on_error", "shard_batches"]

# Set by the launchers of MPICH and Intel MPI (PMI_SIZE), Open MPI, and PMIx-based ones (srun).
LAUNCHER_ENV = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK")
DEFAULT_TIMEOUT = 300.0
_TIMEOUT_TAG = 7101
_SPIN_S = 2e-3
_GRACE = 5.0  # at most this many seconds the waiting ranks give each other to report in, after a deadline


class DistributedError(RuntimeError):
    """The ranks of a job disagree (e.g. were started with different options), or MPI is missing."""


def launched_by_mpi() -> bool:
    """Whether this process was started by an MPI launcher (``mpiexec``, ``mpirun``, ``srun``)."""
    return any(os.environ.get(name) for name in LAUNCHER_ENV)


def _mpi():
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise DistributedError(
            f"this process was started by an MPI launcher, but mpi4py does not import ({exc}); "
            "install it with: pip install 'gpuconv[mpi]'") from None
    return MPI


class ProcessGroup:
    """The ranks of one job over an MPI communicator; ``comm=None`` is a job of one process, where
    every collective returns at once and nothing needs MPI.

    ``rank``, ``world_size``; ``local_rank`` and ``local_size``: the rank among, and the number of,
    the ranks on this machine (from ``MPI_Comm_split_type(SHARED)``, which every MPI implements,
    rather than each launcher's own environment variable). ``timeout``: seconds any one
    collective may wait for the other ranks.
    """

    def __init__(self, comm=None, timeout: float = DEFAULT_TIMEOUT):
        self.comm = comm
        self.timeout = float(timeout)
        self.rank, self.world_size, self.local_rank, self.local_size = 0, 1, 0, 1
        self._nccl = None
        self._nccl_done = None  # the event after the last gradient all-reduce on 'cuda'
        if comm is not None:
            MPI = _mpi()
            self.rank, self.world_size = comm.Get_rank(), comm.Get_size()
            local = comm.Split_type(MPI.COMM_TYPE_SHARED)
            self.local_rank, self.local_size = local.Get_rank(), local.Get_size()
            local.Free()
            # Timeout reports travel on their own communicator, apart from any pending collective.
            self._reports = comm.Dup()

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that logs and writes files."""
        return self.rank == 0

    def __repr__(self) -> str:
        return f"ProcessGroup(rank={self.rank}, world_size={self.world_size}, local_rank={self.local_rank})"

    # -- failure handling -----------------------------------------------------------------------

    def abort(self, code: int = 1) -> None:
        """Stop every rank of the job now (``MPI_Abort``); in a job of one process, exit."""
        sys.stdout.flush()
        sys.stderr.flush()
        if self._nccl is not None:
            self._nccl.abort()
        if self.comm is None:
            raise SystemExit(code)
        time.sleep(0.5)  # the launcher forwards what this rank printed before it tears the job down
        self.comm.Abort(code)
        os._exit(code)  # MPI_Abort may return before the launcher ends this process

    def _wait(self, request, what: str) -> None:
        """Complete a non-blocking MPI request, or abort the job once ``timeout`` has passed."""
        self._poll(request.Test, what)

    def _poll(self, done, what: str) -> None:
        # Spin for the first _SPIN_S (MPI progresses a non-blocking collective only inside Test;
        # LeNet-5's gradient all-reduce between 2 ranks that arrive together takes 0.15 ms on a
        # CPU, as the blocking call), then sleep between tests, longer and longer: a rank that
        # waits for a slower one leaves it the core, and Ctrl-C gets through.
        start = time.monotonic()
        deadline, spin_until = start + self.timeout, start + _SPIN_S
        pause = 1e-5
        while not done():
            now = time.monotonic()
            if now > deadline:
                self._timed_out(what)
            if now > spin_until:
                time.sleep(pause)
                pause = min(1e-3, 2 * pause)

    def _timed_out(self, what: str) -> None:
        """Every rank whose deadline passed tells the others; after a grace period the lowest of
        them names the ranks that never did (they are dead, hung, or out of reach) and aborts."""
        others = [peer for peer in range(self.world_size) if peer != self.rank]
        sent = [self._reports.isend(self.rank, dest=peer, tag=_TIMEOUT_TAG) for peer in others]
        waiting = {self.rank}
        grace_end = time.monotonic() + min(_GRACE, self.timeout / 4)
        while time.monotonic() < grace_end:
            while self._reports.iprobe(tag=_TIMEOUT_TAG):
                waiting.add(self._reports.recv(tag=_TIMEOUT_TAG))
            time.sleep(0.05)
        missing = sorted(set(range(self.world_size)) - waiting)
        if self.rank == min(waiting):
            names = ", ".join(map(str, missing)) or "none (all were waiting: an MPI failure)"
            print(f"gpuconv: rank {self.rank} of {self.world_size}: {what} did not complete within "
                  f"{self.timeout:g} s; rank(s) that never reached it: {names}. Aborting all ranks; the last "
                  f"checkpoint is kept.", file=sys.stderr, flush=True)
            self.abort(1)
        time.sleep(2 * _GRACE)  # the lowest waiting rank is aborting the job; this is in case it died
        del sent
        self.abort(1)

    # -- collectives on host data ---------------------------------------------------------------

    def barrier(self, what: str = "a barrier") -> None:
        if self.is_distributed:
            self._wait(self.comm.Ibarrier(), what)

    @contextlib.contextmanager
    def main_first(self):
        """Run the block on rank 0 first and on the other ranks once it is done (a download)."""
        if not self.is_main:
            self.barrier("waiting for rank 0")
        yield
        if self.is_main:
            self.barrier("waiting for rank 0")

    def allreduce_sum(self, array: np.ndarray, what: str = "an all-reduce") -> np.ndarray:
        """Sum a host array over the ranks, in place; returns it."""
        if self.is_distributed:
            self._wait(self.comm.Iallreduce(_mpi().IN_PLACE, array, op=_mpi().SUM), what)
        return array

    def broadcast_object(self, value, root: int = 0, what: str = "a broadcast"):
        """Rank ``root``'s ``value`` on every rank (pickled; a checkpoint, a configuration)."""
        if not self.is_distributed:
            return value
        payload = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL) if self.rank == root else b""
        size = np.array([len(payload)], np.int64)
        self._wait(self.comm.Ibcast(size, root=root), what)
        buffer = np.frombuffer(payload, np.uint8).copy() if self.rank == root else np.empty(int(size[0]), np.uint8)
        self._wait(self.comm.Ibcast(buffer, root=root), what)
        return value if self.rank == root else pickle.loads(buffer.tobytes())

    def allgather_object(self, value, what: str = "an all-gather") -> list:
        """Every rank's ``value``, in rank order, on every rank."""
        if not self.is_distributed:
            return [value]
        payload = np.frombuffer(pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL), np.uint8)
        sizes = np.empty(self.world_size, np.int64)
        self._wait(self.comm.Iallgather(np.array([payload.size], np.int64), sizes), what)
        gathered = np.empty(int(sizes.sum()), np.uint8)
        self._wait(self.comm.Iallgatherv(payload, [gathered, sizes]), what)
        bounds = np.concatenate([[0], np.cumsum(sizes)])
        return [pickle.loads(gathered[a:b].tobytes()) for a, b in zip(bounds[:-1], bounds[1:])]

    def check_same(self, value, what: str) -> None:
        """Raise :class:`DistributedError` on every rank whose ``value`` differs from rank 0's."""
        reference = self.broadcast_object(value, what=f"the check of {what}")
        if value != reference:
            if isinstance(value, dict) and isinstance(reference, dict):
                keys = sorted(k for k in value.keys() | reference.keys() if value.get(k) != reference.get(k))
                detail = "; ".join(f"{k}: {value.get(k)!r} here, {reference.get(k)!r} on rank 0" for k in keys)
            else:
                detail = f"{value!r} here, {reference!r} on rank 0"
            raise DistributedError(f"{what} differs from rank 0's ({detail}); start every rank with the same options")

    # -- devices and gradients ------------------------------------------------------------------

    def use_device(self, device: str) -> str:
        """Bind this rank to its device: on 'cuda', GPU ``local_rank`` modulo the GPUs this process
        sees, made current before anything is allocated there, and the NCCL communicator. Returns
        a description of the choice."""
        if device != "cuda":
            return device
        import cupy

        count = cupy.cuda.runtime.getDeviceCount()
        index = self.local_rank % count
        cupy.cuda.Device(index).use()
        if self.is_distributed:
            self._nccl_communicator()
        shared = f", shared by {-(-self.local_size // count)} ranks" if self.local_size > count else ""
        return f"cuda:{index}{shared}"

    def _nccl_communicator(self):
        # Awaits a GPU: written against cupy.cuda.nccl's documented API, not yet run.
        if self._nccl is None:
            try:
                from cupy.cuda import nccl
            except ImportError as exc:
                raise DistributedError(f"data-parallel training on 'cuda' needs NCCL, which CuPy cannot load ({exc}); "
                                       "install it with: pip install nvidia-nccl-cu12 (or -cu13)") from None
            unique_id = self.broadcast_object(nccl.get_unique_id() if self.is_main else None,
                                              what="the NCCL unique id")
            self._nccl = nccl.NcclCommunicator(self.world_size, unique_id, self.rank)
        return self._nccl

    def average_gradients(self, optimizer, share: float) -> None:
        """Sum ``share_r * grad_r`` over the ranks into every gradient of ``optimizer``'s
        parameters, with ONE all-reduce of its flat gradient buffer (one per device and dtype),
        in place: the layers wrote their gradients there, and the optimizer steps from there.

        ``share`` is this rank's samples over the global batch's, so the result is the gradient
        of the global batch's mean loss. A missing gradient (an empty local batch) counts as zero.
        """
        if not self.is_distributed:
            return
        for flat in optimizer.flat_gradients():
            flat *= share
            if device_of(flat) == "cuda":
                self._nccl_sum(flat)
            else:
                self.allreduce_sum(flat, what="the gradient all-reduce")

    def _nccl_sum(self, flat) -> None:
        # Awaits a GPU: written against cupy.cuda.nccl's documented API, not yet run.
        import cupy
        from cupy.cuda import nccl

        if flat.dtype != np.float32:
            raise TypeError(f"the NCCL gradient all-reduce takes float32 gradients, got {flat.dtype}")
        stream = cupy.cuda.get_current_stream()
        self._nccl_communicator().allReduce(flat.data.ptr, flat.data.ptr, flat.size, nccl.NCCL_FLOAT32,
                                            nccl.NCCL_SUM, stream.ptr)
        # NCCL waits for a missing rank forever: poll completion against the deadline (abort()
        # then aborts the communicator). The host waits for the previous step's all-reduce, not
        # this one's, so that it can queue the next step while the GPU still works on this.
        previous, self._nccl_done = self._nccl_done, stream.record()
        if previous is not None:
            self._poll(lambda: previous.done, "the NCCL gradient all-reduce")

    def wait_for_device(self, what: str) -> None:
        """On 'cuda' in a job of several ranks, wait (against the deadline) for the GPU's queued
        work, which may wait on NCCL: call before reading a result back to the host."""
        if self._nccl is None:
            return
        import cupy  # awaits a GPU, as the NCCL path

        event = cupy.cuda.get_current_stream().record()
        self._poll(lambda: event.done, what)


_GROUP: ProcessGroup | None = None


def init_process_group(timeout: float | None = None) -> ProcessGroup:
    """This process's group: the MPI job's world when started by an MPI launcher, else a group of
    one (mpi4py is then never imported). Created once per process; ``timeout`` updates it."""
    global _GROUP
    if _GROUP is None:
        _GROUP = ProcessGroup(_mpi().COMM_WORLD) if launched_by_mpi() else ProcessGroup()
    if timeout is not None:
        if not timeout > 0:
            raise ValueError(f"timeout must be positive seconds, got {timeout!r}")
        _GROUP.timeout = float(timeout)
    return _GROUP


def describe_ranks(group: ProcessGroup, device: str) -> list[str]:
    """One line per rank (PID, host, device), gathered to every rank: the launcher names a dead
    process by its PID, this maps the PID to the rank."""
    rows = group.allgather_object((os.getpid(), socket.gethostname(), device), what="the rank table")
    return [f"rank {rank}: pid {pid} on {host}, {dev}" for rank, (pid, host, dev) in enumerate(rows)]


@contextlib.contextmanager
def abort_on_error(expected: tuple[type[BaseException], ...] = (), collective: tuple[type[BaseException], ...] = (),
                   prog: str = "gpuconv"):
    """In a job of several ranks, turn an exception on one rank into a message naming the rank and
    an abort of the whole job: an ``expected`` exception prints its message alone (exit status
    2), Ctrl-C says so (130), any other prints its traceback (1). A ``collective`` exception is
    one that every rank raises at the same step (a stop all ranks agreed on, a diverged loss
    they all summed): it passes through, and each rank ends on its own. A job of one process
    sees its exceptions unchanged."""
    group = init_process_group()
    if not group.is_distributed:
        yield
        return
    try:
        yield
    except collective:
        raise
    except SystemExit as exc:
        if exc.code in (None, 0):
            raise
        print(f"{prog}: rank {group.rank} of {group.world_size} exited with status {exc.code}; aborting all ranks",
              file=sys.stderr)
        group.abort(exc.code if isinstance(exc.code, int) else 1)
    except BaseException as exc:  # noqa: B036 -- every failure, Ctrl-C included, must stop all ranks
        if isinstance(exc, KeyboardInterrupt):
            detail, code = "interrupted", 130
        elif isinstance(exc, expected):
            detail, code = str(exc), 2
        else:
            detail, code = "".join(traceback.format_exception(exc)).rstrip(), 1
        print(f"{prog}: rank {group.rank} of {group.world_size}: {detail}\n{prog}: aborting all ranks",
              file=sys.stderr)
        group.abort(code)


class DistributedSampler:
    """The sample indices rank ``rank`` of ``world_size`` trains on in one epoch.

    The epoch's permutation (:func:`gpuconv.data.epoch_order` of ``(seed, epoch)``, the identity
    without ``shuffle``) from position ``start`` on, strided: rank r takes positions
    ``start + r``, ``start + r + W``, ... (``start`` lets a run resume mid-epoch, counted in samples
    so that it may resume on another number of ranks or batch size).
    """

    def __init__(self, num_samples: int, rank: int = 0, world_size: int = 1, shuffle: bool = True, seed: int = 0):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must lie in [0, world_size={world_size}), got {rank}")
        self.num_samples, self.rank, self.world_size = int(num_samples), rank, world_size
        self.shuffle, self.seed = shuffle, seed

    def indices(self, epoch: int, start: int = 0) -> np.ndarray:
        return epoch_order(self.num_samples, self.shuffle, self.seed, epoch)[start + self.rank::self.world_size]

    def num_steps(self, batch_size: int, start: int = 0) -> int:
        """Global steps from ``start`` to the epoch's end: the same on every rank."""
        return -(-(self.num_samples - start) // (batch_size * self.world_size))

    def global_batch(self, step: int, batch_size: int, start: int = 0) -> int:
        """Samples over all ranks in global step ``step`` (0-based)."""
        return min(batch_size * self.world_size, self.num_samples - start - step * batch_size * self.world_size)


def shard_batches(dataset, sampler: DistributedSampler, batch_size: int, epoch: int, start: int = 0):
    """``(x, y, share)`` of every global step of ``sampler``'s epoch, from this rank's shard of a
    :class:`gpuconv.data.DeviceDataset`: ``share`` is this rank's part of the global batch, and
    ``x`` and ``y`` are None in a last step where the shard has no sample left."""
    local = dataset.batches(batch_size, order=sampler.indices(epoch, start))
    for step in range(sampler.num_steps(batch_size, start)):
        x, y = next(local, (None, None))
        yield x, y, (0 if y is None else len(y)) / sampler.global_batch(step, batch_size, start)
