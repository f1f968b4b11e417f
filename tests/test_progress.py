"""The library's long calls show a bar on an interactive terminal and stay silent elsewhere, unless
told otherwise; a function given as ``progress`` gets the events and no bar is drawn."""

import copy
import io
import sys

import pytest
import torch
from torch import nn

import mpdcompress as mpd
from mpdcompress.errors import ConfigError
from mpdcompress.posthoc.calibrate import compress_calibrated
from mpdcompress.posthoc.distill import DistillConfig, distill
from mpdcompress.progress import progress_bars_enabled, reporting


class Terminal(io.StringIO):
    def isatty(self):
        return True


def terminal(monkeypatch) -> Terminal:
    """Standard error as a terminal whose text the test reads (set inside the test: pytest puts
    its own capture back between a fixture's setup and the test)."""
    stream = Terminal()
    monkeypatch.setattr(sys, "stderr", stream)
    return stream


@pytest.fixture(autouse=True)
def default_setting(monkeypatch):
    monkeypatch.delenv("MPDCOMPRESS_PROGRESS", raising=False)
    yield
    mpd.set_progress_bars(None)


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8)).eval()


def calibration():
    torch.manual_seed(1)
    return [torch.randn(32, 16) for _ in range(2)]


def test_calibration_shows_each_stage_on_a_terminal(monkeypatch):
    stderr = terminal(monkeypatch)
    compress_calibrated(mlp(), 4, calibration(), block_steps=2)
    shown = stderr.getvalue()
    for stage in ("choosing masks", "refitting", "tuning"):
        assert stage in shown


def test_distillation_shows_its_steps_on_a_terminal(monkeypatch):
    stderr = terminal(monkeypatch)
    teacher = mlp()
    student = mpd.mpdify_(copy.deepcopy(teacher), 4)
    distill(student, teacher, calibration(), DistillConfig(steps=3))
    assert "distilling" in stderr.getvalue()


def test_nothing_is_drawn_off_a_terminal_or_when_switched_off(monkeypatch):
    stderr = terminal(monkeypatch)
    mpd.set_progress_bars(False)
    compress_calibrated(mlp(), 4, calibration())
    assert stderr.getvalue() == ""
    mpd.set_progress_bars(None)
    monkeypatch.setenv("MPDCOMPRESS_PROGRESS", "0")
    assert not progress_bars_enabled()
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # a file or a pipe
    monkeypatch.delenv("MPDCOMPRESS_PROGRESS")
    assert not progress_bars_enabled()
    mpd.mpdify_(mlp(), 4, masks="weights")
    assert sys.stderr.getvalue() == ""
    monkeypatch.setenv("MPDCOMPRESS_PROGRESS", "1")
    assert progress_bars_enabled()
    mpd.mpdify_(mlp(), 4, masks="weights", progress=False)
    assert sys.stderr.getvalue() == ""
    mpd.mpdify_(mlp(), 4, masks="weights")
    assert "choosing masks" in sys.stderr.getvalue()


def test_a_function_gets_every_stage_s_events_and_no_bar_is_drawn(monkeypatch):
    stderr = terminal(monkeypatch)
    events = []
    compress_calibrated(mlp(), 4, calibration(), block_steps=2, progress=events.append)
    assert stderr.getvalue() == ""
    kinds = [next(k for k in ("mask", "layer", "block") if k in e) for e in events]
    assert kinds == ["mask"] * 3 + ["layer"] * 3 + ["block"]
    assert [e["index"] for e in events[:3]] == [1, 2, 3] and events[0]["masks"] == 3
    assert events[-1]["error_after"] <= events[-1]["error_before"]


def test_random_masks_take_no_time_and_show_nothing(monkeypatch):
    stderr = terminal(monkeypatch)
    mpd.mpdify_(mlp(), 4, progress=True)
    assert stderr.getvalue() == ""


def test_bad_settings_are_refused_by_name(monkeypatch):
    with pytest.raises(ConfigError, match="progress must be"):
        with reporting("yes", "x", "step", done="step", total="steps"):
            pass
    with pytest.raises(ConfigError, match="set_progress_bars"):
        mpd.set_progress_bars("on")
    monkeypatch.setenv("MPDCOMPRESS_PROGRESS", "yes")
    with pytest.raises(ConfigError, match="MPDCOMPRESS_PROGRESS must be 0 or 1"):
        progress_bars_enabled()


def test_training_shows_one_bar_over_every_epoch_on_a_terminal(data_dir, monkeypatch):
    from mpdcompress.train.loop import train

    from .helpers import small_config

    stderr = terminal(monkeypatch)
    events = []
    train(small_config(epochs=2), progress=events.append)  # a function: events, no bar
    assert stderr.getvalue() == ""
    steps = [e for e in events if e["event"] == "step"]
    assert [e["run_step"] for e in steps] == list(range(1, len(steps) + 1))
    assert steps[-1]["run_step"] == steps[-1]["run_steps"]
    train(small_config(epochs=1))
    assert "training" in stderr.getvalue()
