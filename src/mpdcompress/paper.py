"""The numbers Supic et al. (2018) report: what reproductions and summaries compare against.

Every figure of the paper used anywhere in mpdcompress is written here once.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "PaperRow",
    "TABLE1",
    "MASK_STUDY_FLOOR",
    "NON_PERMUTED_ACCURACY",
    "ALEXNET_TOP1_BY_FACTOR",
    "MASK_SUM_MEAN",
    "GPU_SPEEDUP_CLAIM",
    "DeepCompressionRow",
    "DEEP_COMPRESSION",
]


@dataclass(frozen=True)
class PaperRow:
    """One row of Table 1: FC weights dense → MPD, and test accuracy (%) dense / MPD (top-1)."""

    dataset: str
    compression: int
    fc_weights: tuple[int, int]
    accuracy: tuple[float, float]
    keep_classifier_dense: bool  # how the paper compressed the model's last layer


# LeNet-300-100: "784x300 and 300x100 random binary masks applied to the first and second
# layers" (§3.1); TF CIFAR-10: Table 1 counts local3/local4 only; Deep MNIST and AlexNet: all FC
# layers (AlexNet "FC6, FC7, and FC8", §3.2). LeNet's MPD accuracy is the minimum over 100 masks.
TABLE1: dict[str, PaperRow] = {
    "lenet300": PaperRow("mnist", 10, (272_000, 27_200), (98.16, 97.3), keep_classifier_dense=True),
    "deep-mnist": PaperRow("mnist", 10, (3_220_000, 322_000), (99.3, 99.3), keep_classifier_dense=False),
    "tf-cifar10": PaperRow("cifar10", 10, (958_400, 95_840), (86.0, 85.2), keep_classifier_dense=True),
    "alexnet-bn": PaperRow("imagenet", 8, (87_980_000, 11_000_000), (57.1, 56.4), keep_classifier_dense=False),
}

MASK_STUDY_FLOOR = 97.3  # every one of 100 LeNet masks at 10x stayed above this (Fig. 4)
MASK_SUM_MEAN = 10  # the sum of 100 masks at 10x averages 10 per weight (masks spread evenly)
NON_PERMUTED_ACCURACY = {10: 80.2, 5: 85.97}  # LeNet with plain block-diagonal masks, by factor
ALEXNET_TOP1_BY_FACTOR = {16: 52.7, 8: 56.4, 4: 56.8}
GPU_SPEEDUP_CLAIM = 4.0  # "over 4x faster on several mobile GPUs"


@dataclass(frozen=True)
class DeepCompressionRow:
    """One row of Deep Compression's Table 1 (pruning + quantization + Huffman coding)."""

    dense_bytes: int
    compressed_bytes: int
    ratio: float
    top1_error: tuple[float, float] | None  # % dense, compressed (None: not quoted here)


# The yardstick of pruning + quantization the paper positions itself against (its §2): Han, Mao
# and Dally, "Deep Compression", ICLR 2016, Table 1. Its sparse result needs special kernels or
# hardware to run fast, which MPD's dense blocks do not.
DEEP_COMPRESSION: dict[str, DeepCompressionRow] = {
    "lenet300": DeepCompressionRow(1_070_000, 27_000, 40.0, (1.64, 1.58)),
    "alexnet": DeepCompressionRow(240_000_000, 6_900_000, 35.0, None),
}
