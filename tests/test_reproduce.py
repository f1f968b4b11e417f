import json

from mpdcompress.experiments import run_reproduction

from .helpers import write_fake_mnist


def test_quick_reproduction_slice_writes_the_report(tmp_path, monkeypatch):
    write_fake_mnist(tmp_path / "data" / "mnist", n_train=300, n_test=100, gz=True)
    write_fake_mnist(tmp_path / "data" / "fashion-mnist", n_train=300, n_test=100, gz=True, seed=1)
    monkeypatch.setattr("mpdcompress.data.sources.FASHION_SYSTEM_DIR", tmp_path / "nowhere")
    messages = []
    results = run_reproduction(
        tmp_path / "out",
        "quick",
        data_root=str(tmp_path / "data"),
        progress=messages.append,
        overrides={
            "lenet_epochs": 1,
            "deep_epochs": 1,
            "deep_train_limit": 100,
            "mask_study_masks": 2,
            "mask_study_epochs": 1,
            "ablation_epochs": 1,
            "init_seeds": 1,
        },
    )
    out = tmp_path / "out"
    report = (out / "report.md").read_text()
    saved = json.loads((out / "results.json").read_text())
    statuses = {(r["model"], r["dataset"]): r["status"] for r in saved["table"]}
    assert statuses[("lenet300", "mnist")] == "measured" and statuses[("lenet300", "fashion-mnist")] == "measured"
    assert statuses[("tf-cifar10", "cifar10")] == "data not available here"
    assert "mpdcompress train --recipe tf-cifar10" in report
    assert "torchrun --standalone --nproc_per_node=8 -m mpdcompress train --recipe alexnet-bn-imagenet" in report
    (out / "report.md").unlink()
    from mpdcompress.cli.main import main

    assert main(["reproduce", "--render-only", "--out", str(out)]) == 0
    assert (out / "report.md").read_text() == report
    lenet = next(r for r in saved["table"] if r["model"] == "lenet300" and r["dataset"] == "mnist")
    assert lenet["mpd"]["fc_weights"] == 27_520 and lenet["dense"]["fc_weights"] == 266_200
    assert len(saved["mask_study"]["accuracies"]) == 2 and abs(saved["mask_study"]["mask_sum_mean"] - 0.2) < 1e-6
    assert {(a["compression"], a["permuted"]) for a in saved["ablation"]} == {
        (10, True),
        (10, False),
        (5, True),
        (5, False),
    }
    for name in ("mask_study_accuracy.png", "mask_study_sum.png", "fig1_masks.png", "fig1_trained_layer.png"):
        assert (out / name).stat().st_size > 1000
    assert any(m.endswith("%") for m in messages) and results["profile"] == "quick"
    assert {(row["mode"], row["init"]) for row in saved["compact"]} == {
        ("compact", "block"),
        ("masked", "block"),
        ("compact", "dense"),
    }
    assert "Compact vs masked training" in report
    assert "Wall time of the whole run" in report


def test_stacked_mask_study_matches_separate_training_runs(tmp_path):
    """The stacked trainer is a faster way to run the same experiments, not a different one."""
    import torch

    from mpdcompress.data.sources import load_mnist
    from mpdcompress.experiments.mask_study import train_mask_study
    from mpdcompress.train import TrainConfig, train

    write_fake_mnist(tmp_path / "mnist", n_train=400, n_test=200, gz=True)
    tr, te = load_mnist("train", root=tmp_path, fetch=False), load_mnist("test", root=tmp_path, fetch=False)
    study = train_mask_study([7, 8], tr, te, epochs=2, seed=3)
    for k, mask_seed in enumerate([7, 8]):
        single = train(
            TrainConfig(model="lenet300", compression=10, epochs=2, seed=3, mask_seed=mask_seed, mode="compact"),
            train_split=tr,
            test_split=te,
        )
        assert abs(single.test_accuracy - study["accuracies"][k]) <= 1 / 200  # at most one test image flips
        assert torch.equal(study["fc2_masks"][k], single.model.get_submodule("1").layers[1].mpd_mask.dense())
