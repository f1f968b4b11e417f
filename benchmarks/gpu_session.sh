#!/usr/bin/env bash
# What a session with a lent GPU runs (through the device tool): CUDA tests, then the GPU benchmark.
# Usage: bash benchmarks/gpu_session.sh OUTDIR [--quick]
set -uo pipefail
out=${1:?output folder}
quick=${2:-}
mkdir -p "$out"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$out/gpu.txt" 2>&1
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" >> "$out/gpu.txt" 2>&1
python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_triton_engine.py 2>&1 | tail -15 > "$out/tests.txt"
tail -3 "$out/tests.txt"
# Eager + CUDA-graph timings of dense, Triton engine, PyTorch engine, bare block GEMM, Monarch, 2:4, BSR;
# whole FC stacks; the SGD step. The report checks the GPU engine's targets.
timeout 560 python3 -m mpdcompress bench --device cuda $quick --out "$out/bench_gpu" 2>&1 | tr "\r" "\n" \
  > "$out/bench_gpu.log"; tail -3 "$out/bench_gpu.log"
