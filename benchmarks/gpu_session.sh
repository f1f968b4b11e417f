#!/usr/bin/env bash
# What a session with a lent GPU runs (through the device tool), one part per call. The device
# budget can be 15 minutes in all, machine start included, so run `key` first, then `tests`:
#   bash benchmarks/gpu_session.sh OUTDIR key       the engine's key targets (<= 5 min)     -> OUTDIR/bench_gpu_key/
#   bash benchmarks/gpu_session.sh OUTDIR tests     CUDA tests, untuned tiles (<= 4 min)    -> OUTDIR/tests.txt
#   bash benchmarks/gpu_session.sh OUTDIR quick     two layer shapes, bf16, batches 1 and 128
#   bash benchmarks/gpu_session.sh OUTDIR bf16      the full GPU benchmark in bf16          -> OUTDIR/bench_gpu_bf16/
#   bash benchmarks/gpu_session.sh OUTDIR fp32      the full GPU benchmark in fp32          -> OUTDIR/bench_gpu_fp32/
#   bash benchmarks/gpu_session.sh OUTDIR cnn       whole CNNs on cuDNN, bf16, c = 4 and 8  -> OUTDIR/bench_cnn_gpu/
# Output goes to OUTDIR as it is made (tee, and the benchmark rewrites its report after every
# row), so a part stopped by its timeout still returns what it measured. The GPU machine has no
# package registry: the code runs from PYTHONPATH=src with what is installed there.
set -uo pipefail
out=${1:?output folder}
part=${2:?part: key, tests, quick, bf16, fp32 or cnn}
mkdir -p "$out"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
# The tiles the tuner picks per shape and batch (plain, swap-AB or split-K) come back with the run:
# they are where each variant starts to win, measured.
export MPDCOMPRESS_TILE_CACHE=$out/tiles.json
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } > "$out/gpu.txt" 2>&1
bench() {  # seconds, name, extra arguments: eager + CUDA-graph timings, targets checked in bench.md
  local seconds=$1 name=$2; shift 2
  timeout "$seconds" python3 -m mpdcompress bench --device cuda --out "$out/$name" "$@" 2>&1 | tee "$out/$name.log"
  grep -A3 "^## Targets" "$out/$name/bench.md" 2>/dev/null
}
case $part in
  key) bench 300 bench_gpu_key --profile key ;;
  tests) MPDCOMPRESS_AUTOTUNE=0 timeout 240 python3 -m pytest -q -x -p no:cacheprovider \
           tests/test_cuda.py tests/test_triton_engine.py 2>&1 | tee "$out/tests.txt" | tail -15 ;;
  quick) bench 570 bench_gpu_quick --quick ;;
  bf16) bench 570 bench_gpu_bf16 --dtype bf16 ;;
  fp32) bench 570 bench_gpu_fp32 --dtype fp32 ;;
  cnn) timeout 570 python3 -m mpdcompress bench --profile cnn --device cuda --dtype bf16 --factors 4 8 \
         --out "$out/bench_cnn_gpu" 2>&1 | tee "$out/bench_cnn_gpu.log" | tail -5 ;;
  *) echo "unknown part $part" >&2; exit 2 ;;
esac
