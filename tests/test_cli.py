import subprocess
import sys

import pytest
import torch
from torch import nn

import mpdcompress as mpd
from mpdcompress.cli.main import main
from mpdcompress.models import MODELS

from .helpers import assert_close_to_scale


def test_demo_runs_end_to_end_and_checks_exactness(capsys):
    assert main(["demo", "--steps", "60", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "exactness check: PASS" in out
    assert "26,800" in out  # packed LeNet-300-100 weights at c=10 (padded 784x300 blocks)


def test_cli_reports_invalid_factor_without_traceback():
    proc = subprocess.run(
        [sys.executable, "-m", "mpdcompress", "demo", "-c", "500", "--steps", "1", "--quiet"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "valid range for a 300x784 weight is 1..300" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("name", list(MODELS))
def test_inspect_knows_every_registered_model(name, capsys):
    assert main(["inspect", "--model", name]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{name} (") and "FC weights MPD" in out
    assert ("paper:" in out) == (MODELS[name].paper is not None)


def test_unknown_names_are_one_unquoted_line(capsys):
    assert (
        main(
            [
                "bench",
                "--models",
                "bogus",
                "--shapes",
                "lenet-fc1",
                "--factors",
                "8",
                "--batches",
                "1",
                "--no-rss",
                "--quiet",
                "--out",
                "/nonexistent/never-written",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert err.startswith("mpdcompress bench: error: unknown model 'bogus'; choose from lenet300")
    assert "\n" not in err and not err.endswith("'") and '"' not in err


def test_a_bug_in_library_code_keeps_its_traceback(monkeypatch):
    import mpdcompress.cli.summary

    def broken(*args, **kwargs):
        raise RuntimeError("an internal bug")

    monkeypatch.setattr(mpdcompress.cli.summary, "model_summary", broken)
    with pytest.raises(RuntimeError, match="an internal bug"):
        main(["inspect", "--model", "lenet300"])


def test_file_system_errors_are_one_line(tmp_path, capsys):
    from mpdcompress import mpdify_, save

    save(mpdify_(nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4)), 2), tmp_path / "m.safetensors")
    (tmp_path / "taken").mkdir()
    assert main(["pack", str(tmp_path / "m.safetensors"), "-o", str(tmp_path / "taken")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mpdcompress pack: error: ") and "\n" not in err and "Errno" not in err


@pytest.mark.parametrize(
    "model,convs", [("deep-mnist", False), ("tf-cifar10", False), ("deep-mnist", True), ("tf-cifar10", True)]
)
def test_a_trained_cnn_file_goes_through_pack_inspect_export_and_load(model, convs, tmp_path, capsys):
    """The steps a CNN user takes after `train`, as the trainer prints them (0.1.0 refused the
    file at `pack`: 'Conv2d.stride must be a number'), with and without --compress-convs."""
    out = tmp_path / "run"
    train = ["train", "--model", model, "--dataset", "fake", "--train-limit", "64", "--epochs", "1"]
    train += ["--compress-convs"] if convs else []
    assert main([*train, "--batch-size", "32", "--out", str(out), "--quiet"]) == 0
    kinds = {layer["kind"] for layer in mpd.read_manifest(out / "masked.safetensors")["layers"].values()}
    assert ("MPDConv2d" in kinds) == convs
    masked, packed = out / "masked.safetensors", tmp_path / "packed.safetensors"
    assert f"mpdcompress pack {masked}" in capsys.readouterr().out
    assert main(["pack", str(masked), "-o", str(packed)]) == 0
    assert main(["inspect", str(packed)]) == 0
    assert main(["export", str(packed), "-o", str(tmp_path / "m.onnx")]) == 0
    assert "error" not in capsys.readouterr().err
    x = torch.randn(3, *MODELS[model].input_shape)
    with torch.no_grad():
        got, expected = mpd.load(packed).eval()(x), mpd.load(masked).eval()(x)
    assert_close_to_scale(got, expected)
