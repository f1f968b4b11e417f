"""The paper's models, with the FC shapes of its Table 1.

FC weight counts (no biases): LeNet-300-100 266,200 (paper: 272k); Deep MNIST 3,221,504 (3.22M);
TF CIFAR-10 local3+local4 958,464 (958.4k; the 192→10 softmax layer is not counted there);
AlexNet-BN FC6-8 87,982,080 (87.98M).
"""

from __future__ import annotations

from typing import Callable

from torch import nn

__all__ = ["MODELS", "INPUT_SHAPES", "MODEL_CLASSES", "PAPER_SETUPS", "paper_filter", "classifier_name", "build_model", "fc_weights_kept", "lenet300", "deep_mnist", "tf_cifar10", "alexnet_bn", "fc_stack", "fc_weight_count"]


def _mlp(dims: list[int], dropout: float = 0.0) -> list[nn.Module]:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(dims) - 2:
            layers.append(nn.ReLU())
            if dropout:
                layers.append(nn.Dropout(dropout))
    return layers


def fc_stack(dims: list[int]) -> nn.Sequential:
    """``Linear → ReLU → ... → Linear`` with the given widths (the FC part of a paper model)."""
    return nn.Sequential(*_mlp(dims))


def lenet300(num_classes: int = 10) -> nn.Sequential:
    """LeNet-300-100: 784 → 300 → 100 → classes, ReLU."""
    return nn.Sequential(nn.Flatten(), *_mlp([784, 300, 100, num_classes]))


def deep_mnist(num_classes: int = 10) -> nn.Sequential:
    """TensorFlow's "Deep MNIST" tutorial CNN: two 5x5 conv+pool stages, FC 3136 → 1024 → classes."""
    return nn.Sequential(
        nn.Conv2d(1, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(7 * 7 * 64, 1024), nn.ReLU(), nn.Dropout(0.5),
        nn.Linear(1024, num_classes),
    )


def tf_cifar10(num_classes: int = 10) -> nn.Sequential:
    """TensorFlow's CIFAR-10 tutorial model on 24x24 crops: FC 2304 → 384 → 192 → classes.

    Local response normalization follows the tutorial (size 4, alpha 0.001/9, beta 0.75).
    """
    return nn.Sequential(
        nn.Conv2d(3, 64, 5, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2, padding=1),
        nn.LocalResponseNorm(4, alpha=0.001 / 9.0, beta=0.75, k=1.0),
        nn.Conv2d(64, 64, 5, padding=2), nn.ReLU(),
        nn.LocalResponseNorm(4, alpha=0.001 / 9.0, beta=0.75, k=1.0),
        nn.MaxPool2d(3, 2, padding=1),
        nn.Flatten(),
        *_mlp([6 * 6 * 64, 384, 192, num_classes]),
    )


def alexnet_bn(num_classes: int = 1000) -> nn.Sequential:
    """AlexNet with batch norm; FC6-8 are 16384 → 4096 → 4096 → classes as in the paper.

    The paper's FC6 input is 16384 = 256·8·8, so the conv features are pooled to 8x8 (the
    torchvision AlexNet pools to 6x6 = 9216).
    """
    def conv(cin: int, cout: int, k: int, s: int = 1, p: int = 0) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, k, s, p, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

    return nn.Sequential(
        *conv(3, 64, 11, 4, 2), nn.MaxPool2d(3, 2),
        *conv(64, 192, 5, p=2), nn.MaxPool2d(3, 2),
        *conv(192, 384, 3, p=1), *conv(384, 256, 3, p=1), *conv(256, 256, 3, p=1), nn.MaxPool2d(3, 2),
        nn.AdaptiveAvgPool2d((8, 8)), nn.Flatten(),
        *_mlp([256 * 8 * 8, 4096, 4096, num_classes], dropout=0.5),
    )


MODELS: dict[str, Callable[..., nn.Module]] = {
    "lenet300": lenet300,
    "deep-mnist": deep_mnist,
    "tf-cifar10": tf_cifar10,
    "alexnet-bn": alexnet_bn,
    # AlexNet's FC layers alone on 16384-d inputs: throughput runs on fake data.
    "alexnet-fc": lambda num_classes=1000: fc_stack([16384, 4096, 4096, num_classes]),
}

INPUT_SHAPES: dict[str, tuple[int, ...]] = {
    "lenet300": (1, 28, 28),
    "deep-mnist": (1, 28, 28),
    "tf-cifar10": (3, 24, 24),
    "alexnet-bn": (3, 224, 224),
    "alexnet-fc": (16384,),
}
MODEL_CLASSES = {"lenet300": 10, "deep-mnist": 10, "tf-cifar10": 10, "alexnet-bn": 1000, "alexnet-fc": 1000}


def build_model(name: str, num_classes: int | None = None) -> nn.Module:
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; choose from {sorted(MODELS)}")
    return MODELS[name]() if num_classes is None else MODELS[name](num_classes)


def fc_weight_count(model: nn.Module) -> int:
    """Weights (not biases) of all linear layers: the quantity the paper's Table 1 reports."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))


def fc_weights_kept(model: nn.Module) -> int:
    """Weights of all fully connected layers that the compression keeps (padding not counted),
    whether they are dense, masked or packed."""
    from .nn import BlockDiagonalLinear, MPDLinear

    return sum(
        m.mpd_mask.layout.nnz if isinstance(m, (MPDLinear, BlockDiagonalLinear)) else m.weight.numel()
        for m in model.modules() if isinstance(m, (nn.Linear, BlockDiagonalLinear))
    )


# How the paper compresses each model: the factor and whether the final classifier stays dense.
# LeNet-300-100: "784x300 and 300x100 random binary masks applied to the first and second
# layers" (§3.1); TF CIFAR-10: Table 1 counts local3/local4 only; Deep MNIST and AlexNet: all FC
# layers (AlexNet "FC6, FC7, and FC8", §3.2).
PAPER_SETUPS: dict[str, dict[str, object]] = {
    "lenet300": {"compression": 10, "keep_classifier_dense": True},
    "deep-mnist": {"compression": 10, "keep_classifier_dense": False},
    "tf-cifar10": {"compression": 10, "keep_classifier_dense": True},
    "alexnet-bn": {"compression": 8, "keep_classifier_dense": False},
    "alexnet-fc": {"compression": 8, "keep_classifier_dense": False},
}


def classifier_name(model: nn.Module) -> str:
    """Qualified name of the last ``nn.Linear`` in ``model`` (its classifier)."""
    names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise ValueError("model has no nn.Linear layer")
    return names[-1]


def paper_filter(model: nn.Module, model_name: str) -> Callable[[str, nn.Module], bool]:
    """The ``mpdify`` filter that compresses the layers the paper compressed."""
    keep = PAPER_SETUPS[model_name]["keep_classifier_dense"]
    last = classifier_name(model)
    return lambda name, module: not (keep and name == last)
