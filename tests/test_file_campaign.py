"""A mutation campaign against model files: every mutant is refused with ModelFileError or
loads as a bit-identical model, within bounded time and memory."""

import json
import random
import resource
import time

import pytest
import torch
from torch import nn

import mpdcompress as mpd
from mpdcompress.errors import ModelFileError
from mpdcompress.files.header import manifest_digest as _manifest_digest
from mpdcompress.files.io import load, read_manifest, save

BUDGET = int(__import__("os").environ.get("MPD_FUZZ_EXAMPLES", "0")) or None


def _models():
    torch.manual_seed(0)
    packed = mpd.pack(  # a fused chain with a folded dense tail, then a BatchNorm
        mpd.mpdify_(
            nn.Sequential(
                nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 7), nn.ReLU(), nn.Linear(7, 5), nn.BatchNorm1d(5)
            ),
            3,
            filter_fn=lambda m, n: n in ("0", "2"),
        )
    )
    masked = mpd.mpdify_(nn.Sequential(nn.Linear(9, 8), nn.GELU(), nn.Linear(8, 4)), 2)
    return {"packed": packed.eval(), "masked": masked.eval()}


def _split(blob: bytes):
    n = int.from_bytes(blob[:8], "little")
    return n, json.loads(blob[8 : 8 + n]), blob[8 + n :]


def _join(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw + data


def _same(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa) and repr(a) == repr(b)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("campaign")
    made = {name: (save(model, tmp / f"{name}.safetensors"), model) for name, model in _models().items()}
    packed = made["packed"][1]  # the same model with its masks stored as their seed
    return {**made, "seeded": (save(packed, tmp / "seeded.safetensors", mask_storage="seed"), packed)}


def _load_or_refuse(blob: bytes, path, original) -> str:
    """'refused' or 'identical'; anything else fails the test."""
    path.write_bytes(blob)
    started = time.perf_counter()
    try:
        loaded = load(path)
    except ModelFileError:
        outcome = "refused"
    else:
        assert _same(loaded, original), "a mutated file loaded as a different model"
        outcome = "identical"
    assert time.perf_counter() - started < 5.0
    return outcome


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@pytest.mark.parametrize("name", ["packed", "masked", "seeded"])
def test_single_byte_edits_of_the_header(files, name, tmp_path):
    path, original = files[name]
    blob = path.read_bytes()
    n = int.from_bytes(blob[:8], "little")
    rng = random.Random(0)
    positions = rng.sample(range(8, 8 + n), min(n, BUDGET or 400))
    before = _peak_rss_mib()
    outcomes = {"refused": 0, "identical": 0}
    for pos in positions:
        mutant = bytearray(blob)
        mutant[pos] = (mutant[pos] + rng.randrange(1, 256)) % 256
        outcomes[_load_or_refuse(bytes(mutant), tmp_path / "mutant.safetensors", original)] += 1
    assert outcomes["refused"] >= len(positions) * 0.9, outcomes  # a few edits hit insignificant whitespace
    assert _peak_rss_mib() - before < 300


def _resigned(blob: bytes, edit) -> bytes:
    """The file with its manifest edited and every digest recomputed, as a forger would."""
    n, header, data = _split(blob)
    manifest = json.loads(header["__metadata__"]["mpdcompress"])
    edit(manifest)
    manifest["manifest_sha256"] = _manifest_digest(manifest)
    header["__metadata__"]["mpdcompress"] = json.dumps(manifest)
    return _join(header, data)


def _unsigned(blob: bytes, edit) -> bytes:
    n, header, data = _split(blob)
    manifest = json.loads(header["__metadata__"]["mpdcompress"])
    edit(manifest)
    header["__metadata__"]["mpdcompress"] = json.dumps(manifest)
    return _join(header, data)


def _set(path, value):
    def edit(manifest):
        node = manifest
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value

    return edit


PACKED_EDITS = [
    _set(("architecture", "children", 0, 1, "layers", 0, "args", "d_in"), 300_000_000),
    _set(("architecture", "children", 0, 1, "layers", 0, "args", "compression"), 10**12),
    _set(("architecture", "children", 0, 1, "layers", 0, "args", "d_out"), -3),
    _set(("architecture", "children", 0, 1, "layers", 0, "args", "d_in"), True),
    _set(
        ("architecture", "children", 0, 1, "head"),
        {"type": "Linear", "args": {"in_features": 30000, "out_features": 30000}},
    ),
    _set(("architecture", "children", 0, 1, "tail", "args", "in_features"), -1),
    _set(("architecture", "children", 0, 1, "tail"), {"type": "Conv2d", "args": {"in_channels": 1}}),
    _set(("architecture", "children", 0, 1, "tail"), {"type": "BatchNorm1d", "args": {"num_features": "x"}}),
    _set(
        ("architecture", "children", 0, 1, "tail"),
        {"type": "Linear", "args": {"in_features": 9, "out_features": 5, "bias": True, "dtype": "float8"}},
    ),
    _set(("architecture", "children"), [["0", {"type": "Sequential", "children": "x"}]]),
    _set(("architecture",), {"type": "os.system"}),
    _set(("architecture", "children", 1, 1, "args", "eps"), "0.1"),
    _set(("layers", "0.layers.0", "source"), "no-such-layer"),
    _set(("layers", "0.layers.0", "d_in"), 10**15),
    _set(("sha256",), {"x": 1}),
    _set(("config",), {"compression": 3, "seed": 1.5}),
    _set(("input_shape",), ["a"]),
]


@pytest.mark.parametrize("edit", PACKED_EDITS, ids=range(len(PACKED_EDITS)))
def test_resigned_manifest_edits_are_refused_before_allocation(files, edit, tmp_path):
    path, original = files["packed"]
    before = _peak_rss_mib()
    mutant = _resigned(path.read_bytes(), edit)
    assert _load_or_refuse(mutant, tmp_path / "m.safetensors", original) == "refused"
    assert _peak_rss_mib() - before < 100


@pytest.mark.parametrize("edit", PACKED_EDITS[:6], ids=range(6))
def test_unsigned_manifest_edits_fail_the_manifest_digest(files, edit, tmp_path):
    path, _ = files["packed"]
    (tmp_path / "m.safetensors").write_bytes(_unsigned(path.read_bytes(), edit))
    with pytest.raises(ModelFileError, match="manifest fails its SHA-256|not valid JSON"):
        read_manifest(tmp_path / "m.safetensors")


def test_nesting_and_constants_are_refused(files, tmp_path):
    path, _ = files["packed"]
    n, header, data = _split(path.read_bytes())
    deep = "[" * 5000 + "]" * 5000
    for text in (deep, '{"format": "mpdcompress", "format_version": 2, "x": NaN}', '{"a": Infinity}'):
        header["__metadata__"]["mpdcompress"] = text
        (tmp_path / "m.safetensors").write_bytes(_join(header, data))
        with pytest.raises(ModelFileError):
            load(tmp_path / "m.safetensors")


def test_dtype_edits_in_the_tensor_header_fail_the_digest(files, tmp_path):
    path, _ = files["packed"]
    n, header, data = _split(path.read_bytes())
    key = next(k for k, v in header.items() if k != "__metadata__" and v["dtype"] == "F32")
    header[key]["dtype"] = "I32"
    (tmp_path / "m.safetensors").write_bytes(_join(header, data))
    with pytest.raises(ModelFileError, match="SHA-256"):
        load(tmp_path / "m.safetensors")


def test_nonzero_padding_in_a_packed_file_is_refused(tmp_path):
    torch.manual_seed(0)
    model = mpd.pack(mpd.mpdify_(nn.Sequential(nn.Linear(10, 7)), 3))  # 7 = 3 + 2 + 2: uneven
    layer = model[0]
    pad = layer.padding_mask == 0
    with torch.no_grad():
        layer.weight_blocks[pad] = 0.5
    with pytest.raises(ModelFileError, match="padding entries"):
        load(save(model, tmp_path / "p.safetensors"))


@pytest.mark.parametrize(
    "what,edit,message",
    [
        (
            "100,000 extra ReLUs",
            lambda m: m["architecture"]["children"].extend([[f"x{i}", {"type": "ReLU"}] for i in range(100_000)]),
            "larger than",
        ),
        (
            "a million-entry kernel list",
            lambda m: m["architecture"]["children"].append(
                ["p", {"type": "MaxPool1d", "args": {"kernel_size": [2] * 1_000_000}}]
            ),
            "larger than",
        ),
        ("nesting 300 deep", lambda m: m.update(architecture=_nested(m["architecture"], 300)), "deep"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_architectures_out_of_proportion_to_the_file_are_refused_quickly(files, what, edit, message, tmp_path):
    path, _ = files["packed"]
    mutant = _resigned(path.read_bytes(), edit)
    (tmp_path / "m.safetensors").write_bytes(mutant)
    before, started = _peak_rss_mib(), time.perf_counter()
    with pytest.raises(ModelFileError, match=message):
        load(tmp_path / "m.safetensors")
    assert time.perf_counter() - started < 5.0
    assert _peak_rss_mib() - before < 2 * len(mutant) / 2**20 + 50


def _nested(entry: dict, depth: int) -> dict:
    for _ in range(depth):
        entry = {"type": "Sequential", "children": [["0", entry]]}
    return entry


def test_every_byte_of_the_header_s_number_literals(files, tmp_path):
    """Each byte of each number in the header (sizes, offsets, shapes, args such as eps),
    replaced by other byte values: refused with ModelFileError or loaded identical, never another
    error (1e905 once raised a plain ValueError). MPD_FUZZ_EXAMPLES=0 runs a 2,000-mutant sample;
    a larger budget runs up to all 256 values of every byte."""
    import re

    path, original = files["packed"]
    blob = path.read_bytes()
    n = int.from_bytes(blob[:8], "little")
    header = blob[8 : 8 + n].decode()
    positions = [
        8 + m.start() + i
        for m in re.finditer(r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?", header)
        for i in range(len(m.group()))
    ]
    mutants = [(pos, value) for pos in positions for value in range(256) if value != blob[pos]]
    rng = random.Random(1)
    budget = BUDGET or 2000
    outcomes = {"refused": 0, "identical": 0}
    for pos, value in mutants if budget >= len(mutants) else rng.sample(mutants, budget):
        mutant = bytearray(blob)
        mutant[pos] = value
        outcomes[_load_or_refuse(bytes(mutant), tmp_path / "mutant.safetensors", original)] += 1
    assert outcomes["refused"] > 0.9 * sum(outcomes.values()), outcomes
