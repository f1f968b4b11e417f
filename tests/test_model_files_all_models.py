"""Every registered model, masked and packed (CNNs also with their convolutions compressed),
through every entry point that reads a model file:
``load`` without and with a template, and the CLI's ``inspect``, ``pack`` and ``export``. Each
loaded model must compute exactly what the saved one computed."""

import numpy as np
import pytest
import torch
from torch import nn

import mpdcompress as mpd
from mpdcompress.cli.main import main
from mpdcompress.files.architecture import describe
from mpdcompress.models import MODELS, build_model, paper_filter

FORMS = ("masked", "packed")


def _compressions(name: str) -> tuple[bool, ...]:
    """With convolutions compressed or not (``convs``), whichever compresses something."""
    if MODELS[name].fc_only:
        return (False,)
    with torch.device("meta"):  # sizes only: nothing allocated
        model = build_model(name)
    selected = paper_filter(model, name)
    fc = any(type(m) is nn.Linear and selected(m, n) for n, m in model.named_modules())
    return (False, True) if fc else (True,)


CASES = [
    pytest.param(name, form, convs, id=f"{name}-{form}{'-convs' if convs else ''}")
    for name in MODELS
    for convs in _compressions(name)
    for form in FORMS
]


def _compressed(name: str, form: str, convs: bool) -> nn.Module:
    spec = MODELS[name]
    torch.manual_seed(0)
    model = build_model(name)
    mpd.mpdify_(model, spec.compression, filter_fn=paper_filter(model, name), seed=1, convs=convs)
    assert any(isinstance(m, mpd.MPDConv2d) for m in model.modules()) == convs
    for module in model.modules():  # running statistics that are not the identity, so they count
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    model.eval()
    return mpd.pack(model) if form == "packed" else model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(model, path, example input) per case, made once per test module and worker."""
    folder, cache = tmp_path_factory.mktemp("registry"), {}

    def get(name: str, form: str, convs: bool):
        if (name, form, convs) not in cache:
            model = _compressed(name, form, convs)
            path = folder / f"{name}-{form}-{convs}.safetensors"
            mpd.save(model, path, input_shape=MODELS[name].input_shape)
            cache[name, form, convs] = model, path, torch.randn(2, *MODELS[name].input_shape)
        return cache[name, form, convs]

    return get


def _same_output(a: nn.Module, b: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        expected, got = a.eval()(x), b.eval()(x)
    assert torch.equal(got, expected), f"max difference {(got - expected).abs().max().item():.3g}"


@pytest.mark.parametrize("name,form,convs", CASES)
def test_load_rebuilds_the_architecture_and_computes_the_same(saved, name, form, convs):
    model, path, x = saved(name, form, convs)
    loaded = mpd.load(path)
    assert describe(loaded) == describe(model)
    _same_output(model, loaded, x)


@pytest.mark.parametrize("name,form,convs", CASES)
def test_load_into_a_dense_template_computes_the_same(saved, name, form, convs):
    model, path, x = saved(name, form, convs)
    template = build_model(name)  # freshly initialized: every value must come from the file
    loaded = mpd.load(path, model=template)
    assert describe(loaded) == describe(model)
    _same_output(model, loaded, x)


@pytest.mark.parametrize("name,form,convs", CASES)
def test_inspect_lists_every_compressed_layer(saved, name, form, convs, capsys):
    model, path, _ = saved(name, form, convs)
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"{form} model" in out and "architecture included" in out
    for name, layer in mpd.read_manifest(path)["layers"].items():
        shape = "x".join(map(str, [layer["d_out"], layer["d_in"], *layer.get("kernel_size", [])]))
        assert any(name in line and shape in line for line in out.splitlines()), (name, shape)


@pytest.mark.parametrize("name,form,convs", CASES)
def test_pack_command_packs_masked_files_and_refuses_packed_ones(saved, name, form, convs, tmp_path, capsys):
    model, path, x = saved(name, form, convs)
    out = tmp_path / "packed.safetensors"
    if form == "packed":
        assert main(["pack", str(path), "-o", str(out)]) == 2
        assert "already packed" in capsys.readouterr().err
        return
    assert main(["pack", str(path), "-o", str(out)]) == 0
    packed = mpd.load(out)
    assert mpd.read_manifest(out)["input_shape"] == list(MODELS[name].input_shape)
    _same_output(mpd.pack(model), packed, x)


@pytest.mark.parametrize("name,form,convs", CASES)
def test_export_command_writes_an_onnx_model_that_computes_the_same(saved, name, form, convs, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    model, path, x = saved(name, form, convs)
    onnx_path = tmp_path / "m.onnx"
    assert main(["export", str(path), "-o", str(onnx_path)]) == 0  # input shape from the file
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        expected = model(x).numpy()
    assert np.abs(got - expected).max() <= 1e-4 * max(1.0, np.abs(expected).max())


PACKED_CASES = [case for case in CASES if case.values[1] == "packed"]


@pytest.mark.parametrize("name,form,convs", PACKED_CASES)
def test_int4_files_export_as_matmulnbits_that_computes_the_weight_only_output(saved, name, form, convs, tmp_path):
    """The README's ONNX Runtime MatMulNBits form, for every model: quantized (blocks, packed
    convolutions and the layers kept dense), saved, exported by the CLI, run by ONNX Runtime."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("torchao")
    model, _, x = saved(name, form, convs)
    float_model = mpd.load(mpd.save(model, tmp_path / "f.safetensors")).eval()
    quantized = mpd.quantize_(float_model, "int4", dense_layers=True)
    path = mpd.save(quantized, tmp_path / "q.safetensors", input_shape=MODELS[name].input_shape)
    onnx_path = tmp_path / "q.onnx"
    assert main(["export", str(path), "-o", str(onnx_path), "--quantized-ops", "matmulnbits"]) == 0
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        expected = quantized(x).numpy()
    assert np.abs(got - expected).max() <= 1e-4 * max(1.0, np.abs(expected).max())


# One model per kind of layer the ExecuTorch forms meet (an MLP, 3-D transformer inputs, a packed
# convolution before a chain, LocalResponseNorm): exporting every registry model takes ~7 CPU
# minutes, past what the suite can spend.
EXECUTORCH_CASES = [
    case
    for case in PACKED_CASES
    if case.id in ("lenet300-packed", "transformer-mlp-packed", "deep-mnist-packed-convs", "tf-cifar10-packed")
]


@pytest.mark.parametrize("name,form,convs", EXECUTORCH_CASES)
def test_int4_models_run_weight_only_in_executorch(saved, name, form, convs, tmp_path):
    """ExecuTorch's weight-only form (blocks dequantized inside XNNPACK)."""
    pytest.importorskip("executorch")
    pytest.importorskip("torchao")
    model, _, x = saved(name, form, convs)
    quantized = mpd.quantize_(mpd.load(mpd.save(model, tmp_path / "f.safetensors")).eval(), "int4", dense_layers=True)
    path = mpd.export_executorch(quantized, x, tmp_path / "q.pte")
    with torch.no_grad():
        expected = quantized(x)
    got = mpd.run_executorch(path, x)[0]
    assert (got - expected).abs().max() <= 1e-4 * max(1.0, expected.abs().max())


@pytest.mark.parametrize("name,form,convs", CASES)
def test_masks_stored_as_seeds_load_the_same(saved, name, form, convs, tmp_path):
    model, _, x = saved(name, form, convs)
    path = mpd.save(model, tmp_path / "seeded.safetensors", input_shape=MODELS[name].input_shape, mask_storage="seed")
    manifest = mpd.read_manifest(path)
    assert set(manifest["seeded_orders"]) == set(manifest["layers"])  # every mask is the seed's draw
    _same_output(model, mpd.load(path), x)


BATCHNORM_CASES = [
    case
    for case in CASES
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in build_model(case.values[0]).modules())
]


@pytest.mark.parametrize("name,form,convs", BATCHNORM_CASES)
def test_folded_batchnorm_keeps_the_output_and_the_file(saved, name, form, convs, tmp_path):
    import copy

    from .helpers import assert_close_to_scale

    model, _, x = saved(name, form, convs)
    folded = mpd.fold_batchnorm_(copy.deepcopy(model))
    with torch.no_grad():
        assert_close_to_scale(folded(x), model(x), 1e-5)
    path = mpd.save(folded, tmp_path / "folded.safetensors", input_shape=MODELS[name].input_shape)
    _same_output(folded, mpd.load(path), x)
