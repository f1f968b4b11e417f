"""Quantized model files (format version 3): every entry point loads them back exactly, old
readers' version stays for float files, and damaged integer blocks are refused before use."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open

import mpdcompress as mpd
from mpdcompress.cli.main import main
from mpdcompress.models import build_model, paper_filter

from .helpers import assert_onnx_export_command_matches, resigned

pytest.importorskip("torchao")

CONFIGS = ["int8", "int4", "int4-g64-asym", "int8-dynamic"]


def _packed(name: str, c: int, convs: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(name).eval()
    mpd.mpdify_(model, c, filter_fn=paper_filter(model, name), seed=2, convs=convs)
    return mpd.pack(model)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder, cache = tmp_path_factory.mktemp("quantized"), {}

    def get(name: str, config: str, convs: bool = False):
        if (name, config, convs) not in cache:
            model = mpd.quantize_(_packed(name, 7, convs), config)  # uneven blocks: padding to check
            path = folder / f"{name}-{config}-{convs}.safetensors"
            mpd.save(model, path, input_shape=(1, 28, 28))
            cache[name, config, convs] = model, path
        return cache[name, config, convs]

    return get


def _same(a, b, x):
    with torch.no_grad():
        assert torch.equal(a.eval()(x), b.eval()(x))


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("name,convs", [("lenet300", False), ("deep-mnist", True)])
def test_quantized_files_load_exactly_with_and_without_a_template(files, name, config, convs):
    if convs and config.endswith("dynamic"):
        pytest.skip("convolutions are weight-only")
    model, path = files(name, config, convs)
    manifest = mpd.read_manifest(path)
    assert manifest["format_version"] == 3
    assert all(layer["kind"].startswith("Quantized") for layer in manifest["layers"].values())
    x = torch.randn(3, 1, 28, 28)
    _same(model, mpd.load(path), x)
    template = build_model(name)
    _same(model, mpd.load(path, model=template), x)
    assert repr(mpd.load(path)) == repr(model)


def test_float_files_stay_version_2_for_older_readers(tmp_path):
    path = mpd.save(_packed("lenet300", 4), tmp_path / "f.safetensors")
    assert mpd.read_manifest(path)["format_version"] == 2


def test_int4_file_is_smaller_than_int8_and_int8_than_float(tmp_path, files):
    sizes = {config: files("lenet300", config)[1].stat().st_size for config in ("int8", "int4")}
    sizes["float"] = mpd.save(_packed("lenet300", 4), tmp_path / "f.safetensors").stat().st_size
    assert sizes["int4"] < sizes["int8"] < 0.4 * sizes["float"]


@pytest.mark.parametrize("config", ["int8", "int4-g64-asym"])
def test_cli_inspect_and_export_read_quantized_files(files, tmp_path, capsys, config):
    model, path = files("lenet300", config)
    assert main(["inspect", str(path)]) == 0
    assert config in capsys.readouterr().out
    onnx_path = tmp_path / "m.onnx"
    x = assert_onnx_export_command_matches(path, onnx_path, model)
    float_onnx = tmp_path / "float.onnx"
    mpd.export_onnx(mpd.dequantize(model), x, float_onnx)
    assert onnx_path.stat().st_size < 0.7 * float_onnx.stat().st_size  # the graph holds the integers


def test_quantize_command_packs_and_quantizes_a_masked_file(tmp_path, capsys):
    torch.manual_seed(0)
    model = build_model("lenet300").eval()
    mpd.mpdify_(model, 10, filter_fn=paper_filter(model, "lenet300"))
    masked = mpd.save(model, tmp_path / "masked.safetensors", input_shape=(1, 28, 28))
    out = tmp_path / "q.safetensors"
    assert main(["quantize", str(masked), "-o", str(out), "--format", "int4-g32-asym"]) == 0
    assert "packed first" in capsys.readouterr().out
    x = torch.randn(2, 1, 28, 28)
    expected = mpd.quantize_(mpd.pack(model), "int4-g32-asym")
    _same(expected, mpd.load(out), x)
    assert main(["quantize", str(out), "-o", str(tmp_path / "again.safetensors")]) == 2
    assert "quantized already" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["quantize", str(masked), "-o", str(out), "--format", "int5"])


@pytest.mark.parametrize(
    "key,damage,message",
    [
        ("1.layers.0.scales", lambda t: -t, "finite and positive"),
        ("1.layers.0.scales", lambda t: t.fill_(float("inf")), "NaN or Inf"),
        ("1.layers.1.zero_points", lambda t: t.fill_(200), "outside 0..15"),
        ("1.layers.0.qweight", lambda t: t.fill_(0x11), "padding|pads its rows"),
        ("1.layers.0.qweight", lambda t: t.to(torch.int8), "dtype"),
        ("1.layers.0.scales", lambda t: t[..., :1].contiguous(), "shape"),
    ],
)
def test_damaged_integer_blocks_are_refused(files, tmp_path, key, damage, message):
    _, path = files("lenet300", "int4-g64-asym")
    with safe_open(str(path), framework="pt") as f:
        value = damage(f.get_tensor(key).clone())
    with pytest.raises(mpd.ModelFileError, match=message):
        mpd.load(resigned(path, tmp_path, key, value))


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda m: m["layers"]["1.layers.0"]["quantization"].update(bits=3), "bits must be 8 or 4"),
        (lambda m: m["layers"]["1.layers.0"].pop("quantization"), "quantization entry"),
        (lambda m: m["layers"]["1.layers.0"]["quantization"].update(group_size=32), "declares|shape"),
        (lambda m: m.update(format_version=2), "format version 2 is not"),
    ],
)
def test_inconsistent_quantization_entries_are_refused(files, tmp_path, edit, message):
    _, path = files("lenet300", "int4-g64-asym")
    with pytest.raises(mpd.ModelFileError, match=message):
        mpd.load(resigned(path, tmp_path, edit=edit))


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_fuzzed_quantized_files_load_correctly_or_fail_cleanly(files, tmp_path_factory, data):
    model, path = files("lenet300", "int4")
    raw = bytearray(path.read_bytes())
    n_header = int.from_bytes(raw[:8], "little")
    for _ in range(data.draw(st.integers(1, 3))):
        pos = data.draw(st.integers(8, len(raw) - 1))
        raw[pos] ^= 1 << data.draw(st.integers(0, 7))
    edited = tmp_path_factory.mktemp("fq") / "m.safetensors"
    edited.write_bytes(bytes(raw))
    try:
        loaded = mpd.load(edited)
    except mpd.ModelFileError:
        return
    assert n_header  # the header was read; any accepted file must be the same model
    _same(model, loaded, torch.randn(2, 1, 28, 28))
