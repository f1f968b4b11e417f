"""Named recipes, --dry-run plans and --estimate."""

import pytest

from mpdcompress.cli.main import main
from mpdcompress.train import TrainConfig, make_plan


def test_alexnet_recipe_is_the_papers():
    config = TrainConfig.from_recipe("alexnet-bn-imagenet").resolved()
    assert (config.model, config.dataset, config.compression) == ("alexnet-bn", "imagenet", 8)
    assert (config.batch_size, config.lr, config.lr_step_epochs, config.optimizer) == (512, 3e-2, 30, "sgd")
    assert config.epochs == 200  # compressed models train twice as long
    assert TrainConfig.from_recipe("alexnet-bn-imagenet", compression=0).resolved().epochs == 100
    with pytest.raises(KeyError, match="unknown recipe"):
        TrainConfig.from_recipe("resnet")


def test_plan_splits_the_global_batch_and_counts_weights():
    plan = make_plan(TrainConfig.from_recipe("alexnet-bn-imagenet", mode="compact", micro_batch=32), world_size=8)
    assert (plan.global_batch, plan.micro_batch, plan.accumulation) == (512, 32, 2)
    assert plan.steps_per_epoch == 1_281_167 // 512 and plan.total_steps == plan.steps_per_epoch * 200
    assert (plan.fc_weights_dense, plan.fc_weights_kept) == (87_982_080, 10_997_760)
    assert plan.parameters_trained < plan.parameters_dense / 6


def test_dry_run_prints_the_plan_without_data(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MPDCOMPRESS_DATA", str(tmp_path))
    assert main(["train", "--recipe", "alexnet-bn-imagenet", "--dry-run", "--nproc", "4", "--micro-batch", "64"]) == 0
    out = capsys.readouterr().out
    assert "NOT present" in out and "1,281,167 training images" in out
    assert "global 512 = 4 processes x 64 per forward x 2 accumulation step(s)" in out
    assert "2,502 per epoch x 200 epochs = 500,400 optimizer steps" in out
    assert "87,982,080 -> kept 10,997,760" in out
    assert main(["train", "--recipe", "tf-cifar10", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "390 per epoch x 256 epochs" in out and "momentum 0.0" in out
    assert main(["train", "--recipe", "alexnet-bn-imagenet", "--dry-run", "--nproc", "3"]) == 2
    assert "does not split over 3 processes" in capsys.readouterr().err


def test_estimate_times_real_steps_and_projects_the_run(capsys):
    assert (
        main(
            [
                "train",
                "--model",
                "alexnet-fc",
                "--mode",
                "compact",
                "--epochs",
                "3",
                "--train-limit",
                "2048",
                "--batch-size",
                "64",
                "--estimate",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "plan: alexnet-fc on fake" in out
    assert "ms per optimizer step (median of 5" in out and "images/s" in out
    # alexnet-fc borrows AlexNet's recipe: fake images stand in for ImageNet, limited to 2,048 here
    assert "for 96 steps over imagenet's 2,048 training images (fake images timed)" in out


def test_estimate_on_fake_data_projects_the_recipes_real_dataset(capsys):
    assert (
        main(
            [
                "train",
                "--recipe",
                "alexnet-bn-imagenet",
                "--model",
                "alexnet-fc",
                "--dataset",
                "fake",
                "--mode",
                "compact",
                "--batch-size",
                "64",
                "--epochs",
                "1",
                "--estimate",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "for 20,018 steps over imagenet's 1,281,167 training images (fake images timed)" in out


def test_a_model_without_a_recipe_takes_its_registry_factor(capsys):
    flags = ["--epochs", "1", "--batch-size", "64", "--lr", "1e-3", "--optimizer", "adam", "--dry-run"]
    assert main(["train", "--model", "transformer-mlp", *flags]) == 0
    assert "plan: transformer-mlp on fake (MPD c=8, masked mode" in capsys.readouterr().out
    assert main(["train", "--model", "transformer-mlp", "-c", "0", *flags]) == 0
    assert "plan: transformer-mlp on fake (dense" in capsys.readouterr().out
    assert main(["train", "--model", "transformer-mlp", "--dry-run"]) == 2
    assert "has no recipe; give epochs, batch_size, lr, optimizer" in capsys.readouterr().err
