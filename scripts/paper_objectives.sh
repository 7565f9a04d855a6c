#!/usr/bin/env bash
# The alignment-objective comparison on Beauty at CPU scale (docs/results.md): drafts of each objective form trained
# with several seeds on ONE target and teacher (beauty_paper_* settings), each evaluated on all test users (calls,
# acceptance, overlap, accuracy with 95% bootstrap intervals), then tabulated over seeds. Stages are cached, so a
# rerun only does what is missing. Variables: STRICT_FORMS, RELAXED_FORMS, SEEDS, THREADS, EXTRA (more overrides),
# OUT (the JSON tables). An empty STRICT_FORMS or RELAXED_FORMS skips that half.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
STRICT_FORMS=${STRICT_FORMS-atspeed_s_public,seqkd_public,wordkd_public,atspeed_s}
RELAXED_FORMS=${RELAXED_FORMS-atspeed_r_public,atspeed_r,tvdkd_public}
SEEDS=${SEEDS:-2025,1,2}
THREADS=${THREADS:-1}
OUT=${OUT:-results/objectives}
stamp=$(date +%Y-%m-%d_%H-%M-%S)
# walltime is not the point here: a short batch-1 subset, no throughput timing
common=(logger=csv "threads=$THREADS" eval.speculative_users=50 eval.throughput_batch_size=null ${EXTRA:-})
if [ -n "$STRICT_FORMS" ]; then
  "$PY" run.py -m +experiment=beauty_paper_strict "alignment=$STRICT_FORMS" "draft_training.seed=$SEEDS" \
    "${common[@]}" "hydra.sweep.dir=multirun/objectives_strict_$stamp"
  "$PY" benchmarks/objective_table.py "multirun/objectives_strict_$stamp" --out "$OUT/strict.json"
fi
if [ -n "$RELAXED_FORMS" ]; then
  "$PY" run.py -m +experiment=beauty_paper_relaxed "alignment=$RELAXED_FORMS" "draft_training.seed=$SEEDS" \
    "${common[@]}" "hydra.sweep.dir=multirun/objectives_relaxed_$stamp"
  "$PY" benchmarks/objective_table.py "multirun/objectives_relaxed_$stamp" --out "$OUT/relaxed.json"
fi
