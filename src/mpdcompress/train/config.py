"""What a training run is: :class:`TrainConfig` and the named recipes that fill it in."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from ..core.config import INITS, MODES, check_choice
from ..core.quantize import QuantConfig
from ..errors import CheckpointError, ConfigError, UnknownNameError
from ..models import model_spec

__all__ = ["TrainConfig", "Recipe", "RECIPES", "recipe_for_model", "CheckpointError"]


@dataclass(frozen=True)
class Recipe:
    """Hyper-parameters of one published training setup, and where they come from."""

    model: str
    dataset: str
    compression: int
    batch_size: int  # global: summed over all processes and accumulation steps
    lr: float
    optimizer: str
    epochs: int  # of the dense model
    compressed_epoch_factor: int = 1  # the paper trains compressed AlexNet twice as long
    momentum: float = 0.9
    weight_decay: float = 0.0
    lr_step_epochs: int | None = None  # divide lr by 10 every this many epochs
    source: str = ""


# The paper's recipe where it gives one, otherwise the tutorial the model comes from. The paper
# does not name an optimizer for the MNIST models; Adam is used there.
RECIPES: dict[str, Recipe] = {
    "lenet300-mnist": Recipe(
        "lenet300",
        "mnist",
        10,
        batch_size=50,
        lr=1e-3,
        optimizer="adam",
        epochs=20,
        source="paper §3.1: batch 50, lr 1e-3; 20 epochs chosen here",
    ),
    "deep-mnist": Recipe(
        "deep-mnist",
        "mnist",
        10,
        batch_size=50,
        lr=1e-4,
        optimizer="adam",
        epochs=10,
        source="TensorFlow 'Deep MNIST for experts': Adam 1e-4, batch 50; 10 epochs here instead of 20k steps",
    ),
    "tf-cifar10": Recipe(
        "tf-cifar10",
        "cifar10",
        10,
        batch_size=128,
        lr=0.1,
        optimizer="sgd",
        momentum=0.0,
        weight_decay=4e-3,
        epochs=256,
        lr_step_epochs=350,
        source="TensorFlow CIFAR-10 tutorial: plain SGD lr 0.1 (x0.1 every 350 epochs), batch 128, L2 4e-3 "
        "(there on local3/local4 only, here on every parameter), ~86 % after 100k steps = 256 epochs",
    ),
    "tf-cifar10-fashion": Recipe(
        "tf-cifar10-gray",
        "fashion-mnist",
        10,
        batch_size=64,
        lr=1e-3,
        optimizer="adam",
        epochs=10,
        source="chosen here: the tutorial's plain SGD needs hundreds of epochs; Adam 1e-3 reaches ~78 % "
        "dense / ~75 % MPD c = 4 on Fashion-MNIST after 6,000 images where that SGD reaches ~60 % / ~35 %",
    ),
    "alexnet-bn-imagenet": Recipe(
        "alexnet-bn",
        "imagenet",
        8,
        batch_size=512,
        lr=3e-2,
        optimizer="sgd",
        momentum=0.9,
        weight_decay=5e-4,
        epochs=100,
        compressed_epoch_factor=2,
        lr_step_epochs=30,
        source="paper §3.2: batch 512, lr 3e-2 divided by 10 every 30 epochs, 100 epochs dense and twice that "
        "compressed; momentum 0.9 and weight decay 5e-4 are the usual AlexNet values (not stated)",
    ),
}


def recipe_for_model(model: str) -> Recipe | None:
    """The recipe ``model`` trains with when none is named (its registry entry says which)."""
    name = model_spec(model).recipe
    return RECIPES[name] if name else None


PRECISIONS = ("fp32", "bf16")  # bf16: autocast on CPU and CUDA


@dataclass
class TrainConfig:
    """Everything one ``mpdcompress train`` run needs: model, data, compression, optimizer, schedule, devices."""

    model: str = "lenet300"
    dataset: str = "mnist"  # or "fake": random images of the model's input shape
    compression: int | None = 10  # None: the dense baseline
    permute: bool = True
    compress_convs: bool = False  # also every convolution but those mpdify_'s rules skip (the image-reading one)
    shared_streams: bool = False  # one channel order per residual stream (MPDConfig.shared_streams)
    width: float = 1.0  # every inner width of the model times this (a thin dense baseline: < 1)
    mode: str = "masked"  # or "compact": train the packed block-diagonal form directly
    init: str = "block"  # training from scratch; "dense" keeps nn.Linear's initialization (see mpdify_)
    qat: str | None = None  # compact mode: train with the blocks rounded as this format stores them
    seed: int = 0  # initialization and data order
    mask_seed: int | None = None  # masks; defaults to seed
    epochs: int | None = None
    batch_size: int | None = None  # global batch per optimizer step, over all processes
    micro_batch: int | None = None  # per process and forward; smaller than batch/world → gradient accumulation
    lr: float | None = None
    optimizer: str | None = None
    momentum: float | None = None
    weight_decay: float | None = None
    lr_step_epochs: int | None = None
    precision: str = "fp32"  # or "bf16": autocast on CPU and CUDA
    compile: bool = False
    train_limit: int | None = None  # use only the first N training images (quick runs, tests)
    checkpoint_every: int | None = None  # also checkpoint every N optimizer steps inside an epoch
    workers: int = 4  # data-loading processes per rank, for datasets read from image files
    device: str = "cpu"
    data_root: str | None = None

    def resolved(self) -> "TrainConfig":
        """A copy with the model's recipe filled in where this config leaves values open."""
        check_choice("precision", self.precision, PRECISIONS)
        check_choice("mode", self.mode, MODES)
        check_choice("init", self.init, INITS)
        if not (isinstance(self.width, (int, float)) and 0 < self.width <= 16):
            raise ConfigError(f"width must be a number in (0, 16], got {self.width!r}")
        if self.shared_streams and not (self.compression and self.compress_convs):
            raise ConfigError(
                "shared_streams orders the compressed convolutions: it needs a compression and compress_convs"
            )
        if self.qat is not None and (self.mode != "compact" or not self.compression):
            raise ConfigError(
                "quantization-aware training (qat) trains the packed blocks: it needs a compression and mode 'compact'"
            )
        recipe = recipe_for_model(self.model)
        values = asdict(self)
        if recipe is not None:
            factor = recipe.compressed_epoch_factor if self.compression else 1
            defaults = {
                "epochs": recipe.epochs * factor,
                "batch_size": recipe.batch_size,
                "lr": recipe.lr,
                "optimizer": recipe.optimizer,
                "momentum": recipe.momentum,
                "weight_decay": recipe.weight_decay,
                "lr_step_epochs": recipe.lr_step_epochs,
            }
            for key, value in defaults.items():
                if values[key] is None:
                    values[key] = value
        missing = [k for k in ("epochs", "batch_size", "lr", "optimizer") if values[k] is None]
        if missing:
            raise ConfigError(f"model {self.model!r} has no recipe; give {', '.join(missing)}")
        values["momentum"] = 0.9 if values["momentum"] is None else values["momentum"]
        values["weight_decay"] = values["weight_decay"] or 0.0
        if values["mask_seed"] is None:
            values["mask_seed"] = self.seed
        if self.qat is not None:  # one name per format, so a resumed run compares alike
            values["qat"] = QuantConfig.parse(self.qat).describe()
        return TrainConfig(**values)

    @classmethod
    def from_recipe(cls, name: str, **overrides: Any) -> "TrainConfig":
        """The config of a named recipe; ``overrides`` that are not None replace its values
        (``compression=0`` asks for the dense baseline)."""
        if name not in RECIPES:
            raise UnknownNameError(f"unknown recipe {name!r}; choose from {sorted(RECIPES)}")
        recipe = RECIPES[name]
        base = {"model": recipe.model, "dataset": recipe.dataset, "compression": recipe.compression}
        base.update({k: v for k, v in overrides.items() if v is not None})
        if base["compression"] == 0:
            base["compression"] = None
        return cls(**base)


# Fields that may differ between an interrupted run and the resumed one: where and how it runs,
# not what it computes.
RESUMABLE_DIFFERENCES = ("epochs", "device", "data_root", "micro_batch", "compile", "workers", "checkpoint_every")


# Fields added after checkpoints were first written, with the value older runs had.
LATER_FIELDS = {"shared_streams": False}


def comparable(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in {**LATER_FIELDS, **config}.items() if k not in RESUMABLE_DIFFERENCES}
