#!/usr/bin/env bash
# What a session with a lent GPU runs (through the device tool): CUDA tests, then the CUDA benchmark.
# Usage: bash benchmarks/gpu_session.sh OUTDIR
set -uo pipefail
out=${1:?output folder}
mkdir -p "$out"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$out/gpu.txt" 2>&1
python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$out/cuda_tests.log"
python3 -m mpdcompress bench --device cuda --quiet --out "$out/bench_cuda" 2>&1 | tail -5
python3 -m mpdcompress bench --device cuda --dtype bf16 --quiet --out "$out/bench_cuda_bf16" 2>&1 | tail -5
