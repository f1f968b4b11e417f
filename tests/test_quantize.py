"""quantize_ / dequantize: integer blocks that compute exactly what their dequantized float copy
computes, with torchao's arithmetic, valid on every shape, refused when damaged."""

import sys

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import mpdcompress as mpd
from mpdcompress.errors import CompressionError, ConfigError, MissingDependencyError
from mpdcompress.kernels.quantized_blocks import pack_int4, unpack_int4

pytest.importorskip("torchao")

CONFIGS = ["int8", "int4", "int4-g64", "int4-g128-asym", "int4-g32-asym"]


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(70, 45), nn.ReLU(), nn.Linear(45, 33), nn.GELU(), nn.Linear(33, 6))
    mpd.mpdify_(model, 4, filter_fn=lambda m, n: n != "4", seed=seed)
    return mpd.pack(model)


def _cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 12, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(12, 18, 3, padding=1),
        nn.BatchNorm2d(18),
        nn.ReLU(),
        nn.Conv2d(18, 10, 1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(10, 4),
    )
    mpd.mpdify_(model, 3, convs=True, filter_fn=lambda m, n: n != "8", seed=seed)
    return mpd.pack(model.eval())


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("make,shape", [(_mlp, (5, 70)), (_cnn, (2, 3, 6, 6))])
def test_quantized_model_computes_exactly_its_dequantized_copy(make, shape, config):
    model = mpd.quantize_(make(), config)
    assert len(mpd.core.quantize.quantized_layers(model)) >= 2
    float_model = mpd.dequantize(model)
    assert not mpd.core.quantize.quantized_layers(float_model) and mpd.core.quantize.quantized_layers(model)
    x = torch.randn(*shape)
    with torch.no_grad():
        assert torch.equal(model(x), float_model(x))
        reference = make()(x)
        error = (model(x) - reference).abs().max() / reference.abs().max()
    assert 0 < error < (0.02 if config == "int8" else 0.2)


@pytest.mark.parametrize("config", CONFIGS)
def test_dequantization_is_torchaos_bit_for_bit(config):
    from torchao.quantization.quant_primitives import dequantize_affine

    layer = mpd.quantize_(_mlp(), config)[0].layers[0]
    weight = layer.quantized_weight()
    cfg = mpd.QuantConfig.parse(config)
    group = weight.group_size
    assert group == (weight.inputs if cfg.bits == 8 else cfg.group_size)
    padded = weight.scales.shape[-1] * group  # whole groups, as torchao takes them
    zero = None
    if cfg.bits == 4:
        zero = torch.full_like(weight.scales, 8, dtype=torch.int32) if cfg.symmetric else weight.zero_points.int()
    integers = torch.nn.functional.pad(weight.integers(), (0, padded - weight.integers().shape[-1]))
    q = integers + (0 if zero is None else zero.repeat_interleave(group, -1))
    expected = dequantize_affine(q, (1, 1, group), weight.scales, zero, torch.int32, -(2**31), 2**31 - 1)
    assert torch.equal(weight.dequantize(), expected[..., : weight.inputs].reshape(weight.shape))


@given(
    d_out=st.integers(2, 40),
    d_in=st.integers(2, 90),
    c=st.integers(1, 6),
    group=st.sampled_from([2, 8, 32]),
    symmetric=st.booleans(),
    bits=st.sampled_from([4, 8]),
)
def test_every_shape_quantizes_within_half_a_step_and_keeps_padding_zero(d_out, d_in, c, group, symmetric, bits):
    c = min(c, d_out, d_in)
    config = mpd.QuantConfig(bits=8) if bits == 8 else mpd.QuantConfig(bits=4, group_size=group, symmetric=symmetric)
    torch.manual_seed(d_out * 100 + d_in)
    masked = mpd.MPDLinear(d_in, d_out, mask=mpd.make_mask(d_out, d_in, c, seed=1))
    model = mpd.quantize_(nn.Sequential(mpd.BlockDiagonalLinear.from_masked(masked)), config)
    layer = model[0]
    weight = layer.quantized_weight()
    float_blocks = mpd.BlockDiagonalLinear.from_masked(masked).weight_blocks.detach()
    step = weight.scales.repeat_interleave(weight.group_size, -1)[..., : weight.inputs]
    assert bool(((layer.weight_blocks - float_blocks).abs() <= step / 2 * 1.0001 + 1e-7).all())
    assert torch.equal(layer.weight_blocks * ~layer.layout.padding_mask(), torch.zeros_like(float_blocks))
    x = torch.randn(3, d_in)
    with torch.no_grad():
        assert torch.equal(model(x), mpd.dequantize(model)(x))


def test_int4_packing_round_trips():
    values = torch.randint(0, 16, (3, 5, 8), dtype=torch.uint8)
    packed = pack_int4(values)
    assert packed.shape == (3, 5, 4) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed), values.int())


def test_dynamic_int8_activations_stay_close_to_weight_only():
    model = _mlp()
    weight_only = mpd.quantize_(_mlp(), "int8")
    dynamic = mpd.quantize_(model, mpd.QuantConfig(activations="dynamic"))
    assert "dynamic int8 activations" in repr(dynamic)
    for batch in (1, 9):
        x = torch.randn(batch, 70)
        with torch.no_grad():
            expected, got = weight_only(x), dynamic(x)
        assert not torch.equal(got, expected)
        assert (got - expected).abs().max() <= 0.03 * expected.abs().max()
    x = torch.randn(16, 70)  # eager and traced calls share their activation layout above one row
    with torch.no_grad():  # an exported graph sees the float blocks (no fbgemm op in it)
        exported = torch.export.export(dynamic, (x,)).module()
        assert torch.equal(exported(x), weight_only(x))


def test_filter_fn_selects_layers_and_dense_layers_stay_float():
    model = mpd.quantize_(_mlp(), "int8", filter_fn=lambda m, name: name.endswith("layers.1"))
    layers = model[0].layers
    assert type(layers[0]) is mpd.BlockDiagonalLinear and type(layers[1]) is mpd.QuantizedBlockDiagonalLinear
    assert model[0].tail.weight.dtype == torch.float32
    mpd.quantize_(model, "int4")  # the rest, later
    assert type(layers[0]) is mpd.QuantizedBlockDiagonalLinear
    with pytest.raises(CompressionError, match="quantized already"):
        mpd.quantize_(model, "int4")


def test_state_dict_round_trip_and_damaged_states_are_refused():
    model = mpd.quantize_(_mlp(), "int4-g32-asym")
    other = mpd.quantize_(_mlp(seed=1), "int4-g32-asym")
    x = torch.randn(4, 70)
    other.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(other(x), model(x))
    for key, damage in [
        ("0.layers.0.scales", lambda t: t.neg()),
        ("0.layers.0.scales", lambda t: t.fill_(float("nan"))),
        ("0.layers.1.zero_points", lambda t: t.fill_(16)),
        ("0.layers.0.qweight", lambda t: t.fill_(0x11)),  # padding no longer dequantizes to zero
    ]:
        state = {k: v.clone() for k, v in model.state_dict().items()}
        state[key] = damage(state[key])
        with pytest.raises(CompressionError):
            other.load_state_dict(state)


@pytest.mark.parametrize(
    "text,error",
    [
        ("int3", "unknown quantization"),
        ("int4-g33", "even"),
        ("int8-g32", "per output row"),
        ("int4-dynamic", "bits=8"),
    ],
)
def test_bad_configs_are_refused_by_name(text, error):
    with pytest.raises(ConfigError, match=error):
        mpd.QuantConfig.parse(text)


def test_what_cannot_be_quantized_is_refused():
    masked = nn.Sequential(nn.Linear(8, 8))
    mpd.mpdify_(masked, 2)
    with pytest.raises(CompressionError, match="pack"):
        mpd.quantize_(masked)
    with pytest.raises(CompressionError, match="no packed layer"):
        mpd.quantize_(nn.Sequential(nn.Linear(8, 8)))
    with pytest.raises(CompressionError, match="in place"):
        mpd.quantize_(mpd.pack(masked)[0])
    torch.manual_seed(0)
    cnn = nn.Sequential(nn.Linear(12, 12), nn.Unflatten(1, (12, 1, 1)), nn.Conv2d(12, 12, 1), nn.Flatten())
    mpd.mpdify_(cnn, 3, convs=True)
    cnn = mpd.pack(cnn)
    before = repr(cnn)
    with pytest.raises(CompressionError, match=r"linear layers; these are convolutions: \['2'\]"):
        mpd.quantize_(cnn, "int8-dynamic")
    assert repr(cnn) == before  # refused before its linear layer was quantized
    with pytest.raises(CompressionError, match="no quantized layer"):
        mpd.dequantize(_mlp())


def test_quantizing_without_torchao_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao", None)
    monkeypatch.setitem(sys.modules, "torchao.quantization.quant_primitives", None)
    with pytest.raises(MissingDependencyError, match=r"mpdcompress\[quant\]"):
        mpd.quantize_(_mlp())


def test_the_triton_engine_runs_quantized_layers_on_their_dequantized_blocks():
    pytest.importorskip("triton")
    model = mpd.quantize_(_mlp(), "int4-g32-asym")
    float_model = mpd.dequantize(model)
    x = torch.randn(3, 70)
    with torch.no_grad():
        with mpd.use_engine("triton"):
            got, expected = model(x), float_model(x)
        reference = model(x)  # the PyTorch engine
    assert torch.equal(got, expected)
    assert (got - reference).abs().max() <= 1e-5 * reference.abs().max()


@given(
    c=st.integers(1, 4),
    rows=st.integers(1, 9),
    inputs=st.integers(1, 70),
    fmt=st.sampled_from(["int8", "int4", "int4-g8", "int4-g6-asym", "int4-g128-asym"]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
)
def test_eager_dequantization_is_the_traced_one_bit_for_bit(c, rows, inputs, fmt, dtype):
    """The forward's short way (shifts, in-place arithmetic) gives the values the core-ATen form
    that exporters trace gives, for odd widths, short last groups and every float type."""
    from unittest import mock

    from mpdcompress.core.quantize import QuantConfig, quantize_weight
    from mpdcompress.kernels import quantized_blocks

    blocks = torch.randn(c, rows, inputs).to(dtype)
    weight = quantize_weight(blocks, c, rows, QuantConfig.parse(fmt))
    eager = weight.dequantize()
    with mock.patch.object(quantized_blocks, "tracing", lambda: True):
        traced = weight.dequantize()
    assert eager.dtype == traced.dtype == dtype and eager.is_contiguous()
    assert torch.equal(eager, traced)
