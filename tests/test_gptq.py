"""GPTQ over each block: the quantized model is still exactly its dequantized copy, keeps the
padding zero, and on inputs it was not calibrated on is closer to the float model than rounding
to nearest."""

import copy

import pytest
import torch
from torch import nn

import mpdcompress as mpd
from mpdcompress.errors import CompressionError, ConfigError
from mpdcompress.posthoc.gptq import quantize_calibrated_

pytest.importorskip("torchao")


def _inputs(n: int, seed: int) -> torch.Tensor:
    mixing = torch.randn(64, 64, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.05, 2, 64)
    return torch.randn(n, 64, generator=torch.Generator().manual_seed(seed)) @ mixing  # correlated features


def _packed() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 90), nn.GELU(), nn.Linear(90, 42), nn.ReLU(), nn.Linear(42, 8))
    mpd.mpdify_(model, 4, filter_fn=lambda m, n: n != "4")  # 90 / 4, 42 / 4: uneven blocks
    return mpd.pack(model).eval()


@pytest.mark.parametrize("config", ["int4", "int4-g32-asym", "int8"])
def test_gptq_beats_rounding_on_held_out_inputs_and_stays_exact(config):
    packed = _packed()
    calibration = [_inputs(256, seed) for seed in range(1, 5)]
    held_out = _inputs(2000, 99)
    gptq = quantize_calibrated_(copy.deepcopy(packed), config, calibration)
    rounded = mpd.quantize_(copy.deepcopy(packed), config)
    with torch.no_grad():
        reference = packed(held_out)

        def error(model: nn.Module) -> float:
            return float((model(held_out) - reference).pow(2).mean() / reference.pow(2).mean())

        assert error(gptq) < 0.9 * error(rounded)
        assert torch.equal(gptq(held_out), mpd.dequantize(gptq)(held_out))
    for layer in gptq[0].layers:
        assert isinstance(layer, mpd.QuantizedBlockDiagonalLinear)
        assert torch.equal(layer.weight_blocks * ~layer.layout.padding_mask(), torch.zeros_like(layer.weight_blocks))


def test_convolutions_are_rounded_and_linears_calibrated():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 12, 3, padding=1), nn.ReLU(), nn.Conv2d(12, 12, 3, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(12 * 16, 40), nn.ReLU(), nn.Linear(40, 5),
    )  # fmt: skip
    mpd.mpdify_(model, 3, convs=True, filter_fn=lambda m, n: n != "7")
    packed = mpd.pack(model).eval()
    quantized = quantize_calibrated_(copy.deepcopy(packed), "int4", [torch.randn(8, 3, 4, 4) for _ in range(2)])
    kinds = {type(m).__name__ for m in quantized.modules()}
    assert {"QuantizedBlockDiagonalConv", "QuantizedBlockDiagonalLinear"} <= kinds
    x = torch.randn(3, 3, 4, 4)
    with torch.no_grad():
        assert torch.equal(quantized(x), mpd.dequantize(quantized)(x))


def test_what_cannot_be_calibrated_is_refused():
    packed = _packed()
    with pytest.raises(ConfigError, match="iterator"):
        quantize_calibrated_(packed, "int4", iter([_inputs(8, 1)]))
    with pytest.raises(ConfigError, match="damp"):
        quantize_calibrated_(packed, "int4", [_inputs(8, 1)], damp=2.0)
    with pytest.raises(CompressionError, match="no packed linear layer"):
        quantize_calibrated_(nn.Sequential(nn.Linear(4, 4)), "int4", [torch.randn(2, 4)])


class _Tokens(nn.Module):
    """A token model: the attention mask is for attention, which this one has none of."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.body(hidden)


def test_padding_positions_of_an_attention_mask_do_not_count():
    from mpdcompress.posthoc.gptq import block_hessians

    model = _Tokens(_packed())
    hidden = torch.randn(3, 5, 64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    hidden[mask == 0] = 1e3  # what padding positions hold must not matter
    layer = model.body[0].layers[0]
    got = block_hessians(model, [{"hidden": hidden, "attention_mask": mask}], {"body.0.layers.0": layer})
    kept = hidden[mask.bool()].double()[:, layer.in_gather] * (layer.kernel_in_index >= 0)
    blocks = kept.view(-1, layer.compression, layer.layout.max_cols)
    assert torch.allclose(got["body.0.layers.0"], torch.einsum("nki,nkj->kij", blocks, blocks))
