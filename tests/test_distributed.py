"""torchrun + DDP on CPU (gloo): equivalence with one process, mask checks, faults, stops, resume."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from mpdcompress.train import TrainConfig, train
from mpdcompress.train.inputs import rank_micro_batches, step_plan

from .helpers import small_config

CLI = ["-m", "mpdcompress", "train"]


def torchrun(args, env, nproc=2, **popen):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def finish(proc, timeout=300):
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def weights(path: Path) -> dict:
    return torch.load(path / "checkpoint.pt", weights_only=True)["model"]


def max_relative_difference(a: dict, b: dict) -> float:
    worst = 0.0
    for key, value in a.items():
        if value.is_floating_point():
            worst = max(worst, float((value - b[key]).abs().max() / value.abs().max().clamp_min(1e-12)))
        else:
            assert torch.equal(value, b[key]), key
    return worst


@given(
    n=st.integers(40, 400),
    world=st.sampled_from([1, 2, 3, 4]),
    accumulation=st.sampled_from([1, 2, 5]),
    micro=st.integers(1, 8),
    epoch=st.integers(0, 3),
)
def test_every_step_covers_the_single_process_batch(n, world, accumulation, micro, epoch):
    batch = world * accumulation * micro
    if n < batch:
        return
    plan = step_plan(batch, micro, world, n)
    single = rank_micro_batches(n, step_plan(batch, None, 1, n), 0, seed=7, epoch=epoch)
    per_rank = [rank_micro_batches(n, plan, r, seed=7, epoch=epoch) for r in range(world)]
    assert plan.steps_per_epoch == len(single) == n // batch
    for step, images in enumerate(single):
        mine = [
            i for r in range(world) for b in per_rank[r][step * accumulation : (step + 1) * accumulation] for i in b
        ]
        assert sorted(mine) == sorted(images)
    # One process keeps the trainer's historical order: randperm seeded seed*100_003 + epoch.
    expected = torch.randperm(n, generator=torch.Generator().manual_seed(7 * 100_003 + epoch)).tolist()
    assert [i for b in single for i in b] == expected[: len(single) * batch]


def test_batch_split_errors_say_what_to_change():
    with pytest.raises(ValueError, match="does not split over 3 processes"):
        step_plan(512, None, 3, 10_000)
    with pytest.raises(ValueError, match="--micro-batch 48 does not divide"):
        step_plan(512, 48, 2, 10_000)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        step_plan(512, None, 2, 100)


# Equivalence is checked with SGD (the AlexNet recipe's optimizer): rounding differences stay at
# float level (~2e-7 here). Adam divides by the gradient's own magnitude, so where a gradient
# nearly cancels to zero, rounding decides the sign of a full-size step: ~1e-4 after 12 steps.
SGD = dict(optimizer="sgd", lr=0.05)


def test_gradient_accumulation_matches_the_whole_batch(data_dir):
    whole = train(small_config(epochs=2, batch_size=100, **SGD))
    accumulated = train(small_config(epochs=2, batch_size=100, micro_batch=25, **SGD))
    assert max_relative_difference(whole.model.state_dict(), accumulated.model.state_dict()) < 1e-5
    assert accumulated.history[-1]["test_accuracy"] == pytest.approx(whole.history[-1]["test_accuracy"], abs=0.01)


@pytest.mark.parametrize("mode, micro", [("masked", None), ("compact", 25)])
def test_two_processes_give_the_weights_of_one(data_dir, tmp_path, mode, micro):
    """torchrun --nproc_per_node=2 (gloo) vs one process with the same global batch of 100."""
    config = small_config(epochs=2, batch_size=100, mode=mode, micro_batch=micro, **SGD)
    single = train(config).model.state_dict()
    args = [
        *CLI,
        "--compression",
        "4",
        "--epochs",
        "2",
        "--batch-size",
        "100",
        "--optimizer",
        "sgd",
        "--lr",
        "0.05",
        "--seed",
        "3",
        "--mode",
        mode,
        "--out",
        str(tmp_path / "ddp"),
        "--quiet",
    ] + (["--micro-batch", str(micro)] if micro else [])
    code, out = finish(torchrun(args, {**os.environ, "MPDCOMPRESS_DATA": str(data_dir)}))
    assert code == 0, out
    assert "2 processes (gloo)" in out
    # Float tolerance: gradients are summed in a different order (two halves, then all-reduce).
    assert max_relative_difference(single, weights(tmp_path / "ddp")) < 1e-5


def test_ranks_with_different_masks_are_stopped_by_name(tmp_path):
    script = tmp_path / "mismatch.py"
    script.write_text(
        textwrap.dedent("""
        import sys
        from mpdcompress.models import lenet300
        from mpdcompress import mpdify_
        from mpdcompress.train import MaskMismatchError, init_from_env, verify_identical_masks
        ctx = init_from_env("cpu")
        # Rank 1 was given another --mask-seed: every compressed layer differs, the first is named.
        model = mpdify_(lenet300(), 4, filter_fn=lambda m, name: name != "5", seed=ctx.rank)
        try:
            verify_identical_masks(model, ctx)
        except MaskMismatchError as exc:
            print(f"rank {ctx.rank}: {exc}", flush=True)
            sys.exit(3)
    """)
    )
    code, out = finish(torchrun([str(script)], dict(os.environ)))
    assert code != 0
    assert "compressed layer '1': rank 1 built a different mask than rank 0" in out
    assert out.count("built a different mask") == 2  # every rank stops, none trains on


def _deep_args(out: Path, extra=()):
    return [
        *CLI,
        "--model",
        "deep-mnist",
        "--dataset",
        "fake",
        "--train-limit",
        "2400",
        "--batch-size",
        "100",
        "--epochs",
        "2",
        "--compression",
        "8",
        "--seed",
        "1",
        "--checkpoint-every",
        "2",
        "--out",
        str(out),
        "--quiet",
        *extra,
    ]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """Two ranks, Deep MNIST (dropout: every rank's random state matters) on fake data, no faults."""
    out = tmp_path_factory.mktemp("ref")
    code, log = finish(torchrun(_deep_args(out), dict(os.environ)))
    assert code == 0, log
    return weights(out)


def _worker_pids(parent: int) -> dict[int, int]:
    """LOCAL_RANK → pid of torchrun's worker processes."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1]) != parent:
                continue
            env = dict(kv.split("=", 1) for kv in (proc / "environ").read_bytes().decode().split("\0") if "=" in kv)
        except (OSError, ValueError, IndexError):
            continue
        if "LOCAL_RANK" in env:
            found[int(env["LOCAL_RANK"])] = int(proc.name)
    return found


def _wait_for_mid_epoch_checkpoint(path: Path, proc, min_step=2, timeout=180):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if path.exists():
            try:
                state = torch.load(path, weights_only=True)
            except Exception:  # being replaced right now
                state = None
            if state and state["epoch"] == 0 and state["step"] >= min_step:
                return state
        time.sleep(0.05)
    raise AssertionError("no mid-epoch checkpoint appeared")


def test_killing_one_rank_stops_the_job_and_resume_reaches_the_same_weights(tmp_path, uninterrupted):
    out = tmp_path / "run"
    proc = torchrun(_deep_args(out), dict(os.environ))
    _wait_for_mid_epoch_checkpoint(out / "checkpoint.pt", proc)
    pids = _worker_pids(proc.pid)
    os.kill(pids[1], signal.SIGKILL)
    code, log = finish(proc)
    assert code != 0
    assert "another rank died, was killed or lost its connection" in log or "SIGKILL" in log, log
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert (state["epoch"], state["step"]) < (2, 0)
    code, log = finish(torchrun(_deep_args(out, ["--resume"]), dict(os.environ)))
    assert code == 0, log
    assert max_relative_difference(uninterrupted, weights(out)) == 0.0


def test_sigterm_saves_where_all_ranks_stopped_and_resume_reaches_the_same_weights(tmp_path, uninterrupted):
    out = tmp_path / "run"
    proc = torchrun(_deep_args(out, ["--checkpoint-every", "1000"]), dict(os.environ))
    ckpt = out / "checkpoint.pt"
    deadline = time.time() + 180
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)  # the end of epoch 1
    proc.send_signal(signal.SIGTERM)  # torchrun passes it on to every rank
    code, log = finish(proc)
    assert code != 0
    assert "interrupted: stopped at epoch" in log, log
    state = torch.load(ckpt, weights_only=True)
    assert (state["epoch"], state["step"]) == (1, 10)  # ranks agree on stopping every 10 steps
    code, log = finish(torchrun(_deep_args(out, ["--resume"]), dict(os.environ)))
    assert code == 0, log
    assert max_relative_difference(uninterrupted, weights(out)) == 0.0


def test_bf16_autocast_and_compile_train(data_dir):
    bf16 = train(small_config(epochs=1, precision="bf16"))
    assert bf16.test_accuracy > 0.5
    compiled = train(small_config(epochs=1, mode="compact", compile=True), max_steps=4)
    assert all(torch.isfinite(p).all() for p in compiled.model.parameters())


def test_fake_dataset_has_the_model_input_shape():
    from mpdcompress.train.inputs import open_datasets

    train_data, test_data = open_datasets(TrainConfig(model="alexnet-fc", dataset="fake", train_limit=64).resolved())
    images, labels = train_data.__getitems__([0, 5, 63])
    assert images.shape == (3, 16384) and images.dtype == torch.uint8 and labels.max() < 1000
    assert len(train_data) == 64
    with pytest.raises(ValueError, match="train it on --dataset fake"):
        open_datasets(TrainConfig(model="alexnet-fc", dataset="mnist").resolved())
    with pytest.raises(ValueError, match="lenet300 takes 1-channel 28x28 images; imagenet has 3-channel"):
        open_datasets(TrainConfig(model="lenet300", dataset="imagenet").resolved())


def test_stop_request_mid_epoch_resumes_exactly_with_dropout(tmp_path):
    """Deep MNIST has dropout, so this also checks that the random stream continues exactly."""
    import itertools

    from mpdcompress.train import TrainingInterrupted

    config = TrainConfig(
        model="deep-mnist", dataset="fake", train_limit=800, batch_size=100, epochs=2, compression=8, seed=1
    )
    reference = train(config).model.state_dict()
    calls = itertools.count()
    with pytest.raises(TrainingInterrupted, match="stopped at epoch 1, step 4; resume from"):
        train(config, checkpoint_dir=tmp_path, should_stop=lambda: next(calls) >= 3)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert (state["epoch"], state["step"]) == (0, 4)
    resumed = train(config, checkpoint_dir=tmp_path, resume=True)
    assert max_relative_difference(reference, resumed.model.state_dict()) == 0.0
    assert len(resumed.history) == 2


def test_compiled_bf16_compact_training_runs_under_ddp(data_dir, tmp_path):
    args = [
        *CLI,
        "--compression",
        "4",
        "--epochs",
        "1",
        "--batch-size",
        "100",
        "--mode",
        "compact",
        "--compile",
        "--precision",
        "bf16",
        "--out",
        str(tmp_path / "run"),
        "--quiet",
    ]
    code, out = finish(torchrun(args, {**os.environ, "MPDCOMPRESS_DATA": str(data_dir)}))
    assert code == 0, out
    assert all(torch.isfinite(v).all() for v in weights(tmp_path / "run").values() if v.is_floating_point())
    assert (tmp_path / "run" / "packed.safetensors").is_file()
