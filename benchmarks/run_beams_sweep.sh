#!/usr/bin/env bash
# Target calls and acceptance against the number of draft beams N (M = N, γ = 3, batch 1) for the Beauty CPU pair:
# beauty_target's target with the beauty_strict AtSpeed-S draft (strict) and the beauty_relaxed AtSpeed-R draft
# (relaxed). Calls and acceptance do not depend on the hardware; this CPU's walltimes at large N do (a CPU forward
# pays for every verified token, a GPU call at batch 1 barely does), so read the walltime columns as this CPU's only.
# The paper fixes N = 40; on a GPU a wider draft tree costs little, so this says what N buys there. Last, kernels
# per list (count_ops.py) at N = 40 and 120.
#   bash benchmarks/run_beams_sweep.sh        (after beauty_strict and beauty_relaxed; ~4 min on the 2-core CPU)
#   python benchmarks/perf_tables.py results/cpu_perf     (prints the table with the others)
# Env: PY, OUT (results/cpu_perf), USERS (100), BEAMS ("10 20 40 60 80 120"), MODES ("strict relaxed"), DRAFT_S,
# DRAFT_R, TARGET (default: the drafts found under artifacts/draft and their target).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-results/cpu_perf}
USERS=${USERS:-100}
BEAMS=${BEAMS:-"10 20 40 60 80 120"}
MODES=${MODES:-"strict relaxed"}
source benchmarks/cpu_pair.sh  # pick_draft, target_of
DRAFT_S=${DRAFT_S:-$(pick_draft atspeed_s)}
DRAFT_R=${DRAFT_R:-$([[ $MODES == *relaxed* ]] && pick_draft atspeed_r || echo none)}
TARGET=${TARGET:-$(target_of "$DRAFT_S")}
mkdir -p "$OUT"
for n in $BEAMS; do
  ks=$(for k in 5 10 20; do if [ "$k" -le "$n" ]; then printf '%s,' "$k"; fi; done)  # K <= N
  for mode in $MODES; do
    draft=$DRAFT_S; [ "$mode" = relaxed ] && draft=$DRAFT_R
    "$PY" benchmarks/bench_decoding.py --threads 2 --target-dir "$TARGET" --draft-dir "$draft" \
        --methods "beam_tree,sd_$mode" --users "$USERS" --ks "${ks%,}" --draft-beams "$n" --gamma 3 \
        --json-out "$OUT/beams_${mode}_n$n.json" 2> >(grep -v "Loading weights" >&2) | tee "$OUT/beams_${mode}_n$n.txt"
  done
done
# kernels per list at the paper's N and the widest (device-independent: launches on a GPU), 20 users at K = 10
for n in 40 120; do
  for mode in $MODES; do
    draft=$DRAFT_S; [ "$mode" = relaxed ] && draft=$DRAFT_R
    "$PY" benchmarks/count_ops.py --threads 2 --target-dir "$TARGET" --draft-dir "$draft" \
        --methods "beam_tree,sd_$mode" --users 20 --ks 10 --draft-beams "$n" --gamma 3 \
        --json-out "$OUT/beams_ops_${mode}_n$n.json" 2> >(grep -v "Loading weights" >&2) \
        | tee "$OUT/beams_ops_${mode}_n$n.txt"
  done
done
