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


def test_a_shared_linear_stays_shared_through_save_and_load(tmp_path):
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
    mpd.save(packed, tmp_path / "shared.safetensors")
    # The file's architecture records the sharing, so it loads without the model as well.
    for loaded in (mpd.load(tmp_path / "shared.safetensors", model=packed), mpd.load(tmp_path / "shared.safetensors")):
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), packed(x), rtol=0, atol=0)
        assert loaded[2] is loaded[4] and loaded[2].weight_blocks is loaded[4].weight_blocks


def test_an_architecture_that_shares_what_is_not_there_is_refused(tmp_path):
    from pathlib import Path

    from mpdcompress.architecture import build
    from mpdcompress.modelfile import declared_values

    later = {"type": "Sequential", "children": [["0", {"type": "Shared", "of": "1"}], ["1", {"type": "ReLU"}]]}
    ancestor = {"type": "Sequential", "children": [["0", {"type": "Shared", "of": ""}]]}  # a cycle
    for spec in (later, ancestor):
        with pytest.raises(ModelFileError, match="comes nowhere before"):
            build(spec)
        with pytest.raises(ModelFileError, match="comes nowhere before"):  # the size check, before loading
            declared_values(spec, Path("f.safetensors"))


def test_the_two_readers_of_an_architecture_refuse_the_same_malformed_entries():
    # build() and the size check walk the same tree: an entry one of them accepts and the other
    # does not would let a file through the check that then fails to build (or the reverse).
    from pathlib import Path

    from mpdcompress.architecture import build
    from mpdcompress.modelfile import declared_values

    cases = {
        "malformed children": {"type": "Sequential", "children": [["0"]]},
        "malformed layers": {"type": "PackedChain", "layers": {"0": {}}, "activations": []},
        "not an object": {"type": "Sequential", "children": [["0", 3]]},
    }
    for message, spec in cases.items():
        with pytest.raises(ModelFileError, match=message):
            build(spec)
        with pytest.raises(ModelFileError, match=f"f.safetensors: .*{message}"):
            declared_values(spec, Path("f.safetensors"))


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


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize(
    "build,culprit",
    [
        (lambda: nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), "self_attn.out_proj"),
        (lambda: nn.utils.parametrizations.weight_norm(nn.Linear(8, 8)), "weight_norm"),
    ],
    ids=["multihead-attention", "weight-norm"],
)
def test_layers_the_mask_cannot_reach_are_refused_and_nothing_changes(build, culprit):
    torch.manual_seed(0)
    model = build()
    before, types = _state(model), [type(m) for m in model.modules()]
    with pytest.raises(CompressionError, match=culprit if "." in culprit else "parametrized"):
        mpd.mpdify_(model, 2)
    assert [type(m) for m in model.modules()] == types
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_head_tied_to_an_embedding_is_refused_and_the_embedding_kept():
    class LanguageModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(40, 16)
            self.mlp = nn.Linear(16, 16)
            self.head = nn.Linear(16, 40, bias=False)
            self.head.weight = self.embed.weight

    model = LanguageModel()
    before = _state(model)
    with pytest.raises(CompressionError, match="layer 'head' shares its weight with embed.weight"):
        mpd.mpdify_(model, 4)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    mpd.mpdify_(model, 4, filter_fn=lambda m, name: name != "head")  # the way out the message names
    assert isinstance(model.mlp, mpd.MPDLinear) and torch.equal(model.embed.weight, before["embed.weight"])


def test_packed_models_pickle():
    import pickle

    model = mpd.pack(mpd.mpdify_(nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4)), 2))
    again = pickle.loads(pickle.dumps(model))
    x = torch.randn(2, 8)
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x))
