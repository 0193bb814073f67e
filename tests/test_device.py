import numpy as np
import pytest

import gpuconv
from gpuconv.device import EmuArray, array_module, common_device, device_of, empty, resolve_device, to_device, to_numpy, zeros


def test_auto_without_gpu_picks_cpu_and_says_why(monkeypatch):
    monkeypatch.setattr("gpuconv.device.cuda_status", lambda: (False, "no CUDA device in this test"))
    device, reason = resolve_device("auto")
    assert device == "cpu"
    assert "no CUDA device in this test" in reason


def test_explicit_cuda_without_gpu_is_an_error(monkeypatch):
    monkeypatch.setattr("gpuconv.device.cuda_status", lambda: (False, "no CUDA device in this test"))
    with pytest.raises(RuntimeError, match="'cuda' was requested.*no CUDA device in this test"):
        resolve_device("cuda")


def test_environment_variable_chooses_the_device(monkeypatch):
    monkeypatch.setenv("GPUCONV_DEVICE", "emu")
    assert resolve_device(None)[0] == "emu"
    monkeypatch.setenv("GPUCONV_DEVICE", "tpu")
    with pytest.raises(ValueError, match="GPUCONV_DEVICE"):
        resolve_device(None)


def test_emu_arrays_keep_their_device_through_numpy_ops():
    x = to_device(np.arange(6, dtype=np.float32).reshape(2, 3), "emu")
    assert device_of(x) == "emu"
    for y in (x * 2, np.maximum(x, 1), x.reshape(3, 2), x.T.copy(), x.sum(axis=0), np.zeros_like(x)):
        assert isinstance(y, EmuArray), type(y)
    assert type(to_numpy(x)) is np.ndarray
    np.testing.assert_array_equal(to_numpy(x), np.arange(6).reshape(2, 3))


def test_allocation_and_array_module():
    assert isinstance(empty((2, 3), np.float32, "emu"), EmuArray)
    assert type(zeros((2,), np.float32, "cpu")) is np.ndarray
    assert array_module("emu") is np and array_module(np.ones(1)) is np


def test_mixed_devices_are_refused_by_name():
    a, b = np.ones(2, np.float32), to_device(np.ones(2, np.float32), "emu")
    assert common_device(a=a, bias=None) == "cpu"
    with pytest.raises(ValueError, match="a on cpu, b on emu"):
        common_device(a=a, b=b)


def test_import_never_needs_cupy():
    assert gpuconv.to_numpy is to_numpy
    with pytest.raises(TypeError, match="expected a NumPy or CuPy array"):
        device_of([1, 2])


def test_moving_between_cpu_and_emu_copies_like_torch_to():
    host = np.zeros(3, np.float32)
    on_emu = to_device(host, "emu")
    on_emu += 1
    assert host.sum() == 0, "writing on the emulated device must not change the host array"
    assert to_device(on_emu, "emu") is on_emu and to_device(host, "cpu") is host
    back = to_numpy(on_emu)
    back += 1
    np.testing.assert_array_equal(to_numpy(on_emu), [1, 1, 1])
