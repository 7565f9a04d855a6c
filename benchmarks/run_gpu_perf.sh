#!/usr/bin/env bash
# The GPU performance tables (docs/performance.md) in one run of about 9 minutes, both verification modes, built to
# lose nothing when it is cut short:
#   1. smoke: every CUDA code path the measurements use (lean and transformers forwards in bf16, strict and relaxed
#      SD at batch 1 and batched, the tree baseline, count_ops) on tiny random models, in ~30 s. A failure here ends
#      the run at once (exit 3), before any long step;
#   2. the beauty_gpu_strict pipeline (deep target: 30 layers, hidden 576; teacher; 2-layer AtSpeed-S draft), then
#      beauty_gpu_relaxed, which reuses the target and teacher and aligns an AtSpeed-R draft;
#   3. the headline: bench_decoding at K = 10, batch 1, γ 3, N 40 with M 10/20/40, then N = M = 120 and 80, for
#      strict and relaxed, SD and beam_tree alternating per user in one process;
#   4. as time allows (each step is skipped when fewer than its seconds remain before DEADLINE): γ 1 rows, one call
#      of each model (bench_forward), kernels per list (count_ops), transformers' forward, throughput at B 1-64.
# After every step the results folder is packed into $OUT/gpu_perf.tgz (through a temporary file and a rename), so
# a run killed at a time limit still leaves everything finished before.
#
# On a GPU machine without internet access, prepare on a connected one: `bash scripts/gpu_wheels.sh` fills .whl/
# and copies the Beauty data into data/beauty (both git-ignored); copy the repository with them, then run
#   WHEELS_DIR=.whl OUT=/tmp/gpu_out bash benchmarks/run_gpu_perf.sh
#   tar xzf /tmp/gpu_out/gpu_perf.tgz -C results/ && python benchmarks/perf_tables.py results/gpu_perf
#
# Env: PY (python3), DATA_ROOT (data/beauty), MODES ("strict relaxed"), TARGET_EPOCHS (2), DRAFT_EPOCHS (2),
# USERS (100; batch-1 lists per row), EVAL_USERS (30; the pipeline's own speculative table), REPEATS (1),
# THROUGHPUT_USERS (256), DEADLINE (540 s after the start: optional steps that would end later are skipped), OUT
# (results/gpu_perf_out), RESULTS (results/gpu_perf), ARTIFACTS (artifacts), DEVICE / DTYPE (cuda / bfloat16),
# SMOKE (1; 0 skips it), DATA_NAME (beauty) and SMOKE_DATA_ROOT (DATA_ROOT) for other data, EXTRA (more Hydra
# overrides for both pipeline runs). DEVICE=cpu with EXTRA pointing at tiny models runs every step on a CPU
# (tests/test_benchmarks.py does, so that the CUDA run is not the first to exercise this script).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
DATA_ROOT=${DATA_ROOT:-data/beauty}
DATA_NAME=${DATA_NAME:-beauty}
SMOKE_DATA_ROOT=${SMOKE_DATA_ROOT:-$DATA_ROOT}
MODES=${MODES:-"strict relaxed"}
USERS=${USERS:-100}
DEVICE=${DEVICE:-cuda}
DTYPE=${DTYPE:-bfloat16}
DEADLINE=${DEADLINE:-540}
OUT=${OUT:-results/gpu_perf_out}
RESULTS=${RESULTS:-results/gpu_perf}
ARTIFACTS=${ARTIFACTS:-artifacts}
read -r -a EXTRA_OVERRIDES <<< "${EXTRA:-}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=${WANDB_MODE:-disabled}
mkdir -p "$OUT" "$RESULTS"
exec > >(tee -a "$RESULTS/log.txt") 2>&1

if [ -n "${WHEELS_DIR:-}" ]; then  # the device image lacks hydra/omegaconf and has an older transformers
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      "$WHEELS_DIR"/*.whl || { echo "installing $WHEELS_DIR failed" >&2; exit 2; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}  # the benchmark scripts import atspeed_exp from the checkout
if [ "$DATA_NAME" = beauty ] && [ ! -f "$DATA_ROOT/testing_dict.npy" ]; then
  echo "no Beauty data at DATA_ROOT=$DATA_ROOT (bash scripts/gpu_wheels.sh copies it there; carry data/beauty)" >&2
  exit 2
fi

pack() {  # the results so far, replaced atomically: a kill mid-write leaves the previous archive
  tar czf "$OUT/.gpu_perf.tgz.tmp" -C "$(dirname "$RESULTS")" "$(basename "$RESULTS")" \
      && mv "$OUT/.gpu_perf.tgz.tmp" "$OUT/gpu_perf.tgz"
}
quiet() { grep --line-buffered -v -e "Loading weights" -e "it/s\]" -e "litlogger" -e "LeafSpec"; }
step() {  # step NAME SECONDS CMD...: run CMD unless fewer than SECONDS remain before DEADLINE; pack afterwards
  local name=$1 need=$2 start=$SECONDS rc
  shift 2
  if [ "$need" -gt 0 ] && [ $((SECONDS + need)) -gt "$DEADLINE" ]; then
    echo "== $name: skipped ($((DEADLINE - SECONDS)) s left before DEADLINE, needs ~$need s)"
    return 0
  fi
  echo "== $name (at $SECONDS s)"
  "$@" 2>&1 | quiet
  rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc after $((SECONDS - start)) s"
  pack
  return "$rc"
}
saved() {  # saved NAME SCRIPT ARGS...: a benchmark script whose printed table is kept as NAME.txt (and shown)
  local name=$1 script=$2 rc
  shift 2
  "$PY" "benchmarks/$script" --device "$DEVICE" --dtype "$DTYPE" "$@" > "$RESULTS/$name.txt"
  rc=$?
  cat "$RESULTS/$name.txt"
  return $rc
}
bench() {  # bench NAME ARGS...: bench_decoding on the data, its report as NAME.json
  local name=$1
  shift
  saved "$name" bench_decoding.py --data-root "$DATA_ROOT" --json-out "$RESULTS/$name.json" "$@"
}

{
  echo "started $(date -u +%FT%TZ); commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  if [ "$DEVICE" = cuda ]; then nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; fi
  "$PY" -c "import torch, transformers, lightning; print('torch', torch.__version__, '| transformers', \
transformers.__version__, '| lightning', lightning.__version__)"
} | tee "$RESULTS/device.txt"

# 1. smoke: tiny random models on the device, every method and both forwards; fatal
if [ "${SMOKE:-1}" != 0 ]; then
  smoke() {
    local common=(--target-config conf/model/llama_tiny.yaml --draft-config conf/draft/draft_tiny.yaml
                  --data-root "$SMOKE_DATA_ROOT" --data-name "$DATA_NAME" --users 3 --ks 10 --draft-beams 40
                  --gamma 3 --warmup 1)
    saved smoke_lean bench_decoding.py "${common[@]}" --methods beam,beam_tree,sd_strict,sd_relaxed,sd_relaxed_exact \
        --verify-beams 10,40 --batch-sizes 1,3 \
      && saved smoke_hf bench_decoding.py "${common[@]}" --backend hf --methods beam_tree,sd_strict,sd_relaxed \
          --verify-beams 20 \
      && saved smoke_ops count_ops.py "${common[@]}" --methods beam_tree,sd_strict,sd_relaxed --users 2 \
          --verify-beams 20
  }  # (a strict list that differs from beam_tree's is reported, not fatal: bf16 rounding flips near-ties)
  step smoke 0 smoke || { echo "smoke failed: the CUDA path is broken (see above); nothing else was run"; exit 3; }
fi

# 2. the pipeline per mode: train (or reuse) target, teacher and draft; the pipeline's own evaluation at K = 10
pipeline() {
  local mode=$1
  "$PY" run.py "+experiment=beauty_gpu_$mode" logger=csv trainer.enable_progress_bar=false "data.root=$DATA_ROOT" \
      "paths.artifacts_dir=$ARTIFACTS" "hydra.run.dir=$RESULTS/run_$mode" \
      "target_training.max_epochs=${TARGET_EPOCHS:-2}" "draft_training.max_epochs=${DRAFT_EPOCHS:-2}" \
      draft_training.eval_every_n_epochs=0 "eval.speculative_users=${EVAL_USERS:-30}" 'decoding.ks=[10]' \
      eval.throughput_batch_size=null "${EXTRA_OVERRIDES[@]}" \
    && cp "$RESULTS/run_$mode/summary.json" "$RESULTS/summary_$mode.json"
}
declare -A DRAFT
ready=()
for mode in $MODES; do
  case "$mode" in strict | relaxed) ;; *) echo "MODES: '$mode' is not strict or relaxed" >&2; exit 2 ;; esac
  if step "pipeline_$mode" 0 pipeline "$mode"; then  # never skipped: every table needs it
    DRAFT[$mode]=$("$PY" -c "import json, sys; print(json.load(open(sys.argv[1]))['draft_dir'] + '/model')" \
        "$RESULTS/summary_$mode.json")
    ready+=("$mode")
  fi
done
if [ ${#ready[@]} = 0 ]; then echo "no pipeline run finished: nothing to benchmark"; exit 4; fi
TARGET=$("$PY" -c "import json, sys; print(json.load(open(sys.argv[1]))['target_dir'] + '/model')" \
    "$RESULTS/summary_${ready[0]}.json")
echo "target: $TARGET; drafts: ${DRAFT[*]}"

# 3. the headline rows, then 4. the rest while time remains (rough seconds each on an H100-class GPU)
models() { echo --target-dir "$TARGET" --draft-dir "${DRAFT[$1]}"; }
for mode in "${ready[@]}"; do  # the paper's N = 40, with top-M verification
  step "${mode}_g3" 90 bench "${mode}_g3" $(models "$mode") --methods "beam_tree,sd_$mode" --users "$USERS" \
      --ks 10 --draft-beams 40 --verify-beams 10,20,40 --gamma 3 --repeats "${REPEATS:-1}"
done
# wider draft trees: fewer target calls (run_beams_sweep.sh on the CPU: strict K = 10 2.02 -> 1.53 calls from N 40
# to 120), and a GPU call costs about the same for a few hundred tokens
for n in 120 80; do
  for mode in "${ready[@]}"; do
    step "${mode}_g3_n$n" 45 bench "${mode}_g3_n$n" $(models "$mode") --methods "beam_tree,sd_$mode" \
        --users "$USERS" --ks 10 --draft-beams "$n" --gamma 3 --repeats "${REPEATS:-1}"
  done
done
step forward 40 saved forward bench_forward.py --model-dir "$TARGET" --model-dir "${DRAFT[${ready[0]}]}" \
    --widths 1,10,40,120,240 --repeats 100
for mode in "${ready[@]}"; do
  step "${mode}_g1" 60 bench "${mode}_g1" $(models "$mode") --methods "beam_tree,sd_$mode" --users "$USERS" \
      --ks 10 --draft-beams 40 --verify-beams 20,40 --gamma 1 --repeats "${REPEATS:-1}"
done
for mode in "${ready[@]}"; do
  step "ops_$mode" 45 saved "ops_${mode}_g3" count_ops.py --data-root "$DATA_ROOT" $(models "$mode") \
      --methods "beam_tree,sd_$mode" --users 20 --ks 10 --draft-beams 40 --verify-beams 20,40 --gamma 3 \
      --json-out "$RESULTS/ops_${mode}_g3.json"
done
for mode in "${ready[@]}"; do
  step "${mode}_g3_hf" 60 bench "${mode}_g3_hf" $(models "$mode") --backend hf --methods "beam_tree,sd_$mode" \
      --users "$USERS" --ks 10 --draft-beams 40 --verify-beams 20,40 --gamma 3 --repeats "${REPEATS:-1}"
done
for mode in "${ready[@]}"; do
  step "throughput_k10_$mode" 60 bench "throughput_k10_$mode" $(models "$mode") --methods "beam_tree,sd_$mode" \
      --users "${THROUGHPUT_USERS:-256}" --ks 10 --draft-beams 40 --verify-beams 20,40 --gamma 3 \
      --batch-sizes 1,8,32,64 --skip-latency
done

echo "== tables (python benchmarks/perf_tables.py $RESULTS), after $SECONDS s"
"$PY" benchmarks/perf_tables.py "$RESULTS"
pack
