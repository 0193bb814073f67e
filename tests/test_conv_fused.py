"""Convolution + bias + ReLU + max-pool in one op (F.conv2d_relu_max_pool2d, one kernel on a device)
and Sequential's forward walk that uses it: equal to the unfused sequence, bit for bit."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import gpuconv
import gpuconv.functional as F
from gpuconv import emu, models, nn, optim
from gpuconv.device import to_device, to_numpy
from gpuconv.functional import conv_gemm
from gpuconv.nn import containers
from gpuconv.random import manual_seed

FUSED = "conv2d_relu_max_pool2x2_v2_"
BLOCK = (nn.Conv2d, nn.ReLU, nn.MaxPool2d)


def _without_conv_fusions(monkeypatch):
    """Sequential's forward as before the fusions of convolutions: each module on its own."""
    monkeypatch.delitem(containers.FORWARD_FUSIONS, BLOCK)
    monkeypatch.delitem(containers.FORWARD_FUSIONS, BLOCK[:2])

# (N, C_in, H, W, C_out, kernel, stride, padding, dilation, pool padding, ceil_mode)
CASES = {
    "odd-output-drops-a-row-and-column": (2, 3, 9, 9, 6, 3, 1, 1, 1, 0, False),
    "batch-1-c_out-1-lenet-conv1": (1, 1, 8, 8, 1, 5, 1, 2, 1, 0, False),
    "pool-padding-clips-windows": (2, 6, 7, 6, 16, 3, 1, 0, 1, 1, False),
    "ceil-mode-clips-the-last-window": (1, 2, 7, 7, 5, 3, 1, 0, 1, 0, True),
    "strided-c_out-33-two-row-tiles": (3, 4, 11, 10, 33, 3, 2, 1, 1, 0, True),
    "dilated-odd-width": (2, 2, 10, 9, 6, 3, 1, 1, 2, 1, True),
}


def _arrays(rng, case, integers=False):
    n, c_in, h, w, c_out, k = case[:6]
    if integers:  # exact sums in float32: ties everywhere, the same on every device
        draw = lambda *shape: rng.integers(-2, 3, shape).astype(np.float32)  # noqa: E731
    else:
        draw = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    return draw(n, c_in, h, w), draw(c_out, c_in, k, k), draw(c_out)


def _conv_args(case):
    stride, padding, dilation, pool_padding, ceil_mode = case[6:]
    return (stride, padding, dilation), (2, 2, pool_padding, ceil_mode)


def _fused(x, w, b, case):
    conv_args, pool_args = _conv_args(case)
    return F.conv2d_relu_max_pool2d(x, w, b, *conv_args, *pool_args)


def _unfused(x, w, b, case):
    conv_args, pool_args = _conv_args(case)
    return F.max_pool2d(F.relu(F.conv2d(x, w, b, *conv_args)), *pool_args, return_indices=True)


def _torch(x, w, b, case):
    conv_args, (kernel, stride, padding, ceil_mode) = _conv_args(case)
    y = torch.relu(torch.nn.functional.conv2d(torch.from_numpy(x).double(), torch.from_numpy(w).double(),
                                              torch.from_numpy(b).double(), *conv_args))
    out, indices = torch.nn.functional.max_pool2d(y, kernel, stride, padding, ceil_mode=ceil_mode,
                                                  return_indices=True)
    return out.numpy(), indices.numpy(), y.numpy()


def _assert_identical(got, expected):
    for g, e in zip(got, expected):
        np.testing.assert_array_equal(to_numpy(g), to_numpy(e))


@pytest.mark.parametrize("name", sorted(CASES))
def test_fused_equals_the_unfused_sequence_and_torch(device, name, rng):
    case = CASES[name]
    x, w, b = _arrays(rng, case)
    on = [to_device(a, device) for a in (x, w, b)]
    with gpuconv.profile() as prof:
        got = _fused(*on, case)
    fused = [name for name in prof.counts() if name.startswith(FUSED)]
    assert fused == ([] if device == "cpu" else [f"{FUSED}{'32x128' if case[4] == 1 else '64x128'}"])
    _assert_identical(got, _unfused(*on, case))
    out, *_ = _torch(x, w, b, case)
    np.testing.assert_allclose(to_numpy(got[0]), out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(CASES))
def test_ties_pick_the_first_maximum_as_torch_does(device, name, rng):
    case = CASES[name]
    x, w, b = _arrays(rng, case, integers=True)
    out, indices = _fused(*(to_device(a, device) for a in (x, w, b)), case)
    expected_out, expected_indices, y = _torch(x, w, b, case)
    np.testing.assert_array_equal(to_numpy(out), expected_out)
    np.testing.assert_array_equal(to_numpy(indices), expected_indices)
    if case[-2:] == (0, False):  # every window whole: some hold their maximum twice (the rule is exercised)
        n, c, h, w = expected_out.shape
        windows = y[:, :, :2 * h, :2 * w].reshape(n, c, h, 2, w, 2)
        assert ((windows == expected_out[:, :, :, None, :, None]).sum(axis=(3, 5)) > 1).any()


@pytest.mark.parametrize("tile", sorted(conv_gemm.TILES))
@pytest.mark.parametrize("c_in", [3, 4], ids=["K-27", "K-36"])
def test_every_tile_and_weight_load_in_another_block_and_thread_order(tile, c_in, monkeypatch, rng):
    # K = 27 needs the re-laid weights on the 128-row tiles, K = 36 reads them as they are
    monkeypatch.setattr(conv_gemm, "choose_tile", lambda rows, columns: (tile, "the tile under test"))
    case = (2, c_in, 9, 8, 20, 3, 1, 1, 1, 1, True)
    x, w, b = (to_device(a, "emu") for a in _arrays(rng, case))
    with emu.block_order("reverse"), emu.thread_order("random"):
        with gpuconv.profile() as prof:
            got = _fused(x, w, b, case)
        expected = _unfused(x, w, b, case)
    assert prof.counts()[f"{FUSED}{tile[0]}x{tile[1]}"] == 1
    _assert_identical(got, expected)


def test_nan_propagates_with_the_first_nan_s_index(kernel_device, rng):
    case = CASES["pool-padding-clips-windows"]
    x, w, b = _arrays(rng, case)
    x[0, 1, 2, 3] = np.nan
    x[1, :, 5, 0] = np.nan
    on = [to_device(a, kernel_device) for a in (x, w, b)]
    got = _fused(*on, case)
    assert np.isnan(to_numpy(got[0])).any()
    _assert_identical(got, _unfused(*on, case))
    out, indices = _fused(x, w, b, case)  # the NumPy path: the same NaNs, named by the same indices
    nan = np.isnan(out)
    np.testing.assert_array_equal(np.isnan(to_numpy(got[0])), nan)
    np.testing.assert_array_equal(to_numpy(got[1])[nan], indices[nan])


def test_no_bias_and_an_empty_batch(kernel_device, rng):
    case = CASES["odd-output-drops-a-row-and-column"]
    x, w, _ = (to_device(a, kernel_device) for a in _arrays(rng, case))
    _assert_identical(_fused(x, w, None, case), _unfused(x, w, None, case))
    out, indices = _fused(x[:0], w, None, case)
    assert out.shape == indices.shape == (0, 6, 4, 4)


@pytest.mark.parametrize("pool, env, precision", [
    ((3, 2, 1, False), None, None),  # AlexNet's overlapping pool
    ((2, 1, 0, False), None, None),
    ((2, 2, 0, False), "1", None),  # conv forward version 1
    ((2, 2, 0, False), None, "tf32"),
])
def test_shapes_the_kernel_does_not_take_run_unfused(pool, env, precision, monkeypatch, rng):
    if env is not None:
        monkeypatch.setenv("GPUCONV_KERNEL_CONV2D_FORWARD", env)
    x, w, b = _arrays(rng, CASES["odd-output-drops-a-row-and-column"])
    on = [to_device(a, "emu") for a in (x, w, b)]
    with gpuconv.profile() as prof:
        got = F.conv2d_relu_max_pool2d(*on, 1, 1, 1, *pool, precision=precision)
    assert not any(name.startswith(FUSED) for name in prof.counts())
    y = F.relu(F.conv2d(*on, 1, 1, 1, precision=precision))
    _assert_identical(got, F.max_pool2d(y, *pool, return_indices=True))


def test_bad_input_is_a_clear_error(rng):
    x, w, b = (to_device(a, "emu") for a in _arrays(rng, CASES["odd-output-drops-a-row-and-column"]))
    with pytest.raises(ValueError, match=r"convolution's output of shape \(2, 6, 1, 1\) is too small"):
        F.conv2d_relu_max_pool2d(x, w, b, 1, 0, 4)
    with pytest.raises(ValueError, match="expects 3 input channels"):
        F.conv2d_relu_max_pool2d(x[:, :2], w, b)
    with pytest.raises(ValueError, match="bias must have shape"):
        F.conv2d_relu_max_pool2d(x, w, b[:2])
    with pytest.raises(ValueError, match="padding must be at most half"):
        F.conv2d_relu_max_pool2d(x, w, b, pool_padding=2)


def test_small_output_channel_counts_get_a_small_tile():
    # one wave of any tile: the cost model alone would pick 128x64, whose 128-bit weight loads
    # need a re-laid copy of LeNet's K = 25 weights
    assert conv_gemm.choose_tile(6, 2 * 28 * 28)[0] in conv_gemm.SCALAR_A_TILES
    assert conv_gemm.choose_tile(64, 1000)[0] in conv_gemm.SCALAR_A_TILES
    assert conv_gemm.choose_tile(65, 1000)[0][0] == 128


def test_small_tiles_read_the_weights_in_place(rng):
    # K = 363: the 128-bit loads of the large tiles need a zero-padded copy, the small ones none
    g = F.conv._geometry((1, 3, 12, 12), (2, 3, 11, 11), 1, 0, 1)
    weight = to_device(rng.standard_normal((2, 3, 11, 11)).astype(np.float32), "emu")
    for tile in conv_gemm.SCALAR_A_TILES:
        rows, pitch = conv_gemm._weight_rows(weight, g, (0, 1, 11), (0, 1, 11), transpose=False, tile=tile)
        assert pitch == 363 and np.shares_memory(rows, weight)
    with gpuconv.profile() as prof:
        _, pitch = conv_gemm._weight_rows(weight, g, (0, 1, 11), (0, 1, 11), transpose=False, tile=(128, 64))
    assert pitch == 364 and prof.counts()["conv2d_weight_rows_v2"] == 1


# --- Sequential's forward walk ------------------------------------------------------------


def _lenet_step(fused: bool, monkeypatch, device="emu", batch=3):
    """Forward (profiled), loss, backward and an SGD step of LeNet-5: what every part produced."""
    manual_seed(0)
    model = models.lenet5().to(device)
    rng = np.random.default_rng(3)
    x = to_device(rng.standard_normal((batch, 1, 28, 28)).astype(np.float32), device)
    y = to_device(rng.integers(0, 10, batch).astype(np.int32), device)
    criterion = nn.CrossEntropyLoss()
    optimizer = optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with monkeypatch.context() as patch:
        if not fused:
            _without_conv_fusions(patch)
        with gpuconv.profile() as prof:
            logits = model(x)
        loss = criterion(logits, y)
        model.backward(criterion.backward())
    grads = [to_numpy(p.grad).copy() for p in model.parameters()]
    optimizer.step()
    return prof.counts(), [to_numpy(logits), to_numpy(loss), *grads, *(to_numpy(p.data) for p in model.parameters())]


def test_lenet5_step_with_the_fusion_equals_the_unfused_step(monkeypatch):
    fused_counts, fused = _lenet_step(True, monkeypatch)
    unfused_counts, unfused = _lenet_step(False, monkeypatch)
    for got, expected in zip(fused, unfused):
        np.testing.assert_array_equal(got, expected)
    # the two convolution blocks: 3 launches each -> 1, and no weight re-layout either way
    assert sum(fused_counts.values()) == sum(unfused_counts.values()) - 4
    assert sum(n for name, n in fused_counts.items() if name.startswith(FUSED)) == 2
    assert "max_pool2d_forward_v1" not in fused_counts and unfused_counts["max_pool2d_forward_v1"] == 2
    assert unfused_counts["relu_forward_v1"] - fused_counts["relu_forward_v1"] == 2
    assert "conv2d_weight_rows_v2" not in fused_counts and "conv2d_weight_rows_v2" not in unfused_counts


def test_lenet5_at_batch_256_plans_no_weight_re_layout():
    # the host-path bench's batch: both convolutions on 32x128 tiles, weights read as they are
    for c_in, c_out, size, padding in [(1, 6, 28, 2), (6, 16, 14, 0)]:
        g = F.conv._geometry((256, c_in, size, size), (c_out, c_in, 5, 5), 1, padding, 1)
        pool_out = (g.out_h // 2, g.out_w // 2)
        plan = conv_gemm.plan_relu_max_pool2x2(g, pool_out, (0, 0))
        assert plan.tile == (32, 128) and plan.tile in conv_gemm.SCALAR_A_TILES, plan.describe()


def test_the_walk_leaves_each_layer_what_its_backward_needs(rng, monkeypatch):
    block = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True)).to("emu")
    x = to_device(rng.standard_normal((2, 2, 7, 7)).astype(np.float32), "emu")
    out = block(x)
    conv, relu, pool = block
    assert conv._saved()["input"] is x and relu._ctx is None
    assert pool._saved()["input_shape"] == (2, 3, 5, 5) and pool._saved()["output"] is out
    grad = to_device(rng.standard_normal(out.shape).astype(np.float32), "emu")
    grad_input = block.backward(grad)
    weight_grad = to_numpy(conv.weight.grad).copy()
    # the same gradients as the modules run one by one
    _without_conv_fusions(monkeypatch)
    conv.zero_grad()
    np.testing.assert_array_equal(to_numpy(block(x)), to_numpy(out))
    assert relu._saved()["output"].shape == (2, 3, 5, 5)
    np.testing.assert_array_equal(to_numpy(block.backward(grad)), to_numpy(grad_input))
    np.testing.assert_array_equal(to_numpy(conv.weight.grad), weight_grad)


def test_on_cpu_the_walk_runs_each_module(rng):
    block = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.MaxPool2d(2))
    block(rng.standard_normal((1, 1, 6, 6)).astype(np.float32))
    assert block[1]._saved()["output"].shape == (1, 2, 4, 4)


def test_a_captured_fused_forward_replays_into_its_static_buffers(rng):
    block = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.MaxPool2d(2)).to("emu")
    x = to_device(rng.standard_normal((2, 1, 9, 9)).astype(np.float32), "emu")
    eager = to_numpy(block(x)).copy()
    graph = gpuconv.CUDAGraph()
    with gpuconv.graph(graph):
        out = block(x)
    assert graph.num_operations == 1
    graph.replay()
    np.testing.assert_array_equal(to_numpy(out), eager)
    x[...] = to_device(rng.standard_normal(x.shape).astype(np.float32), "emu")
    graph.replay()
    np.testing.assert_array_equal(to_numpy(out), to_numpy(block(x)))  # eager, on the new input


def test_a_conv_relu_pair_runs_as_one_launch(device, rng, monkeypatch):
    # AlexNet's blocks: conv + ReLU before an LRN or a 3x3/2 pool (the latter: the triple's fallback)
    manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.LocalResponseNorm(3),
                          nn.Conv2d(4, 5, 3), nn.ReLU(), nn.MaxPool2d(3, 2)).to(device)
    x = to_device(rng.standard_normal((2, 2, 9, 9)).astype(np.float32), device)
    grad = to_device(rng.standard_normal((2, 5, 3, 3)).astype(np.float32), device)

    def run():
        with gpuconv.profile() as prof:
            out = model(x)
        return prof.counts(), to_numpy(out), to_numpy(model.backward(grad)), to_numpy(model[0].weight.grad)

    fused_counts, *fused = run()
    model.zero_grad()
    _without_conv_fusions(monkeypatch)
    unfused_counts, *unfused = run()
    for got, expected in zip(fused, unfused):
        np.testing.assert_array_equal(got, expected)
    if device != "cpu":
        assert "relu_forward_v1" not in fused_counts and unfused_counts["relu_forward_v1"] == 2


@pytest.mark.parametrize("tile", [(32, 128), (128, 64)])
def test_a_misaligned_weight_view(tile, monkeypatch, rng):
    # an OIHW view 4 bytes into its buffer: read in place by 32-bit loads, re-laid for 128-bit ones
    monkeypatch.setattr(conv_gemm, "choose_tile", lambda rows, columns: (tile, "the tile under test"))
    case = (2, 4, 7, 6, 16, 3, 1, 0, 1, 1, False)  # K = 36: only the misalignment asks for a copy
    x, w, b = _arrays(rng, case)
    buffer = to_device(np.concatenate([[0.0], w.ravel()]).astype(np.float32), "emu")
    view = buffer[1:].reshape(w.shape)
    assert conv_gemm._address(view) % 16 != 0
    x, b = to_device(x, "emu"), to_device(b, "emu")
    with gpuconv.profile() as prof:
        got = _fused(x, view, b, case)
    assert ("conv2d_weight_rows_v2" in prof.counts()) == (tile not in conv_gemm.SCALAR_A_TILES)
    _assert_identical(got, _unfused(x, to_device(w, "emu"), b, case))


# --- backward-data reading the weight in place ----------------------------------------------

# tests/test_conv.py's cases: strides 2x1, 3, 4 (phases no tap reaches) and 2 with dilation
# (1, 2); 'same' padding with dilation 2; batch 1; C_in / C_out 1, 3, 6, 16, 20 and 96.
DATA_CASES = [0, 1, 2, 4, 6, 8, 9, 11, 12, 13]


def _input_gradient(weight, grad_output, x_shape, args, in_place: bool, monkeypatch):
    with monkeypatch.context() as patch:
        if not in_place:
            patch.setattr(conv_gemm, "IN_PLACE_DATA_TILES", frozenset())
        with gpuconv.profile() as prof:
            grad = F.conv2d_input(x_shape, weight, grad_output, **args)
    return to_numpy(grad), prof.counts()


@pytest.mark.parametrize("tile", sorted(conv_gemm.IN_PLACE_DATA_TILES), ids=lambda t: f"{t[0]}x{t[1]}")
@pytest.mark.parametrize("index", DATA_CASES)
def test_backward_data_reads_the_weight_in_place(kernel_device, index, tile, monkeypatch):
    # against the float64 reference, and bit for bit against the re-laid copy (the same A values
    # in the same K order): no conv2d_weight_rows_v2 launch, one launch per phase with taps
    from test_conv import _assert_close, _on, _problem

    monkeypatch.setattr(conv_gemm, "choose_tile", lambda rows, columns: (tile, "the tile under test"))
    x, weight, _, grad_output, args, (_, dx, _, _) = _problem(index)
    if tile == conv_gemm.NARROW_TILE and x.shape[1] > tile[0]:
        pytest.skip(f"C_in {x.shape[1]}: more rows than the narrow kernel has")
    wd, god = _on(kernel_device, weight, grad_output)
    got, counts = _input_gradient(wd, god, x.shape, args, True, monkeypatch)
    _assert_close(got, dx, weight.shape[0] * weight[0, 0].size, kernel_device)
    plan = conv_gemm.plan_backward_data(F.conv._geometry(x.shape, weight.shape, **args))
    assert counts[f"{conv_gemm._lattice_kernel(tile)}_transposed_weight"] == plan.launches, counts
    assert "conv2d_weight_rows_v2" not in counts, counts
    relaid, relaid_counts = _input_gradient(wd, god, x.shape, args, False, monkeypatch)
    assert relaid_counts["conv2d_weight_rows_v2"] == plan.launches
    np.testing.assert_array_equal(got, relaid)


@pytest.mark.parametrize("order", ["reverse", "random:5"])
def test_backward_data_in_place_in_another_block_order(order, monkeypatch):
    # C_in 67 and 96: several row tiles, a row tile past C_in (rows clamped to the last)
    from test_conv import _on, _problem

    monkeypatch.setattr(conv_gemm, "choose_tile", lambda rows, columns: ((32, 128), "the tile under test"))
    name, _, seed = order.partition(":")
    for index in (6, 11):
        x, weight, _, grad_output, args, _ = _problem(index)
        wd, god = _on("emu", weight, grad_output)
        expected, _ = _input_gradient(wd, god, x.shape, args, False, monkeypatch)
        with emu.block_order(name, int(seed or 0)):
            got, _ = _input_gradient(wd, god, x.shape, args, True, monkeypatch)
        np.testing.assert_array_equal(got, expected)


def test_a_misaligned_weight_view_in_backward_data(monkeypatch, rng):
    # the 32-bit loads take an OIHW view 4 bytes into its buffer as it is
    monkeypatch.setattr(conv_gemm, "choose_tile", lambda rows, columns: ((64, 128), "the tile under test"))
    w = rng.standard_normal((5, 6, 3, 2)).astype(np.float32)
    buffer = to_device(np.concatenate([[0.0], w.ravel()]).astype(np.float32), "emu")
    view = buffer[1:].reshape(w.shape)
    assert conv_gemm._address(view) % 16 != 0
    grad_output = to_device(rng.standard_normal((2, 5, 4, 6)).astype(np.float32), "emu")
    args = dict(stride=(2, 1), padding=1)
    got, counts = _input_gradient(view, grad_output, (2, 6, 8, 5), args, True, monkeypatch)
    assert "conv2d_weight_rows_v2" not in counts
    expected = torch.nn.grad.conv2d_input((2, 6, 8, 5), torch.from_numpy(w).double(),
                                          torch.from_numpy(to_numpy(grad_output)).double(), **args)
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-5, atol=1e-5)
