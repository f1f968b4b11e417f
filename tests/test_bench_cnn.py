"""The CNN benchmark's pieces: multiply-add counts, the thin dense baseline, the report and the
command. No timing is asserted."""

import json

import pytest
import torch
from torch import nn

import mpdcompress as mpd
from mpdcompress.bench.cnn import CnnProfile, multiply_adds, render_cnn_report, run_cnn_bench, thin_dense
from mpdcompress.cli.main import main
from mpdcompress.errors import ConfigError
from mpdcompress.models import MODELS, build_model


def test_multiply_adds_count_kept_weights_only():
    model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.Flatten(), nn.Linear(16 * 4 * 4, 10))
    dense = 16 * 4 * 4 * 8 * 9 + 16 * 4 * 4 * 10
    assert multiply_adds(model, (8, 4, 4)) == dense
    mpd.mpdify_(model, {"0": 4})
    assert multiply_adds(model, (8, 4, 4)) == 16 * 4 * 4 * 8 * 9 // 4 + 16 * 4 * 4 * 10


@pytest.mark.parametrize("name", ["deep-mnist", "tf-cifar10", "resnet18-cifar", "vgg11-cifar"])
def test_thin_dense_has_the_parameters_asked_for_and_runs(name):
    target = sum(p.numel() for p in build_model(name).parameters()) // 4
    thin = thin_dense(name, target)
    assert abs(sum(p.numel() for p in thin.parameters()) / target - 1) < 0.03
    with torch.no_grad():
        out = thin.eval()(torch.randn(2, *MODELS[name].input_shape))
    assert out.shape == (2, MODELS[name].num_classes)


def test_cnn_bench_report_and_command(tmp_path, capsys):
    result = run_cnn_bench(CnnProfile(models=("deep-mnist",), factors=(2,), batches=(1,), repeats=1, training_batch=4))
    (row,) = result["rows"]
    variants = {"dense", "mpd_fc", "mpd_conv_fc", "thin_dense"}
    assert set(row["seconds"]) == variants | {f"{v} channels_last" for v in variants}
    macs = row["multiply_adds"]
    assert macs["dense"] > macs["mpd_fc"] > macs["mpd_conv_fc"]
    (training,) = result["training_rows"]
    assert set(training["seconds"]) == {"dense", "masked", "compact", "thin_dense"} and training["batch"] == 4
    state = {k: v["weights"] for k, v in training["state_bytes"].items()}
    assert state["masked"] == state["dense"] and state["compact"] < state["dense"] / 1.9  # c = 2, first conv dense
    report = render_cnn_report(result)
    assert (
        "| deep-mnist | 2 | 1 | channels first | 1.00× |" in report
        and "| deep-mnist | 2 | 1 | channels last |" in report
        and "## Training step" in report
        and "| deep-mnist | 2 | 4 |" in report
    )
    with pytest.raises(ConfigError, match="layouts must be"):
        run_cnn_bench(CnnProfile(models=("deep-mnist",), layouts=("nhwc",)))
    out = tmp_path / "cnn"
    args = ["bench", "--profile", "cnn", "--models", "vgg11-cifar", "--factors", "8", "--batches", "1"]
    args += ["--layouts", "channels_last", "--training-batch", "0"]
    assert main([*args, "--out", str(out), "--quiet"]) == 0
    saved = json.loads((out / "bench_cnn.json").read_text())
    assert saved["rows"][0]["model"] == "vgg11-cifar" and saved["rows"][0]["layouts"] == ["channels_last"]
    assert "| vgg11-cifar | 8 | 1 | channels last |" in (out / "bench_cnn.md").read_text()
    assert saved["training_rows"] == [] and saved["profile"]["training_batch"] is None
    assert main(["bench", "--profile", "cnn", "--models", "resnet-50", "--quiet"]) == 2
    assert "unknown models" in capsys.readouterr().err


def test_cnn_report_of_a_gpu_run_has_eager_and_cuda_graph_rows():
    """What a GPU run records (eager and CUDA-graph medians; None where capture failed) renders
    as both kinds of rows; written after every row."""
    rows = []
    result = run_cnn_bench(
        CnnProfile(
            models=("deep-mnist",),
            factors=(2,),
            batches=(1,),
            repeats=1,
            layouts=("channels_last",),
            training_batch=None,
        ),
        on_row=lambda so_far: rows.append(len(so_far["rows"])),
    )
    assert rows == [1]
    (row,) = result["rows"]
    row["graph_seconds"] = {**row["seconds"], "thin_dense channels_last": None}
    result["profile"]["device"], result["machine"]["gpu"] = "cuda", "NVIDIA H100"
    report = render_cnn_report(result)
    assert "NVIDIA H100 (cuDNN; timed by CUDA events)" in report
    assert "| deep-mnist | 2 | 1 | channels last | 1.00× |" in report
    assert "| deep-mnist | 2 | 1 | channels last, CUDA graph | 1.00× |" in report and "(not capturable)" in report
    if not torch.cuda.is_available():  # refused before any model is built
        with pytest.raises(ConfigError, match="cuda"):
            run_cnn_bench(CnnProfile(models=("deep-mnist",), device="cuda"))


def test_accuracy_study_trains_every_variant_at_matching_sizes():
    from mpdcompress.experiments.cnn_accuracy import VARIANTS, CnnAccuracyProfile, render_cnn_accuracy, run_cnn_accuracy

    profile = CnnAccuracyProfile(model="deep-mnist", dataset="fake", epochs=1, seeds=(0,), train_limit=64)
    results = run_cnn_accuracy(profile)
    sizes = {row["variant"]: row["parameters"] for row in results["rows"]}
    assert set(sizes) == set(VARIANTS)
    assert abs(sizes["thin_dense"] / sizes["mpd_conv_fc"] - 1) < 0.03 and sizes["dense"] > 3 * sizes["thin_dense"]
    assert all(0 <= row["accuracy"] <= 1 for row in results["rows"])
    assert all(row["epoch_accuracies"][-1] == row["accuracy"] for row in results["rows"])
    report = render_cnn_accuracy(results, "test")
    assert "| thin_dense |" in report and "after each epoch" in report and "Partial" not in report


def test_accuracy_study_resumes_without_training_the_runs_it_has(monkeypatch):
    from mpdcompress.experiments import cnn_accuracy
    from mpdcompress.experiments.cnn_accuracy import CnnAccuracyProfile, render_cnn_accuracy, resumable_rows

    first = CnnAccuracyProfile(model="deep-mnist", dataset="fake", epochs=1, seeds=(0,), train_limit=64)
    written = []
    earlier = cnn_accuracy.run_cnn_accuracy(first, on_row=lambda r: written.append(len(r["rows"])))
    assert written == [1, 2, 3]  # the results after every run, for a study cut short
    trained = []
    real_train = cnn_accuracy.train
    monkeypatch.setattr(
        cnn_accuracy, "train", lambda config, **kw: trained.append(config.seed) or real_train(config, **kw)
    )
    both = CnnAccuracyProfile(model="deep-mnist", dataset="fake", epochs=1, seeds=(0, 1), train_limit=64)
    partial = []
    results = cnn_accuracy.run_cnn_accuracy(
        both, done=resumable_rows(earlier, both), on_row=lambda r: partial.append(render_cnn_accuracy(r, "t"))
    )
    assert trained == [1, 1, 1]  # seed 0 of every variant came from the earlier run
    assert [row for row in results["rows"] if row["seed"] == 0] == earlier["rows"]
    # what a run cut short after its first training writes still holds every earlier row
    assert "Partial: 4 of the 6 training runs are done" in partial[0] and "Partial" not in partial[-1]
    older = {**earlier, "rows": [{k: v for k, v in row.items() if k != "epoch_accuracies"} for row in earlier["rows"]]}
    assert "after each epoch" not in render_cnn_accuracy(older, "t")  # rows from before the curves were kept
    with pytest.raises(ConfigError, match="epochs 1 there, 2 here"):
        resumable_rows(earlier, CnnAccuracyProfile(model="deep-mnist", dataset="fake", epochs=2, train_limit=64))


def test_train_width_flag_trains_a_thinner_model(tmp_path):
    out = tmp_path / "thin"
    args = ["train", "--model", "deep-mnist", "--dataset", "fake", "--train-limit", "32", "--epochs", "1"]
    assert main([*args, "-c", "0", "--width", "0.5", "--batch-size", "16", "--out", str(out), "--quiet"]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["config"]["width"] == 0.5


def test_filter_pruning_keeps_the_strongest_units_and_their_downstream_slices():
    """A pruned Deep MNIST computes exactly the dense one with the pruned units' weights and
    biases zeroed (no BatchNorm: a zeroed unit then contributes nothing), which pins every
    slice, the Flatten's channel blocks included."""
    from mpdcompress.bench.filter_pruning import prune_filters

    torch.manual_seed(0)
    dense = build_model("deep-mnist").eval()
    same = prune_filters(dense, 1.0)
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(same(x), dense(x))
    pruned = prune_filters(dense, 0.5)
    assert [m.weight.shape[0] for m in pruned if hasattr(m, "weight")] == [16, 32, 512, 10]
    zeroed = build_model("deep-mnist").eval()
    zeroed.load_state_dict(dense.state_dict())
    with torch.no_grad():
        for index in (0, 3, 7):  # conv1, conv2, fc1
            layer = zeroed[index]
            norms = layer.weight.abs().flatten(1).sum(1)
            dropped = norms.argsort()[: layer.weight.shape[0] // 2]
            layer.weight[dropped] = 0
            layer.bias[dropped] = 0
        assert torch.allclose(pruned(x), zeroed(x), atol=1e-5)


def test_filter_pruning_slices_batchnorm_and_refuses_residuals():
    from mpdcompress.bench.filter_pruning import prune_filters
    from mpdcompress.errors import CompressionError

    pruned = prune_filters(build_model("vgg11-cifar"), 0.5)
    norms = [m for m in pruned.modules() if isinstance(m, nn.BatchNorm2d)]
    assert [n.num_features for n in norms] == [32, 64, 128, 128, 256, 256, 256, 256]
    assert pruned(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(CompressionError, match="residual"):
        prune_filters(build_model("resnet18-cifar"), 0.5)
