"""Masks chosen from trained weights keep more of the weight than random masks."""

import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import mpdcompress as mpd
from mpdcompress.core.mask_search import kept_mass, mask_from_weight
from mpdcompress.errors import ConfigError

from .helpers import shapes_and_factor


def hidden_block_weight(d_out, d_in, c, seed, noise=0.05):
    """A weight that IS an MPD-masked matrix (a random mask) plus small noise everywhere."""
    g = torch.Generator().manual_seed(seed)
    mask = mpd.make_mask(d_out, d_in, c, seed=seed).dense(torch.float32)
    return torch.randn(d_out, d_in, generator=g) * (mask + noise)


@pytest.mark.parametrize("d_out,d_in,c", [(60, 90, 3), (100, 300, 10), (64, 64, 8), (37, 53, 4)])
def test_search_recovers_a_hidden_block_structure(d_out, d_in, c):
    weight = hidden_block_weight(d_out, d_in, c, seed=1)
    found = kept_mass(weight, mask_from_weight(weight, c, seed=0))
    random = kept_mass(weight, mpd.make_mask(d_out, d_in, c, seed=7))
    ideal = kept_mass(weight, mpd.make_mask(d_out, d_in, c, seed=1))
    assert found >= 0.9 * ideal and found > random + 0.3, (found, ideal, random)


@settings(max_examples=10)
@given(shapes_and_factor(max_dim=24), st.integers(0, 1000))
def test_search_gives_a_valid_mask_that_beats_random_on_any_weight(sdc, seed):
    d_out, d_in, c = sdc
    weight = torch.randn(d_out, d_in, generator=torch.Generator().manual_seed(seed))
    mask = mask_from_weight(weight, c, seed=seed, restarts=1)
    assert mask.shape == (d_out, d_in) and mask.compression == c
    assert int(mask.dense().sum()) == mask.layout.nnz
    # greedy co-clustering never does worse than the 1/c a random mask keeps on average
    assert kept_mass(weight, mask) >= mask.density - 1e-9
    assert torch.equal(mask_from_weight(weight, c, seed=seed, restarts=1).row_order, mask.row_order)  # seeded


def test_mpdify_with_weight_chosen_masks_keeps_weights_and_records_the_choice():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(90, 60), nn.ReLU(), nn.Linear(60, 10))
    with torch.no_grad():
        model[0].weight.copy_(hidden_block_weight(60, 90, 3, seed=2))
    before = model[0].weight.detach().clone()
    mpd.mpdify_(model, 3, masks="weights")
    assert model.mpd_config.masks == "weights"
    assert kept_mass(before, model[0].mpd_mask) > 0.9
    assert torch.equal(model[0].weight[model[0].mask], before[model[0].mask])
    with pytest.raises(ConfigError, match="permute=False"):
        mpd.MPDConfig(3, masks="weights", permute=False)


def test_llm_sized_layer_is_searched_in_well_under_a_minute():
    weight = torch.randn(1024, 3584)  # a quarter of a 4096x14336 MLP layer in each dimension
    started = time.perf_counter()
    mask_from_weight(weight, 8, restarts=1)
    assert time.perf_counter() - started < 30


def hidden_sub_mlps(d_in, hidden, d_out, c, seed, noise=0.05):
    """An MLP that IS c independent sub-MLPs under hidden permutations, plus small noise."""
    g = torch.Generator().manual_seed(seed)
    order_in, order_h, order_out = (torch.randperm(n, generator=g) for n in (d_in, hidden, d_out))
    group = lambda n: torch.arange(n) * c // n  # noqa: E731
    up_mask = (group(hidden)[:, None] == group(d_in)[None, :]).float()[order_h][:, order_in]
    down_mask = (group(d_out)[:, None] == group(hidden)[None, :]).float()[order_out][:, order_h]
    return (
        torch.randn(hidden, d_in, generator=g) * (up_mask + noise),
        torch.randn(d_out, hidden, generator=g) * (down_mask + noise),
    )


def test_joint_masks_find_sub_mlps_and_share_the_hidden_order():
    from mpdcompress.core.mask_search import masks_for_layers

    up, down = hidden_sub_mlps(48, 96, 40, 4, seed=3)
    masks = masks_for_layers({"up": up, "down": down}, [("up", "down")], 4, seed=0)
    assert torch.equal(masks["up"].row_order, masks["down"].col_order)
    assert kept_mass(up, masks["up"]) > 0.9 and kept_mass(down, masks["down"]) > 0.9


def test_joined_layers_must_agree_on_their_hidden_width():
    from mpdcompress.core.mask_search import masks_for_layers
    from mpdcompress.errors import CompressionError

    with pytest.raises(CompressionError, match="cannot be joined"):
        masks_for_layers({"a": torch.randn(8, 4), "b": torch.randn(4, 6)}, [("a", "b")], 2)


def test_weights_joint_masks_leave_no_permutation_inside_a_packed_stack():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 48), nn.GELU(), nn.Linear(48, 16))
    x = torch.randn(5, 32)
    mpd.mpdify_(model, 4, masks="weights-joint")
    layers = list(mpd.compressed_layers(model).values())
    assert torch.equal(layers[0].row_order, layers[1].col_order)
    assert torch.equal(layers[1].row_order, layers[2].col_order)
    packed = mpd.pack(model)
    chain = packed[0]
    assert chain.fused_gather_1 is None and chain.fused_gather_2 is None
    with torch.no_grad():
        torch.testing.assert_close(packed(x), model(x))


@settings(max_examples=10)
@given(st.integers(2, 5), st.lists(st.integers(8, 30), min_size=3, max_size=4), st.integers(0, 99))
def test_joint_masks_are_valid_for_any_stack(c, dims, seed):
    from mpdcompress.core.mask_search import masks_for_layers

    g = torch.Generator().manual_seed(seed)
    weights = {f"l{i}": torch.randn(dims[i + 1], dims[i], generator=g) for i in range(len(dims) - 1)}
    joined = [(f"l{i}", f"l{i + 1}") for i in range(len(dims) - 2)]
    masks = masks_for_layers(weights, joined, c, seed=seed)
    for a, b in joined:
        assert torch.equal(masks[a].row_order, masks[b].col_order)
    for name, w in weights.items():
        assert masks[name].shape == tuple(w.shape) and masks[name].compression == c
