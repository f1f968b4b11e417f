#!/usr/bin/env bash
# What a session with a lent GPU runs (through the device tool): CUDA tests, then the CUDA benchmark.
# Usage: bash benchmarks/gpu_session.sh OUTDIR
set -uo pipefail
out=${1:?output folder}
mkdir -p "$out"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$out/gpu.txt" 2>&1
python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tail -2
shapes="alexnet-fc6 alexnet-fc7 alexnet-fc8 transformer-mlp-up lenet-fc1"
timeout 230 python3 -m mpdcompress bench --device cuda --shapes $shapes --factors 8 16 --batches 1 64 512 \
  --models lenet300 alexnet-fc transformer-mlp alexnet-bn --out "$out/bench_cuda" 2>&1 | tr "\r" "\n" > "$out/bench_cuda.log"; tail -3 "$out/bench_cuda.log"
timeout 90 python3 -m mpdcompress bench --device cuda --dtype bf16 --shapes $shapes --factors 8 --batches 1 64 512 \
  --out "$out/bench_cuda_bf16" 2>&1 | tr "\r" "\n" > "$out/bench_bf16.log"; tail -3 "$out/bench_bf16.log"
timeout 200 python3 -m mpdcompress bench --device cuda --shapes lenet-fc1 --factors 8 --batches 1 \
  --models lenet300 alexnet-fc transformer-mlp --compile reduce-overhead --out "$out/bench_cuda_compiled" \
  2>&1 | tr "\r" "\n" > "$out/bench_compiled.log"; tail -3 "$out/bench_compiled.log"
