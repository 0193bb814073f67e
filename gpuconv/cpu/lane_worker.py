"""The helper process of :mod:`gpuconv.cpu.lane_process`: ``python -m gpuconv.cpu.lane_worker FD``.

It serves one parent over the socket ``FD``: builds replicas of the parent's models (their layers,
parameters as arena views), maps the arenas the parent sends, and runs one lane's forward and
backward per request with the executor's own lane code. It ends when the parent closes the socket.
"""
from __future__ import annotations

import io
import os
import pickle
import signal
import socket
import sys
import traceback
from multiprocessing.connection import Connection
from types import SimpleNamespace

import numpy as np

from ..nn import Parameter
from .executor import Lane, ModelExecutor
from .lane_process import Arena, wait_for_message


class _ReplicaUnpickler(pickle.Unpickler):
    def __init__(self, payload: bytes):
        super().__init__(io.BytesIO(payload))
        self.parameters = {}

    def persistent_load(self, pid):
        kind, index, shape, dtype, requires_grad = pid
        if kind != "parameter":
            raise pickle.UnpicklingError(f"unknown reference {kind!r}")
        parameter = Parameter(np.zeros(shape, dtype), requires_grad)
        self.parameters[index] = parameter
        return parameter


class _Replica:
    """One parent model's executor here, and the arenas and lanes of its lane sizes."""

    def __init__(self, payload: bytes, lane_stages: int):
        unpickler = _ReplicaUnpickler(payload)
        features, flatten, classifier, input_shape = unpickler.load()
        self.parameters = [unpickler.parameters[i] for i in range(len(unpickler.parameters))]
        self.index = {id(p): i for i, p in enumerate(self.parameters)}
        model = SimpleNamespace(features=features, flatten=flatten, classifier=classifier, input_shape=input_shape)
        self.executor = ModelExecutor(model)
        self.executor.lane_stages = lane_stages  # as the parent decided it
        self.plans = {}  # arena number -> (arena, lane)

    def forward(self, arena_number: int, step_rows) -> None:
        arena, lane = self.plans[arena_number]
        for i in lane.parameter_indices:
            self.parameters[i].data = arena[f"parameter {i}"]
        for i in self.executor.lane_stage_range(split=True):
            self.executor.stages[i].use_step_arrays(step_rows.get(i, {}))
        with np.errstate(all="ignore"):
            np.copyto(arena["y"], self.executor.lane_forward(lane, arena["x"]))

    def backward(self, arena_number: int, requires_input_grad: bool, flags):
        arena, lane = self.plans[arena_number]
        index = self.index
        for i, flag in flags.items():
            self.parameters[i].requires_grad = flag
        written = []

        def target(p):
            if not p.requires_grad:
                return None
            written.append(index[id(p)])
            return arena[f"gradient {index[id(p)]}"]

        lane.grad_target = target
        with np.errstate(all="ignore"):
            grad = self.executor.lane_backward(lane, arena["grad_y"], requires_input_grad)
            if grad is not None:
                np.copyto(arena["grad_x"], grad.transpose(3, 0, 1, 2))
        return written, grad is not None


class _Server:
    def __init__(self, sock: socket.socket):
        self.socket = sock
        self.replicas = {}

    def handle(self, message):
        kind, *args = message
        if kind == "arena":  # the file comes right after the message: take it before anything can fail
            _, fds, _, _ = socket.recv_fds(self.socket, 1, 1)
            try:
                (replica, arena_number), entries = args
                arena = Arena(entries, fds[0])
            finally:
                for fd in fds:
                    os.close(fd)
            target = self.replicas[replica]
            count = arena['x'].shape[0]
            lane = Lane(1, slice(0, count), len(target.executor.stages))
            lane.parameter_indices = [int(name.split()[1]) for name, _, _ in entries if name.startswith("parameter ")]
            target.plans[arena_number] = (arena, lane)
            return None
        if kind == "replica":
            replica, payload, lane_stages = args
            self.replicas[replica] = _Replica(payload, lane_stages)
            return None
        if kind == "forward":
            (replica, arena_number), step_rows = args
            return self.replicas[replica].forward(arena_number, step_rows)
        if kind == "backward":
            (replica, arena_number), requires_input_grad, flags = args
            return self.replicas[replica].backward(arena_number, requires_input_grad, flags)
        raise ValueError(f"unknown request {kind!r}")


def main(argv) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C; its exit ends this
    fd = int(argv[1])
    sock = socket.socket(fileno=fd)
    connection = Connection(os.dup(fd))
    server = _Server(sock)
    connection.send(("ok", None))
    while True:
        try:
            wait_for_message(connection)
            dropped, message = connection.recv()
        except (EOFError, OSError):
            return 0
        for key in dropped:  # a replica, or a (replica, arena number)
            if isinstance(key, tuple):
                server.replicas.get(key[0], SimpleNamespace(plans={})).plans.pop(key[1], None)
            else:
                server.replicas.pop(key, None)
        try:
            reply = ("ok", server.handle(message))
        except Exception:  # the parent raises it; this process serves on
            reply = ("error", traceback.format_exc(limit=-4))
        connection.send(reply)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
