"""The paper's models, with the FC shapes of its Table 1.

FC weight counts (no biases): LeNet-300-100 266,200 (paper: 272k); Deep MNIST 3,221,504 (3.22M);
TF CIFAR-10 local3+local4 958,464 (958.4k; the 192→10 softmax layer is not counted there);
AlexNet-BN FC6-8 87,982,080 (87.98M).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

from torch import nn

from .errors import CompressionError, UnknownNameError
from .nn.conv_chain import conv_like
from .nn.residual import Residual
from .paper import TABLE1, PaperRow

__all__ = [
    "ModelSpec",
    "MODELS",
    "model_spec",
    "paper_filter",
    "classifier_name",
    "build_model",
    "fc_weights_kept",
    "lenet300",
    "deep_mnist",
    "tf_cifar10",
    "alexnet_bn",
    "fc_stack",
    "resnet18_cifar",
    "scale_widths",
    "vgg11_cifar",
    "fc_weight_count",
]


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
        nn.Conv2d(1, 32, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(7 * 7 * 64, 1024),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.Linear(1024, num_classes),
    )


def tf_cifar10(num_classes: int = 10, in_channels: int = 3, image_size: int = 24) -> nn.Sequential:
    """TensorFlow's CIFAR-10 tutorial model on 24x24 crops: FC 2304 → 384 → 192 → classes.

    Local response normalization follows the tutorial (size 4, alpha 0.001/9, beta 0.75).
    ``in_channels`` and ``image_size`` fit the same layers to other images (each pool halves the
    side, rounding up), e.g. 1 and 28 for Fashion-MNIST: FC 3136 → 384 → 192 → classes.
    """
    side = -(-image_size // 4)
    return nn.Sequential(
        nn.Conv2d(in_channels, 64, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(3, 2, padding=1),
        nn.LocalResponseNorm(4, alpha=0.001 / 9.0, beta=0.75, k=1.0),
        nn.Conv2d(64, 64, 5, padding=2),
        nn.ReLU(),
        nn.LocalResponseNorm(4, alpha=0.001 / 9.0, beta=0.75, k=1.0),
        nn.MaxPool2d(3, 2, padding=1),
        nn.Flatten(),
        *_mlp([side * side * 64, 384, 192, num_classes]),
    )


def alexnet_bn(num_classes: int = 1000) -> nn.Sequential:
    """AlexNet with batch norm; FC6-8 are 16384 → 4096 → 4096 → classes as in the paper.

    The paper's FC6 input is 16384 = 256·8·8, so the conv features are pooled to 8x8 (the
    torchvision AlexNet pools to 6x6 = 9216).
    """

    def conv(cin: int, cout: int, k: int, s: int = 1, p: int = 0) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, k, s, p, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

    return nn.Sequential(
        *conv(3, 64, 11, 4, 2),
        nn.MaxPool2d(3, 2),
        *conv(64, 192, 5, p=2),
        nn.MaxPool2d(3, 2),
        *conv(192, 384, 3, p=1),
        *conv(384, 256, 3, p=1),
        *conv(256, 256, 3, p=1),
        nn.MaxPool2d(3, 2),
        nn.AdaptiveAvgPool2d((8, 8)),
        nn.Flatten(),
        *_mlp([256 * 8 * 8, 4096, 4096, num_classes], dropout=0.5),
    )


def _conv_bn(cin: int, cout: int, k: int = 3, s: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, s, k // 2, bias=False), nn.BatchNorm2d(cout)]


def resnet18_cifar(num_classes: int = 10) -> nn.Sequential:
    """ResNet-18 as used on 32x32 images (3x3 stem, no max pool): 4 stages of 2 basic blocks,
    64-128-256-512 channels, 1x1-conv shortcuts where the shape changes."""
    layers: list[nn.Module] = [*_conv_bn(3, 64), nn.ReLU()]
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        for s in (stride, 1):
            body = nn.Sequential(*_conv_bn(cin, cout, 3, s), nn.ReLU(), *_conv_bn(cout, cout))
            shortcut = nn.Sequential(*_conv_bn(cin, cout, 1, s)) if (s, cin) != (1, cout) else None
            layers += [Residual(body, shortcut), nn.ReLU()]
            cin = cout
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, num_classes))


def vgg11_cifar(num_classes: int = 10) -> nn.Sequential:
    """VGG-11 with batch norm as used on 32x32 images: 8 convs (64-128-256-256-512-512-512-512)
    and one linear classifier."""
    layers: list[nn.Module] = []
    cin = 3
    for width in (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"):
        if width == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers += [*_conv_bn(cin, width), nn.ReLU()]
            cin = width
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(512, num_classes))


@dataclass(frozen=True)
class ModelSpec:
    """Everything mpdcompress knows about a named model; adding a model is adding one of these."""

    name: str
    build: Callable[..., nn.Module]  # build(num_classes) → a fresh dense model
    input_shape: tuple[int, ...]  # one example, without the batch dimension
    num_classes: int
    compression: int  # the factor it is compressed with by default (the paper's for paper models)
    keep_classifier_dense: bool  # whether its last nn.Linear stays dense, as the paper did
    dataset: str  # what `mpdcompress train` trains it on by default ("fake": random inputs)
    recipe: str | None  # the training recipe it uses by default (see mpdcompress.train.RECIPES)
    fc_only: bool  # only Linear and element-wise layers (benchmarks run it at large batches)
    description: str

    @property
    def paper(self) -> PaperRow | None:
        """Its row of the paper's Table 1, if the paper has one."""
        return TABLE1.get(self.name)


def _paper_spec(
    name: str,
    build: Callable[..., nn.Module],
    input_shape: tuple[int, ...],
    num_classes: int,
    recipe: str,
    fc_only: bool,
    description: str,
) -> ModelSpec:
    row = TABLE1[name]
    return ModelSpec(
        name,
        build,
        input_shape,
        num_classes,
        row.compression,
        row.keep_classifier_dense,
        row.dataset,
        recipe,
        fc_only,
        description,
    )


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        _paper_spec("lenet300", lenet300, (1, 28, 28), 10, "lenet300-mnist", True, "LeNet-300-100, 784-300-100-10"),
        _paper_spec(
            "deep-mnist", deep_mnist, (1, 28, 28), 10, "deep-mnist", False, "TF Deep MNIST CNN, FC 3136-1024-10"
        ),
        _paper_spec(
            "tf-cifar10",
            tf_cifar10,
            (3, 24, 24),
            10,
            "tf-cifar10",
            False,
            "TF CIFAR-10 tutorial CNN, FC 2304-384-192-10",
        ),
        ModelSpec(
            "tf-cifar10-gray",
            lambda num_classes=10: tf_cifar10(num_classes, in_channels=1, image_size=28),
            (1, 28, 28),
            10,
            compression=10,
            keep_classifier_dense=True,
            dataset="fashion-mnist",
            recipe="tf-cifar10-fashion",
            fc_only=False,
            description="the TF CIFAR-10 CNN on 28x28 grey images (Fashion-MNIST), FC 3136-384-192-10",
        ),
        _paper_spec(
            "alexnet-bn",
            alexnet_bn,
            (3, 224, 224),
            1000,
            "alexnet-bn-imagenet",
            False,
            "AlexNet with batch norm, FC 16384-4096-4096-1000",
        ),
        ModelSpec(
            "alexnet-fc",
            lambda num_classes=1000: fc_stack([16384, 4096, 4096, num_classes]),
            (16384,),
            1000,
            compression=8,
            keep_classifier_dense=False,
            dataset="fake",
            recipe="alexnet-bn-imagenet",
            fc_only=True,
            description="AlexNet's FC stack alone on 16384-d inputs (throughput runs on fake data)",
        ),
        ModelSpec(
            "transformer-mlp",
            lambda num_classes=768: fc_stack([768, 3072, num_classes]),
            (768,),
            768,
            compression=8,
            keep_classifier_dense=False,
            dataset="fake",
            recipe=None,
            fc_only=True,
            description="a BERT-base MLP block, 768-3072-768",
        ),
        ModelSpec(
            "resnet18-cifar",
            resnet18_cifar,
            (3, 32, 32),
            10,
            compression=4,
            keep_classifier_dense=True,
            dataset="cifar10",
            recipe=None,
            fc_only=False,
            description="ResNet-18 for 32x32 images, 11.2M weights almost all in convolutions",
        ),
        ModelSpec(
            "vgg11-cifar",
            vgg11_cifar,
            (3, 32, 32),
            10,
            compression=4,
            keep_classifier_dense=True,
            dataset="cifar10",
            recipe=None,
            fc_only=False,
            description="VGG-11 with batch norm for 32x32 images, 9.2M weights in 8 convolutions",
        ),
    )
}


def model_spec(name: str) -> ModelSpec:
    """The registered model called ``name``; UnknownNameError lists the registered names."""
    if name not in MODELS:
        raise UnknownNameError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    return MODELS[name]


def build_model(name: str, num_classes: int | None = None) -> nn.Module:
    """A fresh model of the registry, with ``num_classes`` outputs if given."""
    spec = model_spec(name)
    return spec.build() if num_classes is None else spec.build(num_classes)


def fc_weight_count(model: nn.Module) -> int:
    """Weights (not biases) of all linear layers: the quantity the paper's Table 1 reports."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))


def fc_weights_kept(model: nn.Module) -> int:
    """Weights of all fully connected layers that the compression keeps (padding not counted),
    whether they are dense, masked or packed."""
    from .nn import BlockDiagonalLinear, MPDLinear

    return sum(
        m.mpd_mask.layout.nnz if isinstance(m, (MPDLinear, BlockDiagonalLinear)) else m.weight.numel()
        for m in model.modules()
        if isinstance(m, (nn.Linear, BlockDiagonalLinear))
    )


def classifier_name(model: nn.Module) -> str:
    """Qualified name of the last ``nn.Linear`` in ``model`` (its classifier)."""
    names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise CompressionError("model has no nn.Linear layer")
    return names[-1]


def paper_filter(model: nn.Module, model_name: str) -> Callable[[nn.Module, str], bool]:
    """The ``filter_fn(module, name)`` of :func:`~mpdcompress.mpdify_` that compresses the layers
    the paper compressed (the registry's ``keep_classifier_dense``)."""
    keep = model_spec(model_name).keep_classifier_dense
    last = classifier_name(model)
    return lambda module, name: not (keep and name == last)


def scale_widths(model: nn.Module, scale: float) -> nn.Module:
    """A fresh copy of ``model`` (a Sequential of convolutions, linears, norms, Residuals and
    parameter-free modules) with every inner width, channels and hidden features, times
    ``scale`` (rounded, at least 1): the thinner (or wider) dense network of the same shape.
    The input channels and the classifier's outputs stay; new weights are freshly initialized."""
    first_conv = next((m for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d))), None)
    input_channels = None if first_conv is None else first_conv.in_channels
    classifier = dict(model.named_modules())[classifier_name(model)]

    def width(n: int) -> int:
        return max(1, round(n * scale))

    state: dict[str, int | None] = {"channels": None, "flat_from": None}

    def conv(module: nn.Module) -> nn.Module:
        if module.groups != 1:
            raise CompressionError("scale_widths rescales ungrouped convolutions only")
        first = state["channels"] is None and module.in_channels == input_channels
        state["channels"], state["flat_from"] = module.out_channels, None
        return conv_like(module, module.in_channels if first else width(module.in_channels), width(module.out_channels))

    def linear(module: nn.Linear) -> nn.Linear:
        if state["flat_from"]:
            c = state["flat_from"]
            d_in = width(c) * (module.in_features // c)
        else:
            d_in = width(module.in_features) if state["channels"] is not None else module.in_features
        d_out = module.out_features if module is classifier else width(module.out_features)
        state["channels"], state["flat_from"] = module.out_features, None
        return nn.Linear(d_in, d_out, bias=module.bias is not None)

    def residual(module: Residual) -> Residual:
        entry = dict(state)
        body = rebuild(module.body)
        after = dict(state)
        state.update(entry)
        shortcut = module._modules.get("shortcut")
        shortcut = None if shortcut is None else rebuild(shortcut)
        state.update(after)
        return Residual(body, shortcut)

    def rebuild(module: nn.Module) -> nn.Module:
        if isinstance(module, nn.Sequential):
            return nn.Sequential(*[rebuild(child) for child in module])
        if isinstance(module, Residual):
            return residual(module)
        if type(module) in (nn.Conv1d, nn.Conv2d):
            return conv(module)
        if type(module) is nn.Linear:
            return linear(module)
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            return type(module)(width(module.num_features))
        if isinstance(module, nn.Flatten):
            state["flat_from"] = state["channels"]
        return copy.deepcopy(module)

    return rebuild(model)
