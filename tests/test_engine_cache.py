"""The PyTorch engine keeps what a packed module multiplies with between inference calls; every
change of the module that the next call must see is seen."""

import copy

import torch
from torch import nn

import mpdcompress as mpd
from mpdcompress.kernels import dispatch


def _packed():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 6))
    return mpd.pack(mpd.mpdify_(model, 2, filter_fn=lambda m, n: n in ("0", "2"))).eval()


def _reference(model, x):
    """The output with nothing kept between calls."""
    dispatch._torch_weights.clear()
    with torch.no_grad():
        return model(x)


def test_inference_calls_reuse_the_weights_and_see_every_change():
    model, x = _packed(), torch.randn(3, 12)
    chain = model[0]
    with torch.no_grad():
        model(x)
        assert chain in dispatch._torch_weights
        chain.layers[0].weight_blocks.mul_(2.0)  # in place (an optimizer step, a load_state_dict copy)
        assert torch.equal(model(x), _reference(model, x))
        chain.activations[0] = nn.Tanh()  # an activation swapped in
        assert torch.equal(model(x), _reference(model, x))
        chain.layers[1].weight_blocks = nn.Parameter(torch.randn_like(chain.layers[1].weight_blocks))
        assert torch.equal(model(x), _reference(model, x))
        model.double()
        assert model(x.double()).dtype == torch.float64
        assert torch.equal(model(x.double()), _reference(model, x.double()))
        other = copy.deepcopy(model)
        other[0].layers[0].weight_blocks.zero_()
        model.load_state_dict(other.state_dict())
        assert torch.equal(model(x.double()), _reference(model, x.double()))


def test_training_and_quantized_calls_build_their_weights_each_time():
    model, x = _packed(), torch.randn(3, 12)
    model(x).sum().backward()  # autograd: nothing kept
    assert model[0] not in dispatch._torch_weights
    fake = mpd.fake_quantize_(copy.deepcopy(model), "int8")
    with torch.no_grad():
        fake(x)
    assert fake[0] not in dispatch._torch_weights  # its rounded blocks follow the float ones


def test_a_deleted_module_leaves_nothing_behind():
    import gc

    model = _packed()
    with torch.no_grad():
        model(torch.randn(2, 12))
    before = len(dispatch._torch_weights)
    del model
    gc.collect()
    assert len(dispatch._torch_weights) == before - 1  # what is kept does not keep the module alive
