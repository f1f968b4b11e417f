"""Dense layers quantized alike (``quantize_(..., dense_layers=True)``): the classifier and a
chain's folded tail become QuantizedLinear layers that compute exactly their dequantized float
form, survive model files (with and without a template) and refuse damaged integers."""

import copy

import pytest
import torch
from safetensors import safe_open
from torch import nn

import mpdcompress as mpd
from mpdcompress.cli.main import main
from mpdcompress.core.quantize import QuantConfig, quantize_weight
from mpdcompress.errors import CompressionError
from mpdcompress.models import build_model, paper_filter

from .helpers import assert_onnx_export_command_matches, resigned

pytest.importorskip("torchao")

CONFIGS = ["int8", "int4", "int4-g128", "int4-g64-asym"]


def _packed(name: str = "lenet300", c: int = 7) -> nn.Module:
    torch.manual_seed(0)
    model = build_model(name).eval()
    mpd.mpdify_(model, c, filter_fn=paper_filter(model, name), seed=2)
    return mpd.pack(model)


def _dense_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, mpd.QuantizedLinear)}


@pytest.mark.parametrize("config", CONFIGS)
def test_the_classifier_stores_the_integers_quantize_weight_gives_and_computes_their_float_form(config):
    packed = _packed()
    tail = packed[1].tail
    model = mpd.quantize_(copy.deepcopy(packed), config, dense_layers=True)
    layer = model[1].tail
    assert isinstance(layer, mpd.QuantizedLinear) and list(_dense_layers(model)) == ["1.tail"]
    expected = quantize_weight(tail.weight.detach()[None], 1, tail.out_features, QuantConfig.parse(config))
    assert torch.equal(layer.qweight, expected.qweight) and torch.equal(layer.scales, expected.scales)
    assert torch.equal(layer.weight, expected.dequantize()[0])
    assert torch.equal(layer.bias, tail.bias)
    float_model = mpd.dequantize(model)
    assert type(float_model[1].tail) is nn.Linear
    x = torch.randn(6, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(model(x), float_model(x))
        assert (model(x) - packed(x)).abs().max() < 0.1 * packed(x).abs().max()


def test_without_dense_layers_the_classifier_stays_float():
    model = mpd.quantize_(_packed(), "int4")
    assert type(model[1].tail) is nn.Linear and not _dense_layers(model)


def test_a_dense_model_quantized_whole_and_filter_fn_choosing_layers():
    torch.manual_seed(0)
    dense = build_model("lenet300").eval()
    whole = mpd.quantize_(copy.deepcopy(dense), "int8", dense_layers=True)
    assert list(_dense_layers(whole)) == ["1", "3", "5"]
    only = mpd.quantize_(copy.deepcopy(dense), "int8", dense_layers=True, filter_fn=lambda m, name: name == "5")
    assert list(_dense_layers(only)) == ["5"] and type(only[1]) is nn.Linear
    with pytest.raises(CompressionError, match="dense_layers=True"):
        mpd.quantize_(copy.deepcopy(dense), "int8")
    with pytest.raises(CompressionError, match="quantized already"):
        mpd.quantize_(whole, "int8", dense_layers=True)


def test_dynamic_int8_dense_layers_run_int8_gemms_close_to_weight_only():
    packed = _packed()
    dynamic = mpd.quantize_(copy.deepcopy(packed), "int8-dynamic", dense_layers=True)
    weight_only = mpd.quantize_(copy.deepcopy(packed), "int8", dense_layers=True)
    assert dynamic[1].tail.activations == "dynamic"
    x = torch.randn(16, 1, 28, 28)
    with torch.no_grad():
        got, ref = dynamic(x), weight_only(x)
    assert not torch.equal(got, ref)  # activations are rounded too
    assert (got - ref).abs().max() < 0.05 * ref.abs().max()


def test_quantization_aware_blocks_then_dense_layers_rounded_after_training():
    packed = _packed()
    model = mpd.fake_quantize_(copy.deepcopy(packed), "int4")
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        trained_output = model(x)
    mpd.quantize_(model, "int4", dense_layers=True)
    assert isinstance(model[1].tail, mpd.QuantizedLinear)
    with torch.no_grad():  # only the tail's rounding differs from what QAT ran
        assert not torch.equal(model(x), trained_output)
        assert (model(x) - trained_output).abs().max() < 0.1 * trained_output.abs().max()


@pytest.fixture(scope="module")
def dense_files(tmp_path_factory):
    folder, cache = tmp_path_factory.mktemp("dense-quantized"), {}

    def get(config: str):
        if config not in cache:
            model = mpd.quantize_(_packed(), config, dense_layers=True)
            path = mpd.save(model, folder / f"{config}.safetensors", input_shape=(1, 28, 28))
            cache[config] = model, path
        return cache[config]

    return get


@pytest.mark.parametrize("config", [*CONFIGS, "int8-dynamic"])
def test_files_with_quantized_dense_layers_load_exactly_with_and_without_a_template(dense_files, config):
    model, path = dense_files(config)
    assert mpd.read_manifest(path)["format_version"] == 3
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        expected = model(x)
        for loaded in (mpd.load(path), mpd.load(path, model=build_model("lenet300"))):
            assert isinstance(loaded[1].tail, mpd.QuantizedLinear)
            assert loaded[1].tail.activations == model[1].tail.activations
            assert torch.equal(loaded(x), expected)
    assert repr(mpd.load(path)) == repr(model)


def test_quantizing_the_classifier_makes_the_file_smaller(dense_files, tmp_path):
    _, path = dense_files("int4")
    blocks_only = mpd.save(mpd.quantize_(_packed(), "int4"), tmp_path / "b.safetensors")
    # the 100 x 10 fp32 classifier is 4,000 bytes; int4 with scales stores about 700
    assert path.stat().st_size < blocks_only.stat().st_size - 2500


def _tail_args(manifest):
    return manifest["architecture"]["children"][1][1]["tail"]["args"]


@pytest.mark.parametrize(
    "key,damage,message",
    [
        ("1.tail.scales", lambda t: -t, "finite and positive"),
        ("1.tail.scales", lambda t: t.fill_(float("nan")), "NaN or Inf"),
        ("1.tail.zero_points", lambda t: t.fill_(16), "outside 0..15"),
        ("1.tail.qweight", lambda t: t.to(torch.int8), "dtype"),
        ("1.tail.qweight", lambda t: t[:, :, :1].contiguous(), "shape|declares"),
    ],
)
def test_damaged_dense_integers_are_refused(dense_files, tmp_path, key, damage, message):
    _, path = dense_files("int4-g64-asym")
    with safe_open(str(path), framework="pt") as f:
        value = damage(f.get_tensor(key).clone())
    for template in (None, build_model("lenet300")):
        with pytest.raises(mpd.ModelFileError, match=message):
            mpd.load(resigned(path, tmp_path, key, value), model=template)


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda m: _tail_args(m).update(bits=5), "bits must be 4 or 8"),
        (lambda m: _tail_args(m).update(group_size=None), "group_size"),
        (lambda m: _tail_args(m).update(device="meta"), "no argument 'device'"),
        (lambda m: _tail_args(m).update(group_size=32), "declares|shape"),
    ],
)
def test_inconsistent_dense_quantization_entries_are_refused(dense_files, tmp_path, edit, message):
    _, path = dense_files("int4-g64-asym")
    with pytest.raises(mpd.ModelFileError, match=message):
        mpd.load(resigned(path, tmp_path, edit=edit))


@pytest.mark.parametrize("config", ["int8", "int4-g64-asym"])
def test_load_state_dict_refuses_invalid_integers_before_copying(config):
    model = mpd.quantize_(_packed(), config, dense_layers=True)
    for name in ("1.tail", "1.layers.0"):  # the dense layer and a packed one
        state = {k: v.clone() for k, v in model.state_dict().items()}
        before = copy.deepcopy(model.state_dict())
        state[f"{name}.scales"] = -state[f"{name}.scales"]
        state["1.layers.0.bias"] += 1  # loaded before the tail unless the whole state is checked first
        with pytest.raises(CompressionError, match="finite and positive"):
            model.load_state_dict(state)
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


class _Custom(nn.Module):
    """A model whose architecture a file cannot describe: loading needs a template."""

    def __init__(self):
        super().__init__()
        self.body = build_model("lenet300")

    def forward(self, x):
        return self.body(x)


def test_a_custom_model_with_quantized_dense_layers_loads_into_its_template(tmp_path):
    torch.manual_seed(0)
    model = _Custom().eval()
    mpd.mpdify_(model, 7, filter_fn=lambda m, name: m.out_features > 10, seed=2)
    model = mpd.quantize_(mpd.pack(model), "int4-g32", dense_layers=True)
    path = mpd.save(model, tmp_path / "m.safetensors")
    manifest = mpd.read_manifest(path)
    assert manifest["architecture"] is None and list(manifest["quantized_linears"]) == ["body.1.tail"]
    loaded = mpd.load(path, model=_Custom())
    assert isinstance(loaded.body[1].tail, mpd.QuantizedLinear)
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), model(x))
    with pytest.raises(mpd.ModelFileError, match="not an nn.Linear"):
        mpd.load(
            resigned(path, tmp_path, edit=lambda m: m["quantized_linears"].update({"body.9": {}})), model=_Custom()
        )
    bad = {"in_features": 105, "out_features": 10, "bias": True, "bits": 3}
    with pytest.raises(mpd.ModelFileError, match="bits must be 4 or 8"):
        mpd.load(resigned(path, tmp_path, edit=lambda m: m["quantized_linears"].update({"body.1.tail": bad})))


def test_cli_quantize_dense_layers_and_export_to_onnx(tmp_path, capsys):
    path = mpd.save(_packed(), tmp_path / "p.safetensors", input_shape=(1, 28, 28))
    out = tmp_path / "q.safetensors"
    assert main(["quantize", str(path), "-o", str(out), "--format", "int4-g128", "--dense-layers"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    # the folded classifier reads the 7 blocks' padded rows: 105 inputs
    assert "dense layer 1.tail (10x105) stored int4-g128" in capsys.readouterr().out
    model = mpd.load(out)
    assert isinstance(model[1].tail, mpd.QuantizedLinear) and model[1].tail.group_size == 128
    assert_onnx_export_command_matches(out, tmp_path / "m.onnx", model)
