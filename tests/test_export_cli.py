import numpy as np
import pytest
import torch
from torch import nn

import mpdcompress as mc
from mpdcompress.cli.main import main
from mpdcompress.files.io import load, save
from mpdcompress.files.onnx import export_onnx
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


CUSTOM = """
import torch
from torch import nn


class TokenEncoder(nn.Module):
    def __init__(self, vocab=50, width=16):
        super().__init__()
        self.emb = nn.Embedding(vocab, width)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.ReLU(), nn.Linear(2 * width, width))

    def forward(self, input_ids, attention_mask=None):
        h = self.mlp(self.emb(input_ids))
        if attention_mask is None:
            return h.mean(1)
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return (h * m).sum(1) / m.sum(1)
"""


@pytest.fixture
def custom_model_file(tmp_path):
    source = tmp_path / "custom_models.py"
    source.write_text(CUSTOM)
    namespace = {}
    exec(compile(CUSTOM, str(source), "exec"), namespace)
    torch.manual_seed(0)
    model = mc.pack(mc.mpdify_(namespace["TokenEncoder"](vocab=50, width=16), 4)).eval()
    save(model, tmp_path / "custom.safetensors")
    return model, f"{source}:TokenEncoder"


def test_the_cli_builds_custom_models_from_their_class(tmp_path, custom_model_file, capsys):
    model, spec = custom_model_file
    file = str(tmp_path / "custom.safetensors")
    assert main(["export", file, "-o", str(tmp_path / "x.onnx")]) == 2
    assert "--model-class" in capsys.readouterr().err  # the file cannot rebuild a custom class itself
    argv = ["export", file, "-o", str(tmp_path / "m.onnx"), "--model-class", spec, "--model-kwargs", '{"vocab": 50}']
    argv += ["--input-shape", "6", "--input-dtype", "int64", "--dynamic-dims", "0=batch", "1=sequence"]
    assert main(argv) == 0
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    ids = torch.randint(0, 50, (3, 11))  # another batch and another sequence length
    with torch.no_grad():
        np.testing.assert_allclose(session.run(None, {"input": ids.numpy()})[0], model(ids).numpy(), atol=1e-5)


def test_the_cli_exports_with_the_users_example_inputs_by_name(tmp_path, custom_model_file):
    from safetensors.torch import save_file

    model, spec = custom_model_file
    mask = torch.ones(2, 5, dtype=torch.int64)
    save_file({"input_ids": torch.randint(0, 50, (2, 5)), "attention_mask": mask}, tmp_path / "example.safetensors")
    argv = ["export", str(tmp_path / "custom.safetensors"), "-o", str(tmp_path / "m.onnx"), "--model-class", spec]
    argv += ["--example-inputs", str(tmp_path / "example.safetensors"), "--dynamic-dims", "0=batch", "1=sequence"]
    assert main(argv) == 0
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask"]
    ids, mask = torch.randint(0, 50, (4, 9)), torch.ones(4, 9, dtype=torch.int64)
    mask[0, 5:] = 0
    out = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(out, model(ids, mask).numpy(), atol=1e-5)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--model-class", "nonexistent_module_xyz:Net"], "cannot import 'nonexistent_module_xyz'"),
        (["--model-class", "torch.nn:NoSuchNet"], "has no 'NoSuchNet'"),
        (["--model-class", "just-a-name"], "MODULE:CLASS"),
        (["--model-class", "torch.nn:Linear", "--model-kwargs", "[1, 2]"], "JSON object"),
        (["--dynamic-dims", "batch"], "AXIS=NAME"),
    ],
)
def test_bad_model_classes_and_dims_are_one_line_errors(tmp_path, custom_model_file, capsys, extra, message):
    argv = ["export", str(tmp_path / "custom.safetensors"), "-o", str(tmp_path / "m.onnx"), *extra]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_export_leaves_a_training_model_and_its_batchnorm_statistics_as_they_were(tmp_path):
    pytest.importorskip("onnxruntime")
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 4))
    mc.mpdify_(model, 2, convs=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    export_onnx(model, torch.randn(2, 3, 6, 6), tmp_path / "m.onnx")
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
