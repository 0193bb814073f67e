"""Classic CNNs built from :mod:`gpuconv.nn`, laid out as torchvision lays them out.

Each model is a :class:`ConvNet`: a ``features`` :class:`~gpuconv.nn.Sequential`, a flatten,
and a ``classifier`` Sequential, so parameter names read ``features.0.weight``,
``classifier.6.bias`` exactly as in torchvision (VGG16's names and shapes match torchvision's
``vgg16`` one for one). Each records the input it is built for in ``input_shape`` (C, H, W).
"""
from __future__ import annotations

from . import cpu, nn

__all__ = ["ConvNet", "LeNet5", "AlexNet", "VGG16", "lenet5", "alexnet", "vgg16", "MODELS", "get_model"]


class ConvNet(nn.Module):
    """``classifier(flatten(features(x)))`` for inputs of ``input_shape`` (C, H, W)."""

    def __init__(self, features: nn.Sequential, classifier: nn.Sequential, input_shape: tuple[int, int, int]):
        super().__init__()
        # Registered in the order forward runs them: output_shape and the summary rely on it.
        self.features = features
        self.flatten = nn.Flatten(1)
        self.classifier = classifier
        self.input_shape = tuple(input_shape)

    def forward(self, x):
        if tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(
                f"{type(self).__name__}: input of shape {tuple(x.shape)} does not match the (N, C, H, W) = "
                f"(N, {', '.join(map(str, self.input_shape))}) the model is built for"
            )
        executor = cpu.executor_for(self, x)
        self._executed_by = executor
        if executor is not None:
            return executor.forward(x)
        return self.classifier(self.flatten(self.features(x)))

    # On 'cpu', whether the batch-innermost executor (gpuconv.cpu) may run this model; False keeps
    # the layer-by-layer module path (so does GPUCONV_CPU_EXECUTOR=0 for every model).
    cpu_executor = True
    _executed_by = None  # the executor that ran the last forward, if one did

    # A model's input is data: backward computes no gradient for it (the first convolution
    # launches no backward-data kernel) unless asked to, as for an input with requires_grad.
    requires_input_grad = False

    def backward(self, grad_output):
        if self._executed_by is not None:
            return self._executed_by.backward(grad_output, self.requires_input_grad)
        return nn.backward_chain([self.features, self.flatten, self.classifier], grad_output, self.requires_input_grad)


# One type per architecture, so that repr() and summaries name it.
class LeNet5(ConvNet):
    pass


class AlexNet(ConvNet):
    pass


class VGG16(ConvNet):
    pass


def lenet5(num_classes: int = 10, in_channels: int = 1, classic: bool = False) -> ConvNet:
    """LeNet-5 (LeCun et al. 1998) for 28x28 inputs, the first convolution padded to 32x32's geometry.

    conv 5x5 -> 6 maps, pool 2, conv 5x5 -> 16 maps, pool 2, fully connected 400-120-84-classes.
    The default modern variant uses ReLU and max pooling; ``classic=True`` uses tanh and average
    pooling. 61,706 parameters at 10 classes and 1 input channel.
    """
    act = nn.Tanh if classic else nn.ReLU
    pool = nn.AvgPool2d if classic else nn.MaxPool2d
    features = nn.Sequential(
        nn.Conv2d(in_channels, 6, kernel_size=5, padding=2), act(), pool(2),
        nn.Conv2d(6, 16, kernel_size=5), act(), pool(2),
    )
    classifier = nn.Sequential(
        nn.Linear(16 * 5 * 5, 120), act(),
        nn.Linear(120, 84), act(),
        nn.Linear(84, num_classes),
    )
    return LeNet5(features, classifier, (in_channels, 28, 28))


def alexnet(num_classes: int = 1000, in_channels: int = 3) -> ConvNet:
    """AlexNet (Krizhevsky et al. 2012) as one tower, for 224x224 inputs.

    The paper's two GPU towers merged: 96-256-384-384-256 maps, every layer seeing all channels of
    the previous one (no grouping), conv 11x11/4 padding 2, so 55x55 after conv1 and 256x6x6 =
    9216 features after the last pool. Local response normalisation (size 5, k 2, beta 0.75)
    follows the ReLUs of conv1 and conv2; PyTorch's formula divides alpha by size, so alpha=5e-4
    gives the paper's 1e-4 per squared neighbour. Overlapping max pooling 3/2, dropout 0.5 before
    the two hidden fully connected layers (torchvision's order).

    62,378,344 parameters at 1000 classes and 3 input channels. The paper's conv2, conv4 and conv5
    see only their own tower's half of the channels, which halves their weights: 60,965,224, the
    paper's "60 million".
    """
    features = nn.Sequential(
        nn.Conv2d(in_channels, 96, kernel_size=11, stride=4, padding=2), nn.ReLU(),
        nn.LocalResponseNorm(5, alpha=5e-4, beta=0.75, k=2.0), nn.MaxPool2d(3, 2),
        nn.Conv2d(96, 256, kernel_size=5, padding=2), nn.ReLU(),
        nn.LocalResponseNorm(5, alpha=5e-4, beta=0.75, k=2.0), nn.MaxPool2d(3, 2),
        nn.Conv2d(256, 384, kernel_size=3, padding=1), nn.ReLU(),
        nn.Conv2d(384, 384, kernel_size=3, padding=1), nn.ReLU(),
        nn.Conv2d(384, 256, kernel_size=3, padding=1), nn.ReLU(),
        nn.MaxPool2d(3, 2),
    )
    classifier = nn.Sequential(
        nn.Dropout(0.5), nn.Linear(256 * 6 * 6, 4096), nn.ReLU(),
        nn.Dropout(0.5), nn.Linear(4096, 4096), nn.ReLU(),
        nn.Linear(4096, num_classes),
    )
    return AlexNet(features, classifier, (in_channels, 224, 224))


# Configuration D of Simonyan & Zisserman 2014: output channels of each 3x3 convolution, "M" a 2x2 max pool.
_VGG16_CONFIG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


def vgg16(num_classes: int = 1000, in_channels: int = 3) -> ConvNet:
    """VGG-16 (configuration D) for 224x224 inputs: 13 convolutions 3x3/1 padding 1 with ReLU, five
    2x2 max pools, fully connected 25088-4096-4096-classes with dropout 0.5.

    138,357,544 parameters at 1000 classes and 3 input channels.
    """
    layers, channels = [], in_channels
    for item in _VGG16_CONFIG:
        if item == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(channels, item, kernel_size=3, padding=1), nn.ReLU()]
            channels = item
    classifier = nn.Sequential(
        nn.Linear(512 * 7 * 7, 4096), nn.ReLU(), nn.Dropout(0.5),
        nn.Linear(4096, 4096), nn.ReLU(), nn.Dropout(0.5),
        nn.Linear(4096, num_classes),
    )
    return VGG16(nn.Sequential(*layers), classifier, (in_channels, 224, 224))


MODELS = {"lenet5": lenet5, "alexnet": alexnet, "vgg16": vgg16}


def get_model(name: str, **kwargs) -> ConvNet:
    """Build the model registered as ``name`` (case-insensitive) with the builder's keyword arguments."""
    builder = MODELS.get(str(name).lower())
    if builder is None:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(sorted(MODELS))}")
    return builder(**kwargs)
