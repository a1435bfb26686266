#!/usr/bin/env bash
# The GPU run (the `device` tool), leaving results with device metadata in $OUT for committing
# under benchmarks/results/<device>/:
#   bash benchmarks/run_device.sh [all|test|bench|tune]      (OUT defaults to ./out)
# all (default): build the CUDA extension, run the GPU tests, a decode/QLoRA benchmark sweep and a
# quick tile tuning, each stage under its own time limit, so that one call stays inside the device
# tool's 10 minutes and a stage that overruns still leaves the others' results. The stages alone
# (each in its own call; the build is kept while the machine stays warm):
#   test   build + GPU tests;   bench   the full sweep;   tune   the full tile tuning.
# The device machine has no network: pip never reaches an index here. Its image has torch, Triton,
# peft, transformers and pytest but not bitsandbytes; carry it as a wheel (the PEFT + bnb baseline
# is skipped without it). Once, on the dev machine, in the repo root:
#   echo /.whl/ >> .git/info/exclude; python3 -m pip download --no-deps --only-binary=:all: \
#     --python-version 3.12 --implementation cp --platform manylinux_2_24_x86_64 -d .whl bitsandbytes==0.50.2
# and name `.whl` in the run's `carry`. Afterwards, on the dev machine, merge what was measured
# into the dispatcher's table and commit it with the results folder:
#   python -c "from peftkern.ops import tuning; tuning.adopt('<folder>/tuning_cuda_gemv.json')"
#   (and <folder>/tuning_lora_matmul.json)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out}; mkdir -p "$OUT"
STAGE=${1:-all}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16}
stage() { echo "== $1 ($(date -u +%T))"; }
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  if compgen -G ".whl/*.whl" >/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  if [ "$STAGE" = all ] || [ "$STAGE" = test ] || ! $PY -c "import peftkern._C" 2>/dev/null; then
    stage "build (CUDA extension)"
    time $PY -m pip install -q --no-index --no-deps --no-build-isolation -e . || exit 1
  fi
  $PY -c "import torch, peftkern; print('torch', torch.__version__, 'backends',
          peftkern.ops.available(torch.device('cuda')))"
  case "$STAGE" in
    all)
      stage "GPU tests"; timeout 170 $PY -m pytest -q -m gpu tests/
      stage "benchmark sweep (decode, qlora_fwd_bwd)"
      timeout 180 $PY -m peftkern.bench --device cuda --ops decode,qlora_fwd_bwd --out "$OUT/results"
      stage "tile tuning (quick)"; timeout 80 $PY -m peftkern.bench.tune --quick --out "$OUT/results" ;;
    test) stage "GPU tests"; $PY -m pytest -q -m gpu tests/ ;;
    bench) stage "benchmark sweep"; $PY -m peftkern.bench --device cuda --out "$OUT/results" ;;
    tune) stage "tile tuning"; $PY -m peftkern.bench.tune --out "$OUT/results" ;;
    *) echo "unknown stage $STAGE (all|test|bench|tune)"; exit 2 ;;
  esac
  stage done
} 2>&1 | tee -a "$OUT/device_run.log"
