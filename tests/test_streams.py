"""Residual streams: found in a ResNet, one channel order per stream with shared_streams=True,
and packed models that keep each such stream in that order, so that only the gather inside each
residual body is left, computing what the masked model computes in every form."""

import copy
import dataclasses
from unittest import mock

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import mpdcompress as mpd
from mpdcompress.cli.main import main
from mpdcompress.core.streams import relabel_streams_, residual_streams
from mpdcompress.errors import ConfigError
from mpdcompress.models import build_model
from mpdcompress.nn import Residual, conv_chain, packed_conv
from mpdcompress.train import TrainConfig
from mpdcompress.train.config import comparable

from .helpers import assert_close_to_scale, assert_onnx_export_command_matches
from .test_convs import CHANNELWISE
from .test_fold_batchnorm import _trained_statistics


def _resnet(c=8, shared=True, seed=0):
    torch.manual_seed(seed)
    model = _trained_statistics(build_model("resnet18-cifar"))
    return mpd.mpdify_(model, c, convs=True, seed=seed, shared_streams=shared).eval()


def _gathers(model, x):
    """How many channel gathers a forward of ``model`` runs."""
    calls = []

    def counted(module):
        original = module.gather_channels
        return mock.patch.object(module, "gather_channels", side_effect=lambda *a: calls.append(1) or original(*a))

    with counted(conv_chain), counted(packed_conv), torch.no_grad():
        model(x)
    return len(calls)


def test_a_resnet_has_one_stream_per_stage_with_its_readers_and_writers():
    streams = residual_streams(build_model("resnet18-cifar"))
    assert [s.channels for s in streams] == [64, 128, 256, 512]
    # stage 1: the stem and both bodies write; both bodies and the next block (body and shortcut)
    # read. Later stages: written by the first block's body and shortcut and the second body.
    assert [(len(s.writers), len(s.readers)) for s in streams] == [(3, 4), (3, 3), (3, 3), (3, 2)]
    parent, key = streams[-1].readers[-1]
    assert isinstance(parent._modules[key], nn.Linear)  # after the pool and the Flatten


def test_shared_streams_give_every_conv_on_a_stream_its_order_and_keep_the_inner_ones_random():
    model = _resnet(4)
    again = _resnet(4)
    for stream in residual_streams(model):
        orders = [
            m.row_order if side == "writer" else m.col_order for side, m in stream.convs() if hasattr(m, "row_order")
        ]
        assert len(orders) >= 3 and all(torch.equal(o, orders[0]) for o in orders)
        assert not torch.equal(orders[0], torch.arange(stream.channels))
    body = model[3].body  # the first block: conv1's outputs and conv2's inputs are drawn apart
    assert not torch.equal(body[0].row_order, body[3].col_order)
    for a, b in zip(model.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)  # the same seed draws the same masks
    independent = _resnet(4, shared=False)
    assert not torch.equal(independent[3].body[0].col_order, independent[4 + 1].body[0].col_order)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_a_packed_resnet_with_shared_streams_gathers_only_inside_its_bodies_and_computes_the_same(memory_format):
    masked = _resnet(8)
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=memory_format)
    packed = mpd.pack(masked).eval().to(memory_format=memory_format)
    with torch.no_grad():
        expected = masked(x)
        assert_close_to_scale(packed(x), expected, 1e-5)
    assert _gathers(packed, x) == 8  # one per block, between its two convolutions; 30 with independent orders
    assert _gathers(mpd.pack(_resnet(8, shared=False)).eval(), x) == 30
    unpacked = mpd.unpack(packed)  # the same function, its stream channels renamed
    with torch.no_grad():
        assert_close_to_scale(unpacked(x), expected, 1e-5)
        repacked = mpd.pack(unpacked).eval()
        assert_close_to_scale(repacked(x), expected, 1e-5)
    assert _gathers(repacked, x) == 8
    with torch.no_grad():
        mpd.fold_batchnorm_(packed)
        assert_close_to_scale(packed(x), expected, 1e-5)


def test_gradients_through_a_renamed_stream_match_the_masked_model():
    masked = _resnet(4).train()
    packed = mpd.pack(masked).train()
    x = torch.randn(4, 3, 32, 32)
    torch.manual_seed(1)
    masked(x).square().sum().backward()
    packed(x).square().sum().backward()
    order = masked[3].body[0].col_order  # the first stream's order: the renamed stem's rows
    assert torch.equal(packed[3].body[0].layers[0].col_order, torch.arange(64))
    assert_close_to_scale(packed[0].weight.grad, masked[0].weight.grad[order], 1e-4)
    assert_close_to_scale(packed[1].weight.grad, masked[1].weight.grad[order], 1e-4)  # its BatchNorm


def test_streams_it_cannot_rename_keep_their_gathers_and_stay_exact():
    """A stream that leaves its Sequential, one whose factor does not divide its channels and a
    pre-activation block (BatchNorm before the first convolution) with a Flatten to a linear
    layer that reads several positions per channel."""
    torch.manual_seed(0)

    def block(channels, out=None):
        out = out or channels
        body = nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU(), nn.Conv2d(channels, out, 3, padding=1),
                             nn.BatchNorm2d(out), nn.ReLU(), nn.Conv2d(out, out, 3, padding=1))  # fmt: skip
        return Residual(body, None if out == channels else nn.Conv2d(channels, out, 1))

    model = _trained_statistics(
        nn.Sequential(
            nn.Conv2d(3, 12, 3, padding=1),
            block(12),
            nn.MaxPool2d(2),
            block(12, 18),
            block(18),
            nn.Flatten(),
            nn.Linear(18 * 4 * 4, 5),
        )  # fmt: skip
    )
    assert [s.channels for s in residual_streams(model)] == [12, 18]
    mpd.mpdify_(model, 4, convs=True, shared_streams=True)
    x = torch.randn(2, 3, 8, 8)
    packed = mpd.pack(model).eval()
    with torch.no_grad():
        assert_close_to_scale(packed(x), model(x), 1e-5)
    # The 12-channel stream splits in 4 and is renamed: block 1 keeps its inner gather only, block 2
    # gathers nothing on its input side. 4 does not divide 18: that stream keeps its gathers (block
    # 2's body and shortcut outputs, block 3's three).
    assert _gathers(packed, x) == 1 + 3 + 3
    inner = nn.Sequential(block(12), block(12))  # nothing known writes or reads this stream
    assert residual_streams(nn.Sequential(nn.Conv2d(3, 12, 1), inner)) == []


def test_relabelling_is_a_no_op_without_shared_orders_and_for_compact_training():
    masked = _resnet(4, shared=False)
    copy_ = copy.deepcopy(masked)
    assert relabel_streams_(copy_) == 0
    assert all(
        a is not b and torch.equal(a, b) for a, b in zip(masked.state_dict().values(), copy_.state_dict().values())
    )
    compact = mpd.mpdify_(_trained_statistics(build_model("resnet18-cifar")), 4, convs=True, shared_streams=True,
                          mode="compact")  # fmt: skip
    assert isinstance(compact[0], nn.Conv2d)  # compact mode keeps dense neighbours as they are


def test_files_and_onnx_of_a_packed_resnet_with_shared_streams(tmp_path):
    masked = _resnet(8)
    packed = mpd.fold_batchnorm_(mpd.pack(masked).eval())
    path = mpd.save(packed, tmp_path / "resnet.safetensors", input_shape=(3, 32, 32))
    loaded = mpd.load(path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), packed(x))
    assert _gathers(loaded, x) == 8
    assert loaded.mpd_config.shared_streams
    assert_onnx_export_command_matches(path, tmp_path / "resnet.onnx", packed)


def test_shared_streams_config_is_checked_and_recorded_only_when_set():
    with pytest.raises(ConfigError, match="shared_streams.*masks='weights'"):
        mpd.MPDConfig(4, masks="weights", shared_streams=True)
    assert "shared_streams" not in mpd.MPDConfig(4).to_json()
    assert mpd.MPDConfig(4, shared_streams=True).to_json()["shared_streams"] is True
    with pytest.raises(ConfigError, match="compress_convs"):
        TrainConfig(model="resnet18-cifar", dataset="fake", compression=4, shared_streams=True).resolved()
    old_checkpoint = {k: v for k, v in dataclasses.asdict(TrainConfig()).items() if k != "shared_streams"}
    assert comparable(old_checkpoint) == comparable(dataclasses.asdict(TrainConfig()))


def test_train_cli_trains_and_packs_a_resnet_with_shared_streams(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--model", "resnet18-cifar", "--dataset", "fake", "--width", "0.125", "-c", "4",
            "--compress-convs", "--shared-streams", "--epochs", "1", "--train-limit", "64", "--batch-size", "32",
            "--optimizer", "adam", "--lr", "0.001", "--out", str(out), "--quiet"]  # fmt: skip
    assert main(args) == 0
    assert "residual streams share their channel orders" in capsys.readouterr().out
    assert main(["pack", str(out / "masked.safetensors"), "-o", str(tmp_path / "packed.safetensors")]) == 0
    packed = mpd.load(tmp_path / "packed.safetensors")
    assert packed.mpd_config.shared_streams
    assert _gathers(packed, torch.randn(1, 3, 32, 32)) == 8


@st.composite
def residual_nets(draw):
    """A dense stem, one to three residual blocks (post- or pre-activation, identity or
    convolution shortcuts, channel counts c may or may not divide), channel-wise modules between
    them, and a convolution or a Flatten and linear layer reading the last stream."""
    dims = draw(st.sampled_from([1, 2]))
    conv = nn.Conv1d if dims == 1 else nn.Conv2d
    norm = nn.BatchNorm1d if dims == 1 else nn.BatchNorm2d
    c = draw(st.integers(2, 4))
    channels = draw(st.sampled_from([c * 2, c * 3, c * 2 + 1]))
    modules = [conv(3, channels, 3, padding=1), norm(channels), nn.ReLU()]
    for _ in range(draw(st.integers(1, 3))):
        out = draw(st.sampled_from([channels, c * 3, c * 4 + 1]))
        mid = draw(st.integers(c, 12))
        if draw(st.booleans()):  # pre-activation: BatchNorm and ReLU on the stream, inside the body
            body = [
                norm(channels),
                nn.ReLU(),
                conv(channels, mid, 3, padding=1),
                norm(mid),
                nn.ReLU(),
                conv(mid, out, 1),
            ]
        else:
            body = [conv(channels, mid, 3, padding=1), norm(mid), nn.ReLU(), conv(mid, out, 3, padding=1), norm(out)]
        shortcut = None
        if out != channels or draw(st.booleans()):
            shortcut = (
                nn.Sequential(conv(channels, out, 1), norm(out)) if draw(st.booleans()) else conv(channels, out, 1)
            )
        modules.append(Residual(nn.Sequential(*body), shortcut))
        modules += [make(out, dims) for make in draw(st.lists(st.sampled_from(CHANNELWISE), max_size=2))]
        channels = out
    if draw(st.booleans()):
        modules.append(conv(channels, 5, 1))
    else:
        features = nn.Sequential(*modules)(torch.zeros(1, 3, *[8] * dims)).numel()
        modules += [nn.Flatten(), nn.Linear(features, 5)]
    return dims, c, nn.Sequential(*modules)


@given(residual_nets(), st.integers(0, 1000))
def test_residual_networks_with_shared_streams_pack_exactly_in_training_and_inference(net, seed):
    dims, c, model = net
    torch.manual_seed(seed)
    model = _trained_statistics(model)
    mpd.mpdify_(model, c, convs=True, seed=seed, shared_streams=True)
    packed = mpd.pack(model)
    x = torch.randn(3, 3, *[8] * dims)
    for training in (False, True):  # batch statistics too: a renamed stream's BatchNorms are permuted
        model.train(training)
        packed.train(training)
        with torch.no_grad():
            assert_close_to_scale(packed(x), model(x), 1e-5)
    with torch.no_grad():
        assert_close_to_scale(mpd.unpack(packed).eval()(x), model.eval()(x), 1e-5)
