"""The layers a model file may name: every argument torch accepts round-trips through a file,
and the allow-list never lets through what the constructor (on the meta device) would not build."""

import inspect
import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from torch import nn

import mpdcompress as mpd
from mpdcompress.errors import ModelFileError
from mpdcompress.files.architecture import construct_layer, describe
from mpdcompress.files.layer_arguments import LAYER_ARGUMENTS, SUPPORTED_LAYERS, check_layer_args
from mpdcompress.nn.packed import ELEMENTWISE_MODULES

from .helpers import assert_close_to_scale

DATA = Path(__file__).parent / "data"

# ---- strategies: a layer torch builds, and an input it runs on ----------------------------

small = st.integers(1, 4)
finite = st.floats(-3, 3, allow_nan=False)
flag = st.booleans()


def per_dim(n: int, low: int, high: int):
    return st.integers(low, high) | st.tuples(*[st.integers(low, high)] * n)


def _spatial(value, n: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, tuple) else (value,) * n


@st.composite
def conv(draw, n: int):
    groups = draw(st.integers(1, 3))
    cin, cout = groups * draw(small), groups * draw(small)
    kernel, dilation = draw(per_dim(n, 1, 3)), draw(per_dim(n, 1, 2))
    padding = draw(per_dim(n, 0, 2) | st.sampled_from(["same", "valid"]))
    stride = 1 if padding == "same" else draw(per_dim(n, 1, 3))  # torch refuses 'same' with strides
    mode = draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]))
    cls = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[n]
    layer = cls(cin, cout, kernel, stride, padding, dilation, groups, draw(flag), mode)
    reach = [d * (k - 1) + 1 for k, d in zip(_spatial(kernel, n), _spatial(dilation, n))]
    return layer, torch.randn(2, cin, *[r + 4 for r in reach])


@st.composite
def max_pool(draw, n: int):
    kernel = draw(per_dim(n, 1, 3))
    padding = tuple(k // 2 for k in _spatial(kernel, n)) if draw(flag) else 0  # at most half the kernel
    cls = {1: nn.MaxPool1d, 2: nn.MaxPool2d}[n]
    stride = draw(st.none() | per_dim(n, 1, 3))
    layer = cls(kernel, stride, padding, draw(per_dim(n, 1, 2)), ceil_mode=draw(flag))
    return layer, torch.randn(2, 3, *[12] * n)


@st.composite
def avg_pool(draw, n: int):
    kernel = draw(per_dim(n, 1, 3))
    padding = tuple(k // 2 for k in _spatial(kernel, n)) if draw(flag) else 0
    kwargs = {"divisor_override": draw(st.none() | st.integers(1, 5))} if n == 2 else {}
    cls = {1: nn.AvgPool1d, 2: nn.AvgPool2d}[n]
    layer = cls(kernel, draw(st.none() | per_dim(n, 1, 3)), padding, draw(flag), draw(flag), **kwargs)
    return layer, torch.randn(2, 3, *[9] * n)


def adaptive(cls, n: int, **kwargs):
    out = st.integers(1, 4) | st.tuples(*[st.none() | st.integers(1, 4)] * n) if n > 1 else st.integers(1, 4)
    return st.builds(
        lambda size, kw: (cls(size, **kw), torch.randn(2, 3, *[7] * n)), out, st.fixed_dictionaries(kwargs)
    )


def _norm(cls, spatial: int):
    return st.builds(
        lambda c, eps, m, a, t: (cls(c, eps, m, a, t), torch.randn(4, c, *[3] * spatial)),
        small,
        st.floats(1e-8, 1e-2),
        st.none() | st.floats(0, 1),
        flag,
        flag,
    )


def _pointwise(cls, **kwargs):
    """A layer applied to each element (or along a dimension) with the drawn keyword arguments."""
    return st.builds(lambda kw: (cls(**kw), torch.randn(2, 3, 4)), st.fixed_dictionaries(kwargs))


@st.composite
def unflatten(draw):
    sizes = draw(st.lists(st.integers(1, 3), min_size=1, max_size=3))
    shape = list(sizes)
    if draw(flag):
        shape[draw(st.integers(0, len(sizes) - 1))] = -1
    return nn.Unflatten(1, tuple(shape)), torch.randn(2, int(torch.tensor(sizes).prod()), 2)


@st.composite
def embedding(draw):
    n, dim = draw(st.integers(2, 9)), draw(small)
    layer = nn.Embedding(
        n,
        dim,
        padding_idx=draw(st.none() | st.integers(-n, n - 1)),
        max_norm=draw(st.none() | st.floats(0.5, 3)),
        norm_type=draw(st.floats(1, 3)),
        scale_grad_by_freq=draw(flag),
    )
    return layer, torch.randint(0, n, (2, 5))


@st.composite
def layer_norm(draw):
    shape = draw(st.lists(st.integers(1, 3), min_size=1, max_size=3))
    normalized = shape[0] if len(shape) == 1 and draw(flag) else tuple(shape)
    layer = nn.LayerNorm(normalized, draw(st.floats(1e-8, 1e-2)), draw(flag), bias=draw(flag))
    return layer, torch.randn(2, *shape)


@st.composite
def group_norm(draw):
    groups = draw(small)
    channels = groups * draw(small)
    return nn.GroupNorm(groups, channels, draw(st.floats(1e-8, 1e-2)), draw(flag)), torch.randn(2, channels, 3)


@st.composite
def quantized_linear(draw):
    pytest.importorskip("torchao")  # quantizing needs it; loading does not
    from mpdcompress.core.quantize import QuantConfig, quantize_weight

    inputs, outputs = draw(st.integers(1, 9)), draw(small)
    config = QuantConfig.parse(draw(st.sampled_from(["int8", "int8-dynamic", "int4-g2", "int4-g4-asym"])))
    linear = nn.Linear(inputs, outputs, draw(flag))
    weight = quantize_weight(linear.weight.detach()[None], 1, outputs, config)
    return mpd.QuantizedLinear.from_weight(weight, linear.bias, config.activations), torch.randn(2, inputs)


LAYERS = {
    "Linear": st.builds(lambda i, o, b: (nn.Linear(i, o, b), torch.randn(2, i)), small, small, flag),
    "QuantizedLinear": quantized_linear(),
    "Conv1d": conv(1),
    "Conv2d": conv(2),
    "Conv3d": conv(3),
    "BatchNorm1d": _norm(nn.BatchNorm1d, 0),
    "BatchNorm2d": _norm(nn.BatchNorm2d, 2),
    "BatchNorm3d": _norm(nn.BatchNorm3d, 3),
    "LayerNorm": layer_norm(),
    "GroupNorm": group_norm(),
    "LocalResponseNorm": st.builds(
        lambda s, a, b, k: (nn.LocalResponseNorm(s, a, b, k), torch.randn(2, 5, 3)),
        small,
        st.floats(1e-5, 1),
        st.floats(0.1, 1),
        st.floats(0.5, 2),
    ),
    "Embedding": embedding(),
    "MaxPool1d": max_pool(1),
    "MaxPool2d": max_pool(2),
    "AvgPool1d": avg_pool(1),
    "AvgPool2d": avg_pool(2),
    "AdaptiveAvgPool1d": adaptive(nn.AdaptiveAvgPool1d, 1),
    "AdaptiveAvgPool2d": adaptive(nn.AdaptiveAvgPool2d, 2),
    "AdaptiveMaxPool2d": adaptive(nn.AdaptiveMaxPool2d, 2, return_indices=st.just(False)),
    "Flatten": _pointwise(nn.Flatten, start_dim=st.integers(0, 1), end_dim=st.sampled_from([-1, 2])),
    "Unflatten": unflatten(),
    "Identity": _pointwise(nn.Identity),
    "ReLU": _pointwise(nn.ReLU, inplace=flag),
    "ReLU6": _pointwise(nn.ReLU6, inplace=flag),
    "LeakyReLU": _pointwise(nn.LeakyReLU, negative_slope=finite, inplace=flag),
    "ELU": _pointwise(nn.ELU, alpha=finite, inplace=flag),
    "SELU": _pointwise(nn.SELU, inplace=flag),
    "CELU": _pointwise(nn.CELU, alpha=st.floats(0.1, 3), inplace=flag),
    "GELU": _pointwise(nn.GELU, approximate=st.sampled_from(["none", "tanh"])),
    "SiLU": _pointwise(nn.SiLU, inplace=flag),
    "Mish": _pointwise(nn.Mish, inplace=flag),
    "Sigmoid": _pointwise(nn.Sigmoid),
    "Tanh": _pointwise(nn.Tanh),
    "Hardtanh": _pointwise(nn.Hardtanh, min_val=st.floats(-3, -0.1), max_val=st.floats(0.1, 3), inplace=flag),
    "Hardswish": _pointwise(nn.Hardswish, inplace=flag),
    "Hardsigmoid": _pointwise(nn.Hardsigmoid, inplace=flag),
    "Softplus": _pointwise(nn.Softplus, beta=st.floats(0.5, 3), threshold=st.floats(1, 30)),
    "Softsign": _pointwise(nn.Softsign),
    "Tanhshrink": _pointwise(nn.Tanhshrink),
    "Threshold": _pointwise(nn.Threshold, threshold=finite, value=finite, inplace=flag),
    "LogSigmoid": _pointwise(nn.LogSigmoid),
    "Dropout": _pointwise(nn.Dropout, p=st.floats(0, 1), inplace=flag),
    "AlphaDropout": _pointwise(nn.AlphaDropout, p=st.floats(0, 1), inplace=flag),
    "Dropout2d": _pointwise(nn.Dropout2d, p=st.floats(0, 1), inplace=flag),
    "PReLU": st.builds(lambda n: (nn.PReLU(n), torch.randn(2, 3, 4)), st.sampled_from([1, 3])),
    "Softmax": _pointwise(nn.Softmax, dim=st.none() | st.integers(-3, 2)),
    "LogSoftmax": _pointwise(nn.LogSoftmax, dim=st.none() | st.integers(-3, 2)),
}


def test_every_supported_layer_has_a_strategy_and_fused_chains_can_be_rebuilt():
    assert set(LAYERS) == set(SUPPORTED_LAYERS)
    assert set(ELEMENTWISE_MODULES) <= set(LAYER_ARGUMENTS)


def test_the_allow_list_names_only_arguments_this_torch_has_and_everything_describe_records():
    for cls, allowed in LAYER_ARGUMENTS.items():
        assert set(allowed) <= set(inspect.signature(cls.__init__).parameters), cls.__name__
    never_recorded = {"device", "dtype", "_weight", "_freeze", "init", "args", "kwargs", "self"}
    for cls, allowed in LAYER_ARGUMENTS.items():
        # Every constructor argument that describe() may record (the rest are device, dtype and
        # initial values, which a file never carries) is on the list.
        params = set(inspect.signature(cls.__init__).parameters) - never_recorded
        stored = {p for p in params if p not in ("min_value", "max_value")}  # Hardtanh's deprecated aliases
        assert stored <= set(allowed), (cls.__name__, stored - set(allowed))


@pytest.mark.parametrize("kind", sorted(LAYERS))
@pytest.mark.parametrize("form", ["masked", "packed"])
def test_every_layer_round_trips_through_a_model_file(kind, form, tmp_path):
    @settings(max_examples=max(2, settings.default.max_examples // 4))
    @given(LAYERS[kind])
    def check(drawn):
        layer, x = drawn
        torch.manual_seed(0)
        # A compressed layer beside it: a model file holds at least one.
        model = nn.ModuleList([layer, mpd.mpdify_(nn.Sequential(nn.Linear(6, 4)), 2)]).eval()
        if form == "packed":
            model = mpd.pack(model)
        path = mpd.save(model, tmp_path / "m.safetensors")
        loaded = mpd.load(path).eval()
        assert describe(loaded) == describe(model)
        assert json.loads(json.dumps(describe(loaded))) == describe(model)
        with torch.no_grad():
            expected, got = model[0](x.clone()), loaded[0](x.clone())
        assert torch.equal(got, expected)

    check()


BAD_VALUES = [None, True, 0, -1, 3, 2**50, 0.5, 1e300, "x", "same", "tanh", [], [2], [2, 2], [1, 2, 3], [1] * 1000]


@pytest.mark.parametrize("kind", sorted(SUPPORTED_LAYERS))
def test_arguments_the_allow_list_accepts_are_ones_the_constructor_builds(kind):
    """Every single-argument change of a valid entry, over a pool of JSON values of every type:
    what the check accepts builds on the meta device, or is refused there by the constructor
    (constraints between arguments, such as groups dividing the channels) with ModelFileError;
    device and dtype are refused outright."""

    @settings(max_examples=max(2, settings.default.max_examples // 8))
    @given(LAYERS[kind])
    def check(drawn):
        base = describe(drawn[0]).get("args", {})
        assert check_layer_args(kind, base) is None
        for name in LAYER_ARGUMENTS[SUPPORTED_LAYERS[kind]]:
            for value in BAD_VALUES:
                args = {**base, name: value}
                if check_layer_args(kind, args) is None:
                    with torch.device("meta"):
                        try:
                            built = construct_layer(kind, args)
                        except ModelFileError as exc:
                            assert f"cannot build {kind}" in str(exc)
                            continue
                    assert all(t.is_meta for t in [*built.parameters(), *built.buffers()])
        for forged in ({"device": "cpu"}, {"dtype": "float64"}, {"no_such_argument": 1}):
            assert "takes no argument" in check_layer_args(kind, {**base, **forged})
            with pytest.raises(ModelFileError, match="takes no argument"):
                construct_layer(kind, {**base, **forged})

    check()


def test_a_forged_device_keyword_allocates_nothing(tmp_path):
    """A re-signed file whose architecture asks for a 576 MB layer on the CPU is refused by the
    size check before any layer leaves the meta device."""
    import resource

    from .test_file_campaign import _resigned

    model = mpd.mpdify_(nn.Sequential(nn.Linear(6, 4), nn.ReLU()), 2)
    blob = mpd.save(model, tmp_path / "m.safetensors").read_bytes()

    def edit(manifest):
        big = {"type": "Linear", "args": {"in_features": 12000, "out_features": 12000, "device": "cpu"}}
        manifest["architecture"]["children"][1][1] = big

    (tmp_path / "f.safetensors").write_bytes(_resigned(blob, edit))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ModelFileError, match="takes no argument 'device'"):
        mpd.load(tmp_path / "f.safetensors")
    assert (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024 < 100


@pytest.mark.parametrize("form", ["masked", "packed"])
def test_cnn_files_written_by_release_0_1_0_load_and_compute_what_they_computed(form):
    """tests/data/make_cnn_fixture.py wrote these with mpdcompress 0.1.0, whose reader refused
    them (tuple stride, padding='same', grouped reflect convolution, BatchNorm, pooling)."""
    io = load_file(DATA / "cnn-0.1.0-io.safetensors")
    model = mpd.load(DATA / f"cnn-0.1.0-{form}.safetensors").eval()
    assert any(isinstance(m, nn.Conv2d) and m.padding == "same" for m in model.modules())
    state = model.state_dict()
    stored = load_file(DATA / f"cnn-0.1.0-{form}.safetensors")
    shared = [key for key in stored if key in state]
    assert len(shared) > len(stored) // 2
    for key in shared:  # every weight exactly as written
        assert torch.equal(state[key], stored[key].to(state[key].dtype)), key
    with torch.no_grad():
        # Within rounding of the machine that wrote the outputs: oneDNN and MKL pick their
        # kernels (and summation orders) by CPU, so a last-bit difference is not a wrong model.
        assert_close_to_scale(model(io["input"]), io[form], 1e-6)
