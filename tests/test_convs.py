"""Compressed convolutions: the channel-plane mask, exact packing into a grouped convolution,
the default rules of mpdify_(..., convs=True), and training in both forms."""

import copy
import json
import pickle

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import mpdcompress as mpd
from mpdcompress.core.convert import conv_skip_reason
from mpdcompress.errors import CompressionError
from mpdcompress.models import build_model

from .helpers import assert_close_to_scale


@st.composite
def conv_cases(draw):
    dims = draw(st.sampled_from([1, 2]))
    d_in, d_out = draw(st.integers(1, 24)), draw(st.integers(1, 24))
    c = draw(st.integers(1, min(d_in, d_out)))
    kernel = draw(st.integers(1, 4))
    stride = draw(st.integers(1, 3))
    dilation = draw(st.integers(1, 2))
    padding = draw(st.sampled_from([0, 1, 2, "same", "valid"] if stride == 1 else [0, 1, 2]))
    return dims, d_in, d_out, c, kernel, stride, padding, dilation, draw(st.booleans())


def _conv(dims, d_in, d_out, kernel, stride, padding, dilation, bias):
    kind = nn.Conv1d if dims == 1 else nn.Conv2d
    return kind(d_in, d_out, kernel, stride=stride, padding=padding, dilation=dilation, bias=bias)


@given(conv_cases(), st.integers(0, 1000))
def test_packed_conv_computes_the_masked_conv(case, seed):
    dims, d_in, d_out, c, kernel, stride, padding, dilation, bias = case
    torch.manual_seed(seed)
    masked = mpd.mpdify_(_conv(dims, d_in, d_out, kernel, stride, padding, dilation, bias), {"": c}, seed=seed)
    packed = mpd.pack(masked)
    assert isinstance(packed, mpd.BlockDiagonalConv)
    size = (kernel - 1) * dilation + 1 + 3
    x = torch.randn(2, d_in, *[size] * dims)
    with torch.no_grad():
        assert_close_to_scale(packed(x), masked(x), 1e-5)
    back = mpd.unpack(packed)
    assert torch.equal(back.weight, masked.weight)
    assert (back.bias is None) == (not bias) and (not bias or torch.equal(back.bias, masked.bias))


def test_the_mask_is_the_same_at_every_kernel_position_and_stays_through_training():
    torch.manual_seed(0)
    conv = mpd.mpdify_(nn.Conv2d(12, 10, 3, padding=1), {"": 4}, seed=1)
    plane = conv.mpd_mask.dense()
    assert torch.equal(conv.mask.expand_as(conv.weight), plane[:, :, None, None].expand_as(conv.weight))
    assert int(plane.sum()) == conv.mpd_mask.layout.nnz
    opt = torch.optim.AdamW(conv.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(5):
        opt.zero_grad()
        conv(torch.randn(4, 12, 6, 6)).square().mean().backward()
        opt.step()
    assert not conv.weight[~plane].any()
    assert conv.weight[plane].abs().min() > 0


def test_compact_training_of_an_uneven_conv_keeps_padding_zero_and_matches_masked_training():
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Conv2d(10, 7, 3), nn.ReLU(), nn.Conv2d(7, 9, 1))
    masked = mpd.mpdify_(copy.deepcopy(dense), 3, convs=True, seed=0)
    compact = mpd.mpdify_(copy.deepcopy(dense), 3, convs=True, seed=0, mode="compact")
    assert sum(isinstance(m, mpd.BlockDiagonalConv) for m in compact.modules()) == 2
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (masked, compact)]
    for _ in range(10):
        x = torch.randn(4, 10, 8, 8)
        for model, opt in zip((masked, compact), opts):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
    for layer in [m for m in compact.modules() if isinstance(m, mpd.BlockDiagonalConv)]:
        assert layer.layout.nonzero_padding(layer.blocks(), layer.bias) is None
    x = torch.randn(2, 10, 8, 8)
    with torch.no_grad():
        assert_close_to_scale(compact(x), masked(x), 1e-5)


def test_default_rules_skip_image_grouped_depthwise_and_narrow_convs_with_reasons():
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3),  # reads the image
        nn.Conv2d(16, 32, 3),
        nn.Conv2d(32, 32, 3, groups=32),  # depthwise
        nn.Conv2d(32, 32, 1, groups=4),  # grouped
        nn.Conv2d(32, 32, 3, padding=1, padding_mode="circular"),
        nn.Conv2d(32, 6, 1),  # fewer channels than c
        nn.Flatten(),
        nn.LazyLinear(10),
    )
    model(torch.randn(1, 3, 16, 16))  # materializes the lazy linear
    mpd.mpdify_(model, 8, convs=True)
    assert set(mpd.compressed_layers(model)) == {"1", "7"}
    reasons = model.mpd_skipped
    assert set(reasons) == {"0", "2", "3", "4", "5"}
    assert "image" in reasons["0"] and "depthwise" in reasons["2"] and "groups=4" in reasons["3"]
    assert "padding_mode" in reasons["4"] and "fewer than c=8" in reasons["5"]
    assert conv_skip_reason(nn.Conv2d(64, 64, 3), 8) is None
    only_skipped = nn.Sequential(nn.Conv2d(16, 16, 3, groups=16), nn.Conv2d(16, 16, 3, padding_mode="reflect"))
    with pytest.raises(CompressionError, match=r"convolutions left dense: 0: depthwise.*; 1: padding_mode='reflect'"):
        mpd.mpdify_(only_skipped, 4, convs=True)  # why nothing was selected, not "no nn.Linear"


def test_convs_are_opt_in_and_explicit_choices_are_refused_by_name():
    model = build_model("deep-mnist")
    mpd.mpdify_(model, 4)
    assert all(isinstance(m, mpd.MPDLinear) for m in mpd.compressed_layers(model).values())
    grouped = nn.Sequential(nn.Conv2d(16, 16, 3, groups=2))
    with pytest.raises(CompressionError, match="'0' is a grouped convolution"):
        mpd.mpdify_(grouped, {"0": 2})
    with pytest.raises(CompressionError, match="padding_mode='reflect'"):
        mpd.mpdify_(nn.Sequential(nn.Conv1d(8, 8, 3, padding=1, padding_mode="reflect")), {"0": 2})
    named = nn.Sequential(nn.Conv2d(3, 8, 3))  # the default rules skip it; naming it compresses it
    mpd.mpdify_(named, {"0": 3})
    assert isinstance(named[0], mpd.MPDConv2d)


@pytest.mark.parametrize("name", ["deep-mnist", "tf-cifar10", "alexnet-bn"])
def test_paper_cnns_with_every_conv_but_the_first_pack_exactly(name):
    torch.manual_seed(0)
    model = build_model(name).eval()
    shape = {"deep-mnist": (1, 28, 28), "tf-cifar10": (3, 24, 24), "alexnet-bn": (3, 224, 224)}[name]
    mpd.mpdify_(model, 4, convs=True, seed=0)
    convs = [m for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d))]
    assert sum(isinstance(m, mpd.MPDConv2d) for m in convs) == len(convs) - 1
    packed = mpd.pack(model)
    x = torch.randn(2, *shape)
    with torch.no_grad():
        assert_close_to_scale(packed(x), model(x), 1e-5)
        assert torch.equal(mpd.unpack(packed)(x), model(x))
    dense_weights = sum(m.weight.numel() for m in build_model(name).modules() if hasattr(m, "weight"))
    packed_weights = sum(p.numel() for n, p in packed.named_parameters() if n.endswith(("weight", "weight_blocks")))
    assert packed_weights < dense_weights / 4 * 1.1 + convs[0].weight.numel()


def test_weight_chosen_masks_keep_more_of_a_conv_than_random_ones():
    torch.manual_seed(0)
    conv = nn.Conv2d(32, 32, 3)
    with torch.no_grad():  # a trained-looking weight: strong channel pairs
        conv.weight.mul_(torch.rand(32, 32, 1, 1).pow(4) * 4)
    mass = conv.weight.detach().square().sum()
    kept = {}
    for masks in ("random", "weights"):
        layer = mpd.mpdify_(copy.deepcopy(conv), {"": 4}, masks=masks, seed=0)
        kept[masks] = float(layer.weight.detach().square().sum() / mass)
    assert kept["weights"] > kept["random"] * 1.5


def test_block_init_scales_a_conv_to_its_block_fan_in():
    torch.manual_seed(0)
    dense = nn.Conv2d(64, 64, 3)
    layer = mpd.mpdify_(copy.deepcopy(dense), {"": 4}, init="block", seed=0)
    kept = layer.mask.expand_as(layer.weight)
    ratio = layer.weight[kept] / dense.weight.detach()[kept]
    assert torch.allclose(ratio, torch.full_like(ratio, 2.0))  # sqrt(64 / 16)


def test_state_dict_carries_the_conv_mask_and_bad_masks_are_refused():
    source = mpd.mpdify_(nn.Sequential(nn.Conv2d(8, 8, 3)), 2, convs=True, seed=1)
    target = mpd.mpdify_(nn.Sequential(nn.Conv2d(8, 8, 3)), 2, convs=True, seed=2)
    target.load_state_dict(source.state_dict())
    assert torch.equal(target[0].mask, source[0].mask) and torch.equal(target[0].weight, source[0].weight)
    state = source.state_dict()
    state["0.row_order"] = torch.zeros(8, dtype=torch.long)
    with pytest.raises(CompressionError):
        target.load_state_dict(state)
    packed = mpd.pack(source)
    state = packed.state_dict()
    other = mpd.pack(mpd.mpdify_(nn.Sequential(nn.Conv2d(8, 8, 3)), 2, convs=True, seed=3))
    other.load_state_dict(state)
    x = torch.randn(1, 8, 5, 5)
    with torch.no_grad():
        assert torch.equal(other(x), packed(x))


def test_meta_built_conv_gets_its_mask_back_and_packed_convs_pickle():
    with torch.device("meta"):
        model = nn.Sequential(nn.Conv2d(8, 16, 3), nn.ReLU(), nn.Conv2d(16, 8, 3))
    mpd.mpdify_(model, 4, convs=True, seed=0)
    model.to_empty(device="cpu")
    reference = mpd.mpdify_(nn.Sequential(nn.Conv2d(8, 16, 3), nn.ReLU(), nn.Conv2d(16, 8, 3)), 4, convs=True, seed=0)
    for a, b in zip(mpd.compressed_layers(model).values(), mpd.compressed_layers(reference).values()):
        assert torch.equal(a.mask, b.mask)
    packed = mpd.pack(reference)
    clone = pickle.loads(pickle.dumps(packed))
    x = torch.randn(1, 8, 9, 9)
    with torch.no_grad():
        assert torch.equal(clone(x), packed(x))


def test_compiled_and_channels_last_packed_convs_compute_the_same():
    torch.manual_seed(0)
    masked = mpd.mpdify_(nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 16, 3)), 4,
                         convs=True, seed=0).eval()  # fmt: skip
    packed = mpd.pack(masked)
    x = torch.randn(2, 16, 10, 10)
    with torch.no_grad():
        expected = masked(x)
        assert_close_to_scale(torch.compile(packed)(x), expected, 1e-5)
        last = packed.to(memory_format=torch.channels_last)
        assert_close_to_scale(last(x.to(memory_format=torch.channels_last)), expected, 1e-5)


def test_channels_last_input_stays_channels_last_through_every_gather():
    torch.manual_seed(0)
    masked = mpd.mpdify_(
        nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 24, 3, padding=1),
            nn.BatchNorm2d(24),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(24, 12, 3),
            nn.ReLU(),
            nn.Conv2d(12, 8, 1),  # a lone compressed conv after the chain's dense tail is not folded
        ),
        4,
        convs=True,
        seed=0,
    ).eval()
    packed = mpd.pack(masked).to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 12, 12)
    seen = []
    hooks = [
        m.register_forward_hook(lambda m, i, out: seen.append((type(m).__name__, out)))
        for m in packed.modules()
        if isinstance(m, (mpd.PackedConvChain, mpd.BlockDiagonalConv, nn.MaxPool2d, nn.BatchNorm2d))
    ]
    with torch.no_grad():
        out = packed(x.contiguous(memory_format=torch.channels_last))
    for hook in hooks:
        hook.remove()
    assert {name for name, _ in seen} >= {"PackedConvChain", "MaxPool2d"}
    for name, y in seen:
        assert y.is_contiguous(memory_format=torch.channels_last), name
    assert_close_to_scale(out, masked(x), 1e-5)
    # Autograd through the channels-last gathers (training the packed form).
    x_last = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    packed.train()(x_last).square().sum().backward()
    x_first = x.clone().requires_grad_()
    mpd.pack(masked).train()(x_first).square().sum().backward()
    assert_close_to_scale(x_last.grad, x_first.grad, 1e-5)


def _forged(tmp_path, model, edit_state=None, edit_manifest=None):
    """``model`` saved, then re-signed after an edit of its tensors or manifest, as a forger would."""
    from safetensors.torch import save as st_save

    from mpdcompress.files.header import manifest_digest, tensor_digest
    from mpdcompress.files.io import _index_dtype

    path = mpd.save(model, tmp_path / "forged.safetensors")
    manifest = mpd.read_manifest(path)
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("num_blocks")}
    if edit_state:
        edit_state(state)
    tensors = {k: (v.to(_index_dtype(v.numel())) if k.endswith("_order") else v).contiguous() for k, v in state.items()}
    manifest["sha256"] = {k: tensor_digest(t) for k, t in tensors.items()}
    if edit_manifest:
        edit_manifest(manifest)
    manifest["manifest_sha256"] = manifest_digest(manifest)
    path.write_bytes(st_save(tensors, metadata={"mpdcompress": json.dumps(manifest)}))
    return path


def _uneven_conv_model():
    torch.manual_seed(0)
    return mpd.mpdify_(nn.Sequential(nn.Conv2d(10, 7, 3), nn.Flatten()), 3, convs=True, seed=0).eval()


def test_conv_files_with_nonzero_padding_or_off_mask_weights_are_refused(tmp_path):
    packed = mpd.pack(_uneven_conv_model())

    def pad(state):
        state["0.weight_blocks"] = state["0.weight_blocks"].clone()
        state["0.weight_blocks"][-1, -1] = 1.0  # the last block has 2 of 3 rows and 3 of 4 columns

    with pytest.raises(mpd.ModelFileError, match="padding entries of 0.weight_blocks"):
        mpd.load(_forged(tmp_path, packed, edit_state=pad))
    masked = _uneven_conv_model()

    def off_mask(state):
        weight = state["0.weight"].clone()
        weight[~masked[0].mask.expand_as(weight)] = 1.0
        state["0.weight"] = weight

    with pytest.raises(mpd.ModelFileError, match="off its mask"):
        mpd.load(_forged(tmp_path, masked, edit_state=off_mask))


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda m: m["layers"]["0"].update(kernel_size=[5, 5]), r"declares weight_blocks of shape \(9, 4, 5, 5\)"),
        (lambda m: m["layers"]["0"].update(kernel_size=[3, 3, 3]), "malformed"),
        (lambda m: m["layers"]["0"].pop("kernel_size"), "malformed"),
        (lambda m: m["architecture"]["children"][0][1]["args"].update(stride=[0, 1]), r"Conv2d.stride must be"),
        (lambda m: m["architecture"]["children"][0][1]["args"].update(groups=2), r"unknown args"),
    ],
    ids=["kernel-vs-tensor", "kernel-dims", "no-kernel", "stride", "extra-arg"],
)
def test_conv_manifest_and_architecture_edits_are_refused(tmp_path, edit, message):
    packed = mpd.pack(_uneven_conv_model())
    with pytest.raises(mpd.ModelFileError, match=message):
        mpd.load(_forged(tmp_path, packed, edit_manifest=edit))


CHANNELWISE = [
    lambda ch, dims: (nn.BatchNorm1d if dims == 1 else nn.BatchNorm2d)(ch),
    lambda ch, dims: nn.ReLU(),
    lambda ch, dims: nn.GELU(),
    lambda ch, dims: (nn.MaxPool1d if dims == 1 else nn.MaxPool2d)(2, 1),
    lambda ch, dims: (nn.AvgPool1d if dims == 1 else nn.AvgPool2d)(2, 1),
]


@st.composite
def conv_stacks(draw):
    """A Sequential of convolutions (some compressed, uneven blocks included) with channel-wise
    modules between them, as pack meets them in CNNs."""
    dims = draw(st.sampled_from([1, 2]))
    c = draw(st.integers(2, 4))
    widths = draw(st.lists(st.integers(c, 13), min_size=2, max_size=5))
    compressed = draw(st.lists(st.booleans(), min_size=len(widths) - 1, max_size=len(widths) - 1))
    modules, factors = [], {}
    for i, (a, b) in enumerate(zip(widths, widths[1:])):
        if compressed[i]:
            factors[str(len(modules))] = c
        kind = nn.Conv1d if dims == 1 else nn.Conv2d
        modules.append(kind(a, b, draw(st.integers(1, 3)), padding=1, bias=draw(st.booleans())))
        for make in draw(st.lists(st.sampled_from(CHANNELWISE), max_size=3)):
            modules.append(make(b, dims))
    return dims, widths[0], modules, factors


@given(conv_stacks(), st.integers(0, 1000), st.booleans())
def test_fused_conv_chains_compute_the_masked_model_and_unpack_exactly(stack, seed, fold_dense):
    dims, channels, modules, factors = stack
    torch.manual_seed(seed)
    model = nn.Sequential(*modules)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            nn.init.uniform_(module.weight, 0.5, 2.0)
            nn.init.uniform_(module.bias, -1.0, 1.0)
    if not factors:
        return
    mpd.mpdify_(model, factors, seed=seed)
    packed = mpd.pack(model, fold_dense=fold_dense)
    unpacked = mpd.unpack(packed)
    assert list(unpacked.state_dict()) == list(model.state_dict())
    for key, value in model.state_dict().items():
        assert torch.equal(unpacked.state_dict()[key], value), key
    x = torch.randn(3, channels, *[9] * dims)
    for training in (False, True):  # batch statistics too: BatchNorm runs in block order
        model.train(training)
        packed.train(training)
        with torch.no_grad():
            assert_close_to_scale(packed(x), model(x), 1e-5)


@pytest.mark.parametrize("dims", [1, 2])
def test_channel_dropout_between_compressed_convs_keeps_them_in_one_chain(dims):
    conv = nn.Conv1d if dims == 1 else nn.Conv2d
    dropout = nn.Dropout1d if dims == 1 else nn.Dropout2d
    torch.manual_seed(0)
    model = nn.Sequential(
        conv(8, 16, 3, padding=1), nn.ReLU(), dropout(0.3), conv(16, 12, 3), nn.FeatureAlphaDropout(0.2)
    )
    mpd.mpdify_(model, 4, convs=True, seed=0)
    packed = mpd.pack(model.eval())
    assert isinstance(packed[0], mpd.PackedConvChain) and len(packed[0].layers) == 2
    x = torch.randn(2, 8, *[7] * dims)
    with torch.no_grad():
        assert_close_to_scale(packed(x), model(x), 1e-5)


def test_alexnet_bn_convs_pack_into_one_chain_with_the_first_conv_folded():
    model = build_model("alexnet-bn").eval()
    mpd.mpdify_(model, 8, convs=True, seed=0)
    packed = mpd.pack(model)
    chain = packed[0]
    assert isinstance(chain, mpd.PackedConvChain) and len(chain.layers) == 4
    assert isinstance(chain.head, nn.Conv2d) and chain.tail is None and chain.tail_gap is not None
    gathers = sum(getattr(chain, f"link_{i}") is not None for i in range(1, 4))
    assert gathers == 3  # one gather between consecutive convolutions, none before the first
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert_close_to_scale(packed(x), model(x), 1e-5)


def test_compact_training_through_a_chain_with_batchnorm_matches_masked_training():
    torch.manual_seed(0)
    dense = nn.Sequential(
        nn.Conv2d(3, 12, 3), nn.BatchNorm2d(12), nn.ReLU(), nn.Conv2d(12, 10, 3), nn.BatchNorm2d(10), nn.ReLU(),
        nn.MaxPool2d(2), nn.Conv2d(10, 16, 1), nn.Flatten(),
    )  # fmt: skip
    factors = {"3": 4, "7": 4}  # 10 channels over 4 blocks: uneven
    masked = mpd.mpdify_(copy.deepcopy(dense), factors, seed=0)
    compact = mpd.pack(mpd.mpdify_(copy.deepcopy(dense), factors, seed=0))
    opts = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (masked, compact)]
    for _ in range(8):
        x = torch.randn(6, 3, 10, 10)
        for model, opt in zip((masked, compact), opts):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
    back = mpd.unpack(compact)
    for key, value in masked.state_dict().items():
        assert torch.allclose(back.state_dict()[key].float(), value.float(), atol=1e-5), key


def _trained_looking_cnn(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 24, 3, padding="same"), nn.ReLU(),
        nn.Conv1d(24, 24, 1) if False else nn.Identity(), nn.Conv2d(24, 16, 2, stride=2), nn.Flatten(),
    )  # fmt: skip
    return model.eval()


def test_refit_of_a_conv_with_one_block_recovers_the_dense_weights():
    """With c = 1 the mask keeps everything, so the least-squares fit on the input patches must
    give back the dense convolution: this pins the patch layout (channels, kernel positions,
    padding, stride) to the weight's."""
    from mpdcompress.posthoc.calibrate import refit_

    teacher = _trained_looking_cnn()
    student = mpd.mpdify_(copy.deepcopy(teacher), {"2": 1, "5": 1})
    with torch.no_grad():
        for name in ("2", "5"):
            student.get_submodule(name).weight.mul_(0.3)  # far from the teacher
    batches = [torch.randn(8, 3, 8, 8) for _ in range(6)]
    refit_(student, teacher, batches, damping=1e-9)
    for name in ("2", "5"):
        fitted, dense = student.get_submodule(name), teacher.get_submodule(name)
        assert torch.allclose(fitted.weight, dense.weight, atol=1e-4), name
        assert torch.allclose(fitted.bias, dense.bias, atol=1e-4), name


def test_calibration_brings_a_compressed_cnn_closer_to_its_dense_model():
    from mpdcompress.posthoc.calibrate import compress_calibrated, input_moments

    teacher = _trained_looking_cnn()
    batches = [torch.randn(16, 3, 8, 8) for _ in range(8)]
    moments = input_moments(teacher, batches, config=mpd.MPDConfig(4, convs=True))
    assert set(moments) == {"2", "5"} and moments["5"].shape == (24,)  # conv "0" reads the image

    def error(student):
        x = torch.randn(32, 3, 8, 8)
        with torch.no_grad():
            return float((student(x) - teacher(x)).square().mean() / teacher(x).square().mean())

    plain = mpd.mpdify_(copy.deepcopy(teacher), 4, convs=True, masks="weights")
    calibrated = compress_calibrated(teacher, 4, batches, convs=True)
    tuned = compress_calibrated(teacher, 4, batches, convs=True, block_steps=30)
    assert isinstance(calibrated[2], mpd.MPDConv2d)
    assert error(calibrated) < 0.7 * error(plain)
    assert error(tuned) < error(calibrated)
    assert torch.equal(mpd.unpack(mpd.pack(tuned))[5].weight, tuned[5].weight)


def test_a_packed_cnn_goes_through_torch_export_and_runs_the_same():
    torch.manual_seed(0)
    model = build_model("vgg11-cifar").eval()
    mpd.mpdify_(model, 4, convs=True, seed=0)
    packed = mpd.pack(model)
    x = torch.randn(2, 3, 32, 32)
    exported = torch.export.export(packed, (x,))
    ops = {str(node.target) for node in exported.graph.nodes if node.op == "call_function"}
    assert "aten.conv2d.default" in ops and "aten.index_select.default" in ops
    with torch.no_grad():
        assert torch.equal(exported.module()(x), packed(x))


def test_inference_runs_a_chain_s_relus_in_place_without_touching_the_input_or_hooks():
    torch.manual_seed(5)
    model = nn.Sequential(
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1)
    )
    packed = mpd.pack(mpd.mpdify_(model, 2, convs=True, seed=0)).eval()
    chain = next(m for m in packed.modules() if isinstance(m, mpd.PackedConvChain))
    x = torch.randn(2, 8, 5, 5)
    kept = x.clone()
    expected = packed(x).detach()  # autograd on: every module runs as a module
    with torch.no_grad():
        assert torch.equal(packed(x), expected)
        seen = []
        relu = next(m for m in chain.gaps[0] if isinstance(m, nn.ReLU))
        handle = relu.register_forward_hook(lambda module, inputs, output: seen.append(output.shape))
        assert torch.equal(packed(x), expected) and seen  # a hooked ReLU still runs as a module
        handle.remove()
    assert torch.equal(x, kept)
