#!/usr/bin/env bash
# The CPU performance tables of docs/performance.md: Beauty CPU-scale target (beauty_target) with its
# AtSpeed-S (strict) and AtSpeed-R (relaxed) drafts (beauty_strict / beauty_relaxed runs), batch-1 latency over
# gamma and M, then throughput at B in {1, 8, 32, 64} and all test users at K = 20; before them, one call of each
# model under both forwards (bench_forward.py), and the bound "SD with the target as its own draft" (every step
# accepted at M = N = K: what a perfect draft could save, its own cost aside). Run one at a time on a quiet machine:
# ~20 min on the 2-core CPU. BACKEND=hf reproduces the transformers-forward tables (results/cpu_perf_hf/).
# Outputs: $OUT/*.txt (printed tables) and *.json.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-results/cpu_perf}
source benchmarks/cpu_pair.sh  # pick_draft, target_of
DRAFT_S=${DRAFT_S:-$(pick_draft atspeed_s)}
DRAFT_R=${DRAFT_R:-$(pick_draft atspeed_r)}
echo "drafts: $DRAFT_S $DRAFT_R"
TARGET=${TARGET:-$(target_of "$DRAFT_S")}
USERS=${USERS:-100}
BACKEND=${BACKEND:-auto}
mkdir -p "$OUT"
bench() { local name=$1; shift; "$PY" benchmarks/bench_decoding.py --threads 2 --backend "$BACKEND" \
    --json-out "$OUT/$name.json" "$@" 2> >(grep -v "Loading weights" >&2) | tee "$OUT/$name.txt"; }
ops() { local name=$1; shift; "$PY" benchmarks/count_ops.py --threads 2 --backend "$BACKEND" \
    --json-out "$OUT/$name.json" "$@" 2> >(grep -v "Loading weights" >&2) | tee "$OUT/$name.txt"; }

"$PY" benchmarks/bench_forward.py --threads 2 --model-dir "$TARGET" --model-dir "$DRAFT_S" \
    2> >(grep -v "Loading weights" >&2) | tee "$OUT/forward.txt"
for k in 5 10 20; do
  bench "bound_k$k" --target-dir "$TARGET" --draft same --methods beam_tree,sd_strict --users "$USERS" --ks "$k" \
      --draft-beams "$k" --gamma 3 --repeats 3
done

for gamma in 1 2 3; do
  bench "strict_g$gamma" --target-dir "$TARGET" --draft-dir "$DRAFT_S" --methods beam,beam_tree,sd_strict --users "$USERS" \
      --ks 5,10,20 --draft-beams 40 --verify-beams 20,30,40 --gamma "$gamma" --repeats 3
  bench "relaxed_g$gamma" --target-dir "$TARGET" --draft-dir "$DRAFT_R" --methods beam,beam_tree,sd_relaxed --users "$USERS" \
      --ks 5,10,20 --draft-beams 40 --verify-beams 20,30,40 --gamma "$gamma" --repeats 3
done
# tensor ops per list, by model forward and search (device-independent: kernel launches on a GPU)
for gamma in 1 3; do
  ops "ops_strict_g$gamma" --target-dir "$TARGET" --draft-dir "$DRAFT_S" --methods beam_tree,sd_strict --users 20 --ks 10 \
      --draft-beams 40 --verify-beams 20,40 --gamma "$gamma"
  ops "ops_relaxed_g$gamma" --target-dir "$TARGET" --draft-dir "$DRAFT_R" --methods beam_tree,sd_relaxed --users 20 --ks 10 \
      --draft-beams 40 --verify-beams 20,40 --gamma "$gamma"
done
bench throughput_k10 --target-dir "$TARGET" --draft-dir "$DRAFT_S" --methods beam,beam_tree,sd_strict --users 512 \
    --ks 10 --draft-beams 40 --gamma 1 --batch-sizes 1,8,32,64 --skip-latency
bench throughput_k10_relaxed --target-dir "$TARGET" --draft-dir "$DRAFT_R" --methods beam_tree,sd_relaxed --users 512 \
    --ks 10 --draft-beams 40 --verify-beams 20 --gamma 1 --batch-sizes 1,8,32,64 --skip-latency
bench all_users_k20 --target-dir "$TARGET" --draft-dir "$DRAFT_S" --methods beam,beam_tree,sd_strict --users 0 --ks 20 \
    --draft-beams 40 --gamma 1 --batch-sizes 64 --skip-latency
