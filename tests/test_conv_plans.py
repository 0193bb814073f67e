"""Launch plans of the convolution ops (functional/conv_plans.py): a planned call is the first
call's result bit for bit, anything the plan depends on that changes gets a new plan, and bad
input gets the full checks' error after a plan exists."""
from __future__ import annotations

import numpy as np
import pytest

import gpuconv
import gpuconv.functional as F
from gpuconv.device import device_of, empty, to_device, to_numpy
from gpuconv.functional import conv, conv_gemm, conv_plans

# LeNet's conv2 block, smaller: a 2x2/2 pool after a 5x5 convolution of a 10x11 input (odd W).
X, W = (2, 3, 10, 11), (4, 3, 5, 5)
POOL = dict(pool_kernel_size=2, pool_stride=2)


@pytest.fixture
def arrays(kernel_device):
    rng = np.random.default_rng(3)
    x, w = rng.standard_normal(X, dtype=np.float32), rng.standard_normal(W, dtype=np.float32)
    b = rng.standard_normal(W[0], dtype=np.float32)
    go = rng.standard_normal((2, 4, 6, 7), dtype=np.float32)  # conv output, padding 0
    return tuple(to_device(a, kernel_device) for a in (x, w, b, go))


def _calls(x, w, b, go):
    """The three planned ops, each as one call (backward-filter also into given outputs, as into
    a layer's gradient buffer): results as NumPy arrays."""
    out, indices = F.conv2d_relu_max_pool2d(x, w, b, **POOL)
    grad_weight, grad_bias = F.conv2d_weight(x, W, go, bias_grad=True)
    into = _empty_like(w), _empty_like(b)
    F.conv2d_weight(x, W, go, out=into[0], bias_grad=True, bias_out=into[1])
    grad_input = F.conv2d_input(X, w, go)
    return [to_numpy(a) for a in (out, indices, grad_weight, grad_bias, *into, grad_input)]


def _empty_like(a):
    return empty(a.shape, a.dtype, device_of(a))


def _sizes():
    return [len(c) for c in (conv_plans.FORWARD_RELU_MAX_POOL, conv_plans.BACKWARD_FILTER, conv_plans.BACKWARD_DATA)]


def test_planned_calls_equal_first_calls_without_re_deriving(arrays, monkeypatch):
    with gpuconv.profile() as first_prof:
        first = _calls(*arrays)
    assert _sizes() == [1, 2, 1]
    # A planned call re-derives nothing: no checks, no geometry, no kernel choice.
    for module, name in ((conv, "check_conv2d"), (conv, "_geometry"), (conv_gemm, "plan_forward"),
                         (conv_gemm, "plan_backward_filter"), (conv_gemm, "plan_backward_data")):
        monkeypatch.setattr(module, name, lambda *a, **k: pytest.fail("a planned call re-derived its plan"))
    import gpuconv.functional.conv_fused as conv_fused
    monkeypatch.setattr(conv_fused, "check_conv2d", lambda *a, **k: pytest.fail("a planned call re-checked"))
    with gpuconv.profile() as planned_prof:
        planned = _calls(*arrays)
    assert planned_prof.counts() == first_prof.counts()
    for got, expected in zip(planned, first):
        np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(first[4], first[2])
    np.testing.assert_array_equal(first[5], first[3])


def _fresh(call):
    conv_plans.clear()
    return call()


@pytest.mark.parametrize("change", ["stride", "padding", "dilation", "no bias", "batch", "version", "precision",
                                    "strided input"])
def test_a_changed_argument_gets_its_own_plan(change, monkeypatch):
    rng = np.random.default_rng(4)
    x, w, b = (to_device(rng.standard_normal(s, dtype=np.float32), "emu") for s in (X, W, (W[0],)))
    args = dict(stride=1, padding=0, dilation=1, precision=None)
    F.conv2d_relu_max_pool2d(x, w, b, **args, **POOL)  # the plan a stale lookup would serve
    if change in ("stride", "padding", "dilation"):
        args[change] = 2 if change != "padding" else 1
    elif change == "no bias":
        b = None
    elif change == "batch":
        x = x[:1].copy()
    elif change == "version":
        monkeypatch.setenv("GPUCONV_KERNEL_CONV2D_FORWARD", "1")
    elif change == "precision":
        args["precision"] = "tf32"
    else:
        x = to_device(np.asfortranarray(to_numpy(x)), "emu")

    def call():
        with gpuconv.profile() as prof:
            out, indices = F.conv2d_relu_max_pool2d(x, w, b, **args, **POOL)
        return to_numpy(out), to_numpy(indices), prof.counts()

    got = call()
    expected = _fresh(call)
    for a, e in zip(got[:2], expected[:2]):
        np.testing.assert_array_equal(a, e)
    assert got[2] == expected[2]
    fused = any(k.startswith("conv2d_relu_max_pool2x2_v2") for k in got[2])
    assert fused == (change not in ("version", "precision")), got[2]


def test_bad_input_gets_the_full_error_after_a_plan_exists(arrays):
    x, w, b, go = arrays
    _calls(x, w, b, go)
    with pytest.raises(ValueError, match=r"bias must have shape \(4,\)"):
        F.conv2d_relu_max_pool2d(x, w, b[:3].copy(), **POOL)
    with pytest.raises(TypeError, match="stride"):  # equals 1 as a key
        F.conv2d_relu_max_pool2d(x, w, b, stride=True, **POOL)
    with pytest.raises(ValueError, match="precision"):
        F.conv2d_relu_max_pool2d(x, w, b, precision="fp7", **POOL)
    with pytest.raises(ValueError, match=r"grad_output has shape \(2, 4, 6, 6\)"):
        F.conv2d_input(X, w, go[..., :6].copy())
    with pytest.raises(ValueError, match=r"weight \(4, 2, 5, 5\)"):
        F.conv2d_weight(x, (4, 2, 5, 5), go, bias_grad=True)
    with pytest.raises(ValueError, match="out must be a C-contiguous float32 array of shape"):
        F.conv2d_weight(x, W, go, out=_empty_like(w)[:2], bias_grad=True)
    with pytest.raises(ValueError, match="bias_out is given but bias_grad is False"):
        F.conv2d_weight(x, W, go, bias_out=_empty_like(b))
    with pytest.raises(ValueError, match="cpu"):
        F.conv2d_input(X, to_numpy(w), go)
