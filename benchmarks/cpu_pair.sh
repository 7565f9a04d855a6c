# Sourced by run_cpu_perf.sh and run_beams_sweep.sh: the Beauty CPU pair those tables are measured with.
# pick_draft OBJECTIVE: the beauty_strict / beauty_relaxed draft (1 layer, width 128, 3 epochs) of that objective,
# chosen by its stage settings (other drafts of the same objective, a 10-epoch or a 2-layer one, may sit beside it).
pick_draft() {
  "$PY" - "$1" <<'PICK'
import glob, json, sys
objective = sys.argv[1]
matches = []
for stage in sorted(glob.glob(f"artifacts/draft/beauty-*-{objective}-*/stage.json")):
    settings = json.load(open(stage))["settings"]
    if settings["draft"]["name"] == "draft_1l_128" and settings["draft_training"]["max_epochs"] == 3:
        matches.append(stage.rsplit("/", 1)[0] + "/model")
if not matches:
    sys.exit(f"no artifacts/draft/beauty-*-{objective}-* draft with draft_1l_128 and 3 epochs: run "
             f"python run.py +experiment=beauty_{'strict' if objective == 'atspeed_s' else 'relaxed'} first")
print(matches[0])
PICK
}
# target_of DRAFT_MODEL_DIR: the draft's own target (a draft dir is named <target dir>-<teacher key>-<objective>-<key>)
target_of() { echo "artifacts/target/$(basename "$(dirname "$1")" | cut -d- -f1-2)/model"; }
