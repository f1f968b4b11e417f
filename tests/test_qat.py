"""fake_quantize_: packed models that train with their blocks rounded as quantize_ stores them,
so that conversion changes nothing and int4 costs less than rounding after training."""

import copy

import pytest
import torch
from torch import nn

import mpdcompress as mpd
from mpdcompress.core.qat import fake_quantized_layers
from mpdcompress.core.quantize import quantized_layers
from mpdcompress.errors import CompressionError

from .test_quantize import CONFIGS, _cnn, _mlp

pytest.importorskip("torchao")


@pytest.mark.parametrize("config", CONFIGS[:4])
@pytest.mark.parametrize("make,shape", [(_mlp, (5, 70)), (_cnn, (2, 3, 6, 6))])
def test_a_prepared_model_computes_exactly_what_quantize_then_stores(make, shape, config):
    model = mpd.fake_quantize_(make(), config)
    assert len(fake_quantized_layers(model)) >= 2
    x = torch.randn(*shape)
    quantized = mpd.quantize_(copy.deepcopy(model), config)
    assert len(quantized_layers(quantized)) == len(fake_quantized_layers(model))
    assert not fake_quantized_layers(quantized)
    with torch.no_grad():
        expected = quantized(x)
        assert torch.equal(model(x), expected)
        assert not torch.equal(make()(x), expected)  # the rounding is there
    # With autograd on, the same blocks (the GEMMs may run another way: no out= arguments).
    torch.testing.assert_close(model(x), expected, rtol=1e-6, atol=1e-7)


def test_gradients_pass_the_rounding_unchanged_to_the_float_blocks():
    model = mpd.fake_quantize_(_mlp(), "int4")
    rounded = mpd.dequantize(mpd.quantize_(copy.deepcopy(model), "int4"))  # float blocks = the rounded ones
    x = torch.randn(8, 70)
    model(x).square().sum().backward()
    rounded(x).square().sum().backward()
    layers = [m for m in model.modules() if isinstance(m, mpd.BlockDiagonalLinear)]
    twins = [m for m in rounded.modules() if isinstance(m, mpd.BlockDiagonalLinear)]
    for layer, twin in zip(layers, twins, strict=True):
        torch.testing.assert_close(layer.weight_blocks.grad, twin.weight_blocks.grad)
    # Padding stays out of training: its gradient is zero (the blocks of 45 rows are uneven).
    uneven = [m for m in layers if m.padding_mask is not None]
    assert uneven and all(not m.weight_blocks.grad.masked_select(~m.padding_mask).any() for m in uneven)


@pytest.mark.parametrize("seed", [0, 1])
def test_quantization_aware_steps_lower_the_loss_that_rounding_left(seed):
    torch.manual_seed(seed)
    teacher = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 16))
    x = torch.randn(512, 64)
    with torch.no_grad():
        target = teacher(x)
    student = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 16))
    mpd.mpdify_(student, 2, seed=seed)
    packed = mpd.pack(student)
    opt = torch.optim.Adam(packed.parameters(), lr=3e-3)
    for _ in range(300):
        opt.zero_grad()
        nn.functional.mse_loss(packed(x), target).backward()
        opt.step()

    def quantized_loss(model: nn.Module) -> float:
        with torch.no_grad():
            return nn.functional.mse_loss(mpd.quantize_(copy.deepcopy(model), "int4-g32")(x), target).item()

    aware = mpd.fake_quantize_(copy.deepcopy(packed), "int4-g32")
    opt = torch.optim.SGD(aware.parameters(), lr=0.05)
    for _ in range(100):
        opt.zero_grad()
        nn.functional.mse_loss(aware(x), target).backward()
        opt.step()
    # Measured 0.95-0.98 of the rounded model's loss over six seeds.
    assert quantized_loss(aware) < 0.99 * quantized_loss(packed)


def test_quantizing_with_another_config_than_the_one_trained_for_is_refused():
    model = mpd.fake_quantize_(_mlp(), "int4")
    with pytest.raises(CompressionError, match="trained quantization-aware for another format than int8"):
        mpd.quantize_(model, "int8")
    assert fake_quantized_layers(model) and not quantized_layers(model)  # nothing changed
    mpd.quantize_(model, "int4-g32")  # the same config, named differently


def test_what_cannot_be_prepared_is_refused():
    masked = nn.Sequential(nn.Linear(8, 8))
    mpd.mpdify_(masked, 2)
    with pytest.raises(CompressionError, match="call pack"):
        mpd.fake_quantize_(masked, "int4")
    with pytest.raises(CompressionError, match="no float packed layer"):
        mpd.fake_quantize_(nn.Sequential(nn.Linear(4, 4)), "int8")
    with pytest.raises(CompressionError, match="no float packed layer"):
        mpd.fake_quantize_(mpd.quantize_(_mlp(), "int8"))
    only_first = mpd.fake_quantize_(_mlp(), "int8", filter_fn=lambda m, name: name.endswith("layers.0"))
    assert list(fake_quantized_layers(only_first)) == ["0.layers.0"]


def test_the_triton_engine_trains_on_the_same_rounded_blocks():
    pytest.importorskip("triton")
    model = mpd.fake_quantize_(_mlp(), "int4-g32-asym")
    x = torch.randn(3, 70)
    with mpd.use_engine("triton"):
        got = model(x)
        got.square().sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    expected = model(x)
    expected.square().sum().backward()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    for grad, param in zip(grads, model.parameters(), strict=True):
        torch.testing.assert_close(grad, param.grad, rtol=1e-4, atol=1e-5)


def test_the_size_study_adds_quantization_aware_rows_for_4_bit_formats(data_dir, tmp_path):
    from mpdcompress.experiments.size_study import (
        SizeProfile,
        plot_size_study,
        render_size_study,
        run_size_study,
    )

    profile = SizeProfile(
        compressions=(4,),
        formats=("int8", "int4-g64"),
        epochs=1,
        train_limit=200,
        speed_compression=4,
        size_only=None,
        qat_steps=3,
    )
    results = run_size_study(profile)
    mpd_rows = {r["format"]: r for r in results["rows"] if r["model"] == "mpd c=4"}
    assert list(mpd_rows) == ["fp32", "int8", "int4-g64", "int4-g64 QAT"]  # no QAT row for int8
    assert mpd_rows["int4-g64 QAT"]["bytes"] == mpd_rows["int4-g64"]["bytes"]  # the same format, other values
    assert all(r["seed_bytes"] < r["bytes"] for r in mpd_rows.values())  # the random masks' orders left out
    assert all(0 <= r["accuracy"] <= 1 for r in results["rows"])
    report = render_size_study(results, "cmd")
    assert "| mpd c=4 | int4-g64 QAT |" in report and "distilled from its own fp32 form for 3 steps" in report
    assert plot_size_study(results, tmp_path / "plot.png").stat().st_size > 0


def test_the_trainer_trains_compact_blocks_quantization_aware_and_the_file_quantizes_to_the_same_model(
    data_dir, tmp_path, capsys
):
    from mpdcompress.cli.main import main
    from mpdcompress.errors import ConfigError
    from mpdcompress.train import train

    from .helpers import small_config

    with pytest.raises(ConfigError, match="needs a compression and mode 'compact'"):
        train(small_config(qat="int4"))
    with pytest.raises(ConfigError, match="unknown quantization"):
        train(small_config(mode="compact", qat="int3"))
    result = train(small_config(mode="compact", qat="int4", epochs=1))
    assert result.config["qat"] == "int4-g32" and fake_quantized_layers(result.model)
    saved = mpd.save(result.model, tmp_path / "packed.safetensors")
    quantized = mpd.quantize_(mpd.load(saved), "int4")
    x = torch.randn(7, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(quantized(x), result.model.eval()(x))  # the accuracy trained for is the one shipped

    out = tmp_path / "run"
    argv = ["train", "--dataset", "mnist", "--train-limit", "200", "--epochs", "1", "-c", "4"]
    assert main([*argv, "--mode", "compact", "--qat", "int4-g64", "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "blocks trained as int4-g64" in printed and "--format int4-g64" in printed
    assert (
        main(
            ["quantize", str(out / "packed.safetensors"), "-o", str(tmp_path / "q.safetensors"), "--format", "int4-g64"]
        )
        == 0
    )
    assert main([*argv, "--qat", "int4", "--out", str(tmp_path / "refused"), "--quiet"]) == 2
    assert "mode 'compact'" in capsys.readouterr().err


def test_a_packed_model_on_the_meta_device_is_refused_by_both_quantizers():
    model = mpd.mpdify_(nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4)), 2, mode="compact").to("meta")
    for quantizer in (mpd.quantize_, mpd.fake_quantize_):
        with pytest.raises(CompressionError, match="meta device"):
            quantizer(model, "int8")
    assert not fake_quantized_layers(model) and not quantized_layers(model)


def test_size_study_compresses_and_quantizes_the_convolutions_when_asked(data_dir):
    from mpdcompress.experiments.size_study import SizeProfile, render_size_study, run_size_study

    profiles = {
        convs: SizeProfile(
            model="deep-mnist",
            compressions=(4,),
            formats=("int4-g64",),
            epochs=1,
            train_limit=64,
            speed_compression=4,
            size_only=None,
            qat_steps=2,
            compress_convs=convs,
        )
        for convs in (False, True)
    }
    sizes = {}
    for convs, profile in profiles.items():
        results = run_size_study(profile)
        sizes[convs] = {r["format"]: r["bytes"] for r in results["rows"] if r["model"] == "mpd c=4"}
    # conv2's 51k weights, a quarter kept and at 4 bits, instead of all of them in fp32
    assert sizes[True]["int4-g64 QAT"] < sizes[False]["int4-g64 QAT"] - 150_000
    assert "MPD on its convolutions too" in render_size_study(results, "cmd")
