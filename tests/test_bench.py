"""Smoke tests of the benchmark code on tiny shapes. No timing is asserted (timings are results, not tests)."""

import json

import pytest
import torch

from mpdcompress.bench import layer_candidates, model_weight_bytes, run_layer_bench, run_model_bench
from mpdcompress.bench.model import build_stack
from mpdcompress.bench.report import write_bench_report
from mpdcompress.bench.suite import BenchProfile, run_suite


@pytest.mark.parametrize("d_out,d_in,c", [(12, 20, 4), (10, 7, 3)])
def test_every_candidate_computes_the_masked_layer(d_out, d_in, c):
    fns, notes = layer_candidates(d_out, d_in, c)
    x = torch.randn(5, d_in)
    with torch.no_grad():
        ref = fns["masked"](x)
        for key in ("csr", "packed", "bsr"):
            if key in fns:
                assert torch.allclose(fns[key](x), ref, atol=1e-5), key
            else:
                assert key in notes
    assert fns["bmm_only"](x).shape == (c, 5, -(-d_out // c))
    if d_out % c or d_in % c:
        assert notes["bsr"].startswith("uneven blocks")


def test_layer_and_model_bench_rows_and_report(tmp_path):
    rows = run_layer_bench([("tiny", 12, 20)], factors=(2, 4), batches=(1, 3), repeats=1)
    assert len(rows) == 4
    assert all(r["speedup_vs_dense"]["dense"] == 1.0 and r["seconds"]["packed"] > 0 for r in rows)
    models = run_model_bench(["lenet300"], {True: (2,), False: (1,)}, repeats=1, min_time=0.0)
    assert models[0]["state_dict_bytes"]["packed"]["total"] < models[0]["state_dict_bytes"]["dense"]["total"]
    result = {
        "command": "test",
        "machine": {"cpu": "x"},
        "repeats": 1,
        "layers": rows,
        "models": models,
        "peak_rss": [{"model": "m", "form": "dense", "bytes": 2**20, "over_baseline": 0}],
    }
    paths = write_bench_report(result, tmp_path)
    assert json.loads((tmp_path / "bench.json").read_text())["layers"][0]["shape"] == "tiny"
    md = (tmp_path / "bench.md").read_text()
    assert "| tiny (12×20) | 2 | 1 |" in md and "lenet300" in md
    assert {p.name for p in paths} >= {"bench.json", "bench.md", "speedup_vs_batch.png", "speedup_vs_c.png"}


def test_packed_state_is_about_one_over_c_of_dense():
    dense, _ = build_stack("alexnet-fc", "dense")
    packed, _ = build_stack("alexnet-fc", "packed")
    ratio = model_weight_bytes(packed)["total"] / model_weight_bytes(dense)["total"]
    assert ratio <= 1 / 8 + 0.02


def test_suite_runs_with_a_tiny_config():
    config = BenchProfile(
        shapes=(("tiny", 8, 8),),
        factors=(2,),
        batches=(1,),
        models=("transformer-mlp",),
        model_batches_fc=(1,),
        model_batches_conv=(1,),
        rss_models=("lenet300",),
        onnx_models=(),
        training_models=(),
        repeats=1,
    )
    result = run_suite(config)
    assert result["profile"]["factors"] == (2,)
    assert result["machine"]["torch"] == torch.__version__
    forms = {r["form"] for r in result["peak_rss"]}
    assert forms == {"dense", "packed"} and all(r["bytes"] > 0 for r in result["peak_rss"])


def test_unknown_stack_and_form():
    with pytest.raises(KeyError, match="unknown model"):
        build_stack("nope", "dense")
    with pytest.raises(ValueError, match="form must be"):
        build_stack("lenet300", "sparse")


def test_training_bench_rows():
    from mpdcompress.bench.training import run_training_bench

    rows = run_training_bench(["transformer-mlp"], [8], {"transformer-mlp": 4}, repeats=1)
    (row,) = rows
    assert set(row["seconds"]) == {"dense", "masked", "compact"}
    compact = row["state_bytes"]["compact"]
    # Adam keeps two moments per parameter plus a 4-byte step counter for each of the 4 tensors.
    assert compact["optimizer"] == 2 * compact["weights"] + 4 * 4
    assert row["compact_state_fraction_of_masked"] <= 1 / 8 + 0.05
