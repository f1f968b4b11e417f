"""CUDA code paths: skipped where no GPU is present (CI); run on a GPU machine to check them."""

import importlib.util

import pytest
import torch
from torch import nn

from mpdcompress import mpdify_, pack, unpack, use_engine
from mpdcompress.kernels import engine_for
from mpdcompress.models import fc_stack

from .helpers import assert_close_to_scale

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("dims,c", [([784, 300, 100, 10], 10), ([4096, 4096, 1000], 8), ([768, 3072, 768], 4)])
@pytest.mark.parametrize("batch", [1, 33, 512])
def test_packed_matches_masked_on_cuda_fp32(dims, c, batch):
    torch.manual_seed(0)
    model = mpdify_(fc_stack(dims), c).cuda().eval()
    packed = pack(model)
    x = torch.randn(batch, dims[0], device="cuda")
    torch.backends.cuda.matmul.allow_tf32 = False
    with torch.no_grad():
        assert_close_to_scale(packed(x), model(x))


def test_bf16_and_autocast_on_cuda():
    torch.manual_seed(0)
    model = mpdify_(fc_stack([1024, 2048, 512]), 8).cuda().eval()
    packed = pack(model)
    x = torch.randn(64, 1024, device="cuda")
    with torch.no_grad():
        ref = model(x)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            low = packed(x)
        assert low.dtype == torch.bfloat16
        assert_close_to_scale(low.float(), ref, rel=3e-2)
        half = pack(model.to(torch.bfloat16))
        assert_close_to_scale(half(x.bfloat16()).float(), ref, rel=3e-2)


def test_compile_and_training_on_cuda():
    torch.manual_seed(0)
    model = mpdify_(nn.Sequential(nn.Linear(300, 200), nn.ReLU(), nn.Linear(200, 10)), 7).cuda()
    packed = pack(model)
    compiled = torch.compile(packed)
    x, y = torch.randn(128, 300, device="cuda"), torch.randint(0, 10, (128,), device="cuda")
    with torch.no_grad():
        assert_close_to_scale(compiled(x), packed(x), rel=1e-4)
    opt = torch.optim.Adam(packed.parameters(), lr=1e-3)
    for _ in range(5):
        opt.zero_grad()
        nn.functional.cross_entropy(compiled(x), y).backward()
        opt.step()
    with torch.no_grad():
        assert_close_to_scale(unpack(packed)(x), packed(x), rel=1e-4)


# -- the Triton engine on a real GPU (the CPU suite runs the same kernels through the interpreter) --
triton_needed = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")


@triton_needed
@pytest.mark.parametrize("dtype,rel", [(torch.float32, 2e-5), (torch.bfloat16, 3e-2), (torch.float16, 5e-3)])
@pytest.mark.parametrize("batch", [1, 16, 100, 2048])
def test_triton_engine_matches_torch_engine_on_gpu_shapes(dtype, rel, batch):
    torch.backends.cuda.matmul.allow_tf32 = False
    model = pack(mpdify_(fc_stack([4096, 4096, 1000]), 8)).cuda().to(dtype).eval()
    x = torch.randn(batch, 4096, device="cuda", dtype=dtype)
    with torch.no_grad():
        with use_engine("torch"):
            ref = model(x)
        out = model(x)  # auto: Triton on CUDA
    assert engine_for(x) == "triton"
    assert_close_to_scale(out.float(), ref.float(), rel=rel)


@triton_needed
def test_triton_engine_under_cuda_graphs_compile_and_export():
    model = pack(mpdify_(fc_stack([1024, 2048, 512]), 8)).cuda().to(torch.bfloat16).eval()
    x = torch.randn(64, 1024, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        ref = model(x)
        graph = torch.cuda.CUDAGraph()
        model(x)  # warm-up outside capture (tile choice)
        with torch.cuda.graph(graph):
            out = model(x)
        graph.replay()
        assert torch.equal(out, ref)
        compiled = torch.compile(model, fullgraph=True, mode="reduce-overhead")
        for _ in range(3):
            got = compiled(x)
        assert_close_to_scale(got.float(), ref.float(), rel=1e-6)
    program = torch.export.export(model, (x,))
    assert sum(str(n.target) == "mpdcompress.block_linear.default" for n in program.graph.nodes) == 2


@triton_needed
def test_compact_training_with_triton_kernels_on_gpu():
    torch.manual_seed(0)
    models = {e: mpdify_(fc_stack([512, 1024, 10]), 8, mode="compact").cuda() for e in ("torch", "triton")}
    models["triton"].load_state_dict(models["torch"].state_dict())
    x, y = torch.randn(256, 512, device="cuda"), torch.randint(0, 10, (256,), device="cuda")
    torch.backends.cuda.matmul.allow_tf32 = False
    for engine, model in models.items():
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        with use_engine(engine):
            for _ in range(10):
                opt.zero_grad()
                nn.functional.cross_entropy(model(x), y).backward()
                opt.step()
    for ref, got in zip(models["torch"].parameters(), models["triton"].parameters()):
        assert_close_to_scale(got, ref, rel=1e-4)


def test_packed_resnet_with_shared_streams_on_cuda_and_the_cnn_bench_there():
    """cuDNN's grouped convolutions give what the masked model gives (fp32, TF32 off), channels-last
    too; the CNN bench times every variant eagerly and from a CUDA graph, and the training steps."""
    from mpdcompress.bench.cnn import CnnProfile, render_cnn_report, run_cnn_bench
    from mpdcompress.models import build_model

    torch.manual_seed(0)
    torch.backends.cudnn.allow_tf32 = False
    masked = mpdify_(build_model("resnet18-cifar"), 8, convs=True, shared_streams=True).cuda().eval()
    packed = pack(masked).eval()
    x = torch.randn(4, 3, 32, 32, device="cuda")
    with torch.no_grad():
        assert_close_to_scale(packed(x), masked(x), 1e-4)
        last = packed.to(memory_format=torch.channels_last)
        assert_close_to_scale(last(x.contiguous(memory_format=torch.channels_last)), masked(x), 1e-4)
    profile = CnnProfile(
        models=("resnet18-cifar",), factors=(4,), batches=(1,), repeats=2, device="cuda", dtype="bf16", training_batch=8
    )
    result = run_cnn_bench(profile)
    (row,) = result["rows"]
    (training,) = result["training_rows"]
    assert all(v > 0 for v in training["seconds"].values())
    assert all(v is not None and v > 0 for v in row["seconds"].values())
    assert row["graph_seconds"]["dense"] is not None
    report = render_cnn_report(result)
    assert "| resnet18-cifar | 4 | 1 | channels last, CUDA graph |" in report and "cuDNN" in report
