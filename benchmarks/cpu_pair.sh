# Sourced by run_cpu_perf.sh and run_beams_sweep.sh: the CPU pair those tables are measured with, on the dataset
# DATA_NAME (default beauty; games, or any dataset run with the same experiment settings).
# pick_draft OBJECTIVE: the <dataset>_strict / <dataset>_relaxed draft (1 layer, width 128, 3 epochs) of that
# objective, chosen by its stage settings (other drafts of the same objective, a 10-epoch or a 2-layer one, may sit
# beside it).
DATA_NAME=${DATA_NAME:-beauty}
pick_draft() {
  "$PY" - "$1" "$DATA_NAME" <<'PICK'
import glob, json, sys
objective, dataset = sys.argv[1], sys.argv[2]
matches = []
for stage in sorted(glob.glob(f"artifacts/draft/{dataset}-*-{objective}-*/stage.json")):
    settings = json.load(open(stage))["settings"]
    if settings["draft"]["name"] == "draft_1l_128" and settings["draft_training"]["max_epochs"] == 3:
        matches.append(stage.rsplit("/", 1)[0] + "/model")
if not matches:
    sys.exit(f"no artifacts/draft/{dataset}-*-{objective}-* draft with draft_1l_128 and 3 epochs: run "
             f"python run.py +experiment={dataset}_{'strict' if objective == 'atspeed_s' else 'relaxed'} first")
print(matches[0])
PICK
}
# target_of DRAFT_MODEL_DIR: the draft's own target (a draft dir is named <target dir>-<teacher key>-<objective>-<key>)
target_of() { echo "artifacts/target/$(basename "$(dirname "$1")" | cut -d- -f1-2)/model"; }
