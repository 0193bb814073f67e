"""A whole training step (forward, loss, backward, SGD update) of LeNet-5 and AlexNet on the
kernel devices against the NumPy path, from the same weights, data and dropout seeds."""
import numpy as np
import pytest

import gpuconv
from gpuconv import models, nn, optim
from gpuconv.device import to_device, to_numpy


def _train_step(model, x, y):
    gpuconv.manual_seed(7)  # the same dropout seeds on every device
    criterion = nn.CrossEntropyLoss()
    optimizer = optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    loss = criterion(model(x), y)
    model.backward(criterion.backward())
    grads = {name: to_numpy(p.grad) for name, p in model.named_parameters()}
    optimizer.step()
    return float(to_numpy(loss)), grads, {name: to_numpy(p.data) for name, p in model.named_parameters()}


@pytest.mark.parametrize("name, batch", [("lenet5", 4), ("alexnet", 1)])
def test_training_step_matches_the_numpy_path(kernel_device, name, batch, rng, request):
    if name == "alexnet" and kernel_device == "emu" and not request.config.getoption("--slow"):
        pytest.skip("AlexNet on the emulated device takes minutes (run with --slow); its layers are "
                    "covered there at small shapes, and the whole step on 'cuda'")
    gpuconv.manual_seed(0)
    model = models.get_model(name, num_classes=10)
    state = model.state_dict()
    x = rng.standard_normal((batch, *model.input_shape)).astype(np.float32)
    y = rng.integers(0, 10, batch)

    expected_loss, expected_grads, expected_params = _train_step(model.train(), x, y)
    device_model = models.get_model(name, num_classes=10)
    device_model.load_state_dict(state)
    device_model.to(kernel_device).train()
    loss, grads, params = _train_step(device_model, to_device(x, kernel_device), to_device(y, kernel_device))

    assert loss == pytest.approx(expected_loss, rel=1e-4)
    for key in expected_grads:
        scale = np.abs(expected_grads[key]).max()
        np.testing.assert_allclose(grads[key], expected_grads[key], rtol=2e-3, atol=2e-4 * scale, err_msg=key)
        np.testing.assert_allclose(params[key], expected_params[key], rtol=1e-4, atol=1e-6, err_msg=key)
