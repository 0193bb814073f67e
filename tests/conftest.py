"""One test body, several devices: the `device` fixture runs a test on the NumPy path ('cpu'),
on the emulated CUDA device with threads in forward and in reverse order ('emu'), and on a real
GPU ('cuda', marked `gpu`) where CuPy sees one. Tests compare every device with a float64
reference, so 'emu' and 'cuda' are held to the same answer as 'cpu'."""
from __future__ import annotations

import contextlib
import shutil

import numpy as np
import pytest

from gpuconv.device import cuda_status

HAVE_GPU = cuda_status()[0]
HAVE_CXX = shutil.which("g++") is not None

DEVICE_PARAMS = [
    pytest.param(("cpu", None), id="cpu"),
    pytest.param(("emu", "forward"), id="emu-forward",
                 marks=pytest.mark.skipif(not HAVE_CXX, reason="no host C++ compiler for the emulated device")),
    pytest.param(("emu", "reverse"), id="emu-reverse",
                 marks=pytest.mark.skipif(not HAVE_CXX, reason="no host C++ compiler for the emulated device")),
    pytest.param(("cuda", None), id="cuda",
                 marks=[pytest.mark.gpu, pytest.mark.skipif(not HAVE_GPU, reason="no CUDA GPU (CuPy)")]),
]


def _order_context(device, order):
    if device != "emu":
        return contextlib.nullcontext()
    from gpuconv import emu

    return emu.thread_order(order)


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true", help="also run the tests that take minutes on the CPU")


@pytest.fixture(params=DEVICE_PARAMS)
def device(request):
    """A device name; for 'emu' the threads of every block run in the order named in the id."""
    name, order = request.param
    with _order_context(name, order):
        yield name


@pytest.fixture(params=[p for p in DEVICE_PARAMS if p.values[0][0] != "cpu"])
def kernel_device(request):
    """Like `device`, without 'cpu': for tests of the kernel path alone."""
    name, order = request.param
    with _order_context(name, order):
        yield name


@pytest.fixture(autouse=True)
def _fresh_conv_plans():
    """Each test plans its convolutions anew: many replace the planner's choices (the tile, the
    K split), which a plan kept from another test would not see."""
    from gpuconv.functional import conv_plans
    conv_plans.clear()


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
