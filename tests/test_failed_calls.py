"""API misuse: refused with a precise error, and a refused call changes nothing."""

import os
import stat
import time

import pytest
import torch
from torch import nn

import mpdcompress as mpd
from mpdcompress.errors import CompressionError, CompressionTypeError, ModelFileError, UnsupportedArchitectureError


def test_pack_and_unpack_with_nothing_to_convert():
    with pytest.raises(CompressionError, match="nothing to pack"):
        mpd.pack(nn.Sequential(nn.Linear(4, 4)))
    with pytest.raises(CompressionError, match="nothing to unpack"):
        mpd.unpack(nn.Sequential(nn.Linear(4, 4)))


def test_pack_on_the_meta_device_says_why():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4))
    mpd.mpdify_(model, 2)
    with pytest.raises(CompressionError, match="meta device"):
        mpd.pack(model)


def test_a_shared_linear_stays_shared_and_save_says_why():
    torch.manual_seed(0)
    shared = nn.Linear(6, 6)
    model = mpd.mpdify_(nn.Sequential(nn.Linear(8, 6), nn.ReLU(), shared, nn.ReLU(), shared), 2)
    packed = mpd.pack(model)
    x = torch.randn(3, 8)
    with torch.no_grad():
        torch.testing.assert_close(packed(x), model(x))
    layers = [m for m in packed.modules() if isinstance(m, mpd.BlockDiagonalLinear)]
    assert len({id(m) for m in layers}) == len(layers)  # modules() yields a shared module once
    assert packed[2] is packed[4]
    with pytest.raises(UnsupportedArchitectureError, match="share their tensor"):
        mpd.save(packed, "/nonexistent/never.safetensors")


def test_complex_weights_are_refused_at_save(tmp_path):
    model = mpd.mpdify_(nn.Sequential(nn.Linear(4, 4)), 2).to(torch.complex64)
    with pytest.raises(UnsupportedArchitectureError, match="complex64"):
        mpd.save(model, tmp_path / "c.safetensors")
    assert not list(tmp_path.iterdir())


def test_float_and_bool_seeds_are_refused():
    for seed in (1.5, True):
        with pytest.raises(CompressionTypeError):
            mpd.mpdify_(nn.Linear(8, 8), 2, seed=seed)
        with pytest.raises(CompressionTypeError):
            mpd.make_mask(8, 8, 2, seed=seed)


def test_a_failed_load_leaves_the_callers_model_as_it_was(tmp_path):
    torch.manual_seed(0)
    path = mpd.save(
        mpd.pack(mpd.mpdify_(nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4)), 2)), tmp_path / "m.safetensors"
    )
    other = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 5))  # does not fit the file
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ModelFileError):
        mpd.load(path, model=other)
    assert [type(m) for m in other] == [nn.Linear, nn.ReLU, nn.Linear]
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())
    fits = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4))
    loaded = mpd.load(path, model=fits)
    assert loaded is not fits and type(fits[0]) is nn.Linear  # the caller's model is a template


@pytest.mark.parametrize("packed", [False, True])
def test_a_refused_load_state_dict_keeps_the_masks(packed):
    model = mpd.mpdify_(nn.Sequential(nn.Linear(20, 12)), 3)
    model = mpd.pack(model) if packed else model
    good = {k: v.clone() for k, v in model.state_dict().items()}
    for key, bad in (("0.row_order", torch.zeros(12, dtype=torch.int64)), ("0.num_blocks", torch.tensor(100))):
        with pytest.raises(CompressionError):
            model.load_state_dict({**good, key: bad})
        assert all(torch.equal(good[k], v) for k, v in model.state_dict().items())


def test_saved_files_get_the_mode_a_plain_write_gives(tmp_path):
    model = mpd.mpdify_(nn.Sequential(nn.Linear(4, 4)), 2)
    old = os.umask(0o022)
    try:
        path = mpd.save(model, tmp_path / "m.safetensors")
        assert stat.S_IMODE(path.stat().st_mode) == 0o644
        path.chmod(0o640)
        mpd.save(model, path)  # replacing keeps the replaced file's mode
        assert stat.S_IMODE(path.stat().st_mode) == 0o640
    finally:
        os.umask(old)


def test_temporary_files_of_killed_writes_are_removed(tmp_path):
    stale, fresh = tmp_path / ".m.safetensors.abc123.tmp", tmp_path / ".m.safetensors.def456.tmp"
    stale.write_bytes(b"x" * 100)
    fresh.write_bytes(b"x")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    mpd.save(mpd.mpdify_(nn.Sequential(nn.Linear(4, 4)), 2), tmp_path / "m.safetensors")
    assert not stale.exists() and fresh.exists()  # a fresh one may belong to a write still running
