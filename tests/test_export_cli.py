import numpy as np
import pytest
import torch

import mpdcompress as mc
from mpdcompress.cli import main
from mpdcompress.export import export_onnx
from mpdcompress.io import load, save
from mpdcompress.models import build_model, fc_stack

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")


@pytest.mark.parametrize(
    "builder,shape,c",
    [(lambda: build_model("lenet300"), (1, 28, 28), 10), (lambda: fc_stack([96, 64, 40, 10]), (96,), 4)],
)
def test_onnx_export_runs_in_onnxruntime_with_dynamic_batch(tmp_path, builder, shape, c):
    torch.manual_seed(0)
    model = mc.pack(mc.mpdify_(builder(), c)).eval()
    path = export_onnx(model, torch.randn(2, *shape), tmp_path / "m.onnx")
    graph = onnx.load(str(path))
    ops = {n.op_type for n in graph.graph.node}
    assert {"Gather", "MatMul"} <= ops
    assert graph.opset_import[0].version >= 17
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 5, 33):
        x = torch.randn(batch, *shape)
        out = session.run(None, {"input": x.numpy()})[0]
        with torch.no_grad():
            ref = model(x).numpy()
        assert np.abs(out - ref).max() <= 1e-5 * max(1.0, np.abs(ref).max())


def test_export_rejects_old_opset(tmp_path):
    with pytest.raises(ValueError, match=r"opset must be in 17\.\."):
        export_onnx(mc.pack(mc.mpdify_(fc_stack([8, 8]), 2)), torch.randn(1, 8), tmp_path / "m.onnx", opset=13)


def test_cli_pack_inspect_export(tmp_path, capsys):
    torch.manual_seed(0)
    masked = mc.mpdify_(build_model("lenet300"), 10)
    save(masked, tmp_path / "masked.safetensors", input_shape=(1, 28, 28))
    assert main(["pack", str(tmp_path / "masked.safetensors"), "-o", str(tmp_path / "packed.safetensors")]) == 0
    assert "wrote" in capsys.readouterr().out
    packed = load(tmp_path / "packed.safetensors")
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(packed(x), masked(x), atol=1e-6)
    assert main(["inspect", str(tmp_path / "packed.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "1.layers.0" in out and "300x784" in out and "266,200 -> 26,620 weights (10.00x fewer)" in out
    assert main(["export", str(tmp_path / "packed.safetensors"), "-o", str(tmp_path / "m.onnx")]) == 0
    assert "input shape (batch, 1, 28, 28)" in capsys.readouterr().out
    assert main(["pack", str(tmp_path / "packed.safetensors"), "-o", str(tmp_path / "again.safetensors")]) == 2
    assert "already packed" in capsys.readouterr().err


def test_cli_inspect_paper_model(capsys):
    assert main(["inspect", "--model", "alexnet-bn"]) == 0
    out = capsys.readouterr().out
    assert "87,982,080" in out and "10,997,760" in out
    assert main(["inspect"]) == 2


def test_export_leaves_the_callers_model_and_logging_as_they_were(tmp_path):
    import logging

    model = mc.pack(mc.mpdify_(fc_stack([16, 12, 4]), 2)).train()
    model[0].layers[0].eval()  # a mixed state must come back as it was
    modes = [m.training for m in model.modules()]
    logger = logging.getLogger("torch.onnx")
    logger.setLevel(logging.INFO)
    export_onnx(model, torch.randn(2, 16), tmp_path / "m.onnx")
    assert [m.training for m in model.modules()] == modes
    assert logger.level == logging.INFO
    logger.setLevel(logging.NOTSET)
