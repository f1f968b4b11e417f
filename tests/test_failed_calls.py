"""API misuse: refused with a precise error, and a refused call changes nothing."""

import os
import stat
import tempfile
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import mpdcompress as mpd
from mpdcompress.errors import (
    CompressionError,
    CompressionTypeError,
    ModelFileError,
    MPDCompressError,
    UnsupportedArchitectureError,
)


def test_pack_and_unpack_with_nothing_to_convert():
    with pytest.raises(CompressionError, match="nothing to pack"):
        mpd.pack(nn.Sequential(nn.Linear(4, 4)))
    with pytest.raises(CompressionError, match="nothing to unpack"):
        mpd.unpack(nn.Sequential(nn.Linear(4, 4)))


def test_pack_on_the_meta_device_says_why():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4))
    mpd.mpdify_(model, 2)
    with pytest.raises(CompressionError, match="meta device"):
        mpd.pack(model)


def test_a_shared_linear_stays_shared_through_save_and_load(tmp_path):
    torch.manual_seed(0)
    shared = nn.Linear(6, 6)
    model = mpd.mpdify_(nn.Sequential(nn.Linear(8, 6), nn.ReLU(), shared, nn.ReLU(), shared), 2)
    packed = mpd.pack(model)
    x = torch.randn(3, 8)
    with torch.no_grad():
        torch.testing.assert_close(packed(x), model(x))
    layers = [m for m in packed.modules() if isinstance(m, mpd.BlockDiagonalLinear)]
    assert len({id(m) for m in layers}) == len(layers)  # modules() yields a shared module once
    assert packed[2] is packed[4]
    mpd.save(packed, tmp_path / "shared.safetensors")
    # The file's architecture records the sharing, so it loads without the model as well.
    for loaded in (mpd.load(tmp_path / "shared.safetensors", model=packed), mpd.load(tmp_path / "shared.safetensors")):
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), packed(x), rtol=0, atol=0)
        assert loaded[2] is loaded[4] and loaded[2].weight_blocks is loaded[4].weight_blocks


def test_an_architecture_that_shares_what_is_not_there_is_refused(tmp_path):
    from pathlib import Path

    from mpdcompress.files.architecture import build
    from mpdcompress.files.header import declared_values

    later = {"type": "Sequential", "children": [["0", {"type": "Shared", "of": "1"}], ["1", {"type": "ReLU"}]]}
    ancestor = {"type": "Sequential", "children": [["0", {"type": "Shared", "of": ""}]]}  # a cycle
    for spec in (later, ancestor):
        with pytest.raises(ModelFileError, match="comes nowhere before"):
            build(spec)
        with pytest.raises(ModelFileError, match="comes nowhere before"):  # the size check, before loading
            declared_values(spec, Path("f.safetensors"))


def test_the_two_readers_of_an_architecture_refuse_the_same_malformed_entries():
    # build() and the size check walk the same tree: an entry one of them accepts and the other
    # does not would let a file through the check that then fails to build (or the reverse).
    from pathlib import Path

    from mpdcompress.files.architecture import build
    from mpdcompress.files.header import declared_values

    cases = {
        "malformed children": {"type": "Sequential", "children": [["0"]]},
        "malformed layers": {"type": "PackedChain", "layers": {"0": {}}, "activations": []},
        "not an object": {"type": "Sequential", "children": [["0", 3]]},
    }
    for message, spec in cases.items():
        with pytest.raises(ModelFileError, match=message):
            build(spec)
        with pytest.raises(ModelFileError, match=f"f.safetensors: .*{message}"):
            declared_values(spec, Path("f.safetensors"))


def test_complex_weights_are_refused_at_save(tmp_path):
    model = mpd.mpdify_(nn.Sequential(nn.Linear(4, 4)), 2).to(torch.complex64)
    with pytest.raises(UnsupportedArchitectureError, match="complex64"):
        mpd.save(model, tmp_path / "c.safetensors")
    assert not list(tmp_path.iterdir())


def test_float_and_bool_seeds_are_refused():
    for seed in (1.5, True):
        with pytest.raises(CompressionTypeError):
            mpd.mpdify_(nn.Linear(8, 8), 2, seed=seed)
        with pytest.raises(CompressionTypeError):
            mpd.make_mask(8, 8, 2, seed=seed)


def test_a_failed_load_leaves_the_callers_model_as_it_was(tmp_path):
    torch.manual_seed(0)
    path = mpd.save(
        mpd.pack(mpd.mpdify_(nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4)), 2)), tmp_path / "m.safetensors"
    )
    other = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 5))  # does not fit the file
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ModelFileError):
        mpd.load(path, model=other)
    assert [type(m) for m in other] == [nn.Linear, nn.ReLU, nn.Linear]
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())
    fits = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4))
    loaded = mpd.load(path, model=fits)
    assert loaded is not fits and type(fits[0]) is nn.Linear  # the caller's model is a template


@pytest.mark.parametrize("packed", [False, True])
def test_a_refused_load_state_dict_keeps_the_masks(packed):
    model = mpd.mpdify_(nn.Sequential(nn.Linear(20, 12)), 3)
    model = mpd.pack(model) if packed else model
    good = {k: v.clone() for k, v in model.state_dict().items()}
    for key, bad in (("0.row_order", torch.zeros(12, dtype=torch.int64)), ("0.num_blocks", torch.tensor(100))):
        with pytest.raises(CompressionError):
            model.load_state_dict({**good, key: bad})
        assert all(torch.equal(good[k], v) for k, v in model.state_dict().items())


def test_saved_files_get_the_mode_a_plain_write_gives(tmp_path):
    model = mpd.mpdify_(nn.Sequential(nn.Linear(4, 4)), 2)
    old = os.umask(0o022)
    try:
        path = mpd.save(model, tmp_path / "m.safetensors")
        assert stat.S_IMODE(path.stat().st_mode) == 0o644
        path.chmod(0o640)
        mpd.save(model, path)  # replacing keeps the replaced file's mode
        assert stat.S_IMODE(path.stat().st_mode) == 0o640
    finally:
        os.umask(old)


def test_temporary_files_of_killed_writes_are_removed(tmp_path):
    stale, fresh = tmp_path / ".m.safetensors.abc123.tmp", tmp_path / ".m.safetensors.def456.tmp"
    stale.write_bytes(b"x" * 100)
    fresh.write_bytes(b"x")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    mpd.save(mpd.mpdify_(nn.Sequential(nn.Linear(4, 4)), 2), tmp_path / "m.safetensors")
    assert not stale.exists() and fresh.exists()  # a fresh one may belong to a write still running


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize(
    "build,culprit",
    [
        (lambda: nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), "self_attn.out_proj"),
        (lambda: nn.utils.parametrizations.weight_norm(nn.Linear(8, 8)), "weight_norm"),
    ],
    ids=["multihead-attention", "weight-norm"],
)
def test_layers_the_mask_cannot_reach_are_refused_and_nothing_changes(build, culprit):
    torch.manual_seed(0)
    model = build()
    before, types = _state(model), [type(m) for m in model.modules()]
    with pytest.raises(CompressionError, match=culprit if "." in culprit else "parametrized"):
        mpd.mpdify_(model, 2)
    assert [type(m) for m in model.modules()] == types
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_head_tied_to_an_embedding_is_refused_and_the_embedding_kept():
    class LanguageModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(40, 16)
            self.mlp = nn.Linear(16, 16)
            self.head = nn.Linear(16, 40, bias=False)
            self.head.weight = self.embed.weight

    model = LanguageModel()
    before = _state(model)
    with pytest.raises(CompressionError, match="layer 'head' shares its weight with embed.weight"):
        mpd.mpdify_(model, 4)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    mpd.mpdify_(model, 4, filter_fn=lambda m, name: name != "head")  # the way out the message names
    assert isinstance(model.mlp, mpd.MPDLinear) and torch.equal(model.embed.weight, before["embed.weight"])


def test_packed_models_pickle():
    import pickle

    model = mpd.pack(mpd.mpdify_(nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4)), 2))
    again = pickle.loads(pickle.dumps(model))
    x = torch.randn(2, 8)
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x))


def _snapshot(model: nn.Module) -> dict:
    """Everything a refused call must leave as it was: each module's identity and type, each
    parameter's and buffer's identity and value (non-persistent buffers, such as masks, too)."""
    return {
        "modules": [(name, id(m), type(m)) for name, m in model.named_modules(remove_duplicate=False)],
        "tensors": {
            name: (id(t), t.detach().clone())
            for name, t in [
                *model.named_parameters(remove_duplicate=False),
                *model.named_buffers(remove_duplicate=False),
            ]
        },
    }


def _unchanged(model: nn.Module, before: dict) -> bool:
    after = _snapshot(model)
    return (
        after["modules"] == before["modules"]
        and set(after["tensors"]) == set(before["tensors"])
        and all(
            after["tensors"][k][0] == ident and torch.equal(after["tensors"][k][1], value)
            for k, (ident, value) in before["tensors"].items()
        )
    )


def _three_layers(form: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = mpd.mpdify_(nn.Sequential(nn.Linear(40, 24), nn.ReLU(), nn.Linear(24, 9)), 4, seed=seed)
    return mpd.pack(model, fold_dense=False) if form == "packed" else model


BAD_LATER_LAYER = {  # key suffix of the second compressed layer -> a value its check refuses
    "duplicate row_order": ("row_order", lambda t: torch.zeros_like(t)),
    "out-of-range row_order": ("row_order", lambda t: t + 100),
    "float row_order": ("row_order", lambda t: t.double()),
    "wrong-shape row_order": ("row_order", lambda t: t[:-1]),
    "zero num_blocks": ("num_blocks", lambda t: torch.zeros_like(t)),
}


@pytest.mark.parametrize("form", ["masked", "packed"])
@pytest.mark.parametrize("bad", sorted(BAD_LATER_LAYER))
@pytest.mark.parametrize("strict,assign", [(True, False), (False, False), (True, True)])
def test_load_state_dict_refusing_a_later_layer_changes_no_earlier_one(form, bad, strict, assign):
    model, donor = _three_layers(form, 0), _three_layers(form, 1)
    second = [name for name, m in model.named_modules() if isinstance(m, (mpd.MPDLinear, mpd.BlockDiagonalLinear))][1]
    suffix, spoil = BAD_LATER_LAYER[bad]
    state = donor.state_dict()
    state[f"{second}.{suffix}"] = spoil(state[f"{second}.{suffix}"])
    before = _snapshot(model)
    with pytest.raises((MPDCompressError, RuntimeError)):
        model.load_state_dict(state, strict=strict, assign=assign)
    assert _unchanged(model, before)
    model.load_state_dict(donor.state_dict(), strict=strict, assign=assign)  # a valid state still loads
    x = torch.randn(3, 40)
    with torch.no_grad():
        assert torch.equal(model(x), donor(x))


@pytest.mark.parametrize("form", ["masked", "packed"])
def test_torch_s_own_load_state_dict_errors_change_nothing_either(form):
    model, donor = _three_layers(form, 0), _three_layers(form, 1)
    good = donor.state_dict()
    last_bias = [k for k in good if k.endswith("bias")][-1]
    for state, strict in (
        ({**good, last_bias: torch.zeros(good[last_bias].numel() + 1)}, False),  # size mismatch
        ({k: v for k, v in good.items() if k != last_bias}, True),  # a missing key
        ({**good, "no.such.key": torch.zeros(1)}, True),  # an unexpected key
    ):
        before = _snapshot(model)
        with pytest.raises(RuntimeError, match="nothing was loaded"):
            model.load_state_dict(state, strict=strict)
        assert _unchanged(model, before)


def test_load_state_dict_into_an_uneven_packed_layer_refuses_nonzero_padding():
    model = mpd.pack(mpd.mpdify_(nn.Sequential(nn.Linear(10, 7)), 3))
    for key in ("0.weight_blocks", "0.bias"):
        state = model.state_dict()
        spoiled = state[key].clone()
        spoiled.view(-1)[-1] = 6.3  # the last block's last row (or bias entry) is padding at 7 = 3 + 2 + 2
        before = _snapshot(model)
        with pytest.raises(CompressionError, match="padding entries are not zero"):
            model.load_state_dict({**state, key: spoiled})
        assert _unchanged(model, before)


@pytest.mark.parametrize(
    "factors,options",
    [
        ({"0": 4, "2": 1000}, {}),
        ({"0": 4, "2": 2.5}, {}),
        ({"0": 4, "2": 1000}, {"masks": "weights"}),
        ({"0": 4, "2": 1000}, {"masks": "weights-joint"}),
        ({"0": 4, "2": 1000}, {"mode": "compact"}),
        ({"0": 4, "2": 1000}, {"init": "block"}),
    ],
)
def test_mpdify_refusing_a_later_layer_changes_no_earlier_one(factors, options):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 24), nn.ReLU(), nn.Linear(24, 8))
    before = _snapshot(model)
    with pytest.raises(MPDCompressError):
        mpd.mpdify_(model, factors, **options)
    assert _unchanged(model, before)


def test_misuse_of_public_calls_raises_our_errors(tmp_path):
    """Each of these raised a plain TypeError, AttributeError, RuntimeError, ValueError or
    AssertionError from deep inside before; now an MPDCompressError that says what to change."""
    path = mpd.save(mpd.mpdify_(nn.Sequential(nn.Linear(8, 6)), 2), tmp_path / "m.safetensors")
    calls = {
        "unknown option": (lambda: mpd.mpdify_(nn.Linear(8, 8), 4, bogus=1), "unknown option"),
        "not a module": (lambda: mpd.mpdify_("x", 4), "torch.nn.Module"),
        "template not a module": (lambda: mpd.load(path, model="x"), "torch.nn.Module"),
        "bad device": (lambda: mpd.load(path, device="bogus"), "not a device name"),
        "unsupported device": (lambda: mpd.load(path, device="meta"), "runs on cpu or cuda"),
        "input shape": (lambda: mpd.save(mpd.pack(mpd.load(path)), tmp_path / "p", input_shape=("a",)), "input_shape"),
        "huge seed": (lambda: mpd.mpdify_(nn.Linear(8, 8), 2, seed=10**23), "seed must be from 0"),
    }
    if not torch.cuda.is_available():
        calls["cuda without cuda"] = (lambda: mpd.load(path, device="cuda"), "is_available")
    for name, (call, message) in calls.items():
        with pytest.raises(MPDCompressError, match=message):
            call()


def test_mpdify_under_a_meta_default_device_draws_its_masks_on_the_cpu():
    with torch.device("meta"):
        model = mpd.mpdify_(nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4)), 2, seed=3)
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    reference = mpd.mpdify_(nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4)), 2, seed=3)
    assert torch.equal(model[0].row_order, reference[0].row_order)
    assert torch.equal(model[2].mask, reference[2].mask)


def _resign(blob: bytes, edit) -> bytes:
    from .test_file_campaign import _resigned

    return _resigned(blob, edit)


def _forge(original, out, edit=lambda manifest: None, tensors_edit=None, drop=()):
    """``original`` rewritten as a forger would: manifest and tensors edited, every digest
    recomputed, so only mpdcompress's own checks stand between the file and the user."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    from mpdcompress.files.header import manifest_digest, tensor_digest

    with safe_open(str(original), framework="pt") as f:
        tensors, manifest = {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["mpdcompress"])
    edit(manifest)
    if tensors_edit is not None:
        tensors_edit(tensors)
    tensors = {k: v for k, v in tensors.items() if k not in drop}
    manifest["sha256"] = {k: tensor_digest(v) for k, v in tensors.items()}
    manifest["manifest_sha256"] = manifest_digest(manifest)
    save_file(tensors, out, metadata={"mpdcompress": json.dumps(manifest)})
    return out


def test_forged_architectures_are_refused_as_model_file_errors(tmp_path):
    torch.manual_seed(0)
    model = mpd.pack(mpd.mpdify_(nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4), nn.BatchNorm1d(4)), 2))
    path = mpd.save(model, tmp_path / "m.safetensors", input_shape=(8,))

    def source_keys(m):
        m["architecture"]["children"][0][1]["source_keys"] = [{"a": 1}, None, 5]

    def parameter_free_layer_that_cannot_run(m):  # holds no values, so the size check passes
        norm = {"type": "LayerNorm", "args": {"normalized_shape": [2**39], "elementwise_affine": False}}
        m["architecture"]["children"].append(["9", norm])

    norm, index = "3.weight", "0.layers.1.row_order"  # 4 values each
    forgeries = [
        (_forge(path, tmp_path / "keys", source_keys), "source_keys"),
        (_forge(path, tmp_path / "tie", lambda m: m.update(ties={norm: index}), drop=[norm]), "different kinds"),
        (_forge(path, tmp_path / "run", parameter_free_layer_that_cannot_run), "cannot run on its recorded input"),
    ]
    for forged, message in forgeries:
        with pytest.raises(ModelFileError, match=message):
            mpd.load(forged)


def test_a_masked_file_with_weights_off_its_mask_is_refused(tmp_path):
    torch.manual_seed(0)
    model = mpd.mpdify_(nn.Sequential(nn.Linear(8, 6)), 2)
    path = mpd.save(model, tmp_path / "m.safetensors")
    off = (~model[0].mask).nonzero()[0].tolist()

    def put_a_value_off_the_mask(tensors):
        tensors["0.weight"] = tensors["0.weight"].clone()
        tensors["0.weight"][off[0], off[1]] = 1.0

    forged = _forge(path, tmp_path / "f.safetensors", tensors_edit=put_a_value_off_the_mask)
    with pytest.raises(ModelFileError, match="nonzero values off its mask"):
        mpd.load(forged)


def test_a_template_of_another_architecture_is_refused():
    torch.manual_seed(0)
    model = mpd.mpdify_(nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4)), 2)
    path = mpd.save(model, Path(tempfile.mkdtemp()) / "m.safetensors")
    with pytest.raises(ModelFileError, match=r"not the file's architecture \(at children\[1\]"):
        mpd.load(path, model=nn.Sequential(nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 4)))
    mpd.load(path, model=nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4)))  # the right one loads


def test_temporary_files_of_a_dead_writer_are_removed_at_the_next_write_whatever_their_age(tmp_path):
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    orphan = tmp_path / f".m.safetensors.{int(dead.stdout)}.x1y2.tmp"  # its writer has exited
    running = tmp_path / f".m.safetensors.{os.getpid()}.a1b2.tmp"  # a write of this process
    orphan.write_bytes(b"x" * 100)
    running.write_bytes(b"x")
    mpd.save(mpd.mpdify_(nn.Sequential(nn.Linear(4, 4)), 2), tmp_path / "m.safetensors")
    assert not orphan.exists() and running.exists()


def test_pack_in_place_refusing_a_nested_layer_packs_nothing():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 6)), nn.Sequential(nn.Linear(6, 4), nn.ReLU())
    )
    mpd.mpdify_(model, 2)
    with torch.no_grad():
        model[1][0].row_order[0] = model[1][0].row_order[1]  # a corrupted mask deep in the model
    before = _snapshot(model)
    with pytest.raises(MPDCompressError, match="permutation"):
        mpd.pack(model, inplace=True)
    assert _unchanged(model, before)


def test_unpack_in_place_refusing_a_nested_layer_unpacks_nothing():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 6)), nn.Sequential(nn.Linear(6, 4), nn.ReLU())
    )
    packed = mpd.pack(mpd.mpdify_(model, 2))
    with torch.no_grad():
        packed[1][0].row_order[0] = packed[1][0].row_order[1]
    before = _snapshot(packed)
    with pytest.raises(MPDCompressError, match="permutation"):
        mpd.unpack(packed, inplace=True)
    assert _unchanged(packed, before)


def test_structured_forgeries_of_tensor_data_are_refused(tmp_path):
    """Re-signed files whose tensors overlap in the data, or whose dtypes are mixed (a float64
    layer in a float32 model, which would fail at its first forward)."""
    import json

    torch.manual_seed(0)
    model = mpd.pack(mpd.mpdify_(nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 6), nn.BatchNorm1d(6)), 2))
    path = mpd.save(model, tmp_path / "m.safetensors", input_shape=(8,))

    def to_double(tensors):
        tensors["0.layers.1.weight_blocks"] = tensors["0.layers.1.weight_blocks"].double()

    mixed = _forge(path, tmp_path / "mixed.safetensors", tensors_edit=to_double)
    blob = path.read_bytes()
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8 : 8 + n])
    # Two tensors of six float32 values made to read the same bytes.
    header["3.weight"]["data_offsets"] = header["3.bias"]["data_offsets"]
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    (tmp_path / "overlap.safetensors").write_bytes(len(raw).to_bytes(8, "little") + raw + blob[8 + n :])
    for forged in (mixed, tmp_path / "overlap.safetensors"):
        with pytest.raises(ModelFileError):
            mpd.load(forged)


class _DataDependentNet(nn.Module):
    """A user's own module whose forward does what meta tensors cannot (a value on the host)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 6)

    def forward(self, x):
        assert float(x.abs().sum()) >= 0
        return self.fc(x)


def test_a_file_of_a_custom_model_loads_into_its_template_despite_the_run_check(tmp_path):
    # The meta-device forward of load only runs on modules a file can describe: this valid file
    # was refused ("Tensor.item() cannot be called on meta tensors") when it ran on every model.
    torch.manual_seed(0)
    model = mpd.mpdify_(_DataDependentNet(), 2)
    path = mpd.save(model, tmp_path / "m.safetensors", input_shape=(8,))
    loaded = mpd.load(path, model=_DataDependentNet())
    x = torch.randn(3, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
