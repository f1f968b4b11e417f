"""Quantized linear layers exported as ONNX Runtime's MatMulNBits: the weights the graph holds are
the layer's own integers, ONNX Runtime computes the weight-only output with them (to float
rounding), or close to it with int8 activations, for every int4 / int8 form and odd block widths."""

import pytest
import torch
from torch import nn

import mpdcompress as mpd
from mpdcompress.cli.main import main
from mpdcompress.errors import ConfigError

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
pytest.importorskip("torchao")


def _quantized(fmt: str, c: int = 4, dense_layers: bool = False) -> nn.Module:
    """Packed blocks of odd widths (75 and 47 inputs), uneven blocks, a dense classifier."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(300, 190), nn.ReLU(), nn.Linear(190, 70), nn.ReLU(), nn.Linear(70, 10))
    mpd.mpdify_(model, c, filter_fn=lambda module, name: name != "4", seed=0)
    return mpd.quantize_(mpd.pack(model).eval(), fmt, dense_layers=dense_layers)


def _quantized_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if hasattr(m, "quantized_weight")]


def _ort_error(path, model: nn.Module, batches=(1, 6)) -> float:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst = 0.0
    for batch in batches:
        x = torch.randn(batch, 300)
        got = torch.from_numpy(session.run(None, {"input": x.numpy()})[0])
        with torch.no_grad():
            expected = model(x)
        worst = max(worst, float((got - expected).abs().max() / expected.abs().max()))
    return worst


def _op_types(path) -> list[str]:
    return [node.op_type for node in onnx.load(str(path)).graph.node]


@pytest.mark.parametrize("fmt", ["int4", "int4-g64", "int4-asym", "int4-g128-asym"])
def test_int4_layers_run_as_matmulnbits_with_the_weight_only_output(tmp_path, fmt):
    model = _quantized(fmt, dense_layers=True)
    path = mpd.export_onnx(model, torch.randn(2, 300), tmp_path / "m.onnx", quantized_ops="matmulnbits")
    assert _op_types(path).count("MatMulNBits") == 2 * 4 + 1  # every block and the dense classifier
    assert _ort_error(path, model) < 1e-5
    assert all(layer.qweight is not None for layer in _quantized_layers(model))  # the caller's model keeps them


@pytest.mark.parametrize("fmt", ["int8", "int4", "int4-g32-asym"])
def test_int8_activations_run_every_quantized_linear_as_matmulnbits_close_to_weight_only(tmp_path, fmt):
    model = _quantized(fmt)
    path = mpd.export_onnx(model, torch.randn(2, 300), tmp_path / "m.onnx", int8_activations=True)
    assert _op_types(path).count("MatMulNBits") == 2 * 4
    assert 0 < _ort_error(path, model) < 2e-2


def test_the_graph_dequantizes_to_exactly_the_layers_weights():
    from mpdcompress.files.onnx_matmulnbits import NBitsBlocks

    for fmt in ("int8", "int4", "int4-g128-asym"):
        layer = _quantized_layers(_quantized(fmt))[0]
        form = NBitsBlocks(layer.quantized_weight(), 0, "layer")
        blocks = layer.weight_blocks
        for k in range(blocks.shape[0]):
            # F.linear of the identity returns the dequantized block itself, bit for bit.
            got = form._block(k, torch.eye(blocks.shape[2])).t()
            assert torch.equal(got, blocks[k]), (fmt, k)


def test_int8_weight_only_keeps_the_dequantizing_form(tmp_path):
    int8 = _quantized("int8")
    with pytest.raises(ConfigError, match="int8 too with int8_activations"):
        mpd.export_onnx(int8, torch.randn(2, 300), tmp_path / "m.onnx", quantized_ops="matmulnbits")
    with pytest.raises(ConfigError, match="quantize_ it first"):
        mpd.export_onnx(mpd.dequantize(int8), torch.randn(2, 300), tmp_path / "m.onnx", int8_activations=True)
    with pytest.raises(ConfigError, match="quantized_ops"):
        mpd.export_onnx(int8, torch.randn(2, 300), tmp_path / "m.onnx", quantized_ops="qdq")


def test_groups_matmulnbits_cannot_hold_are_refused_with_the_layer_name(tmp_path):
    with pytest.raises(ConfigError, match=r"^[\w.]+: MatMulNBits needs groups of a power of two.*48"):
        mpd.export_onnx(_quantized("int4-g48"), torch.randn(2, 300), tmp_path / "m.onnx", quantized_ops="matmulnbits")
    assert not (tmp_path / "m.onnx").exists()


def test_export_command_quantized_ops(tmp_path, capsys):
    model = _quantized("int4")
    saved = mpd.save(model, tmp_path / "q.safetensors", input_shape=(300,))
    out = tmp_path / "q.onnx"
    assert main(["export", str(saved), "-o", str(out), "--quantized-ops", "matmulnbits"]) == 0
    assert "as MatMulNBits" in capsys.readouterr().out
    assert _ort_error(out, model) < 1e-5
    assert main(["export", str(saved), "-o", str(out), "--int8-activations"]) == 0
    assert "MatMulNBits with int8 activations" in capsys.readouterr().out
    assert 0 < _ort_error(out, model) < 2e-2


def test_runtime_bench_times_the_matmulnbits_forms_checked_against_pytorch():
    from mpdcompress.bench.runtimes import render_runtime_bench, run_runtime_bench

    results = run_runtime_bench("lenet300", 4, ("int4",), (3,), ("onnxruntime",))
    errors = {row["variant"]: row["relative_error_vs_pytorch"] for row in results["rows"]}
    assert set(errors) == {
        "dense fp32",
        "MPD c=4 fp32",
        "MPD c=4 int4",
        "MPD c=4 int4 as MatMulNBits",
        "MPD c=4 int4 + int8 activations",
    }
    assert all(error < 1e-5 for variant, error in errors.items() if not variant.endswith("activations"))
    assert 0 < errors["MPD c=4 int4 + int8 activations"] < 2e-2
    assert "| onnxruntime | MPD c=4 int4 as MatMulNBits |" in render_runtime_bench(results, "cmd")
