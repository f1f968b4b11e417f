import subprocess
import sys

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from mpdcompress import BlockLayout, MPDMask, make_mask, validate_compression
from mpdcompress.core.masks import check_permutation, layer_seed

from .helpers import shapes_and_factor


@given(shapes_and_factor(), st.integers(0, 2**31 - 1))
def test_mask_has_block_layout_counts(sdc, seed):
    d_out, d_in, c = sdc
    mask = make_mask(d_out, d_in, c, seed=seed)
    m = mask.dense(torch.int64)
    layout = mask.layout
    assert sorted(layout.row_sizes, reverse=True) == list(layout.row_sizes)
    assert max(layout.row_sizes) - min(layout.row_sizes) <= 1
    assert max(layout.col_sizes) - min(layout.col_sizes) <= 1
    assert int(m.sum()) == layout.nnz
    # Every row of row-group k has exactly col_sizes[k] ones, every column of col-group k has row_sizes[k].
    row_group = torch.empty(d_out, dtype=torch.int64)
    row_group[mask.row_order] = layout.row_groups()
    col_group = torch.empty(d_in, dtype=torch.int64)
    col_group[mask.col_order] = layout.col_groups()
    assert torch.equal(m.sum(1), torch.tensor(layout.col_sizes)[row_group])
    assert torch.equal(m.sum(0), torch.tensor(layout.row_sizes)[col_group])


@given(shapes_and_factor(), st.integers(0, 2**31 - 1))
def test_unpermuting_the_mask_gives_block_diagonal(sdc, seed):
    d_out, d_in, c = sdc
    mask = make_mask(d_out, d_in, c, seed=seed)
    unpermuted = mask.dense()[mask.row_order][:, mask.col_order]  # P_rowᵀ M P_colᵀ
    assert torch.equal(unpermuted, mask.layout.block_diagonal())


def test_density_is_about_one_over_c():
    layout = BlockLayout.create(784, 300, 10)
    assert layout.row_sizes == (79, 79, 79, 79, 78, 78, 78, 78, 78, 78)
    assert layout.col_sizes == (30,) * 10
    assert layout.nnz == 4 * 79 * 30 + 6 * 78 * 30
    assert abs(layout.density - 0.1) < 1e-3
    assert BlockLayout.create(300, 100, 10).nnz == 3000


def test_same_seed_same_mask_and_different_seed_differs():
    a, b, other = make_mask(300, 100, 10, seed=7), make_mask(300, 100, 10, seed=7), make_mask(300, 100, 10, seed=8)
    assert torch.equal(a.dense(), b.dense())
    assert not torch.equal(a.dense(), other.dense())


def test_generator_and_global_rng_paths():
    g = torch.Generator().manual_seed(3)
    assert torch.equal(make_mask(20, 30, 4, generator=g).dense(), make_mask(20, 30, 4, seed=3).dense())
    with pytest.raises(ValueError, match="either seed or generator"):
        make_mask(20, 30, 4, seed=1, generator=torch.Generator())


def test_non_permuted_mask_is_block_diagonal():
    mask = make_mask(30, 20, 5, permute=False)
    assert not mask.is_permuted
    assert torch.equal(mask.dense(), mask.layout.block_diagonal())
    assert make_mask(30, 20, 5, seed=0).is_permuted


def test_inverse_orders():
    mask = make_mask(17, 9, 3, seed=5)
    assert torch.equal(mask.row_order[mask.inverse_row_order()], torch.arange(17))
    assert torch.equal(mask.col_order[mask.inverse_col_order()], torch.arange(9))


def test_masks_identical_across_processes():
    code = (
        "import torch, hashlib; from mpdcompress import make_mask;"
        "m = make_mask(784, 300, 10, seed=123);"
        "print(hashlib.sha256(m.row_order.numpy().tobytes() + m.col_order.numpy().tobytes()).hexdigest())"
    )
    digests = {
        subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
        for _ in range(2)
    }
    assert len(digests) == 1


def test_layer_seed_depends_on_seed_and_name_only():
    assert layer_seed(0, "fc1") == layer_seed(0, "fc1")
    assert len({layer_seed(0, "fc1"), layer_seed(1, "fc1"), layer_seed(0, "fc2")}) == 3


@pytest.mark.parametrize("c", [0, -1, 301, 1000])
def test_out_of_range_factor_is_value_error_naming_layer_and_range(c):
    with pytest.raises(ValueError, match=r"layer 'fc1'.*valid range for a 300x784 weight is 1\.\.300"):
        validate_compression(300, 784, c, name="fc1")


@pytest.mark.parametrize("c", [2.5, "4", None, True, 4.0])
def test_non_integer_factor_is_type_error(c):
    with pytest.raises(TypeError, match=r"layer 'fc1'.*compression must be an int.*1\.\.100"):
        validate_compression(100, 100, c, name="fc1")


@pytest.mark.parametrize("d_out,d_in,exc", [(0, 5, ValueError), (5, -2, ValueError), (5.0, 5, TypeError)])
def test_bad_dimensions(d_out, d_in, exc):
    with pytest.raises(exc, match="layer 'x'"):
        make_mask(d_out, d_in, 1, name="x")


def test_bad_seed_type():
    with pytest.raises(TypeError, match="seed must be an int"):
        make_mask(4, 4, 2, seed=1.5)


@pytest.mark.parametrize(
    "perm,exc,msg",
    [
        (torch.tensor([0, 1, 1]), ValueError, "not a permutation"),
        (torch.tensor([0, 1, 3]), ValueError, "outside 0..2"),
        (torch.tensor([0.0, 1.0, 2.0]), TypeError, "integer dtype"),
        (torch.tensor([0, 1]), ValueError, "length 3"),
        ([0, 1, 2], TypeError, "torch.Tensor"),
    ],
)
def test_check_permutation_rejects_bad_orders(perm, exc, msg):
    with pytest.raises(exc, match=msg):
        check_permutation(perm, 3, "row_order")


def test_mask_rejects_mismatched_orders():
    layout = BlockLayout.create(4, 6, 2)
    with pytest.raises(ValueError, match="col_order must be 1-D of length 6"):
        MPDMask(layout, torch.arange(4), torch.arange(5))
