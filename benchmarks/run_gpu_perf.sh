#!/usr/bin/env bash
# The GPU performance tables of README (issue 5), in ONE command per mode, for a lent GPU machine that is given back
# between calls (nothing survives a call but what is copied to $OUT): trains the deep Beauty target (beauty_gpu_*:
# 30 layers, hidden 576), its teacher data and the 2-layer draft for MODE (strict: AtSpeed-S, relaxed: AtSpeed-R),
# runs the pipeline's evaluation, then bench_forward (transformers vs lean forward, one call) and bench_decoding at
# K = 10, batch 1, M in {10, 20, 40}, γ in {1, 3}, with the lean forward and, for comparison, transformers', plus a
# throughput table; everything printed is also kept in $OUT/gpu_perf_MODE.tgz.
#
#   MODE=strict bash benchmarks/run_gpu_perf.sh     # ~7-8 min on an H100 (session 1's timings)
#   MODE=relaxed bash benchmarks/run_gpu_perf.sh
#
# On the device tool: carry .whl (transformers 5.23.0, tokenizers, hydra-core, omegaconf, antlr4 wheels) and
# data/beauty, and run `WHEELS_DIR=.whl MODE=strict WANDB_MODE=disabled HF_HUB_OFFLINE=1 OUT=$OUT bash
# benchmarks/run_gpu_perf.sh` (timeout_s 600); $OUT/gpu_perf_MODE.tgz comes back.
# Env: PY (python), DATA_ROOT (Beauty folder; default data/beauty, a copy of ../shared/data/beauty carried along),
# TARGET_EPOCHS (2), DRAFT_EPOCHS (2), USERS (100), REPEATS (1; runs per list), THROUGHPUT_USERS (512), OUT (results/gpu_perf), RESULTS
# (results/gpu_perf_MODE), ARTIFACTS (artifacts); DEVICE / DTYPE (cuda / bfloat16) and EXTRA (more Hydra overrides)
# let a CPU smoke test run the same steps on tiny models (tests/test_benchmarks.py).
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=${MODE:?set MODE=strict or MODE=relaxed}
PY=${PY:-python}
DATA_ROOT=${DATA_ROOT:-data/beauty}
OUT=${OUT:-results/gpu_perf}
USERS=${USERS:-100}
DEVICE=${DEVICE:-cuda}
DTYPE=${DTYPE:-bfloat16}
read -r -a EXTRA_OVERRIDES <<< "${EXTRA:-}"
case "$MODE" in
  strict) OBJECTIVE=atspeed_s ;;
  relaxed) OBJECTIVE=atspeed_r ;;
  *) echo "MODE=$MODE: expected strict or relaxed" >&2; exit 2 ;;
esac
if [ -n "${WHEELS_DIR:-}" ]; then  # a machine without the pinned transformers / hydra: install the carried wheels
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS_DIR"/*.whl
  export PYTHONPATH=/tmp/site:.${PYTHONPATH:+:$PYTHONPATH}
fi
RESULTS=${RESULTS:-results/gpu_perf_$MODE}
ARTIFACTS=${ARTIFACTS:-artifacts}
mkdir -p "$OUT" "$RESULTS"
if [ "$DEVICE" = cuda ]; then nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$RESULTS/device.txt"; fi

"$PY" run.py "+experiment=beauty_gpu_$MODE" logger=csv trainer.enable_progress_bar=false "data.root=$DATA_ROOT" \
    "paths.artifacts_dir=$ARTIFACTS" "hydra.run.dir=$RESULTS/run" \
    "target_training.max_epochs=${TARGET_EPOCHS:-2}" "draft_training.max_epochs=${DRAFT_EPOCHS:-2}" \
    draft_training.eval_every_n_epochs=0 "eval.speculative_users=$USERS" 'decoding.ks=[10]' "${EXTRA_OVERRIDES[@]}" \
    2>&1 | grep -v "it/s\]" | tee "$RESULTS/run.log"
TARGET=$(ls -td "$ARTIFACTS"/target/*/ | head -1)model
DRAFT=$(ls -td "$ARTIFACTS"/draft/*-"$OBJECTIVE"-*/ | head -1)model

"$PY" benchmarks/bench_forward.py --device "$DEVICE" --dtype "$DTYPE" --model-dir "$TARGET" --model-dir "$DRAFT" \
    --widths 1,10,40,120,240 --repeats 100 2> >(grep -v "Loading weights" >&2) | tee "$RESULTS/forward.txt"
bench() { local name=$1; shift; "$PY" benchmarks/bench_decoding.py --device "$DEVICE" --dtype "$DTYPE" \
    --target-dir "$TARGET" --draft-dir "$DRAFT" --data-root "$DATA_ROOT" --json-out "$RESULTS/$name.json" "$@" \
    2> >(grep -v "Loading weights" >&2) | tee "$RESULTS/$name.txt"; }
for gamma in 1 3; do
  bench "${MODE}_g$gamma" --methods "beam,beam_tree,sd_$MODE" --users "$USERS" --ks 10 --draft-beams 40 \
      --verify-beams 10,20,40 --gamma "$gamma" --repeats "${REPEATS:-1}"
done
bench "${MODE}_g3_hf" --backend hf --methods "beam_tree,sd_$MODE" --users "$USERS" --ks 10 --draft-beams 40 \
    --verify-beams 20,40 --gamma 3 --repeats "${REPEATS:-1}"
bench "throughput_k10_$MODE" --methods "beam_tree,sd_$MODE" --users "${THROUGHPUT_USERS:-512}" --ks 10 --draft-beams 40 --verify-beams 20,40 \
    --gamma 3 --batch-sizes 1,8,32,64 --skip-latency
# kernel launches per list with these models (a failure here must not cost the measurements above)
"$PY" benchmarks/count_ops.py --device "$DEVICE" --dtype "$DTYPE" --target-dir "$TARGET" --draft-dir "$DRAFT" \
    --data-root "$DATA_ROOT" --methods "beam_tree,sd_$MODE" --users 20 --ks 10 --draft-beams 40 --verify-beams 20,40 \
    --gamma 3 --json-out "$RESULTS/ops_${MODE}_g3.json" 2> >(grep -v "Loading weights" >&2) \
    | tee "$RESULTS/ops_${MODE}_g3.txt" || echo "count_ops failed (see above); the other results stand"
cp "$RESULTS/run/summary.json" "$RESULTS/summary.json"
tar czf "$OUT/gpu_perf_$MODE.tgz" "$RESULTS"
