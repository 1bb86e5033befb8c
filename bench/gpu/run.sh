#!/usr/bin/env bash
# The one command to run on the GPU machine (no network), from anywhere:
#   bash bench/gpu/run.sh [gpu_bench.py options]
# Installs the carried wheels (bench/gpu/wheels, made by fetch_wheels.sh) that the machine lacks into a folder on
# PYTHONPATH, then runs bench/gpu/gpu_bench.py with a time budget that ends before the device tool's 10 minutes.
# Results: $OUT (the device tool's folder) if set, else bench/results/gpu.
set -uo pipefail
cd "$(dirname "$0")/../.."
started=$SECONDS
out=${OUT:-bench/results/gpu}
mkdir -p "$out"
python=${PYTHON:-python3}
site=${BENCH_SITE:-/tmp/lora-gpu-bench-site}
wheels=${BENCH_WHEELS:-bench/gpu/wheels}  # another folder only to rehearse elsewhere (wheels for another Python)

echo "python: $($python -c 'import sys; print(sys.version.split()[0], sys.executable)')"
$python bench/gpu/install_wheels.py "$wheels" "$site" 2>&1 | tee "$out/install.log"
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version,clocks.sm,clocks.max.sm --format=csv \
    2>&1 | tee "$out/nvidia-smi.txt"
fi

# 570 s of the 600 a device command may take, less what installing took: gpu_bench.py stops starting parts that
# would not end by then, and writes what it has.
budget=$(( ${BENCH_BUDGET_S:-570} - (SECONDS - started) ))
$python bench/gpu/gpu_bench.py --out "$out" --budget-s "$budget" "$@"
