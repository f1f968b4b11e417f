"""The Triton engine against the PyTorch engine (the reference), on the CPU through Triton's
interpreter (conftest sets TRITON_INTERPRET=1 where there is no GPU) or on a GPU where there is one.

Interpreted kernels run every program in Python, so shapes stay small and example counts low.
"""

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch._library.custom_ops import _maybe_get_opdef
from torch.utils._python_dispatch import TorchDispatchMode

pytest.importorskip("triton")

import mpdcompress as mpd  # noqa: E402
from mpdcompress.kernels import (  # noqa: E402
    EngineUnavailableError,
    dispatch,
    engine_for,
    triton_engine,
    triton_kernels,
    tuning,
    use_engine,
)
from mpdcompress.kernels.triton_engine import epilogue_code  # noqa: E402
from mpdcompress.kernels.triton_kernels import ACT_GELU, ACT_GELU_TANH, ACT_NONE, ACT_RELU, ACT_SILU  # noqa: E402
from mpdcompress.kernels.tuning import batch_bucket, candidates  # noqa: E402

from .helpers import assert_close_to_scale  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Relative to the output scale: fp32 kernels accumulate in another order than bmm; 16-bit types
# round every layer's output (the reference rounds inside its GEMM too).
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 4e-2, torch.float16: 5e-3}
ACTIVATIONS = [
    nn.ReLU,
    nn.GELU,
    lambda: nn.GELU(approximate="tanh"),
    nn.SiLU,
    nn.Identity,
    nn.Tanh,
    lambda: nn.Sequential(nn.ReLU(), nn.Dropout(0.5)),
]


def chain(dims, act, c_for, seed=0, bias=True):
    torch.manual_seed(seed)
    mods = []
    for i in range(len(dims) - 1):
        mods += [nn.Linear(dims[i], dims[i + 1], bias=bias), act()]
    model = nn.Sequential(*mods[:-1])
    return mpd.mpdify_(model, {str(2 * i): c_for(i) for i in range(len(dims) - 1)}, seed=seed)


def both_engines(model, x):
    outs = {}
    for engine in ("torch", "triton"):
        with use_engine(engine):
            outs[engine] = model(x)
    return outs["torch"], outs["triton"]


@settings(max_examples=12)
@given(
    st.lists(st.integers(1, 48), min_size=2, max_size=4),
    st.integers(0, 1000),
    st.sampled_from([1, 3, 17, 70]),
    st.sampled_from(range(len(ACTIVATIONS))),
    st.booleans(),
)
def test_forward_matches_reference_engine(dims, seed, batch, act, bias):
    masked = chain(dims, ACTIVATIONS[act], lambda i: 1 + (seed + i) % min(dims[i], dims[i + 1]), seed, bias).eval()
    packed = mpd.pack(masked).to(DEVICE)
    x = torch.randn(batch, dims[0], device=DEVICE)
    with torch.no_grad():
        ref, out = both_engines(packed, x)
        assert_close_to_scale(out, ref, rel=TOLERANCE[torch.float32])
        assert_close_to_scale(out.cpu(), masked(x.cpu()), rel=TOLERANCE[torch.float32])
    assert out.shape == (batch, dims[-1]) and out.is_contiguous()


@pytest.mark.parametrize("batch", [3, 70])
def test_folded_dense_neighbours_forward_and_backward(batch):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(20, 45), nn.ReLU(), nn.Linear(45, 33), nn.GELU(), nn.Linear(33, 26), nn.Tanh(), nn.Linear(26, 7)
    )
    mpd.mpdify_(model, 4, filter_fn=lambda module, name: name in ("2", "4"))
    packed = mpd.pack(model).to(DEVICE)
    chain = packed[0]
    assert chain.head is not None and chain.tail is not None and len(packed) == 1
    x = torch.randn(batch, 20, device=DEVICE, requires_grad=True)
    grads = {}
    for engine in ("torch", "triton"):
        packed.zero_grad()
        x.grad = None
        with use_engine(engine):
            out = packed(x)
            out.square().sum().backward()
        grads[engine] = [out.detach(), x.grad.clone()] + [p.grad.clone() for p in packed.parameters()]
    assert_close_to_scale(grads["torch"][0], model.to(DEVICE)(x).detach(), rel=TOLERANCE[torch.float32])
    for ref, got in zip(grads["torch"], grads["triton"]):
        assert_close_to_scale(got, ref, rel=TOLERANCE[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("lead", [(5,), (2, 3), (2, 40)])
def test_dtypes_and_leading_dimensions(dtype, lead):
    masked = chain([45, 61, 30, 12], nn.GELU, lambda i: (3, 4, 5)[i]).eval()  # uneven blocks
    packed = mpd.pack(masked).to(DEVICE, dtype)
    x = torch.randn(*lead, 45, device=DEVICE)
    with torch.no_grad():
        with use_engine("triton"):
            out = packed(x.to(dtype))
        ref = masked(x.cpu())
    assert out.dtype == dtype and out.shape == (*lead, 12)
    assert_close_to_scale(out.float().cpu(), ref, rel=TOLERANCE[dtype])


def test_single_layer_with_batch_zero_and_autocast():
    layer = mpd.pack(mpd.mpdify_(nn.Linear(40, 24), 4)).to(DEVICE).eval()
    with use_engine("triton"), torch.no_grad():
        assert layer(torch.randn(0, 40, device=DEVICE)).shape == (0, 24)
        x = torch.randn(9, 40, device=DEVICE)
        with torch.autocast(torch.device(DEVICE).type, dtype=torch.bfloat16):
            low = layer(x)
        ref = layer(x)
    assert low.dtype == torch.bfloat16
    assert_close_to_scale(low.float(), ref, rel=TOLERANCE[torch.bfloat16])


def test_mixed_dtypes_are_refused_like_torch_does():
    layer = mpd.pack(mpd.mpdify_(nn.Linear(40, 24), 4)).to(DEVICE, torch.float16).eval()
    with use_engine("triton"), pytest.raises(RuntimeError, match="dtype"):
        layer(torch.randn(3, 40, device=DEVICE))


@pytest.mark.parametrize("act", [nn.ReLU, nn.GELU, nn.Identity])
@pytest.mark.parametrize("lead", [(6,), (3, 25)])
def test_backward_matches_reference_engine(act, lead):
    model = mpd.pack(chain([50, 37, 64, 10], act, lambda i: (3, 2, 5)[i])).to(DEVICE).train()
    x = torch.randn(*lead, 50, device=DEVICE, requires_grad=True)
    weight = torch.linspace(-1, 1, 10, device=DEVICE)
    grads = {}
    for engine in ("torch", "triton"):
        model.zero_grad()
        x.grad = None
        with use_engine(engine):
            (model(x) * weight).sum().backward()
        grads[engine] = [x.grad.clone()] + [p.grad.clone() for p in model.parameters()]
    names = ["input"] + [name for name, _ in model.named_parameters()]
    for name, ref, got in zip(names, grads["torch"], grads["triton"]):
        assert got.shape == ref.shape, name
        assert_close_to_scale(got, ref, rel=TOLERANCE[torch.float32])


VARIANTS = {
    "plain": {},
    "swap-AB": {"swap_ab": True},
    "split-K": {"split_k": 3},
    "both": {"swap_ab": True, "split_k": 2},
}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("batch", [1, 5, 70])
def test_every_kernel_variant_matches_reference_forward_and_backward(variant, batch, monkeypatch):
    """Swap-AB and split-K are candidates the tuner may pick for any launch, the input gradient's
    included; each must compute what the PyTorch engine computes (forced here, as the interpreter
    otherwise always runs one tile)."""
    if DEVICE == "cuda":
        pytest.skip("the interpreter's tile is forced; on a GPU the tuner tries every variant itself")
    monkeypatch.setattr(tuning, "_INTERPRETER", dataclasses.replace(tuning._INTERPRETER, **VARIANTS[variant]))
    model = mpd.pack(chain([50, 37, 64, 10], nn.ReLU, lambda i: (3, 2, 5)[i]))
    x = torch.randn(batch, 50, requires_grad=True)
    results = {}
    for engine in ("torch", "triton"):
        model.zero_grad()
        x.grad = None
        with use_engine(engine):
            out = model(x)
            (out * torch.linspace(-1, 1, 10)).sum().backward()
        results[engine] = [out.detach(), x.grad.clone()] + [p.grad.clone() for p in model.parameters()]
    for ref, got in zip(results["torch"], results["triton"]):
        assert_close_to_scale(got, ref, rel=TOLERANCE[torch.float32])
    gelu = mpd.pack(chain([33, 40, 9], nn.GELU, lambda i: 3, bias=False)).eval()  # a fused non-ReLU epilogue
    with torch.no_grad():
        ref, got = both_engines(gelu, x.detach()[:, :33])
    assert_close_to_scale(got, ref, rel=TOLERANCE[torch.float32])


def test_feature_major_activations_start_every_row_on_16_elements(monkeypatch):
    """Triton vectorises loads only along strides it knows are multiples of 16: a batch of 70
    still gives the kernels a feature stride of 80."""
    real = triton_kernels._block_linear
    strides = []

    class Recording:
        def __getitem__(self, grid):
            def launch(x, in_index, w, bias, out_index, y, *args, **kwargs):
                strides.extend(t.stride(1) for t in (x, y) if t.shape[0] > 1 and t.stride(0) == 1)
                return real[grid](x, in_index, w, bias, out_index, y, *args, **kwargs)

            return launch

    monkeypatch.setattr(triton_kernels, "_block_linear", Recording())
    packed = mpd.pack(chain([40, 64, 48, 20], nn.ReLU, lambda i: 4)).to(DEVICE).eval()
    with use_engine("triton"), torch.no_grad():
        out = packed(torch.randn(70, 40, device=DEVICE))
    assert strides and all(stride % 16 == 0 for stride in strides), strides
    assert out.is_contiguous()


def test_launch_plans_replay_eager_inference_and_follow_every_change_of_the_model(monkeypatch):
    """The second no-grad call of a module replays the launches its first call built; a plan never
    outlives a change of the tensors it launches with (dtype, device, identity), and sees
    in-place updates (it reads the live tensors)."""
    records = []
    record = triton_engine.LaunchPlan.record.__func__
    monkeypatch.setattr(
        triton_engine.LaunchPlan, "record", classmethod(lambda cls, *a: records.append(1) or record(cls, *a))
    )
    masked = chain([40, 64, 48, 20], nn.GELU, lambda i: (4, 3, 2)[i]).eval()
    packed = mpd.pack(masked).to(DEVICE)
    with use_engine("triton"), torch.no_grad():
        for shape in [(3, 40), (70, 40), (2, 5, 40), (3, 40)]:
            x = torch.randn(shape, device=DEVICE)
            first, again = packed(x), packed(x)
            assert torch.equal(first, again) and first.is_contiguous()
            assert_close_to_scale(again.cpu(), masked(x.cpu()), rel=TOLERANCE[torch.float32])
        assert len(records) == 3  # one plan per batch size and layout, reused after that
        x = torch.randn(5, 40, device=DEVICE)
        packed(x)
        layer = packed[0].layers[0]
        layer.weight_blocks.mul_(2)  # what an optimizer step does: in place, no new plan needed
        masked[0].weight.mul_(2)
        assert_close_to_scale(packed(x).cpu(), masked(x.cpu()), rel=TOLERANCE[torch.float32])
        before = len(records)
        half = packed.half()  # .to(): the same Parameter objects get new data of another dtype
        assert_close_to_scale(half(x.half()).float().cpu(), masked(x.cpu()), rel=TOLERANCE[torch.float16])
        packed.float()  # (weights now rounded to fp16: the PyTorch engine is the reference below)
        state = {k: v.clone() for k, v in packed.state_dict().items()}
        state["0.layers.0.bias"] = state["0.layers.0.bias"] + 1
        packed.load_state_dict(state, assign=True)  # new tensors replace the recorded ones
        ref, got = both_engines(packed, x)
        assert_close_to_scale(got, ref, rel=TOLERANCE[torch.float32])
        assert len(records) == before + 2
        mpd.quantize_(packed, "int8")  # layers replaced by quantized ones: never replayed stale
        ref, got = both_engines(packed, x)
        assert_close_to_scale(got, ref, rel=TOLERANCE[torch.float32])
        assert_close_to_scale(got, mpd.dequantize(packed)(x), rel=TOLERANCE[torch.float32])


def _no_float_copy(self):
    raise AssertionError("integer blocks dequantized into a float copy")


def _integer_blocks(blocks, c, rows, config):
    """Round-to-nearest integer blocks without torchao (the GPU machine has none): the kernel's
    arithmetic, not the choice of scales, is under test. Padding stays exactly zero."""
    from mpdcompress.kernels.quantized_blocks import SYMMETRIC_INT4_ZERO, QuantizedWeight, pack_int4

    cols = blocks.shape[-1]
    group = cols if config.bits == 8 else config.group_size
    groups = -(-cols // group)
    w = nn.functional.pad(blocks.detach().float(), (0, groups * group - cols)).unflatten(-1, (groups, group))
    zeros = None
    if config.symmetric:
        top = 127 if config.bits == 8 else 7
        scales = w.abs().amax(-1).clamp_min(1e-8) / top
        q = (w / scales[..., None]).round().clamp(-top - 1, top)
        if config.bits == 4:
            q = q + SYMMETRIC_INT4_ZERO
    else:
        low, high = w.amin(-1).clamp(max=0), w.amax(-1).clamp(min=0)
        scales = (high - low).clamp_min(1e-8) / 15
        zeros = (-low / scales).round().clamp(0, 15)
        q = (w / scales[..., None] + zeros[..., None]).round().clamp(0, 15)
        zeros = zeros.to(torch.uint8)
    if config.bits == 8:
        q = q.flatten(-2)[..., :cols].to(torch.int8)
    else:  # an odd row ends in a padding nibble: the rounded zero of its (even) group's padding
        q = pack_int4(q.flatten(-2)[..., : cols + cols % 2])
    return QuantizedWeight(q, scales.to(blocks.dtype), zeros, config.bits, tuple(blocks.shape), group)


@pytest.fixture
def quantize_(monkeypatch):
    from mpdcompress.core import quantize

    monkeypatch.setattr(quantize, "quantize_weight", _integer_blocks)
    return mpd.quantize_


@pytest.mark.parametrize("fmt", ["int8", "int4", "int4-g8-asym", "int4-g16"])
def test_integer_blocks_are_dequantized_inside_the_kernel_to_the_float_blocks_values(fmt, quantize_, monkeypatch):
    """Eager inference multiplies a quantized model's integers, dequantized tile by tile, with
    the values of its dequantized blocks (fp32: bit for bit, through the same tiles), and never
    writes a float copy of the blocks; autograd runs on the dequantized blocks as before."""
    from mpdcompress.kernels.quantized_blocks import QuantizedWeight

    masked = chain([40, 36, 22, 10], nn.GELU, lambda i: (4, 3, 2)[i]).eval()
    quantized = quantize_(mpd.pack(masked).to(DEVICE), fmt)
    dequantized = mpd.dequantize(quantized)
    for batch in (1, 5, 70):
        x = torch.randn(batch, 40, device=DEVICE)
        with torch.no_grad():
            reference = quantized(x)  # the PyTorch engine
            with use_engine("triton"):
                floats = dequantized(x)
                with monkeypatch.context() as patch:
                    patch.setattr(QuantizedWeight, "dequantize", _no_float_copy)
                    got = quantized(x)
                    assert torch.equal(quantized(x), got)  # the launch plan, replayed
        assert_close_to_scale(got.cpu(), reference.cpu(), rel=TOLERANCE[torch.float32])
        if tuning.interpreting():  # one tile for both (a GPU measures each launch's own)
            assert torch.equal(got, floats)
    x = torch.randn(5, 40, device=DEVICE, requires_grad=True)
    ref, out = both_engines(quantized, x)
    assert_close_to_scale(out.detach().cpu(), ref.detach().cpu(), rel=TOLERANCE[torch.float32])
    (ref_grad,) = torch.autograd.grad(ref.sum(), x)
    (grad,) = torch.autograd.grad(out.sum(), x)
    assert_close_to_scale(grad.cpu(), ref_grad.cpu(), rel=TOLERANCE[torch.float32])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_integer_blocks_match_the_reference_engine(dtype, quantize_):
    masked = chain([40, 36, 10], nn.ReLU, lambda i: (4, 2)[i]).eval()
    quantized = quantize_(mpd.pack(masked).to(DEVICE, dtype), "int4-g8-asym")
    x = torch.randn(7, 40, device=DEVICE, dtype=dtype)
    with torch.no_grad():
        ref, got = both_engines(quantized, x)
        with use_engine("triton"):
            floats = mpd.dequantize(quantized)(x)
    assert_close_to_scale(got.float().cpu(), ref.float().cpu(), rel=TOLERANCE[dtype])
    if not tuning.interpreting():  # the interpreter truncates to 16 bits where a GPU rounds
        assert_close_to_scale(got.float().cpu(), floats.float().cpu(), rel=TOLERANCE[dtype] / 10)


def test_a_gpu_measures_the_activation_layout_of_each_launch_plan(monkeypatch):
    """Whether to transpose the input first and to write the last output feature-major is timed
    (all four ways) once per chain shape and batch bucket, not fixed at 64 rows; every way computes
    the same thing. Measurement is faked here: the interpreter's timings mean nothing."""
    if DEVICE == "cuda":
        pytest.skip("on a GPU the layouts are really measured; this fakes the timings")
    monkeypatch.setattr(triton_engine, "_measures_layouts", lambda device: True)
    monkeypatch.setattr(triton_engine, "_layouts_chosen", {})
    outputs = {}

    def fake_measure(options, run):
        for layout in options:
            outputs[layout] = run(layout)
        return {layout: 2.0 - layout[0] + layout[1] for layout in options}  # (True, False) "wins"

    monkeypatch.setattr(tuning, "measure", fake_measure)
    masked = chain([40, 64, 48, 20], nn.ReLU, lambda i: (4, 3, 2)[i]).eval()
    packed = mpd.pack(masked)
    x = torch.randn(5, 40)
    with use_engine("triton"), torch.no_grad():
        out = packed(x)
        assert_close_to_scale(out, masked(x), rel=TOLERANCE[torch.float32])
        plan = next(iter(triton_engine._plans[packed[0]].values()))
    assert (plan.transpose_input, plan.feature_major_output) == (True, False)
    assert sorted(outputs) == sorted(triton_engine._LAYOUTS)
    for got in outputs.values():
        assert got.shape == out.shape and got.is_contiguous()
        assert_close_to_scale(got, out, rel=TOLERANCE[torch.float32])


def test_compact_training_keeps_padding_zero_and_tracks_reference():
    torch.manual_seed(0)
    models = {
        e: mpd.mpdify_(nn.Sequential(nn.Linear(30, 41), nn.ReLU(), nn.Linear(41, 7)), 4, mode="compact").to(DEVICE)
        for e in ("torch", "triton")
    }
    models["triton"].load_state_dict(models["torch"].state_dict())
    x, y = torch.randn(64, 30, device=DEVICE), torch.randint(0, 7, (64,), device=DEVICE)
    for engine, model in models.items():
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        with use_engine(engine):
            for _ in range(5):
                opt.zero_grad()
                nn.functional.cross_entropy(model(x), y).backward()
                opt.step()
    for (name, ref), (_, got) in zip(models["torch"].named_parameters(), models["triton"].named_parameters()):
        assert_close_to_scale(got, ref, rel=1e-4)
    for layer in models["triton"][0].layers:
        if layer.padding_mask is not None:
            assert torch.all(layer.weight_blocks[layer.padding_mask == 0] == 0)


def test_compile_fullgraph_export_and_onnx_keep_one_op_per_layer(tmp_path):
    packed = mpd.pack(chain([40, 64, 20], nn.ReLU, lambda i: 4)).to(DEVICE).eval()
    x = torch.randn(7, 40, device=DEVICE)
    with use_engine("triton"), torch.no_grad():
        ref = packed(x)
        assert_close_to_scale(torch.compile(packed, fullgraph=True)(x), ref, rel=1e-6)
        program = torch.export.export(packed, (x,))
    targets = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
    assert targets.count("mpdcompress.block_linear.default") == 2
    assert not any("index_select" in t or "gather" in t for t in targets)
    assert_close_to_scale(program.module()(x), ref, rel=1e-6)
    pytest.importorskip("onnxruntime")
    with use_engine("triton"):  # ONNX keeps its portable Gather + MatMul graph whatever the engine
        mpd.export_onnx(packed.cpu(), x.cpu(), tmp_path / "m.onnx")


def test_compiled_training_step_matches_eager():
    model = mpd.mpdify_(nn.Sequential(nn.Linear(40, 64), nn.ReLU(), nn.Linear(64, 20)), 4, mode="compact").to(DEVICE)
    x = torch.randn(16, 40, device=DEVICE)
    with use_engine("triton"):
        torch.compile(model, fullgraph=True)(x).square().sum().backward()
        compiled = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        model(x).square().sum().backward()
    for got, ref in zip(compiled, [p.grad for p in model.parameters()]):
        assert_close_to_scale(got, ref, rel=1e-5)


def test_dispatch_choices(monkeypatch):
    x, on_cpu = torch.randn(2, 20, device=DEVICE), torch.randn(2, 20)
    assert engine_for(x) == ("triton" if x.is_cuda else "torch")  # auto: CPU tensors take the PyTorch engine
    with use_engine("triton"):
        assert engine_for(x) == "triton"  # the interpreter (or a GPU) can run it
        with pytest.raises(EngineUnavailableError, match="float64"):
            engine_for(x.double())
        with pytest.raises(EngineUnavailableError, match="no kernel indices"):
            engine_for(x, has_kernel_indices=False)
        monkeypatch.setattr(dispatch, "_triton_installed", False)
        with pytest.raises(EngineUnavailableError, match="not installed"):
            engine_for(x)
    monkeypatch.setattr(dispatch, "_triton_installed", True)
    monkeypatch.setattr(dispatch, "interpreting", lambda: False)
    with use_engine("triton"), pytest.raises(EngineUnavailableError, match="CUDA"):
        engine_for(on_cpu)
    with use_engine("torch"):
        assert engine_for(x) == "torch"
    with pytest.raises(ValueError, match="unknown engine 'cuda'"):
        mpd.set_engine("cuda")
    assert dispatch.get_engine() == "auto"


def test_epilogue_codes():
    assert epilogue_code(None) == ACT_NONE
    assert epilogue_code(nn.ReLU()) == ACT_RELU
    assert epilogue_code(nn.GELU()) == ACT_GELU
    assert epilogue_code(nn.GELU(approximate="tanh")) == ACT_GELU_TANH
    assert epilogue_code(nn.Sequential(nn.SiLU(), nn.Dropout(0.1).eval())) == ACT_SILU
    assert epilogue_code(nn.Sequential(nn.Identity())) == ACT_NONE
    assert epilogue_code(nn.Dropout(0.1)) is None  # training dropout is random: applied by torch
    assert epilogue_code(nn.Sequential(nn.ReLU(), nn.ReLU())) is None
    assert epilogue_code(nn.Tanh()) is None


def test_tile_candidates_fit_the_kernels():
    assert [batch_bucket(b) for b in (1, 2, 3, 16, 17, 2048, 10**6)] == [1, 2, 4, 16, 32, 2048, 4096]
    for kernel in ("linear", "weight_grad"):
        for bucket in (1, 16, 128, 4096):
            for cfg in candidates(kernel, bucket):
                for size in (cfg.block_b, cfg.block_r, cfg.block_k):
                    assert size >= 16 and size & (size - 1) == 0  # tl.dot needs powers of two >= 16
                if cfg.swap_ab:  # the rows are then the MMA's M: Hopper's wgmma needs 64 of them
                    assert kernel == "linear" and cfg.block_r >= 64
                assert cfg.split_k >= 1 and (cfg.split_k == 1 or (kernel == "linear" and bucket == 1))


class _HostSyncRefused(TorchDispatchMode):
    """Fails on every op that makes the host wait for the device (a ``.item()``, a truth test
    of a tensor, ``nonzero``...), including those inside our custom ops' implementations."""

    SYNCS = {
        torch.ops.aten._local_scalar_dense.default,
        torch.ops.aten.is_nonzero.default,
        torch.ops.aten.item.default,
        torch.ops.aten.nonzero.default,
        torch.ops.aten.equal.default,
        torch.ops.aten.masked_select.default,
    }

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.SYNCS:
            raise AssertionError(f"host sync in the engine: {func}")
        opdef = _maybe_get_opdef(func._schema.name) if func.namespace == "mpdcompress" else None
        if opdef is not None:  # run our op's body under this mode too
            with self:
                return opdef._init_fn(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


class _NoLaunch:
    """A Triton kernel stand-in: ``kernel[grid](...)`` does nothing (only host code is tested)."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


@pytest.mark.parametrize("engine", ["torch", "triton"])
def test_forward_and_backward_never_wait_for_the_device(engine, monkeypatch):

    monkeypatch.setattr(triton_kernels, "_block_linear", _NoLaunch())
    monkeypatch.setattr(triton_kernels, "_block_weight_grad", _NoLaunch())
    torch.manual_seed(0)
    model = nn.Sequential(  # an uneven folded head (input gaps) and tail, a ReLU and a GELU inside
        nn.Linear(20, 45), nn.Sigmoid(), nn.Linear(45, 33), nn.ReLU(), nn.Linear(33, 26), nn.GELU(), nn.Linear(26, 7)
    )
    packed = mpd.pack(mpd.mpdify_(model, 4, filter_fn=lambda module, name: name in ("2", "4")))
    single = mpd.pack(mpd.mpdify_(nn.Linear(45, 33), 4))
    x = torch.randn(70, 20, requires_grad=True)
    with use_engine(engine), _HostSyncRefused():
        for net, inp in ((packed, x), (single, torch.randn(3, 45, requires_grad=True))):
            net(inp).sum().backward()
            with torch.no_grad():
                net(inp[:1])


class _OpsSeen(TorchDispatchMode):
    """Records every ATen op dispatched (our custom ops count as one op each, their bodies unseen)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.__name__.split(".")[0])
        return func(*args, **(kwargs or {}))


def test_backward_fuses_the_relu_derivative_and_the_bias_gradient_into_the_kernels():
    # Even blocks: uneven ones multiply by their padding mask in autograd, which is not the epilogue.
    model = mpd.pack(chain([48, 36, 64, 8], nn.ReLU, lambda i: (3, 2, 4)[i])).train()
    x = torch.randn(70, 48, requires_grad=True)
    with use_engine("triton"):
        out = model(x)
        with _OpsSeen() as seen:
            out.backward(torch.randn_like(out))
    elementwise = {"gt", "mul", "sum", "index_select", "clamp", "ge"} & set(seen.ops)
    assert not elementwise, seen.ops  # each of those would be a launch of its own on a GPU
    assert seen.ops.count("block_weight_grad") == 3 and seen.ops.count("block_linear_input_grad") == 3


@pytest.mark.parametrize("engine", ["torch", "triton"])
def test_gradients_reach_the_input_through_a_frozen_packed_model(engine):
    """A frozen packed model behind trained layers (or a saliency map): only the input needs a gradient."""
    masked = chain([48, 36, 20], nn.ReLU, lambda i: 4).eval()
    packed = mpd.pack(masked).to(DEVICE).requires_grad_(False)
    x = torch.randn(6, 48, device=DEVICE, requires_grad=True)
    with use_engine(engine):
        packed(x).square().sum().backward()
    xm = x.detach().cpu().requires_grad_()
    masked(xm).square().sum().backward()
    assert_close_to_scale(x.grad.cpu(), xm.grad, rel=TOLERANCE[torch.float32])


def test_bias_only_fine_tuning_matches_reference_engine():
    """Frozen blocks, trained biases: the bias gradient then has no weight-gradient launch to ride in."""
    model = mpd.pack(chain([50, 37, 64, 10], nn.ReLU, lambda i: (3, 2, 5)[i])).to(DEVICE).train()
    for layer in model[0].layers:
        layer.weight_blocks.requires_grad_(False)
    x = torch.randn(9, 50, device=DEVICE)
    grads = {}
    for engine in ("torch", "triton"):
        model.zero_grad()
        with use_engine(engine):
            model(x).square().sum().backward()
        grads[engine] = [layer.bias.grad.clone() for layer in model[0].layers]
    for ref, got in zip(grads["torch"], grads["triton"]):
        assert_close_to_scale(got, ref, rel=TOLERANCE[torch.float32])


def test_tune_measures_ahead_of_time_persists_and_never_tunes_inside_capture(tmp_path, monkeypatch):
    import json

    monkeypatch.setattr(triton_kernels, "_block_linear", _NoLaunch())
    monkeypatch.setattr(triton_kernels, "_block_weight_grad", _NoLaunch())
    monkeypatch.setattr(tuning, "interpreting", lambda: False)  # choose as on a GPU
    monkeypatch.setattr(tuning, "_chosen", {})
    monkeypatch.setattr(tuning, "_recent", {})
    monkeypatch.setenv("MPDCOMPRESS_TILE_CACHE", str(tmp_path / "tiles.json"))
    measured = []

    def fake_measure(options, run):  # the second candidate is always fastest
        measured.append(options)
        return {cfg: float(i != 1) for i, cfg in enumerate(options)}

    monkeypatch.setattr(tuning, "measure", fake_measure)
    torch.manual_seed(0)
    model = mpd.pack(mpd.mpdify_(nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 12)), 4))
    x = torch.randn(7, 32)
    before = [p.grad for p in model.parameters()]
    count = mpd.tune(model, x, batch_sizes=[1, 20, 300], training=True)
    assert [p.grad for p in model.parameters()] == before  # tuning leaves no gradients behind
    stored = json.loads((tmp_path / "tiles.json").read_text())["cpu"]
    assert count == len(stored) == len(measured)
    assert {tuning.TileConfig(**cfg) for cfg in stored.values()} <= {options[1] for options in measured}
    # A forward over 8x8 blocks and the input gradient over their transposes share sizes but not
    # strides: two choices, where a key without strides would have shared one.
    square = [k for k in stored if k.startswith("('linear', 32, 8, 8, 4,")]
    assert len(square) == 2, square
    assert {k.startswith("('weight_grad'") for k in stored} == {True, False}

    # A new process reads the cache: nothing is measured again.
    monkeypatch.setattr(tuning, "_chosen", {})
    monkeypatch.setattr(tuning, "_recent", {})
    monkeypatch.setattr(tuning, "measure", lambda options, run: pytest.fail("measured a cached shape"))
    with use_engine("triton"):
        model(torch.randn(20, 32)).sum().backward()

    # While a CUDA graph is captured nothing is measured or stored, and the user is told why.
    monkeypatch.setattr(tuning, "capturing", lambda device: True)
    with use_engine("triton"), torch.no_grad(), pytest.warns(UserWarning, match=r"mpdcompress.tune"):
        model(torch.randn(3000, 32))
    assert json.loads((tmp_path / "tiles.json").read_text())["cpu"] == stored
    with pytest.raises(mpd.errors.ConfigError, match="capture"):
        mpd.tune(model, x)
