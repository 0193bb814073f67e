"""Convolution: forward (bias, fused ReLU), the three gradients, on every device.

Every device runs float32 and is held to a float64 reference written as plain loops over the
definition. Tolerances: float32 against float64 with rtol 1e-4 and atol 1e-5 * sqrt(K), K the
length of the dot product behind each output element (C_in*KH*KW for the forward pass,
C_out*KH*KW for the input gradient, N*H_out*W_out for the weight and bias gradients): rounding
errors of a K-term float32 sum of unit-variance products grow as sqrt(K).
"""
import functools

import numpy as np
import pytest

from gpuconv import functional as F
from gpuconv.device import EmuArray, to_device, to_numpy
from gpuconv.functional import conv as conv_module
from gpuconv.functional import conv_gemm
from gradcheck import numerical_gradient

# (N, C_in, H, W, C_out, KH, KW, stride, padding, dilation): chosen so that together they cover
# odd and rectangular sizes, strides 1 to 4 and above the kernel size, padding, PyTorch's
# asymmetric 'same', dilation, batch 1, 1x1 kernels, C_in and C_out of 1, 3, 6, 16 and 96, and
# sizes that divide none of the kernel tiles (v1 64x64x16, v2 128/64/32 x 128/64 x 8), including
# more than one tile along M (C_out 67, 96), N (N*H_out*W_out 99) and K (K 45, 180, 864).
CASES = [
    (2, 3, 7, 9, 5, 3, 2, (2, 1), 1, 1),
    (1, 4, 10, 8, 6, 1, 1, 3, 0, 1),
    (2, 2, 9, 9, 4, 3, 3, 1, "same", 2),
    (2, 2, 8, 7, 3, 4, 2, 1, "same", 1),
    (2, 3, 6, 6, 2, 2, 2, 4, 2, 1),
    (1, 5, 9, 11, 67, 3, 3, 1, 1, 1),
    (1, 20, 5, 5, 3, 3, 3, 2, (1, 2), (1, 2)),
    (3, 2, 4, 5, 3, 4, 5, 1, "valid", 1),
    # For the v2 kernels and their per-shape plans: LeNet's skinny 1->6 at batch 1 and 6->16 with
    # an asymmetric 'same'; AlexNet conv1's 11x11 stride 4 into 96 channels; 96 channels into 3
    # with stride 3 and dilation 2; one output channel; stride 4 over a 2x2 kernel (phases of the
    # input gradient that no tap reaches); 17x16 = 272 taps, past the v2 tap table (version 1 runs).
    (1, 1, 9, 8, 6, 5, 5, 1, 2, 1),
    (2, 6, 7, 9, 16, 4, 2, 1, "same", 1),
    (2, 3, 15, 13, 96, 11, 11, 4, 2, 1),
    (1, 96, 5, 6, 3, 3, 3, 3, 1, 2),
    (2, 16, 7, 7, 1, 2, 4, 2, (1, 0), (2, 1)),
    (1, 2, 9, 9, 3, 2, 2, 4, 0, 1),
    (1, 3, 20, 19, 5, 17, 16, 1, 1, 1),
]
CASE_IDS = [f"case{i}" for i in range(len(CASES))]


def _reference_padding(size, kernel, stride, padding, dilation):
    """(before, output size) along one axis, from PyTorch's documented rules."""
    if padding == "same":
        total = dilation * (kernel - 1)
        return total // 2, size
    before = 0 if padding == "valid" else padding
    return before, (size + 2 * before - dilation * (kernel - 1) - 1) // stride + 1


def _per_axis(value):
    return (value, value) if isinstance(value, (int, str)) else value


def _reference(x, w, b, grad_output_seed, stride, padding, dilation):
    """Forward output and the three gradients of sum(output * grad_output), by direct loops in float64."""
    n_batch, c_in, height, width = x.shape
    c_out, _, kernel_h, kernel_w = w.shape
    (s_h, s_w), (p_h, p_w), (d_h, d_w) = _per_axis(stride), _per_axis(padding), _per_axis(dilation)
    top, out_h = _reference_padding(height, kernel_h, s_h, p_h, d_h)
    left, out_w = _reference_padding(width, kernel_w, s_w, p_w, d_w)
    grad_output = np.random.default_rng(grad_output_seed).standard_normal((n_batch, c_out, out_h, out_w))
    y = np.zeros((n_batch, c_out, out_h, out_w))
    dx, dw = np.zeros_like(x), np.zeros_like(w)
    for n in range(n_batch):
        for co in range(c_out):
            for oh in range(out_h):
                for ow in range(out_w):
                    g = grad_output[n, co, oh, ow]
                    total = b[co]
                    for ci in range(c_in):
                        for i in range(kernel_h):
                            ih = oh * s_h - top + i * d_h
                            if not 0 <= ih < height:
                                continue
                            for j in range(kernel_w):
                                iw = ow * s_w - left + j * d_w
                                if 0 <= iw < width:
                                    total += x[n, ci, ih, iw] * w[co, ci, i, j]
                                    dx[n, ci, ih, iw] += w[co, ci, i, j] * g
                                    dw[co, ci, i, j] += x[n, ci, ih, iw] * g
                    y[n, co, oh, ow] = total
    return y, grad_output, dx, dw, grad_output.sum(axis=(0, 2, 3))


@functools.cache
def _problem(index):
    """Inputs of CASES[index] in float64 and their reference results, computed once for all devices."""
    n, c_in, h, w, c_out, kh, kw, stride, padding, dilation = CASES[index]
    rng = np.random.default_rng(index)
    x = rng.standard_normal((n, c_in, h, w))
    weight = rng.standard_normal((c_out, c_in, kh, kw))
    bias = rng.standard_normal(c_out)
    y, grad_output, dx, dw, db = _reference(x, weight, bias, 100 + index, stride, padding, dilation)
    conv_args = dict(stride=stride, padding=padding, dilation=dilation)
    return x, weight, bias, grad_output, conv_args, (y, dx, dw, db)


def _on(device, *arrays):
    return [to_device(a.astype(np.float32), device) for a in arrays]


def _assert_close(actual, expected, depth, device):
    actual = to_numpy(actual)
    assert actual.shape == expected.shape
    assert actual.dtype == np.float32, f"result on {device} is {actual.dtype}"
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-5 * np.sqrt(depth))


@pytest.mark.parametrize("index", range(len(CASES)), ids=CASE_IDS)
def test_conv2d_matches_loop_reference(device, index):
    x, weight, bias, _, args, (y, _, _, _) = _problem(index)
    xd, wd, bd = _on(device, x, weight, bias)
    depth = weight[0].size
    _assert_close(F.conv2d(xd, wd, bd, **args), y, depth, device)
    # Without bias, with the fused ReLU: both flags of the kernel's epilogue.
    expected_relu = np.maximum(y - bias.reshape(1, -1, 1, 1), 0)
    _assert_close(F.conv2d(xd, wd, **args, activation="relu"), expected_relu, depth, device)


@pytest.mark.parametrize("index", range(len(CASES)), ids=CASE_IDS)
def test_conv2d_input_matches_loop_reference(device, index):
    x, weight, _, grad_output, args, (_, dx, _, _) = _problem(index)
    wd, god = _on(device, weight, grad_output)
    depth = weight.shape[0] * weight.shape[2] * weight.shape[3]
    _assert_close(F.conv2d_input(x.shape, wd, god, **args), dx, depth, device)


@pytest.mark.parametrize("index", range(len(CASES)), ids=CASE_IDS)
def test_conv2d_weight_and_bias_match_loop_reference(device, index):
    x, weight, _, grad_output, args, (_, _, dw, db) = _problem(index)
    xd, god = _on(device, x, grad_output)
    depth = grad_output[:, 0].size
    _assert_close(F.conv2d_weight(xd, weight.shape, god, **args), dw, depth, device)
    _assert_close(F.conv2d_bias(god), db, depth, device)


def test_conv2d_bias_over_planes_wider_than_a_block(device, rng):
    # 3 x 19 x 17 = 969 pixels per channel: every thread of the 256-thread reduction sums several.
    grad_output = rng.standard_normal((3, 2, 19, 17))
    expected = np.array([sum(grad_output[n, c, h, w] for n in range(3) for h in range(19) for w in range(17))
                         for c in range(2)])
    _assert_close(F.conv2d_bias(*_on(device, grad_output)), expected, grad_output[:, 0].size, device)


def test_fused_relu_propagates_nan(device):
    # As F.relu and PyTorch: a NaN output stays NaN through the fused ReLU (fmaxf would give 0).
    x = np.ones((1, 1, 3, 3), np.float32)
    x[0, 0, 1, 1] = np.nan
    weight = np.ones((2, 1, 1, 1), np.float32)
    weight[1] = -1.0
    y = to_numpy(F.conv2d(to_device(x, device), to_device(weight, device), activation="relu"))
    expected = np.where(np.isnan(x), np.nan, np.concatenate([x, np.zeros_like(x)], axis=1))
    np.testing.assert_array_equal(y, expected)


def test_kernel_devices_accept_non_contiguous_arrays(kernel_device):
    x, weight, bias, _, args, (y, _, _, _) = _problem(0)
    xd, wd, bd = _on(kernel_device, np.ascontiguousarray(x.transpose(0, 1, 3, 2)), weight, bias)
    _assert_close(F.conv2d(xd.transpose(0, 1, 3, 2), wd, bd, **args), y, weight[0].size, kernel_device)


def test_weight_gradient_split_k_with_several_tiles_per_split(kernel_device, monkeypatch):
    # Case 0 has K = 2*4*10 = 80, five K tiles; two splits of 48 and 32 cover several tiles each
    # and end on a partial tile (tiny problems otherwise get one tile per split).
    monkeypatch.setattr(conv_module, "_TARGET_BLOCKS", 2)
    x, weight, _, grad_output, args, (_, _, dw, _) = _problem(0)
    xd, god = _on(kernel_device, x, grad_output)
    _assert_close(F.conv2d_weight(xd, weight.shape, god, **args), dw, grad_output[:, 0].size, kernel_device)


def test_kernels_refuse_sizes_past_their_int_indices(monkeypatch):
    # 50000 x 50000 pixels, broadcast from one float: the check must come before any copy.
    monkeypatch.delenv("GPUCONV_KERNEL_CONV2D_FORWARD", raising=False)
    huge = np.broadcast_to(np.zeros(1, np.float32), (1, 1, 50000, 50000))
    with pytest.raises(ValueError, match=r"input \(1, 1, 50000, 50000\) .* too large for the conv2d kernels"):
        F.conv2d(huge.view(EmuArray), to_device(np.ones((1, 1, 1, 1), np.float32), "emu"))


def test_kernel_limits_keep_a_tile_of_headroom_below_2_31():
    # batch*H*W = 2^31 - 2 fits an int, but the last tile's unmasked indices (n0 + 63) would not.
    geometry = conv_module._geometry((1, 1, 1386, 1549411), (1, 1, 1, 1), 1, 0, 1)
    assert geometry.batch * geometry.height * geometry.width == 2**31 - 2
    with pytest.raises(ValueError, match="too large for the conv2d kernels"):
        conv_module._check_kernel_limits(geometry)
    conv_module._check_kernel_limits(conv_module._geometry((1, 1, 1024, 2**21 - 1), (1, 1, 1, 1), 1, 0, 1))


@pytest.mark.parametrize("op", ["forward", "input", "weight"])
def test_kernels_refuse_channels_past_grid_y(op, monkeypatch):
    # 65536 tiles of 64 channels: gridDim.y past CUDA's 65535, a launch that fails only on a GPU.
    # Broadcast arrays: the check must come before any copy.
    for name in ("CONV2D_FORWARD", "CONV2D_BACKWARD_DATA", "CONV2D_BACKWARD_FILTER"):
        monkeypatch.delenv(f"GPUCONV_KERNEL_{name}", raising=False)
    channels = 65536 * 64
    on_emu = lambda shape: np.broadcast_to(np.zeros(1, np.float32), shape).view(EmuArray)  # noqa: E731
    with pytest.raises(ValueError, match=r"too many channels for the conv2d kernels: C_in and C_out must each be at most 4194240"):
        if op == "forward":
            F.conv2d(on_emu((1, 1, 1, 1)), on_emu((channels, 1, 1, 1)))
        elif op == "input":
            F.conv2d_input((1, channels, 1, 1), on_emu((1, channels, 1, 1)), on_emu((1, 1, 1, 1)))
        else:
            F.conv2d_weight(on_emu((1, 1, 1, 1)), (channels, 1, 1, 1), on_emu((1, channels, 1, 1)))


@pytest.mark.parametrize("index", [0, 3, 6], ids=[CASE_IDS[i] for i in (0, 3, 6)])
def test_baseline_version_on_kernel_devices(kernel_device, index, monkeypatch):
    for op in ("CONV2D_FORWARD", "CONV2D_BACKWARD_DATA", "CONV2D_BACKWARD_FILTER", "CONV2D_BIAS_GRAD"):
        monkeypatch.setenv(f"GPUCONV_KERNEL_{op}", "0")
    x, weight, bias, grad_output, args, (y, dx, dw, db) = _problem(index)
    xd, wd, bd, god = _on(kernel_device, x, weight, bias, grad_output)
    results = [F.conv2d(xd, wd, bd, **args), F.conv2d_input(x.shape, wd, god, **args),
               F.conv2d_weight(xd, weight.shape, god, **args), F.conv2d_bias(god)]
    for result, expected in zip(results, (y, dx, dw, db)):
        assert type(result) is type(xd), "the baseline must return arrays on the device of its inputs"
        np.testing.assert_allclose(to_numpy(result), expected, rtol=1e-4, atol=1e-3)


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize("index", range(len(CASES)), ids=CASE_IDS)
def test_cpu_float64_matches_torch(index):
    torch = pytest.importorskip("torch")
    x, weight, bias, grad_output, args, _ = _problem(index)
    tx, tw, tb = (torch.tensor(a, requires_grad=True) for a in (x, weight, bias))
    expected = torch.nn.functional.conv2d(tx, tw, tb, **args)
    # Autograd rather than torch.nn.grad.conv2d_input/_weight: those take numeric padding only.
    expected.backward(torch.from_numpy(grad_output))
    y = F.conv2d(x, weight, bias, **args)
    assert y.dtype == np.float64
    for ours, theirs in [(y, expected), (F.conv2d_input(x.shape, weight, grad_output, **args), tx.grad),
                         (F.conv2d_weight(x, weight.shape, grad_output, **args), tw.grad),
                         (F.conv2d_bias(grad_output), tb.grad)]:
        np.testing.assert_allclose(ours, theirs.detach().numpy(), rtol=1e-12, atol=1e-12)


def test_gradient_functions_match_torch_nn_grad():
    torch = pytest.importorskip("torch")
    x, weight, _, grad_output, args, _ = _problem(0)
    tx, tw, tg = (torch.from_numpy(a) for a in (x, weight, grad_output))
    expected_input = torch.nn.grad.conv2d_input(x.shape, tw, tg, **args).numpy()
    expected_weight = torch.nn.grad.conv2d_weight(tx, weight.shape, tg, **args).numpy()
    np.testing.assert_allclose(F.conv2d_input(x.shape, weight, grad_output, **args), expected_input, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(F.conv2d_weight(x, weight.shape, grad_output, **args), expected_weight,
                               rtol=1e-12, atol=1e-12)


def test_gradients_match_finite_differences(rng):
    x = rng.standard_normal((2, 2, 5, 4))
    weight = rng.standard_normal((3, 2, 3, 2))
    args = dict(stride=(2, 1), padding="valid", dilation=(1, 2))
    grad_output = rng.standard_normal(F.conv2d(x, weight, **args).shape)

    def loss(x_, w_):
        return float((F.conv2d(x_, w_, **args) * grad_output).sum())

    np.testing.assert_allclose(F.conv2d_input(x.shape, weight, grad_output, **args),
                               numerical_gradient(x, lambda: loss(x, weight)), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(F.conv2d_weight(x, weight.shape, grad_output, **args),
                               numerical_gradient(weight, lambda: loss(x, weight)), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("index", [0, 4], ids=[CASE_IDS[0], CASE_IDS[4]])
def test_chunked_batch_gives_the_same_answer(index, monkeypatch):
    x, weight, bias, grad_output, args, _ = _problem(index)
    whole = (F.conv2d(x, weight, bias, **args), F.conv2d_input(x.shape, weight, grad_output, **args),
             F.conv2d_weight(x, weight.shape, grad_output, **args))
    monkeypatch.setattr(conv_module, "IM2COL_BUDGET_BYTES", 1)  # one image per chunk
    chunks = conv_module._batch_chunks(conv_module._geometry(x.shape, weight.shape, **args), x.itemsize)
    assert len(chunks) == x.shape[0]
    chunked = (F.conv2d(x, weight, bias, **args), F.conv2d_input(x.shape, weight, grad_output, **args),
               F.conv2d_weight(x, weight.shape, grad_output, **args))
    for a, b in zip(whole, chunked):
        np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-13)


def test_im2col_chunks_respect_the_budget():
    # AlexNet conv1 at batch 128: 363 x 3025 floats per image, 562 MB for the batch at once.
    g = conv_module._geometry((128, 3, 227, 227), (96, 3, 11, 11), 4, 0, 1)
    chunks = conv_module._batch_chunks(g, 4)
    assert len(chunks) > 1 and sum(c.stop - c.start for c in chunks) == 128
    largest = max(c.stop - c.start for c in chunks)
    assert largest * g.patch_size * g.out_h * g.out_w * 4 <= conv_module.IM2COL_BUDGET_BYTES


@pytest.mark.parametrize("input_size, kernel, stride, padding, dilation, expected", [
    ((28, 28), 5, 1, 2, 1, (28, 28)),
    ((227, 227), 11, 4, 0, 1, (55, 55)),
    ((8, 7), (4, 2), 1, "same", 1, (8, 7)),
    ((9, 9), 3, 1, "same", 3, (9, 9)),
    ((7, 9), (3, 2), (2, 1), 1, 1, (4, 10)),
    ((5, 5), 3, 2, (1, 0), (1, 2), (3, 1)),
])
def test_conv2d_output_size(input_size, kernel, stride, padding, dilation, expected):
    assert F.conv2d_output_size(input_size, kernel, stride, padding, dilation) == expected


def _bad_calls():
    x = np.zeros((2, 3, 8, 8), np.float32)
    w = np.zeros((4, 3, 3, 3), np.float32)
    go = np.zeros((2, 4, 6, 6), np.float32)
    return [
        (lambda: F.conv2d(x[0], w), ValueError, r"input must be 4-D \(NCHW\), got shape \(3, 8, 8\)"),
        (lambda: F.conv2d(x, w[0]), ValueError, r"weight must be 4-D \(OIHW\), got shape \(3, 3, 3\)"),
        (lambda: F.conv2d(x, np.zeros((4, 2, 3, 3), np.float32)), ValueError,
         r"weight \(4, 2, 3, 3\) .* expects 2 input channels, but input \(2, 3, 8, 8\) .* has 3"),
        (lambda: F.conv2d(x, np.zeros((4, 3, 9, 3), np.float32)), ValueError,
         r"kernel extent \(9, 3\) .* larger than the padded input \(8, 8\)"),
        (lambda: F.conv2d(x, w, dilation=4), ValueError, r"kernel extent \(9, 9\)"),
        (lambda: F.conv2d(x, w, stride=0), ValueError, "stride must be positive"),
        (lambda: F.conv2d(x, w, dilation=(1, 0)), ValueError, "dilation must be positive"),
        (lambda: F.conv2d(x, w, padding=-1), ValueError, "padding must be at least 0"),
        (lambda: F.conv2d(x, w, padding="full"), ValueError, "padding must be an int, a pair, 'same' or 'valid'"),
        (lambda: F.conv2d(x, w, stride=2, padding="same"), ValueError, "padding='same' needs stride 1"),
        (lambda: F.conv2d(x, w, stride=1.5), TypeError, "stride must be an int or a pair of ints"),
        (lambda: F.conv2d(x.astype(np.int32), w), TypeError, "input must be float32 or float64 on cpu, got int32"),
        (lambda: F.conv2d(x.astype(np.float64), w), TypeError, r"one dtype, got input float64 .*weight float32"),
        (lambda: F.conv2d(x.tolist(), w), TypeError, "input must be an array, got list"),
        (lambda: F.conv2d(x, w, np.zeros(5, np.float32)), ValueError, r"bias must have shape \(4,\) .* got \(5,\)"),
        (lambda: F.conv2d(x, w, np.zeros((4, 1), np.float32)), ValueError, r"bias must be 1-D, got shape \(4, 1\)"),
        (lambda: F.conv2d(x, w, activation="gelu"), ValueError, "activation must be None or 'relu'"),
        (lambda: F.conv2d(to_device(x, "emu"), w), ValueError, "one device, got input on emu, weight on cpu"),
        (lambda: F.conv2d(to_device(x.astype(np.float64), "emu"), w), TypeError, "input must be float32 on emu"),
        (lambda: F.conv2d_input((2, 3, 8, 8), w, go[:, :3]), ValueError,
         r"grad_output has shape \(2, 3, 6, 6\), .* output of shape \(2, 4, 6, 6\)"),
        (lambda: F.conv2d_input((2, 3, 8), w, go), TypeError, "input_shape must be a tuple of 4 ints"),
        (lambda: F.conv2d_weight(x, (4, 3, 3, 3), go, stride=2), ValueError, r"output of shape \(2, 4, 3, 3\)"),
        (lambda: F.conv2d_weight(x, (4, 3, 3, 3), go[0]), ValueError, "grad_output must be 4-D"),
        (lambda: F.conv2d_weight(x, (4, 3, 3, 3), go.astype(np.float64)), TypeError, "one dtype"),
        (lambda: F.conv2d_bias(go[0]), ValueError, "grad_output must be 4-D"),
        (lambda: F.conv2d_output_size((8, 8), 9), ValueError, "kernel extent"),
    ]


@pytest.mark.parametrize("call, error, message", _bad_calls())
def test_bad_arguments_are_refused_with_the_shapes_involved(call, error, message):
    with pytest.raises(error, match=message):
        call()


# ------------------------------------------------------------------------------------------
# Version 2: every tile, the stride phases of backward-data, the deterministic split-K of
# backward-filter, and the per-shape plans.

V2_CASES = [0, 5, 10, 13]  # small, C_out 67 (several M tiles), 96 channels at stride 4, empty phases
LATTICE_TILES = sorted(conv_gemm.TILES)


def _force_tile(monkeypatch, tile):
    monkeypatch.setattr(conv_gemm, "choose_tile", lambda rows, columns: (tile, "forced"))
    monkeypatch.setattr(conv_gemm, "FILTER_TILES", (tile,))


@pytest.mark.parametrize("tile", LATTICE_TILES, ids=lambda t: f"{t[0]}x{t[1]}")
@pytest.mark.parametrize("index", V2_CASES, ids=[CASE_IDS[i] for i in V2_CASES])
def test_v2_lattice_kernel_on_every_tile(kernel_device, index, tile, monkeypatch):
    # conv2d_gemm_v2 serves the forward pass and each stride phase of backward-data.
    _force_tile(monkeypatch, tile)
    x, weight, bias, grad_output, args, (y, dx, _, _) = _problem(index)
    xd, wd, bd, god = _on(kernel_device, x, weight, bias, grad_output)
    g = conv_module._geometry(x.shape, weight.shape, **args)
    assert conv_gemm.plan_forward(g).tile == tile and conv_gemm.plan_backward_data(g).tile == tile
    _assert_close(F.conv2d(xd, wd, bd, **args), y, weight[0].size, kernel_device)
    _assert_close(F.conv2d(xd, wd, **args, activation="relu"), np.maximum(y - bias.reshape(1, -1, 1, 1), 0),
                  weight[0].size, kernel_device)
    _assert_close(F.conv2d_input(x.shape, wd, god, **args), dx, weight.shape[0] * weight[0, 0].size, kernel_device)


NARROW_CASES = [0, 4, 8, 10, 11, 12, 13]  # C_in or C_out of 1 to 3


@pytest.mark.parametrize("index", NARROW_CASES, ids=[CASE_IDS[i] for i in NARROW_CASES])
def test_v2_narrow_kernel_for_at_most_four_rows(kernel_device, index):
    # Planned by default: forward where C_out <= 4, backward-data where C_in <= 4.
    x, weight, bias, grad_output, args, (y, dx, _, _) = _problem(index)
    g = conv_module._geometry(x.shape, weight.shape, **args)
    xd, wd, bd, god = _on(kernel_device, x, weight, bias, grad_output)
    checked = 0
    if g.c_out <= 4:
        assert conv_gemm.plan_forward(g).kernel == "conv2d_gemm_narrow_v2"
        _assert_close(F.conv2d(xd, wd, bd, **args, activation="relu"), np.maximum(y, 0), weight[0].size, kernel_device)
        checked += 1
    if g.c_in <= 4:
        assert conv_gemm.plan_backward_data(g).kernel == "conv2d_gemm_narrow_v2"
        _assert_close(F.conv2d_input(x.shape, wd, god, **args), dx, weight.shape[0] * weight[0, 0].size, kernel_device)
        checked += 1
    assert checked


# Backward-filter adds C_in 96 and 16 (the _c4 kernels, columns in runs of 4 channels of a tap;
# 16 at batch 2 with 'same'-style padding (1, 0) and dilation) to the lattice cases.
FILTER_CASES = V2_CASES + [11, 12]


@pytest.mark.parametrize("tile", conv_gemm.FILTER_TILES, ids=lambda t: f"{t[0]}x{t[1]}")
@pytest.mark.parametrize("index", FILTER_CASES, ids=[CASE_IDS[i] for i in FILTER_CASES])
def test_v2_weight_gradient_on_every_tile(kernel_device, index, tile, monkeypatch):
    _force_tile(monkeypatch, tile)
    x, weight, _, grad_output, args, (_, _, dw, db) = _problem(index)
    xd, god = _on(kernel_device, x, grad_output)
    g = conv_module._geometry(x.shape, weight.shape, **args)
    plan = conv_gemm.plan_backward_filter(g)
    assert plan.tile == tile
    assert conv_gemm.filter_kernel(plan, g).endswith("_c4") == (x.shape[1] % 4 == 0)
    _assert_close(F.conv2d_weight(xd, weight.shape, god, **args), dw, grad_output[:, 0].size, kernel_device)
    grad_weight, grad_bias = F.conv2d_weight(xd, weight.shape, god, **args, bias_grad=True)
    _assert_close(grad_weight, dw, grad_output[:, 0].size, kernel_device)
    _assert_close(grad_bias, db, grad_output[:, 0].size, kernel_device)


@pytest.mark.parametrize("splits", [1, 4])
@pytest.mark.parametrize("index", [1, 5, 8, 11, 13], ids=[CASE_IDS[i] for i in (1, 5, 8, 11, 13)])
def test_v2_bias_gradient_from_the_weight_gradient_launch(index, splits, monkeypatch):
    # Batch 1 (cases 1, 5, 8, 11: C_out 6, 67, 6, 3), a 2x2 output plane smaller than a K tile
    # (13); split-K off and on (cases 11 and 13 have one K tile: never split). Against the float64 reference and the separate bias kernel, and the
    # launches: one backward-filter kernel (and its reduce when split), no bias kernel.
    from gpuconv import profile

    monkeypatch.setattr(conv_gemm, "_filter_splits", lambda tile, g: splits)
    x, weight, _, grad_output, args, (_, _, dw, db) = _problem(index)
    xd, god = _on("emu", x, grad_output)
    bias_out = to_device(np.full(weight.shape[0], np.nan, np.float32), "emu")
    with profile() as prof:
        grad_weight, grad_bias = F.conv2d_weight(xd, weight.shape, god, **args, bias_grad=True, bias_out=bias_out)
    assert grad_bias is bias_out
    launched = prof.counts()
    assert not any(name.startswith("conv2d_bias_grad") for name in launched)
    plan = conv_gemm.plan_backward_filter(conv_module._geometry(x.shape, weight.shape, **args))
    assert "conv2d_split_k_reduce_v2" not in launched  # version 3: the last block of a tile adds the splits
    assert (plan.splits > 1) == (splits > 1 and index in (1, 5, 8))
    _assert_close(grad_weight, dw, grad_output[:, 0].size, "emu")
    _assert_close(grad_bias, db, grad_output[:, 0].size, "emu")
    np.testing.assert_allclose(to_numpy(grad_bias), to_numpy(F.conv2d_bias(god)), rtol=1e-5, atol=1e-5)


def test_conv2d_backward_launches_no_bias_kernel_with_the_v2_weight_gradient(rng):
    from gpuconv import nn, profile

    layer = nn.Conv2d(3, 5, 3, padding=1)
    layer.to("emu")
    x = to_device(rng.standard_normal((2, 3, 6, 7)).astype(np.float32), "emu")
    grad_output = to_device(rng.standard_normal((2, 5, 6, 7)).astype(np.float32), "emu")
    layer(x)
    with profile() as prof:
        layer.backward(grad_output)
    assert not any(name.startswith("conv2d_bias_grad") for name in prof.counts())
    _assert_close(layer.bias.grad, to_numpy(grad_output).astype(np.float64).sum(axis=(0, 2, 3)), 2 * 6 * 7, "emu")
    layer.weight.requires_grad = False  # the bias alone: its own kernel
    layer.weight.grad = layer.bias.grad = None
    layer(x)
    with profile() as prof:
        layer.backward(grad_output)
    assert prof.counts().get("conv2d_bias_grad_v1") == 1 and layer.weight.grad is None


def test_bias_grad_arguments_are_checked():
    x, go = np.zeros((1, 2, 4, 4), np.float32), np.zeros((1, 3, 4, 4), np.float32)
    with pytest.raises(ValueError, match=r"bias_out must be a C-contiguous float32 array of shape \(3,\)"):
        F.conv2d_weight(x, (3, 2, 1, 1), go, bias_grad=True, bias_out=np.zeros(4, np.float32))
    with pytest.raises(ValueError, match="bias_out is given but bias_grad is False"):
        F.conv2d_weight(x, (3, 2, 1, 1), go, bias_out=np.zeros(3, np.float32))
    empty_grad = F.conv2d_weight(x[:0], (3, 2, 1, 1), go[:0], bias_grad=True)
    assert [to_numpy(a).tolist() for a in empty_grad][1] == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("splits", [1, 3, 10])
def test_v2_weight_gradient_split_k(splits, monkeypatch):
    # Case 0 has K = 80, ten K tiles: one split (the kernel writes the result, no reduce), three
    # of 4, 4 and 2 tiles (the last one short), and one tile per split.
    monkeypatch.setattr(conv_gemm, "_filter_splits", lambda tile, g: splits)
    x, weight, _, grad_output, args, (_, _, dw, _) = _problem(0)
    assert conv_gemm.plan_backward_filter(conv_module._geometry(x.shape, weight.shape, **args)).splits == splits
    xd, god = _on("emu", x, grad_output)
    _assert_close(F.conv2d_weight(xd, weight.shape, god, **args), dw, grad_output[:, 0].size, "emu")


def test_v2_weight_gradient_is_bit_identical_across_runs_and_thread_orders():
    # Partial sums land in a workspace and are added in split order: no float atomics, so the
    # bits cannot depend on which block or thread finishes first.
    from gpuconv import emu

    x, weight, _, grad_output, args, _ = _problem(10)
    xd, god = _on("emu", x, grad_output)
    g = conv_module._geometry(x.shape, weight.shape, **args)
    assert conv_gemm.plan_backward_filter(g).splits > 1
    results = []
    for order in ("forward", "reverse", "forward"):
        with emu.thread_order(order):
            results.append(to_numpy(F.conv2d_weight(xd, weight.shape, god, **args)))
    for other in results[1:]:
        np.testing.assert_array_equal(results[0].view(np.uint32), other.view(np.uint32))


@pytest.mark.parametrize("index", [0, 4, 6, 10, 11, 12, 13], ids=[CASE_IDS[i] for i in (0, 4, 6, 10, 11, 12, 13)])
def test_v2_split_backward_data_matches_the_plain_kernel(index, monkeypatch):
    # Strided cases: the stride phases of v2 against v1, which multiplies every tap, zeros included.
    x, weight, _, grad_output, args, _ = _problem(index)
    wd, god = _on("emu", weight, grad_output)
    monkeypatch.setenv("GPUCONV_KERNEL_CONV2D_BACKWARD_DATA", "1")
    plain = to_numpy(F.conv2d_input(x.shape, wd, god, **args))
    monkeypatch.setenv("GPUCONV_KERNEL_CONV2D_BACKWARD_DATA", "2")
    split = to_numpy(F.conv2d_input(x.shape, wd, god, **args))
    np.testing.assert_allclose(split, plain, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("size, kernel, stride, pad, dilation", [
    (224, 11, 4, 2, 1), (9, 2, 4, 0, 1), (7, 4, 2, 1, 2), (13, 3, 1, 1, 1), (10, 3, 3, 2, 3)])
def test_backward_data_phases_meet_only_their_taps(size, kernel, stride, pad, dilation):
    # Brute force over one axis: each phase's pixels are exactly those y with (y + pad) % stride
    # = r, every kernel tap belongs to exactly one phase, and each (pixel, tap) of a phase lands on
    # a real output row: no zero-tap work is left in the split GEMMs.
    out_size = (size + 2 * pad - dilation * (kernel - 1) - 1) // stride + 1
    phases = conv_gemm._phases(size, out_size, kernel, stride, pad, dilation)
    assert sorted(y for p in phases for y in range(p.first, size, stride)) == list(range(size))
    assert sorted(i for p in phases for i, _ in p.taps) == list(range(kernel))
    for p in phases:
        assert p.count == len(range(p.first, size, stride))
        for q in range(p.count):
            y = p.first + stride * q
            for i, shift in p.taps:
                assert (y + pad - i * dilation) % stride == 0
                assert q + p.origin - shift == (y + pad - i * dilation) // stride


def test_alexnet_conv1_backward_data_does_no_zero_tap_work():
    g = conv_module._geometry((128, 3, 224, 224), (96, 3, 11, 11), 4, 2, 1)
    plan = conv_gemm.plan_backward_data(g)
    assert plan.version == 2 and plan.launches == 16
    # The (pixel, tap) pairs the phases multiply are exactly those whose tap lands on the output
    # lattice, (y + pad - i) % 4 == 0 along each axis: 1/16 of the plain kernel's 224^2 x 121.
    along_axis = sum(1 for y in range(224) for i in range(11) if (y + 2 - i) % 4 == 0)
    executed = sum(ph.count * pw.count * len(ph.taps) * len(pw.taps) for ph, pw in conv_gemm._data_phases(g))
    assert executed == along_axis ** 2
    assert executed * 16 == pytest.approx(224 * 224 * 121, rel=0.01)


@pytest.mark.parametrize("rows, columns, expected", [
    (384, 128 * 169, (128, 128)),   # AlexNet conv3-5: large M and N
    (3, 128 * 224 * 224, conv_gemm.NARROW_TILE),  # C_in 3: the direct narrow kernel
    (4, 1000, conv_gemm.NARROW_TILE),
    (6, 256 * 28 * 28, (32, 128)),  # LeNet conv1's 6 output channels
    (16, 256 * 10 * 10, (32, 128)),  # LeNet conv2's 16 (M = 16 fits 32 rows)
    (256, 128 * 169, (128, 128)),  # AlexNet conv5: 128x64 ties, the larger tile wins
    (96, 128 * 55 * 55, (32, 128)),  # AlexNet conv1: 96 rows pad to 128 on the large tiles
    (128, 64 * 100, (128, 64)),  # 50 blocks of 128x128 would leave 82 SMs idle
])
def test_tile_choice_per_shape(rows, columns, expected):
    assert conv_gemm.choose_tile(rows, columns)[0] == expected


def test_plans_fall_back_to_version_1_with_the_reason():
    many_taps = conv_module._geometry((1, 3, 20, 19), (5, 3, 17, 16), 1, 1, 1)
    for plan in (conv_gemm.plan_forward(many_taps), conv_gemm.plan_backward_data(many_taps),
                 conv_gemm.plan_backward_filter(many_taps)):
        assert plan.version == 1 and plan.reason == "272 kernel taps > 256"
    huge = conv_module._geometry((1, 64, 6000, 6000), (64, 64, 3, 3), 1, 1, 1)
    assert conv_gemm.plan_forward(huge).reason == "a tensor past 32-bit offsets"


def test_backward_filter_split_fills_the_gpu_several_waves_deep():
    # AlexNet conv2 at batch 128: 2 x 19 tiles of 128x128 alone fill a third of one wave.
    g = conv_module._geometry((128, 96, 27, 27), (256, 96, 5, 5), 1, 2, 1)
    plan = conv_gemm.plan_backward_filter(g)
    blocks = 2 * 19 * plan.splits
    assert blocks >= conv_gemm.WAVES * conv_gemm.SMS * conv_gemm.TILES[plan.tile][1] * 0.9
    assert plan.splits * 256 * 2400 * 4 <= conv_gemm.WORKSPACE_BYTES


def test_conv2d_plan_names_the_kernel_for_each_version(monkeypatch):
    shapes, args = ((128, 3, 224, 224), (96, 3, 11, 11)), dict(stride=4, padding=2)
    for op in ("conv2d_forward", "conv2d_backward_data", "conv2d_backward_filter"):
        monkeypatch.delenv(f"GPUCONV_KERNEL_{op.upper()}", raising=False)
        assert F.conv2d_plan(op, *shapes, **args).version == (3 if op == "conv2d_backward_filter" else 2)
        monkeypatch.setenv(f"GPUCONV_KERNEL_{op.upper()}", "1")
        plan = F.conv2d_plan(op, *shapes, **args)
        assert (plan.version, plan.kernel, plan.tile) == (1, f"{op}_v1", (64, 64))
        monkeypatch.setenv(f"GPUCONV_KERNEL_{op.upper()}", "0")
        assert F.conv2d_plan(op, *shapes, **args).kernel == "im2col + cuBLAS"
        monkeypatch.delenv(f"GPUCONV_KERNEL_{op.upper()}")
    # AlexNet conv1's input gradient: v1 multiplies 16x the taps (and pads 3 channels to 64).
    data = F.conv2d_plan("conv2d_backward_data", *shapes, **args)
    assert data.kernel_text == "conv2d_gemm_narrow_v2 4x256, 16 phases"
    assert "4x4 stride phases" in data.describe()
    monkeypatch.setenv("GPUCONV_KERNEL_CONV2D_BACKWARD_DATA", "1")
    assert F.conv2d_plan("conv2d_backward_data", *shapes, **args).useful < data.useful / 16
    with pytest.raises(ValueError, match="op must be one of"):
        F.conv2d_plan("conv2d_backward", *shapes)


def test_weights_are_relaid_for_vector_loads_only_when_needed():
    # K = 3*11*11 = 363 is not a multiple of 4: conv2d_weight_rows_v2 writes a zero-padded copy
    # (the kernel reads 4 floats at a time); K = 2*2*2 = 8 is used in place, when 16-byte aligned.
    rng = np.random.default_rng(0)
    g = conv_module._geometry((1, 3, 12, 12), (2, 3, 11, 11), 1, 0, 1)
    weight = to_device(rng.standard_normal((2, 3, 11, 11)).astype(np.float32), "emu")
    relaid, pitch = conv_gemm._weight_rows(weight, g, (0, 1, 11), (0, 1, 11), transpose=False)
    assert pitch == 364 and conv_gemm._address(relaid) % 16 == 0
    np.testing.assert_array_equal(to_numpy(relaid)[:, :363], to_numpy(weight).reshape(2, 363))
    assert not to_numpy(relaid)[:, 363:].any()
    g8 = conv_module._geometry((1, 2, 4, 4), (2, 2, 2, 2), 1, 0, 1)
    square = to_device(rng.standard_normal((2, 2, 2, 2)).astype(np.float32), "emu")
    same, _ = conv_gemm._weight_rows(square, g8, (0, 1, 2), (0, 1, 2), transpose=False)
    assert np.shares_memory(same, square) == (conv_gemm._address(square) % 16 == 0)
    # Backward-data's phase (taps i = 1, j in {0, 1}) of the transposed weight: [ci][co*2 + t].
    phase, pitch = conv_gemm._weight_rows(square, g8, (1, 1, 1), (0, 1, 2), transpose=True)
    expected = to_numpy(square)[:, :, 1, :].transpose(1, 0, 2).reshape(2, 4)
    assert pitch == 4
    np.testing.assert_array_equal(to_numpy(phase), expected)


@pytest.mark.parametrize("order", ["reverse", "random:3"])
def test_v2_weight_gradient_is_bit_identical_in_any_block_order(order, monkeypatch):
    # The emulator runs the blocks in another order: v2's partial sums are added in split order
    # whatever the block order; v1's float atomics add them in block order (the planted contrast:
    # the check sees the difference).
    from gpuconv import emu

    x, weight, _, grad_output, args, _ = _problem(5)  # K = 99 output pixels: 13 K tiles of v2, 7 of v1
    xd, god = _on("emu", x, grad_output)

    def weight_gradient(version, block_order, xd=xd, god=god, weight_shape=weight.shape, args=args):
        monkeypatch.setenv("GPUCONV_KERNEL_CONV2D_BACKWARD_FILTER", version)
        with emu.block_order(*block_order):
            grads = F.conv2d_weight(xd, weight_shape, god, **args, bias_grad=version != "1")
        return np.concatenate([to_numpy(a).ravel() for a in (grads if version != "1" else [grads])]).view(np.uint32)

    name, _, seed = order.partition(":")
    other = (name, int(seed or 0))
    np.testing.assert_array_equal(weight_gradient("2", ("forward", 0)), weight_gradient("2", other))
    # Version 3 (the splits added by the last block of each tile, whichever block that is): the
    # same bits as the reduce kernel's, in any block order.
    np.testing.assert_array_equal(weight_gradient("3", ("forward", 0)), weight_gradient("2", ("forward", 0)))
    np.testing.assert_array_equal(weight_gradient("3", other), weight_gradient("2", ("forward", 0)))
    # C_in 16: the _c4 kernel, split over K as well.
    x16, w16, _, go16, args16, _ = _problem(12)
    on16 = dict(zip(("xd", "god"), _on("emu", x16, go16)), weight_shape=w16.shape, args=args16)
    assert conv_gemm.plan_backward_filter(conv_module._geometry(x16.shape, w16.shape, **args16)).splits > 1
    np.testing.assert_array_equal(weight_gradient("2", ("forward", 0), **on16), weight_gradient("2", other, **on16))
    np.testing.assert_array_equal(weight_gradient("3", other, **on16), weight_gradient("2", other, **on16))
    monkeypatch.setattr(conv_module, "_TARGET_BLOCKS", 4096)  # v1: many splits adding into each element
    assert (weight_gradient("1", ("forward", 0)) != weight_gradient("1", other)).any()
