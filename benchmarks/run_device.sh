#!/usr/bin/env bash
# The GPU run (the `device` tool), leaving results with device metadata in $OUT for committing
# under benchmarks/results/<device>/:
#   bash benchmarks/run_device.sh [all|test|bench|tune]      (OUT defaults to ./out)
# all (default): build the CUDA extension, run the GPU tests, the benchmark sweep, and a quick
# tile tuning, each stage under its own time limit so that one call stays inside the device tool's
# 10 minutes and a stage that overruns still leaves the others' results. The stages alone:
#   test   build + GPU tests;   bench   the full sweep;   tune   the full tile tuning.
# Afterwards, on the dev machine: merge what was measured into the dispatcher's table with
#   python -c "from peftkern.ops import tuning; tuning.adopt('<folder>/tuning_cuda_gemv.json')"
# (and tuning_lora_matmul.json), then commit the results folder and peftkern/ops/tuning.json.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out}; mkdir -p "$OUT"
STAGE=${1:-all}
stage() { echo "== $1 ($(date -u +%T))"; }
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  if ! python -c "import peftkern._C" 2>/dev/null || [ "$STAGE" = all ] || [ "$STAGE" = test ]; then
    python -m pip install --quiet triton numpy pybind11 ninja safetensors pytest pytest-benchmark \
        "bitsandbytes>=0.46" peft transformers matplotlib
    stage "build (CUDA extension)"; time MAX_JOBS=16 python -m pip install --quiet --no-build-isolation -e .
  fi
  python -c "import torch, peftkern; print('backends', peftkern.ops.available(torch.device('cuda')))"
  case "$STAGE" in
    all)
      stage "GPU tests"; timeout 150 python -m pytest -q -m gpu tests/ 2>&1 | tail -25
      stage "benchmark sweep (decode, qlora)"; timeout 200 python -m peftkern.bench --device cuda \
          --ops decode,qlora_fwd,qlora_fwd_bwd,dequantize --out "$OUT/results"
      stage "tile tuning (quick)"; timeout 90 python -m peftkern.bench.tune --quick --out "$OUT/results" ;;
    test) stage "GPU tests"; python -m pytest -q -m gpu tests/ 2>&1 | tail -40 ;;
    bench) stage "benchmark sweep"; python -m peftkern.bench --device cuda --out "$OUT/results" ;;
    tune) stage "tile tuning"; python -m peftkern.bench.tune --out "$OUT/results" ;;
    *) echo "unknown stage $STAGE (all|test|bench|tune)"; exit 2 ;;
  esac
  stage done
} 2>&1 | tee -a "$OUT/device_run.log"
