import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from torch import nn

import mpdcompress as mc
from mpdcompress.files.header import manifest_digest, tensor_digest
from mpdcompress.files.io import ModelFileError, NonFiniteWeightsWarning, load, read_manifest, save
from mpdcompress.models import build_model, fc_stack, paper_filter


def packed_lenet(seed=0):
    torch.manual_seed(seed)
    model = build_model("lenet300").eval()
    mc.mpdify_(model, 10, filter_fn=paper_filter(model, "lenet300"), seed=seed)
    return mc.pack(model)


@pytest.fixture(scope="module")
def lenet_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("io") / "lenet.safetensors"
    model = packed_lenet()
    save(model, path)
    return path, model


def outputs_equal(a, b, shape=(1, 28, 28)):
    """Same tensors bit for bit, and the same outputs (up to BLAS summation order)."""
    sa, sb = a.state_dict(), b.state_dict()
    if list(sa) != list(sb) or not all(torch.equal(sa[k], sb[k]) for k in sa):
        return False
    x = torch.randn(4, *shape)
    with torch.no_grad():
        return torch.allclose(a.eval()(x), b.eval()(x), rtol=1e-6, atol=1e-7)


def test_round_trip_packed_without_user_code(lenet_file):
    path, model = lenet_file
    loaded = load(path)
    assert outputs_equal(loaded, model)
    assert [type(m).__name__ for m in loaded] == [type(m).__name__ for m in model]
    assert list(loaded.state_dict()) == list(model.state_dict())


def test_round_trip_into_a_dense_skeleton_and_a_masked_file(tmp_path, lenet_file):
    path, model = lenet_file
    assert outputs_equal(load(path, model=build_model("lenet300")), model)
    masked = mc.unpack(model)
    save(masked, tmp_path / "masked.safetensors")
    assert read_manifest(tmp_path / "masked.safetensors")["form"] == "masked"
    back = load(tmp_path / "masked.safetensors")
    assert isinstance(back[1], mc.MPDLinear) and outputs_equal(back, masked)


class Custom(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(12, 9), nn.Linear(9, 4)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def test_custom_modules_need_the_model_and_load_into_it(tmp_path):
    model = mc.pack(mc.mpdify_(Custom(), 3))
    save(model, tmp_path / "c.safetensors")
    with pytest.raises(ValueError, match=r"pass the model: load\(path, model=MyNet\(\)\)"):
        load(tmp_path / "c.safetensors")
    loaded = load(tmp_path / "c.safetensors", model=Custom())
    assert outputs_equal(loaded, model, shape=(12,))


def test_indices_use_the_smallest_integer_type(lenet_file):
    from safetensors import safe_open

    path, _ = lenet_file
    with safe_open(str(path), "pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys() if k.endswith("_order")}
    # 784 and 300 indices need 16 bits; the 100 outputs of the second layer fit in 8.
    assert dtypes == {
        "1.layers.0.row_order": "I16",
        "1.layers.0.col_order": "I16",
        "1.layers.1.row_order": "I8",
        "1.layers.1.col_order": "I16",
    }


def test_layers_sharing_one_order_tensor_save_and_load(tmp_path):
    """Hand-made masks may share a permutation tensor between layers; each layer's orders are
    still stored (the loader checks every layer's own), not tied to the first one's."""
    from mpdcompress.core.masks import MPDMask, make_mask

    first = make_mask(8, 8, 2, seed=1)
    second = MPDMask(first.layout, first.col_order, first.row_order)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    model[0], model[2] = mc.MPDLinear.from_linear(model[0], first), mc.MPDLinear.from_linear(model[2], second)
    loaded = load(save(model, tmp_path / "shared-orders.safetensors"))
    assert torch.equal(loaded[2].row_order, first.col_order) and torch.equal(loaded[0].col_order, first.col_order)
    x = torch.randn(3, 8)
    assert torch.equal(loaded(x), model(x))


@pytest.mark.parametrize(
    "name,builder,c",
    [("lenet", lambda: build_model("lenet300"), 10), ("alexnet-fc", lambda: fc_stack([16384, 4096, 4096, 1000]), 8)],
)
def test_packed_file_is_within_one_over_c_plus_two_percent_of_dense(tmp_path, name, builder, c):
    torch.manual_seed(0)
    dense = builder()
    save_file({k: v.contiguous() for k, v in dense.state_dict().items()}, tmp_path / "dense.safetensors")
    packed = mc.pack(mc.mpdify_(dense, c))
    save(packed, tmp_path / "packed.safetensors")
    ratio = os.path.getsize(tmp_path / "packed.safetensors") / os.path.getsize(tmp_path / "dense.safetensors")
    assert ratio <= 1 / c + 0.02, ratio


def split_file(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def join_file(path: Path, header: dict, data: bytes) -> Path:
    new = json.dumps(header).encode()
    path.write_bytes(len(new).to_bytes(8, "little") + new + data)
    return path


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda m: m.update(format_version=99), "format version 99 is not supported"),
        (lambda m: m.update(format="other"), "does not declare format"),
        (lambda m: m["layers"]["1.layers.0"].update(compression=1000), r"layer '1.layers.0'.*exceeds"),
        (lambda m: m["layers"]["1.layers.0"].update(compression=5), r"declares weight_blocks of shape \(5, "),
        (lambda m: m["sha256"].update({"1.layers.0.weight_blocks": "0" * 64}), "SHA-256"),
        (lambda m: m.pop("sha256"), "lacks 'sha256'"),
        (lambda m: m["layers"]["1.layers.0"].update(bias="yes"), "malformed"),
        (lambda m: m.update(user=["x"]), "'user' is malformed"),
    ],
    ids=["version", "format", "bad-factor", "factor-vs-blocks", "hash", "no-hashes", "bias-type", "user-type"],
)
def test_inconsistent_manifest_is_refused(tmp_path, lenet_file, edit, message):
    """Edits re-signed with the manifest's own digest, as a forger would: the deeper checks hold."""
    header, data = split_file(lenet_file[0])
    manifest = json.loads(header["__metadata__"]["mpdcompress"])
    edit(manifest)
    manifest["manifest_sha256"] = manifest_digest(manifest)
    header["__metadata__"]["mpdcompress"] = json.dumps(manifest)
    with pytest.raises(ModelFileError, match=message):
        load(join_file(tmp_path / "bad.safetensors", header, data))


def test_an_unsigned_manifest_edit_fails_the_manifest_digest(tmp_path, lenet_file):
    header, data = split_file(lenet_file[0])
    manifest = json.loads(header["__metadata__"]["mpdcompress"])
    manifest["architecture"]["children"][0][1]["args"]["start_dim"] = 0  # would load a different model
    header["__metadata__"]["mpdcompress"] = json.dumps(manifest)
    with pytest.raises(ModelFileError, match="manifest fails its SHA-256 check"):
        load(join_file(tmp_path / "bad.safetensors", header, data))


def test_plain_safetensors_file_is_not_a_model_file(tmp_path, lenet_file):
    header, data = split_file(lenet_file[0])
    del header["__metadata__"]
    with pytest.raises(ModelFileError, match="not an mpdcompress model file"):
        load(join_file(tmp_path / "plain.safetensors", header, data))


def save_with_tensor(tmp_path, key, value):
    """A well-formed file (valid hashes) whose tensor ``key`` was replaced by ``value``."""
    from safetensors.torch import save as st_save

    from mpdcompress.files.io import _index_dtype

    path = save(packed_lenet(), tmp_path / "edited.safetensors")
    header, _ = split_file(path)
    manifest = json.loads(header["__metadata__"]["mpdcompress"])
    state = {**packed_lenet().state_dict(), key: value}
    tensors = {
        k: (v.to(_index_dtype(v.numel())) if k.endswith("_order") else v).contiguous()
        for k, v in state.items()
        if not k.endswith("num_blocks")
    }
    manifest["sha256"] = {k: tensor_digest(t) for k, t in tensors.items()}
    manifest["manifest_sha256"] = manifest_digest(manifest)
    path.write_bytes(st_save(tensors, metadata={"mpdcompress": json.dumps(manifest)}))
    return path


def test_index_that_is_not_a_permutation_is_refused(tmp_path):
    key = "1.layers.0.col_order"
    bad = torch.zeros(784, dtype=torch.int64)
    with pytest.raises(ModelFileError, match="not a permutation"):
        load(save_with_tensor(tmp_path, key, bad))


def test_out_of_range_index_is_refused(tmp_path):
    bad = torch.arange(300, dtype=torch.int64)
    bad[0] = 5000
    with pytest.raises(ModelFileError, match="outside 0..299"):
        load(save_with_tensor(tmp_path, "1.layers.0.row_order", bad))


def test_block_shape_disagreeing_with_manifest_is_refused(tmp_path):
    with pytest.raises(ModelFileError, match=r"weight_blocks.*shape"):
        load(save_with_tensor(tmp_path, "1.layers.0.weight_blocks", torch.zeros(10, 30, 78)))


def test_nan_weights_refused_by_default_and_loadable_with_a_warning(tmp_path):
    blocks = packed_lenet().state_dict()["1.layers.1.weight_blocks"].clone()
    blocks[0, 0, 0] = float("nan")
    path = save_with_tensor(tmp_path, "1.layers.1.weight_blocks", blocks)
    with pytest.raises(ModelFileError, match="NaN or Inf"):
        load(path)
    with pytest.warns(NonFiniteWeightsWarning):
        load(path, on_nonfinite="warn")
    with pytest.raises(ValueError, match="on_nonfinite"):
        load(path, on_nonfinite="maybe")


def test_truncated_and_garbage_files(tmp_path, lenet_file):
    path, _ = lenet_file
    raw = path.read_bytes()
    for cut in (0, 4, 8, 100, len(raw) // 2, len(raw) - 1):
        (tmp_path / "t.safetensors").write_bytes(raw[:cut])
        with pytest.raises(ModelFileError):
            load(tmp_path / "t.safetensors")
    (tmp_path / "g.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!" + b"\x00" * 64)
    with pytest.raises(ModelFileError, match="not valid JSON|does not fit|data should be"):
        load(tmp_path / "g.safetensors")
    with pytest.raises(FileNotFoundError):
        load(tmp_path / "missing.safetensors")


def test_save_refuses_uncompressed_and_mixed_models(tmp_path):
    with pytest.raises(ValueError, match="no compressed layer"):
        save(nn.Linear(3, 3), tmp_path / "x.safetensors")
    mixed = mc.mpdify_(nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 4)), 2)
    mixed[0] = mc.BlockDiagonalLinear.from_masked(mixed[0])
    with pytest.raises(ValueError, match="mixes packed and masked"):
        save(mixed, tmp_path / "x.safetensors")


def test_crash_during_save_keeps_the_previous_file(tmp_path, lenet_file):
    """A process killed in the middle of save() leaves the old file intact and loadable."""
    path = tmp_path / "model.safetensors"
    save(packed_lenet(seed=1), path)
    before = path.read_bytes()
    code = f"""
import os, torch, mpdcompress as mc
from mpdcompress.files.io import save
from mpdcompress.models import fc_stack
real_fsync = os.fsync
def die(fd):
    os._exit(9)          # the machine 'crashes' after writing the data, before the rename
os.fsync = die
save(mc.pack(mc.mpdify_(fc_stack([512, 256, 10]), 4)), {str(path)!r})
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 9, proc.stderr
    assert path.read_bytes() == before
    assert outputs_equal(load(path), packed_lenet(seed=1))


def test_failed_save_removes_its_temporary_file(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        save(packed_lenet(), tmp_path / "m.safetensors")
    assert list(tmp_path.iterdir()) == []


FUZZ_EXAMPLES = int(os.environ.get("MPD_FUZZ_EXAMPLES", "150"))


@settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_fuzzed_files_load_correctly_or_fail_cleanly(tmp_path_factory, data):
    """Random byte flips, truncations and insertions: either a clean ModelFileError or the same model."""
    base = tmp_path_factory.getbasetemp() / "fuzz_base.safetensors"
    model = packed_lenet()
    if not base.exists():
        save(model, base)
    raw = bytearray(base.read_bytes())
    n_header = int.from_bytes(raw[:8], "little")
    kind = data.draw(st.sampled_from(["flip_header", "flip_data", "truncate", "insert", "length"]))
    if kind == "flip_header":
        for _ in range(data.draw(st.integers(1, 4))):
            pos = data.draw(st.integers(8, 8 + n_header - 1))
            raw[pos] = data.draw(st.integers(0, 255))
    elif kind == "flip_data":
        pos = data.draw(st.integers(8 + n_header, len(raw) - 1))
        raw[pos] ^= 1 << data.draw(st.integers(0, 7))
    elif kind == "truncate":
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    elif kind == "insert":
        pos = data.draw(st.integers(0, len(raw)))
        raw[pos:pos] = data.draw(st.binary(min_size=1, max_size=16))
    else:
        raw[:8] = data.draw(st.integers(0, 2**64 - 1)).to_bytes(8, "little")
    path = tmp_path_factory.mktemp("fz") / "m.safetensors"
    path.write_bytes(bytes(raw))
    try:
        loaded = load(path)
    except ModelFileError:
        return
    except ValueError as exc:  # e.g. an architecture edit the builder rejects
        assert "architecture" in str(exc) or "layer" in str(exc), exc
        return
    assert outputs_equal(loaded, model)
