"""Model zoo: parameter counts against counts by hand, output shapes, torchvision-style names,
checkpoints, and that a model learns."""
from __future__ import annotations

import numpy as np
import pytest

from gpuconv import models, nn
from gpuconv.device import device_of, to_device, to_numpy
from gpuconv.random import manual_seed


def conv_params(c_in, c_out, k):
    return c_out * c_in * k * k + c_out


def fc_params(n_in, n_out):
    return n_out * n_in + n_out


# Built once per module: drawing 62M random parameters takes a second or more on a slow machine.
@pytest.fixture(scope="module")
def alexnet():
    return models.alexnet()


@pytest.fixture(scope="module")
def vgg():
    """VGG16 with lazily allocated zero weights: its tests read names and shapes only, and drawing
    138M random numbers would take most of this file's time (AlexNet's fixture covers the drawing)."""
    with pytest.MonkeyPatch.context() as patch:
        for layers in (nn.conv, nn.linear):
            patch.setattr(layers, "_uniform", lambda shape, bound: np.zeros(shape, np.float32))
        return models.vgg16()


def test_lenet5_parameter_count_and_layers():
    expected = (conv_params(1, 6, 5) + conv_params(6, 16, 5)
                + fc_params(400, 120) + fc_params(120, 84) + fc_params(84, 10))
    assert expected == 61_706
    for classic in (False, True):
        model = models.lenet5(classic=classic)
        assert model.num_parameters() == expected
        kinds = {type(m) for m in model.modules()}
        assert kinds >= ({nn.Tanh, nn.AvgPool2d} if classic else {nn.ReLU, nn.MaxPool2d})
        assert not kinds & ({nn.ReLU, nn.MaxPool2d} if classic else {nn.Tanh, nn.AvgPool2d})
    assert models.lenet5(num_classes=5, in_channels=3).num_parameters() == (
        expected - fc_params(84, 10) + fc_params(84, 5) - conv_params(1, 6, 5) + conv_params(3, 6, 5))


def test_alexnet_parameter_count_and_geometry(alexnet):
    convs = (conv_params(3, 96, 11) + conv_params(96, 256, 5) + conv_params(256, 384, 3)
             + conv_params(384, 384, 3) + conv_params(384, 256, 3))
    fcs = fc_params(256 * 6 * 6, 4096) + fc_params(4096, 4096) + fc_params(4096, 1000)
    model = alexnet
    assert model.num_parameters() == convs + fcs == 62_378_344
    halved_by_towers = (256 * 96 * 25 + 384 * 384 * 9 + 256 * 384 * 9) // 2
    assert convs + fcs - halved_by_towers == 60_965_224
    assert "62,378,344" in models.alexnet.__doc__ and "60,965,224" in models.alexnet.__doc__
    assert model.input_shape == (3, 224, 224)
    assert model.features.output_shape((1, 3, 224, 224)) == (1, 256, 6, 6)
    assert model.features[0].output_shape((1, 3, 224, 224)) == (1, 96, 55, 55)
    lrn = [m for m in model.modules() if isinstance(m, nn.LocalResponseNorm)]
    assert [(m.size, m.alpha, m.beta, m.k) for m in lrn] == [(5, 5e-4, 0.75, 2.0)] * 2
    assert [m.p for m in model.modules() if isinstance(m, nn.Dropout)] == [0.5, 0.5]


def test_alexnet_forward_at_224(alexnet, rng):
    out = alexnet.eval()(rng.standard_normal((1, 3, 224, 224)).astype(np.float32))
    assert out.shape == (1, 1000) and out.dtype == np.float32 and np.all(np.isfinite(out))


def test_vgg16_parameter_count_and_torchvision_names(vgg):
    channels = [3, 64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
    convs = sum(conv_params(a, b, 3) for a, b in zip(channels, channels[1:]))
    fcs = fc_params(512 * 7 * 7, 4096) + fc_params(4096, 4096) + fc_params(4096, 1000)
    assert vgg.num_parameters() == convs + fcs == 138_357_544
    conv_indices = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]
    expected = [f"features.{i}.{p}" for i in conv_indices for p in ("weight", "bias")]
    expected += [f"classifier.{i}.{p}" for i in (0, 3, 6) for p in ("weight", "bias")]
    assert [name for name, _ in vgg.named_parameters()] == expected
    assert vgg.output_shape((2, 3, 224, 224)) == (2, 1000)
    assert vgg.features.output_shape((1, 3, 224, 224)) == (1, 512, 7, 7)


def test_state_dict_names_follow_torchvision(alexnet):
    assert [name for name, _ in alexnet.named_parameters()] == [
        f"{part}.{i}.{p}" for part, indices in (("features", (0, 4, 8, 10, 12)), ("classifier", (1, 4, 6)))
        for i in indices for p in ("weight", "bias")]
    assert list(models.lenet5().state_dict()) == [
        f"{part}.{i}.{p}" for part, indices in (("features", (0, 3)), ("classifier", (0, 2, 4)))
        for i in indices for p in ("weight", "bias")]


@pytest.mark.parametrize("classic", [False, True])
def test_lenet5_forward_backward_shapes(classic, rng):
    model = models.lenet5(classic=classic)
    assert model.input_shape == (1, 28, 28)
    x = rng.standard_normal((3, 1, 28, 28)).astype(np.float32)
    out = model(x)
    assert out.shape == (3, 10)
    model.requires_input_grad = True  # a model computes no input gradient unless asked
    grad_input = model.backward(np.ones_like(out))
    assert grad_input.shape == x.shape
    assert all(p.grad is not None and p.grad.shape == p.shape for p in model.parameters())


def test_lenet5_learns_a_fixed_batch(rng):
    manual_seed(0)
    model = models.lenet5()
    criterion = nn.CrossEntropyLoss()
    x = rng.standard_normal((8, 1, 28, 28)).astype(np.float32)
    labels = rng.integers(0, 10, size=8).astype(np.int32)
    losses = []
    for _ in range(10):
        losses.append(float(criterion(model(x), labels)))
        model.zero_grad()
        model.backward(criterion.backward())
        for p in model.parameters():
            p.data -= 0.1 * p.grad
    assert losses[0] == pytest.approx(np.log(10), rel=0.1)  # an untrained model guesses uniformly
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < 0.75 * losses[0]


def test_lenet5_on_every_device_matches_cpu(device, rng):
    manual_seed(4)
    model = models.lenet5(classic=True)
    cpu_model = models.lenet5(classic=True)
    cpu_model.load_state_dict(model.state_dict())
    model.requires_input_grad = cpu_model.requires_input_grad = True
    x = rng.standard_normal((2, 1, 28, 28)).astype(np.float32)
    grad = rng.standard_normal((2, 10)).astype(np.float32)
    out = model.to(device)(to_device(x, device))
    assert device_of(out) == device
    np.testing.assert_allclose(to_numpy(out), cpu_model(x), rtol=1e-4, atol=1e-5)
    grad_input = model.backward(to_device(grad, device))
    np.testing.assert_allclose(to_numpy(grad_input), cpu_model.backward(grad), rtol=1e-4, atol=1e-6)
    for (name, p), q in zip(model.named_parameters(), cpu_model.parameters()):
        np.testing.assert_allclose(to_numpy(p.grad), q.grad, rtol=1e-4, atol=1e-5, err_msg=name)


def test_model_rejects_an_input_of_the_wrong_shape():
    with pytest.raises(ValueError, match=r"input of shape \(2, 3, 28, 28\) does not match .* \(N, 1, 28, 28\)"):
        models.lenet5()(np.zeros((2, 3, 28, 28), np.float32))


def test_checkpoint_of_another_model_is_a_clear_error(alexnet):
    lenet_state = models.lenet5().state_dict()
    with pytest.raises(ValueError, match=r"(?s)into AlexNet:.*missing keys: .*features.8.weight.*"
                                         r"unexpected keys: features.3.weight.*"
                                         r"features.0.weight: expected shape \(96, 3, 11, 11\), got \(6, 1, 5, 5\)"):
        alexnet.load_state_dict(lenet_state)
    with pytest.raises(ValueError, match=r"classifier.4.weight: expected shape \(5, 84\), got \(10, 84\)"):
        models.lenet5(num_classes=5).load_state_dict(models.lenet5().state_dict())


def test_registry():
    assert set(models.MODELS) == {"lenet5", "alexnet", "vgg16"}
    model = models.get_model("LeNet5", num_classes=3)
    assert isinstance(model, models.LeNet5) and model.classifier[-1].out_features == 3
    with pytest.raises(ValueError, match="unknown model 'resnet50'; available: alexnet, lenet5, vgg16"):
        models.get_model("resnet50")
