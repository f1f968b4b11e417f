"""CUDA code paths: skipped where no GPU is present (CI); run on a GPU machine to check them."""

import pytest
import torch
from torch import nn

from mpdcompress import mpdify, pack, unpack
from mpdcompress.models import fc_stack

from .conftest import assert_close_to_scale

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("dims,c", [([784, 300, 100, 10], 10), ([4096, 4096, 1000], 8), ([768, 3072, 768], 4)])
@pytest.mark.parametrize("batch", [1, 33, 512])
def test_packed_matches_masked_on_cuda_fp32(dims, c, batch):
    torch.manual_seed(0)
    model = mpdify(fc_stack(dims), c).cuda().eval()
    packed = pack(model)
    x = torch.randn(batch, dims[0], device="cuda")
    torch.backends.cuda.matmul.allow_tf32 = False
    with torch.no_grad():
        assert_close_to_scale(packed(x), model(x))


def test_bf16_and_autocast_on_cuda():
    torch.manual_seed(0)
    model = mpdify(fc_stack([1024, 2048, 512]), 8).cuda().eval()
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
    model = mpdify(nn.Sequential(nn.Linear(300, 200), nn.ReLU(), nn.Linear(200, 10)), 7).cuda()
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
