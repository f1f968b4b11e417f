"""Folding BatchNorm into the convolution before it: the same function in eval mode, for dense,
masked and packed models (BatchNorms inside packed chains included), padding kept zero so that
model files still load, and refusals where folding would change the model."""

import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import mpdcompress as mpd
from mpdcompress.errors import CompressionError
from mpdcompress.models import build_model

from .helpers import assert_close_to_scale
from .test_convs import conv_stacks


def _trained_statistics(model: nn.Module) -> nn.Module:
    """BatchNorms with the running statistics and affine parameters of a trained model."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.running_mean is not None:
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            if module.affine:
                nn.init.uniform_(module.weight, 0.5, 2.0)
                nn.init.uniform_(module.bias, -1.0, 1.0)
    return model.eval()


def _norms(model: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@given(conv_stacks(), st.integers(0, 1000), st.booleans())
def test_folded_models_compute_what_they_computed_dense_masked_and_packed(stack, seed, fold_dense):
    dims, channels, modules, factors = stack
    torch.manual_seed(seed)
    dense = _trained_statistics(nn.Sequential(*modules))
    x = torch.randn(3, channels, *[9] * dims)
    forms = {"dense": dense}
    if factors:
        forms["masked"] = mpd.mpdify_(copy.deepcopy(dense), factors, seed=seed)
        forms["packed"] = mpd.pack(copy.deepcopy(forms["masked"]), fold_dense=fold_dense).eval()
    for name, model in forms.items():
        with torch.no_grad():
            expected = model(x)
            folded = mpd.fold_batchnorm_(model)
            assert_close_to_scale(folded(x), expected, 1e-5)


def test_a_packed_resnet_folds_every_batchnorm_but_the_stem_s_and_still_saves_loads_and_unpacks(tmp_path):
    torch.manual_seed(0)
    dense = _trained_statistics(build_model("resnet18-cifar"))
    mpd.mpdify_(dense, 8, convs=True, seed=0)
    packed = mpd.pack(dense).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = packed(x)
        mpd.fold_batchnorm_(packed)
        assert _norms(packed) == 0  # the stem's dense conv folds too; every chain's BatchNorms fold
        assert_close_to_scale(packed(x), expected, 1e-5)
        channels_last = copy.deepcopy(packed).to(memory_format=torch.channels_last)
        assert_close_to_scale(channels_last(x.to(memory_format=torch.channels_last)), expected, 1e-5)
        loaded = mpd.load(mpd.save(packed, tmp_path / "folded.safetensors", input_shape=(3, 32, 32)))
        assert torch.equal(loaded(x), packed(x))
        assert_close_to_scale(mpd.unpack(copy.deepcopy(packed))(x), expected, 1e-5)


def test_uneven_packed_layers_keep_zero_padding_and_load():
    torch.manual_seed(1)
    model = _trained_statistics(
        nn.Sequential(
            nn.Conv2d(5, 11, 3, padding=1), nn.BatchNorm2d(11), nn.ReLU(), nn.Conv2d(11, 7, 1), nn.BatchNorm2d(7)
        )
    )
    mpd.mpdify_(model, {"0": 3, "3": 3}, seed=0)
    packed = mpd.pack(model, fold_dense=False).eval()
    mpd.fold_batchnorm_(packed)
    layers = [m for m in packed.modules() if isinstance(m, mpd.BlockDiagonalConv)]
    assert len(layers) == 2
    for layer in layers:
        rows = torch.ones(layer.bias.numel(), dtype=torch.bool)
        rows[layer.out_gather] = False
        assert layer.bias[rows].abs().max() == 0  # padding rows: still nothing
        # the layer's own check of its weights and padding, as load_state_dict runs it
        layer.load_state_dict(layer.state_dict())


def _assert_left_alone(model: nn.Module, x: torch.Tensor, norms: int) -> None:
    """Folding leaves ``norms`` BatchNorms in ``model`` and its output bit for bit."""
    with torch.no_grad():
        expected = model(x)
        mpd.fold_batchnorm_(model)
        assert _norms(model) == norms
        assert torch.equal(model(x), expected)


def test_what_cannot_fold_is_left_and_training_mode_is_refused():
    torch.manual_seed(2)
    model = _trained_statistics(
        nn.Sequential(
            nn.Conv2d(4, 8, 3),
            nn.BatchNorm2d(8, track_running_stats=False),  # batch statistics even in eval mode
            nn.Conv2d(8, 8, 1),
            nn.ReLU(),
            nn.BatchNorm2d(8),  # after an activation
            nn.Flatten(),
            nn.Linear(8 * 4, 6),
            nn.BatchNorm1d(6),  # a linear layer's features are not always BatchNorm1d's channels
        )
    )
    _assert_left_alone(model, torch.randn(3, 4, 4, 4), norms=3)
    with pytest.raises(CompressionError, match=r"the BatchNorm '1' is in training mode: call model.eval\(\) first"):
        mpd.fold_batchnorm_(model.train())


def test_quantized_packed_convs_keep_their_batchnorm():
    pytest.importorskip("torchao")
    torch.manual_seed(3)
    model = _trained_statistics(
        nn.Sequential(
            nn.Conv2d(8, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1),
            nn.BatchNorm2d(8),
        )
    )
    mpd.mpdify_(model, 2, convs=True, seed=0)
    packed = mpd.quantize_(mpd.pack(model, fold_dense=False).eval(), "int8")
    _assert_left_alone(packed, torch.randn(2, 8, 6, 6), norms=2)


def test_the_pack_command_folds_batchnorm_when_asked(tmp_path, capsys):
    from mpdcompress.cli.main import main

    torch.manual_seed(4)
    model = _trained_statistics(
        nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 12, 3), nn.BatchNorm2d(12)
        )
    )
    masked = mpd.mpdify_(model, 2, convs=True, seed=0)
    mpd.save(masked, tmp_path / "masked.safetensors", input_shape=(3, 8, 8))
    assert main(["pack", str(tmp_path / "masked.safetensors"), "-o", str(tmp_path / "packed.safetensors")]) == 0
    assert (
        main(
            [
                "pack",
                str(tmp_path / "masked.safetensors"),
                "-o",
                str(tmp_path / "folded.safetensors"),
                "--fold-batchnorm",
            ]
        )
        == 0
    )
    assert "folded 2 of 2 BatchNorm layers" in capsys.readouterr().out
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        folded = mpd.load(tmp_path / "folded.safetensors").eval()
        assert _norms(folded) == 0 and _norms(mpd.load(tmp_path / "packed.safetensors")) == 2
        assert_close_to_scale(folded(x), masked.eval()(x), 1e-5)
