#!/usr/bin/env bash
# What a session with a lent GPU runs (through the device tool), one part per call so each fits
# the tool's 10-minute limit per command:
#   bash benchmarks/gpu_session.sh OUTDIR tests     CUDA tests (tests/test_cuda.py, tests/test_triton_engine.py)
#   bash benchmarks/gpu_session.sh OUTDIR quick     a first look: two layer shapes, bf16, batches 1 and 128
#   bash benchmarks/gpu_session.sh OUTDIR bf16      the full GPU benchmark in bf16  -> OUTDIR/bench_gpu_bf16/
#   bash benchmarks/gpu_session.sh OUTDIR fp32      the full GPU benchmark in fp32  -> OUTDIR/bench_gpu_fp32/
set -uo pipefail
out=${1:?output folder}
part=${2:?part: tests, quick, bf16 or fp32}
mkdir -p "$out"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } > "$out/gpu.txt" 2>&1
bench() {  # name, extra arguments: eager + CUDA-graph timings, targets checked in bench.md
  local name=$1; shift
  timeout 570 python3 -m mpdcompress bench --device cuda --quiet --out "$out/$name" "$@" > "$out/$name.log" 2>&1
  tail -3 "$out/$name.log"; grep -A3 "^## Targets" "$out/$name/bench.md" 2>/dev/null
}
case $part in
  tests) python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_triton_engine.py 2>&1 | tail -15 \
           | tee "$out/tests.txt" ;;
  quick) bench bench_gpu_quick --quick ;;
  bf16) bench bench_gpu_bf16 --dtype bf16 ;;
  fp32) bench bench_gpu_fp32 --dtype fp32 ;;
  *) echo "unknown part $part" >&2; exit 2 ;;
esac
