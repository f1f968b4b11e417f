"""Model files that store random masks as their seed: smaller, loaded bit for bit, and refused by
name wherever the drawn orders would not be the writer's."""

import copy

import pytest
import torch
from torch import nn

import mpdcompress as mpd
from mpdcompress.cli.main import main
from mpdcompress.errors import ConfigError, ModelFileError
from mpdcompress.files import seeded_masks

from .helpers import resigned


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(49, 30), nn.ReLU(), nn.Linear(30, 20), nn.ReLU(), nn.Linear(20, 10))


def cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 12, 3, padding=1), nn.ReLU(), nn.Conv2d(12, 6, 1)
    )


def _forms():
    masked_mlp = mpd.mpdify_(mlp(), 3, seed=7)
    masked_cnn = mpd.mpdify_(cnn(), 2, convs=True, seed=3)
    yield "masked mlp", masked_mlp, (1, 7, 7)
    yield "packed mlp", mpd.pack(copy.deepcopy(masked_mlp)), (1, 7, 7)
    yield "packed cnn", mpd.pack(copy.deepcopy(masked_cnn)), (3, 6, 6)
    if pytest.importorskip("torchao"):
        quantized = mpd.quantize_(mpd.pack(copy.deepcopy(masked_mlp)), "int4", dense_layers=True)
        yield "int4 mlp", quantized, (1, 7, 7)


def test_seeded_files_are_smaller_and_load_bit_for_bit(tmp_path):
    for label, model, shape in _forms():
        model.eval()
        stored = mpd.save(model, tmp_path / "orders.safetensors", input_shape=shape)
        seeded = mpd.save(model, tmp_path / "seed.safetensors", input_shape=shape, mask_storage="seed")
        manifest = mpd.read_manifest(seeded)
        assert manifest["format_version"] == 4 and set(manifest["seeded_orders"]) == set(manifest["layers"]), label
        assert seeded.stat().st_size < stored.stat().st_size, label
        x = torch.randn(3, *shape)
        with torch.no_grad():
            loaded = mpd.load(seeded).eval()
            assert torch.equal(loaded(x), model(x)), label
            template = mpd.load(seeded, model=mlp() if "mlp" in label else cnn()).eval()
            assert torch.equal(template(x), model(x)), label
        for key, value in model.state_dict().items():
            if key.endswith(("row_order", "col_order")):
                assert torch.equal(loaded.state_dict()[key], value), (label, key)


def test_masks_no_seed_draws_are_stored_as_orders(tmp_path):
    torch.manual_seed(0)
    model = mpd.mpdify_(mlp(), 3, masks="weights")  # chosen from the weights, not drawn from a seed
    path = mpd.save(model, tmp_path / "m.safetensors", mask_storage="seed")
    assert "seeded_orders" not in mpd.read_manifest(path) and mpd.read_manifest(path)["format_version"] == 2
    drawn = mpd.mpdify_(mlp(), 3, seed=1)
    drawn.get_submodule("1").row_order.copy_(torch.arange(30).flip(0))  # one layer's mask replaced by hand
    manifest = mpd.read_manifest(mpd.save(drawn, tmp_path / "d.safetensors", mask_storage="seed"))
    assert list(manifest["seeded_orders"]) == ["3", "5"]
    with pytest.raises(ConfigError, match="mask_storage must be one of orders, seed"):
        mpd.save(drawn, tmp_path / "x.safetensors", mask_storage="seeds")


def test_a_torch_that_draws_other_orders_is_refused_by_name(tmp_path, monkeypatch):
    path = mpd.save(mpd.pack(mpd.mpdify_(mlp(), 3, seed=7)), tmp_path / "m.safetensors", mask_storage="seed")
    real = seeded_masks.make_mask

    def other_torch(*args, **kwargs):
        mask = real(*args, **kwargs)
        return type(mask)(mask.layout, mask.row_order.flip(0), mask.col_order)

    monkeypatch.setattr(seeded_masks, "make_mask", other_torch)
    with pytest.raises(ModelFileError, match="draws other permutations from it than the writer's did"):
        mpd.load(path)


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda m: m["seeded_orders"].update({"1.layers.0": "0" * 64}), "draws other permutations"),
        (lambda m: m["seeded_orders"].update({"nowhere": "0" * 64}), "names layers the manifest does not list"),
        (lambda m: m.update(format_version=3), "need format version 4"),
        (lambda m: m.update(config=None), "need the compression config"),
        (lambda m: m["config"].update(masks="weights"), "the recorded config chose masks='weights'"),
        (lambda m: m["config"].update(seed=8), "draws other permutations"),
        (lambda m: m.update(seeded_orders=[]), "'seeded_orders' is malformed"),
    ],
)
def test_forged_seed_entries_are_refused(tmp_path, edit, message):
    path = mpd.save(mpd.pack(mpd.mpdify_(mlp(), 3, seed=7)), tmp_path / "m.safetensors", mask_storage="seed")
    with pytest.raises(ModelFileError, match=message):
        mpd.load(resigned(path, tmp_path, edit=edit))


def test_orders_stored_and_left_to_the_seed_at_once_are_refused(tmp_path):
    model = mpd.pack(mpd.mpdify_(mlp(), 3, seed=7))
    path = mpd.save(model, tmp_path / "m.safetensors", mask_storage="seed")
    order = model.state_dict()["1.layers.0.row_order"].to(torch.int16)
    with pytest.raises(ModelFileError, match="is stored and also left to its seed"):
        mpd.load(resigned(path, tmp_path, key="1.layers.0.row_order", value=order))


def test_the_quantize_and_pack_commands_write_seeded_files(tmp_path, capsys):
    pytest.importorskip("torchao")
    masked = mpd.save(mpd.mpdify_(mlp(), 3, seed=7), tmp_path / "masked.safetensors", input_shape=(1, 7, 7))
    for command in (["pack"], ["quantize", "--format", "int4", "--dense-layers"]):
        out = tmp_path / f"{command[0]}.safetensors"
        assert main([command[0], str(masked), "-o", str(out), *command[1:], "--mask-storage", "seed"]) == 0
        assert "seeded_orders" in mpd.read_manifest(out)
        assert main(["inspect", str(out)]) == 0
        assert "masks of 3 of 3 layers stored as seed 7 (drawn again on load" in capsys.readouterr().out
    assert "error" not in capsys.readouterr().err
