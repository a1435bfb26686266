#!/usr/bin/env bash
# The GPU run (the `device` tool), leaving results with device metadata in $OUT for committing
# under benchmarks/results/<device>/:
#   bash benchmarks/run_device.sh [all|test|bench|tune]      (OUT defaults to ./out)
# all (default): build the CUDA extension, run the GPU tests (fp32, fp16, bf16), the decode and
# QLoRA training sweeps (against PEFT + bnb, dequantize + cuBLAS and dense bf16 LoRA) and a quick
# tile tuning, each stage under its own time budget (below), so that one call stays inside the
# device tool's 10 minutes and a stage that overruns still leaves the others' results. The stages alone
# (each in its own call; the build is kept while the machine stays warm):
#   test   build + GPU tests;   bench   the full sweep;   tune   the full tile tuning;
#   family the DoRA, mixed-adapter and MoE cases at 4096x4096, M=2048 (issue 16's GPU figures).
# The device machine has no network: pip never reaches an index here. Its image has torch, Triton,
# peft, transformers and pytest but not bitsandbytes; carry it as a wheel (the PEFT + bnb baseline
# is skipped without it). Once, on the dev machine, in the repo root:
#   echo /.whl/ >> .git/info/exclude; python3 -m pip download --no-deps --only-binary=:all: \
#     --python-version 3.12 --implementation cp --platform manylinux_2_24_x86_64 -d .whl bitsandbytes==0.50.2
# and name `.whl` in the run's `carry`. Afterwards, on the dev machine, merge what was measured
# into the dispatcher's table and commit it with the results folder: the script leaves the merged
# table as $OUT/tuning.json (copy it to peftkern/ops/tuning.json), or by hand:
#   python -c "from peftkern.ops import tuning; tuning.adopt('<folder>/tuning_cuda_gemv.json')"
#   (and <folder>/tuning_lora_matmul.json)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out}; mkdir -p "$OUT"
STAGE=${1:-all}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16}
# The timed plan of `all` (seconds; the README's table). The whole call must end inside the device
# tool's 600 s limit: a stage gets its budget or what is left before DEADLINE, whichever is less,
# and is skipped (logged) when under 20 s remain. Each stage's budget, time and exit status go to
# $OUT/stages.tsv.
BUDGET_BUILD=150 BUDGET_TEST=150 BUDGET_SWEEP=170 BUDGET_TUNE=70
DEADLINE=$(( $(date +%s) + ${TOTAL_BUDGET:-570} ))
printf 'stage\tbudget_s\ttook_s\trc\n' > "$OUT/stages.tsv"
run_stage() {  # run_stage NAME BUDGET CMD...: CMD under min(BUDGET, time left)
  local name=$1 budget=$2; shift 2
  local left=$(( DEADLINE - $(date +%s) - 5 ))
  (( budget > left )) && budget=$left
  if (( budget < 20 )); then
    echo "== $name: skipped, ${left}s left"; printf '%s\t%s\t-\tskipped\n' "$name" "$budget" >> "$OUT/stages.tsv"
    return 1
  fi
  echo "== $name (budget ${budget}s, $(date -u +%T))"
  local t0=$(date +%s); timeout "$budget" "$@"; local rc=$?
  printf '%s\t%s\t%s\t%s\n' "$name" "$budget" "$(( $(date +%s) - t0 ))" "$rc" >> "$OUT/stages.tsv"
  return $rc
}
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  if compgen -G ".whl/*.whl" >/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  if [ "$STAGE" = all ] || [ "$STAGE" = test ] || ! $PY -c "import peftkern._C" 2>/dev/null; then
    run_stage build $BUDGET_BUILD $PY -m pip install -q --no-index --no-deps --no-build-isolation -e . \
      || exit 1
  fi
  $PY -c "import torch, peftkern; print('torch', torch.__version__, 'backends',
          peftkern.ops.available(torch.device('cuda')))"
  case "$STAGE" in
    all)
      run_stage "GPU tests" $BUDGET_TEST $PY -m pytest -q -m gpu tests/
      run_stage "sweep (decode, qlora_fwd_bwd)" $BUDGET_SWEEP \
        $PY -m peftkern.bench --device cuda --ops decode,qlora_fwd_bwd --out "$OUT/results"
      run_stage "tile tuning (quick)" $BUDGET_TUNE $PY -m peftkern.bench.tune --quick --out "$OUT/results" ;;
    test) run_stage "GPU tests" 580 $PY -m pytest -q -m gpu tests/ ;;
    bench) run_stage sweep 580 $PY -m peftkern.bench --device cuda --out "$OUT/results" ;;
    tune) run_stage "tile tuning" 580 $PY -m peftkern.bench.tune --out "$OUT/results" ;;
    family) run_stage "DoRA, mixed adapters, MoE" 580 $PY -m peftkern.bench --device cuda \
        --ops dora_step,qdora_step,mixed_1,mixed_4,mixed_16,moe_step --shapes 4096x4096 --M 2048 \
        --out "$OUT/results" ;;
    *) echo "unknown stage $STAGE (all|test|bench|tune|family)"; exit 2 ;;
  esac
  # the table as it would be committed: every tuning file of this run merged into a copy
  for f in "$OUT"/results/*/tuning_lora_matmul.json "$OUT"/results/*/tuning_cuda_gemv.json; do
    [ -f "$f" ] || continue
    cp -n peftkern/ops/tuning.json "$OUT/tuning.json" 2>/dev/null
    $PY -c "import sys; from peftkern.ops import tuning; tuning.TABLE = sys.argv[2]; tuning.adopt(sys.argv[1])" \
      "$f" "$OUT/tuning.json" && echo "merged $f into $OUT/tuning.json"
  done
  echo "== done ($(date -u +%T)); stage times in $OUT/stages.tsv"
} 2>&1 | tee -a "$OUT/device_run.log"
