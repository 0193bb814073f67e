"""The summary table: totals against parameter counts, MACs against counts by hand, shapes, text."""
from __future__ import annotations

import numpy as np
import pytest

from gpuconv import models, nn
from gpuconv.summary import summary


@pytest.fixture
def shapes_only(monkeypatch):
    """Build models with lazily allocated zero weights: a summary reads shapes, never values,
    and drawing VGG16's 138M random weights would dominate the test's time."""
    for layers in (nn.conv, nn.linear):  # each layer module holds its own name for the initialiser
        monkeypatch.setattr(layers, "_uniform", lambda shape, bound: np.zeros(shape, np.float32))


def conv_macs(c_in, c_out, k, out_hw):
    return c_out * out_hw * out_hw * c_in * k * k


def test_lenet5_table_per_layer():
    result = summary(models.lenet5())
    assert result.input_shape == (1, 1, 28, 28)
    rows = {row.name: row for row in result.rows}
    assert rows["features.0"].output_shape == (1, 6, 28, 28) and rows["features.0"].kind == "Conv2d"
    assert rows["features.0"].macs == conv_macs(1, 6, 5, 28) == 117_600
    assert rows["features.2"].output_shape == (1, 6, 14, 14)
    assert rows["features.3"].macs == conv_macs(6, 16, 5, 10) == 240_000
    assert rows["flatten"].output_shape == (1, 400)
    assert rows["classifier.0"].macs == 400 * 120 and rows["classifier.0"].params == 400 * 120 + 120
    assert [row.macs for row in result.rows if row.kind not in ("Conv2d", "Linear")] == [0] * 7
    assert result.total_macs == 117_600 + 240_000 + 48_000 + 10_080 + 840 == 416_520
    assert result.total_params == models.lenet5().num_parameters() == 61_706
    assert result.rows[-1].output_shape == (1, 10)
    # Activations: the input and every layer's output, in elements and float32 bytes.
    expected = 784 + 2 * 4704 + 1176 + 2 * 1600 + 2 * 400 + 2 * 120 + 2 * 84 + 10
    assert result.activation_elements == expected and result.activation_bytes == 4 * expected
    assert result.param_bytes == 4 * 61_706


def test_batch_scales_macs_and_activations_not_params():
    one = summary(models.lenet5(), (1, 28, 28))
    batch = summary(models.lenet5(), (32, 1, 28, 28))
    assert batch.input_shape == (32, 1, 28, 28)
    assert batch.total_macs == 32 * one.total_macs and batch.activation_elements == 32 * one.activation_elements
    assert batch.total_params == one.total_params
    assert [r.output_shape[1:] for r in batch.rows] == [r.output_shape[1:] for r in one.rows]


def test_alexnet_totals(shapes_only):
    model = models.alexnet()
    result = summary(model)
    conv1 = result.rows[0]
    assert (conv1.name, conv1.output_shape) == ("features.0", (1, 96, 55, 55))
    assert conv1.macs == conv_macs(3, 96, 11, 55) == 105_415_200
    convs = (conv_macs(3, 96, 11, 55) + conv_macs(96, 256, 5, 27) + conv_macs(256, 384, 3, 13)
             + conv_macs(384, 384, 3, 13) + conv_macs(384, 256, 3, 13))
    fcs = 9216 * 4096 + 4096 * 4096 + 4096 * 1000
    assert result.total_macs == convs + fcs == 1_135_256_096
    assert result.total_params == model.num_parameters() == 62_378_344
    assert next(r for r in result.rows if r.name == "flatten").output_shape == (1, 256 * 6 * 6)


def test_vgg16_totals(shapes_only):
    model = models.vgg16()
    result = summary(model, (3, 224, 224))
    assert result.total_params == model.num_parameters() == 138_357_544
    channels = [3, 64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
    sizes = [224] * 2 + [112] * 2 + [56] * 3 + [28] * 3 + [14] * 3
    convs = sum(conv_macs(a, b, 3, hw) for a, b, hw in zip(channels, channels[1:], sizes))
    assert result.total_macs == convs + 25088 * 4096 + 4096 * 4096 + 4096 * 1000 == 15_470_264_320
    assert result.rows[-1].output_shape == (1, 1000)


def test_summary_does_not_run_the_model(monkeypatch):
    def refuse(self, *args):
        raise AssertionError("summary ran a forward pass")

    monkeypatch.setattr(nn.Conv2d, "forward", refuse)
    monkeypatch.setattr(nn.Linear, "forward", refuse)
    assert summary(models.lenet5()).total_params == 61_706


def test_table_text():
    text = str(summary(models.lenet5(), (8, 1, 28, 28)))
    lines = text.splitlines()
    assert lines[0] == "LeNet5 for input (8, 1, 28, 28)"
    assert lines[2].split() == ["Layer", "(type)", "Output", "shape", "Activations", "Params", "MACs"]
    conv_line = next(line for line in lines if line.startswith("features.0 (Conv2d)"))
    assert "(8, 6, 28, 28)" in conv_line
    assert conv_line.split()[-3:] == [f"{8 * 4704:,}", "156", f"{8 * 117_600:,}"]
    assert "Total params: 61,706 (0.24 MiB as float32)" in text
    assert f"Total MACs: {8 * 416_520:,} (3.33 M) for a batch of 8" in text
    widths = {len(line) for line in lines[1:-3]}
    assert len(widths) == 1  # every row of the table is as wide as its rules


def test_plain_sequential_and_float64():
    model = nn.Sequential(nn.Linear(10, 5), nn.ReLU(), nn.Linear(5, 2)).double()
    result = summary(model, (4, 10))
    assert result.input_shape == (4, 10)
    assert result.total_macs == 4 * (50 + 10) and result.total_params == 55 + 12
    assert result.itemsize == 8 and "as float64" in str(result)
    assert [r.name for r in result.rows] == ["0", "1", "2"]


def test_errors_name_the_shapes():
    with pytest.raises(ValueError, match="Sequential has no input_shape attribute; pass input_shape"):
        summary(nn.Sequential(nn.ReLU()))
    with pytest.raises(ValueError, match=r"input_shape must be positive ints, got \(1, 0, 28\)"):
        summary(models.lenet5(), (1, 0, 28))
    with pytest.raises(ValueError, match=r"Conv2d: input has 3 channels, the layer expects 1 "
                                         r"\(input shape \(1, 3, 28, 28\)\)"):
        summary(models.lenet5(), (3, 28, 28))
    with pytest.raises(ValueError, match=r"Linear: input has 576 features, the layer expects 400"):
        summary(models.lenet5(), (1, 32, 32))
