import math

import pytest
import torch
from torch import nn

from mpdcompress import BlockDiagonalLinear, MPDLinear, PackedChain, mpdify_, unpack
from mpdcompress.models import fc_stack

from .helpers import small_config


def test_compact_mode_builds_the_packed_form_of_the_same_masked_model():
    torch.manual_seed(0)
    masked = mpdify_(fc_stack([64, 48, 10]), 4, seed=3)
    torch.manual_seed(0)
    compact = mpdify_(fc_stack([64, 48, 10]), 4, seed=3, mode="compact")
    assert isinstance(compact[0], PackedChain)
    assert all(name.endswith(("weight_blocks", "bias")) for name, _ in compact.named_parameters())
    for (k1, v1), (k2, v2) in zip(masked.state_dict().items(), unpack(compact).state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2)


def test_block_init_uses_the_block_width_as_fan_in():
    torch.manual_seed(0)
    layer = mpdify_(nn.Linear(1000, 400), 10, seed=1, init="block")
    kept = layer.weight.detach()[layer.mask]
    bound = 1 / math.sqrt(100)  # nn.Linear's bound for fan-in = block width 1000/10
    assert float(kept.abs().max()) <= bound + 1e-6
    assert float(kept.abs().max()) > 0.95 * bound
    torch.manual_seed(0)
    dense_init = mpdify_(nn.Linear(1000, 400), 10, seed=1, init="dense")
    assert float(dense_init.weight.detach().abs().max()) <= 1 / math.sqrt(1000) + 1e-6


def test_default_keeps_every_kept_weight_bit_identical():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(50, 40), nn.ReLU(), nn.Linear(40, 10))
    before = {key: value.clone() for key, value in model.state_dict().items()}
    mpdify_(model, 4)
    for i in (0, 2):
        layer = model[i]
        assert torch.equal(layer.weight[layer.mask], before[f"{i}.weight"][layer.mask])
        assert torch.equal(layer.bias, before[f"{i}.bias"])
        assert not layer.weight[~layer.mask].any()


def test_invalid_mode_and_init():
    with pytest.raises(ValueError, match="mode must be"):
        mpdify_(nn.Linear(8, 8), 2, mode="sparse")
    with pytest.raises(ValueError, match="init must be"):
        mpdify_(nn.Linear(8, 8), 2, init="xavier")


# Tolerance of the equivalence test: both forms compute the same sums in a different order
# (one dense GEMM vs padded block GEMMs), so each step differs by float32 rounding (~1e-7
# relative); after 300 SGD steps the weights differ by 3e-7 to 5e-7 of their scale here. 1e-5
# leaves room for other BLAS builds while still catching any real mismatch (a wrong gradient or
# a drifted mask moves weights by far more within a few steps).
EQUIVALENCE_RTOL = 1e-5


@pytest.mark.parametrize("dims,c", [([60, 40, 10], 4), ([50, 33, 7], 3)])
def test_masked_and_compact_training_reach_the_same_weights(dims, c):
    def run(mode):
        torch.manual_seed(0)
        model = mpdify_(fc_stack(dims), c, seed=5, mode=mode)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
        g = torch.Generator().manual_seed(1)
        for _ in range(300):
            x = torch.randn(32, dims[0], generator=g)
            y = torch.randint(0, dims[-1], (32,), generator=g)
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        return model

    masked = run("masked")
    compact = unpack(run("compact"))
    for (key, a), b in zip(masked.state_dict().items(), compact.state_dict().values()):
        if a.dtype.is_floating_point:
            err = float((a - b).abs().max() / a.abs().max())
            assert err <= EQUIVALENCE_RTOL, (key, err)
        else:
            assert torch.equal(a, b)


def test_compact_model_compiles_checkpoints_and_trains_with_the_trainer(data_dir, tmp_path):
    from mpdcompress.train import train

    full = train(small_config(mode="compact", epochs=2), checkpoint_dir=tmp_path / "a")
    train(small_config(mode="compact", epochs=1), checkpoint_dir=tmp_path / "b")
    resumed = train(small_config(mode="compact", epochs=2), checkpoint_dir=tmp_path / "b", resume=True)
    for p, q in zip(full.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(p, q)
    assert full.test_accuracy > 0.8
    assert any(isinstance(m, BlockDiagonalLinear) for m in full.model.modules())
    assert full.fc_weights == 784 * 300 // 4 + 300 * 100 // 4 + 100 * 10

    model = mpdify_(fc_stack([32, 24, 6]), 4, mode="compact")
    compiled = torch.compile(model, backend="aot_eager")
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = torch.randn(16, 32), torch.randint(0, 6, (16,))
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(compiled(x), y).backward()
        opt.step()
    assert isinstance(unpack(model)[0], MPDLinear)
