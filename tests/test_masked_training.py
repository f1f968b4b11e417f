import io

import pytest
import torch
from torch import nn

import mpdcompress as mc
from mpdcompress import MPDConfig, MPDLinear, mpdify, mpdify_, pack, save
from mpdcompress.errors import CompressionError, CompressionTypeError, MPDCompressError


def lenet(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Flatten(), nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10)
    )


def off_mask_max(model):
    return max(
        float(m.weight.detach()[~m.mask].abs().max()) if (~m.mask).any() else 0.0
        for m in model.modules()
        if isinstance(m, MPDLinear)
    )


def test_mpdify_replaces_all_linears_and_keeps_parameters():
    model = lenet()
    weights = [m.weight for m in model if isinstance(m, nn.Linear)]
    out = mpdify_(model, 10)
    assert out is model
    layers = [m for m in model if isinstance(m, MPDLinear)]
    assert len(layers) == 3 and [m.weight for m in layers] == weights
    assert layers[0].compression == 10 and abs(layers[0].mpd_mask.density - 0.1) < 1e-3
    assert off_mask_max(model) == 0.0


def test_filter_and_mapping_select_layers():
    model = mpdify_(lenet(), 10, filter_fn=lambda m, name: m.out_features != 10)
    assert [type(m).__name__ for m in model if isinstance(m, nn.Linear)] == ["MPDLinear", "MPDLinear", "Linear"]
    model = mpdify_(lenet(), {"3": 4})
    assert [getattr(m, "compression", None) for m in model if isinstance(m, nn.Linear)] == [None, 4, None]
    with pytest.raises(KeyError, match="fc9"):
        mpdify_(lenet(), {"fc9": 4})
    with pytest.raises(ValueError, match="no nn.Linear layer was selected"):
        mpdify_(lenet(), 4, filter_fn=lambda m, name: False)


def test_invalid_factor_names_the_layer():
    with pytest.raises(ValueError, match=r"layer '5'.*1\.\.10"):
        mpdify_(lenet(), 20)
    with pytest.raises(TypeError, match=r"layer '1'"):
        mpdify_(lenet(), {"1": 2.5})
    with pytest.raises(TypeError, match="compression must be an int"):
        mpdify_(lenet(), 2.5)


def test_root_linear_and_shared_module():
    layer = mpdify_(nn.Linear(8, 6), 2)
    assert isinstance(layer, MPDLinear)
    shared = nn.Linear(8, 8)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    mpdify_(model, 2)
    assert model[0] is model[2] and isinstance(model[0], MPDLinear)


def test_same_seed_same_masks_different_seed_differs():
    a, b, c = mpdify_(lenet(), 10, seed=1), mpdify_(lenet(), 10, seed=1), mpdify_(lenet(), 10, seed=2)
    assert torch.equal(a[1].mask, b[1].mask) and not torch.equal(a[1].mask, c[1].mask)
    # A layer's mask depends on its own name only, not on which other layers are compressed.
    d = mpdify_(lenet(), {"3": 10}, seed=1)
    assert torch.equal(a[3].mask, d[3].mask)


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=1e-2),
        lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
        lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
        lambda p: torch.optim.RMSprop(p, lr=1e-3, momentum=0.5, weight_decay=1e-3),
        lambda p: torch.optim.Adagrad(p, lr=1e-2, weight_decay=1e-3),
        lambda p: torch.optim.NAdam(p, lr=1e-2, weight_decay=1e-3),
    ],
    ids=["adam-wd", "adamw", "sgd-nesterov-wd", "rmsprop", "adagrad", "nadam"],
)
def test_optimizers_keep_exact_zeros_off_mask(make_opt):
    torch.manual_seed(0)
    model = mpdify_(nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 10)), 4)
    opt = make_opt(model.parameters())
    x, y = torch.randn(256, 64), torch.randint(0, 10, (256,))
    first = model[0].weight.detach().clone()
    for _ in range(300):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    assert off_mask_max(model) == 0.0
    assert not torch.equal(first, model[0].weight)  # training did move the kept weights


def test_training_reduces_loss_with_adam_weight_decay():
    torch.manual_seed(0)
    model = mpdify_(lenet(), 10)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4)
    teacher = nn.Linear(784, 10)
    x = torch.randn(512, 784)
    y = teacher(x).argmax(1)
    losses = []
    for _ in range(300):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert off_mask_max(model) == 0.0


def test_state_dict_round_trip_continues_training_identically():
    torch.manual_seed(0)
    model = mpdify_(lenet(), 10, seed=5)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = torch.randn(64, 784), torch.randint(0, 10, (64,))

    def step(m, o):
        o.zero_grad()
        nn.functional.cross_entropy(m(x), y).backward()
        o.step()

    for _ in range(5):
        step(model, opt)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    assert {"1.row_order", "1.col_order", "1.num_blocks"} <= set(model.state_dict())
    assert "1.mask" not in model.state_dict()  # derived from the orders, not stored

    # A fresh model with a *different* seed must take the masks from the checkpoint.
    restored = mpdify_(lenet(seed=1), 10, seed=99)
    ckpt = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    restored.load_state_dict(ckpt["model"])
    opt2 = torch.optim.Adam(restored.parameters(), lr=1e-3)
    opt2.load_state_dict(ckpt["opt"])
    assert torch.equal(restored[1].mask, model[1].mask)
    for _ in range(5):
        step(model, opt)
        step(restored, opt2)
    for a, b in zip(model.state_dict().values(), restored.state_dict().values()):
        assert torch.equal(a, b)


def test_loading_dense_weights_masks_them():
    dense = lenet()
    model = mpdify_(lenet(seed=3), 10)
    state = {**model.state_dict(), **{k: v for k, v in dense.state_dict().items()}}
    model.load_state_dict(state)
    assert off_mask_max(model) == 0.0


def test_loading_corrupt_orders_is_refused():
    model = mpdify_(lenet(), 10)
    state = model.state_dict()
    state["1.row_order"] = torch.zeros_like(state["1.row_order"])
    with pytest.raises(ValueError, match="not a permutation"):
        mpdify_(lenet(), 10).load_state_dict(state)


def test_mpdlinear_constructor_errors():
    with pytest.raises(TypeError, match="compression= or mask="):
        MPDLinear(4, 4)
    mask = mc.make_mask(4, 4, 2, seed=0)
    with pytest.raises(ValueError, match="disagrees"):
        MPDLinear(4, 4, compression=4, mask=mask)
    with pytest.raises(ValueError, match="does not match"):
        MPDLinear.from_linear(nn.Linear(5, 4), mask)


def test_apply_masks_reverts_foreign_updates():
    model = mpdify_(lenet(), 10)
    with torch.no_grad():
        model[1].weight.add_(1.0)
    mc.apply_masks_(model)
    assert off_mask_max(model) == 0.0


def test_to_dtype_and_autocast():
    model = mpdify_(lenet(), 10).to(torch.float64)
    assert model[1].weight.dtype == torch.float64 and model[1].mask.dtype == torch.bool
    model = mpdify_(lenet(), 10)
    x = torch.randn(4, 784)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.dtype == torch.bfloat16
    assert torch.allclose(out.float(), model(x), atol=0.05, rtol=0.05)


def test_torch_compile_masked_model_trains():
    torch.manual_seed(0)
    model = mpdify_(nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4)), 4)
    compiled = torch.compile(model, backend="aot_eager")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(16, 32), torch.randint(0, 4, (16,))
    eager = model(x)
    assert torch.allclose(compiled(x), eager, atol=1e-6)
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(compiled(x), y).backward()
        opt.step()
    assert off_mask_max(model) == 0.0


def test_mpdify_is_a_deprecated_alias_with_the_old_filter_order():
    with pytest.warns(DeprecationWarning, match="mpdify_"):
        model = mpdify(lenet(), 10, filter=lambda name, m: m.out_features != 10)
    assert isinstance(model[1], MPDLinear) and isinstance(model[3], MPDLinear)
    assert not isinstance(model[5], MPDLinear)


def test_compressing_twice_says_so():
    model = mpdify_(lenet(), 10)
    with pytest.raises(CompressionError, match="already compressed"):
        mpdify_(model, 10)
    with pytest.raises(CompressionError, match="already compressed"):
        mpdify_(pack(model), 10)


def test_config_object_is_checked_once_and_recorded(tmp_path):
    config = MPDConfig(10, seed=3, init="block")
    model = mpdify_(lenet(), config, filter_fn=lambda m, name: name != "5")
    assert model.mpd_config == config
    assert mpdify_(lenet(), config, seed=4).mpd_config.seed == 4  # keywords override the config's fields
    from mpdcompress.files.io import read_manifest

    save(pack(model), tmp_path / "m.safetensors")
    assert read_manifest(tmp_path / "m.safetensors")["config"] == {
        "compression": 10,
        "seed": 3,
        "permute": True,
        "mode": "masked",
        "init": "block",
        "masks": "random",
        "convs": False,
    }
    for bad in (dict(seed=1.5), dict(seed=True), dict(permute="yes")):
        with pytest.raises(CompressionTypeError):
            MPDConfig(4, **bad)
    with pytest.raises(CompressionTypeError, match="compression must be an int"):
        MPDConfig(2.5)
    with pytest.raises(MPDCompressError, match="mode must be one of"):
        MPDConfig(4, mode="sparse")
