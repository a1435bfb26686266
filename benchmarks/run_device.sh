#!/usr/bin/env bash
# One call on a GPU machine (the `device` tool): build the CUDA extension, run the GPU tests, run
# the benchmark sweep, and leave the results (with device metadata) in $OUT for committing under
# benchmarks/results/<device>/.   Usage: bash benchmarks/run_device.sh   (OUT defaults to ./out)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out}; mkdir -p "$OUT"
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python -m pip install --quiet triton numpy pybind11 ninja safetensors pytest pytest-benchmark \
      "bitsandbytes>=0.46" peft transformers matplotlib
  echo "== build (CUDA extension)"; time python -m pip install --quiet --no-build-isolation -e .
  echo "== GPU tests"; python -m pytest -q -m gpu tests/ 2>&1 | tail -20
  echo "== all tests on the GPU machine"; python -m pytest -q -x tests/ 2>&1 | tail -5
  echo "== benchmark sweep"; python -m peftkern.bench --device cuda --out "$OUT/results"
} 2>&1 | tee "$OUT/device_run.log"
