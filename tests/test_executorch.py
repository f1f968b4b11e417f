"""ExecuTorch export: packed models, float and quantized, CNNs included, run in ExecuTorch's own
runtime and compute what PyTorch computes, at the batch they were exported with and another."""

import copy

import pytest
import torch

import mpdcompress as mpd
from mpdcompress.cli.main import main
from mpdcompress.errors import ConfigError, ExportError
from mpdcompress.models import build_model, paper_filter

pytest.importorskip("executorch")
pytest.importorskip("torchao")


def _packed(name: str, convs: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(name).eval()
    mpd.mpdify_(model, 4, filter_fn=paper_filter(model, name), seed=1, convs=convs)
    return mpd.pack(model).eval()


def _close(got: torch.Tensor, expected: torch.Tensor) -> None:
    assert got.shape == expected.shape
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_quantized_cnn_pte_file_computes_what_pytorch_computes(tmp_path):
    # Float MLPs are exported by the example of docs/engines.md, which the docs tests run.
    model = mpd.quantize_(_packed("deep-mnist", convs=True), "int8")
    path = mpd.export_executorch(model, torch.randn(4, 1, 28, 28), tmp_path / "m.pte")
    assert path.stat().st_size > 0 and not model.training
    for batch in (1, 3):
        x = torch.randn(batch, 1, 28, 28)
        with torch.no_grad():
            _close(mpd.run_executorch(path, x)[0], model(x))


@pytest.mark.parametrize("fmt", ["int8", "int4-g8", "int4-g32-asym"])
def test_weight_only_blocks_dequantize_in_xnnpack_to_the_weight_only_output(tmp_path, fmt):
    """Odd block widths (75 inputs), uneven blocks and a quantized dense classifier: the program
    stores the integers and computes the weight-only output (to float rounding)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(300, 190), torch.nn.ReLU(), torch.nn.Linear(190, 70), torch.nn.ReLU(), torch.nn.Linear(70, 10)
    )
    mpd.mpdify_(model, 4, filter_fn=lambda module, name: name != "4", seed=0)
    model = mpd.quantize_(mpd.pack(model).eval(), fmt, dense_layers=True)
    path = mpd.export_executorch(model, torch.randn(2, 300), tmp_path / "m.pte")
    for batch in (1, 6):
        x = torch.randn(batch, 300)
        with torch.no_grad():
            _close(mpd.run_executorch(path, x)[0], model(x))


@pytest.mark.parametrize("fmt, share", [("int8", 0.35), ("int4-g32", 0.25)])
def test_weight_only_programs_hold_the_integers_not_float_copies(tmp_path, fmt, share):
    masked = mpd.mpdify_(torch.nn.Sequential(torch.nn.Linear(1024, 1024)), 4, seed=0)
    model = mpd.quantize_(mpd.pack(masked).eval(), fmt)
    path = mpd.export_executorch(model, torch.randn(2, 1024), tmp_path / "q.pte")
    float_path = mpd.export_executorch(mpd.dequantize(model), torch.randn(2, 1024), tmp_path / "f.pte")
    assert path.stat().st_size < share * float_path.stat().st_size  # 1 MB of float blocks


def test_export_command_writes_a_pte_file_for_a_quantized_file(tmp_path, capsys):
    model = mpd.quantize_(_packed("lenet300"), "int4")
    saved = mpd.save(model, tmp_path / "q.safetensors", input_shape=(1, 28, 28))
    out = tmp_path / "q.pte"
    assert main(["export", str(saved), "-o", str(out)]) == 0
    assert "ExecuTorch" in capsys.readouterr().out
    for batch in (1, 5):
        x = torch.randn(batch, 1, 28, 28)
        with torch.no_grad():
            _close(mpd.run_executorch(out, x)[0], model(x))


def test_a_model_that_does_not_take_the_example_is_refused_before_tracing(tmp_path):
    with pytest.raises(ConfigError, match="max_size"):
        mpd.export_executorch(_packed("lenet300"), torch.randn(2, 1, 28, 28), tmp_path / "m.pte", max_size=1)
    with pytest.raises(ExportError, match="does not run on the example"):
        mpd.export_executorch(_packed("lenet300"), torch.randn(2, 3, 5), tmp_path / "m.pte")
    assert not (tmp_path / "m.pte").exists()


@pytest.mark.parametrize("config", ["int8", "int4-g32"])
def test_int8_activations_run_xnnpack_kernels_close_to_the_weight_only_output(tmp_path, config):
    model = mpd.quantize_(_packed("lenet300"), config, dense_layers=True)
    exact = mpd.export_executorch(model, torch.randn(2, 1, 28, 28), tmp_path / "exact.pte")
    fast = mpd.export_executorch(model, torch.randn(2, 1, 28, 28), tmp_path / "fast.pte", int8_activations=True)
    # The integers are constants of the program either way; the fast one holds no float copy.
    assert fast.stat().st_size < 1.5 * exact.stat().st_size
    for batch in (1, 6):
        x = torch.randn(batch, 1, 28, 28)
        with torch.no_grad():
            expected = model(x)
        got = mpd.run_executorch(fast, x)[0]
        error = (got - expected).abs().max() / expected.abs().max()
        assert 0 < error < 1e-2  # activations are rounded to int8, so not exact, and not far
        _close(mpd.run_executorch(exact, x)[0], expected)


def test_int8_activations_form_matches_in_pytorch_and_leaves_what_xnnpack_cannot_run(tmp_path):
    from mpdcompress.files.executorch import Int8ActivationBlocks, _int8_activation_form

    model = mpd.quantize_(_packed("deep-mnist", convs=True), "int4-g32", dense_layers=True)
    form = copy.deepcopy(model)
    _int8_activation_form(form)
    kinds = {
        type(m).__name__: isinstance(m.export_gemm, Int8ActivationBlocks)
        for m in form.modules()
        if hasattr(m, "export_gemm")
    }
    assert kinds == {"QuantizedBlockDiagonalConv": False, "QuantizedBlockDiagonalLinear": True}
    assert all(getattr(m, "export_gemm", None) is None for m in model.modules())  # the model itself is untouched
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        assert (form(x) - model(x)).abs().max() < 1e-2 * model(x).abs().max()
    asymmetric = mpd.quantize_(_packed("lenet300"), "int4-asym", dense_layers=True)
    with pytest.raises(ConfigError, match="symmetric"):
        mpd.export_executorch(asymmetric, torch.randn(2, 1, 28, 28), tmp_path / "a.pte", int8_activations=True)


def test_export_command_int8_activations(tmp_path, capsys):
    saved = mpd.save(mpd.quantize_(_packed("lenet300"), "int8"), tmp_path / "q.safetensors", input_shape=(1, 28, 28))
    assert main(["export", str(saved), "-o", str(tmp_path / "q.pte"), "--int8-activations"]) == 0
    assert "int8 activations" in capsys.readouterr().out
    assert main(["export", str(saved), "-o", str(tmp_path / "q.pte"), "--quantized-ops", "matmulnbits"]) == 2
    assert "for ONNX exports" in capsys.readouterr().err


def test_runtime_bench_checks_every_variant_against_pytorch_including_int8_activations():
    from mpdcompress.bench.runtimes import render_runtime_bench, run_runtime_bench

    results = run_runtime_bench("lenet300", 4, ("int8",), (3,), ("executorch",))
    errors = {row["variant"]: row["relative_error_vs_pytorch"] for row in results["rows"]}
    assert set(errors) == {"dense fp32", "MPD c=4 fp32", "MPD c=4 int8", "MPD c=4 int8 + int8 activations"}
    assert all(error < 1e-5 for variant, error in errors.items() if not variant.endswith("activations"))
    assert 0 < errors["MPD c=4 int8 + int8 activations"] < 1e-2
    assert "| executorch | MPD c=4 int8 + int8 activations |" in render_runtime_bench(results, "cmd")


@pytest.mark.parametrize("size", [1, 2, 4, 5])
def test_local_response_norm_runs_from_channel_slices(size):
    from mpdcompress.files.executorch import SlicedLocalResponseNorm

    norm = torch.nn.LocalResponseNorm(size, alpha=1e-2, beta=0.75, k=1.0)
    x = torch.randn(2, 7, 5, 6)
    _close(SlicedLocalResponseNorm(norm)(x), norm(x))  # torch's avg_pool3d has no ExecuTorch kernel


def test_a_program_the_runtime_has_no_kernel_for_is_refused_by_name(tmp_path):
    model = torch.nn.Sequential(torch.nn.AvgPool3d((2, 1, 1), stride=1)).eval()
    with pytest.raises(ExportError, match="no kernel for aten::avg_pool3d"):
        mpd.export_executorch(model, torch.randn(2, 3, 4, 5, 6), tmp_path / "m.pte")
    assert not (tmp_path / "m.pte").exists()
