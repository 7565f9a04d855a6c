#!/usr/bin/env bash
# Mutation testing with mutmut 3, on demand (minutes to hours; not part of the test suite or CI).
#   scripts/mutation.sh                       # the [tool.mutmut] scope of pyproject.toml, from the repository root
#   scripts/mutation.sh PATH [-- TEST ...]    # one file or folder of atspeed_exp/, with its own tests
# A narrower run works in .mutation/<PATH as a name>/ (ignored by git): a pyproject.toml whose [tool.mutmut] mutates
# only PATH and selects only its tests, links to atspeed_exp/, tests/ and conf/, and mutmut's mutants/ folder. Without
# "-- TEST ...", the tests are those listed for PATH's folder below. Results are cached in mutants/: a rerun tests only
# mutants of changed functions; delete the folder to start over.
# Needs the optional extra: pip install -e ".[mutation]". Environment: MUTMUT_CHILDREN (worker processes, default 1),
# OMP_NUM_THREADS (default 1).
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$PWD"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=disabled
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
children="${MUTMUT_CHILDREN:-1}"
bin="$(dirname "$(command -v python)")"
[ -x .venv/bin/mutmut ] && bin="$repo/.venv/bin"
if [ ! -x "$bin/mutmut" ]; then
  echo "mutation: mutmut not found; install the extra: pip install -e \".[mutation]\"" >&2
  exit 2
fi

tests_for() {  # the unit tests of a part of the package
  case "$1" in
    atspeed_exp/metrics*) echo tests/test_metrics.py tests/test_streaming_metrics.py tests/test_diversity.py ;;
    atspeed_exp/losses*) echo tests/test_losses.py ;;
    atspeed_exp/decoding*)
      echo tests/test_beam_search.py tests/test_speculative.py tests/test_speculative_batched.py \
        tests/test_drafters.py tests/test_processors.py tests/test_cf_assistant.py tests/test_relaxed_official.py \
        tests/test_verify_dare.py tests/test_trigram_drafter.py tests/test_retrieval_drafter.py \
        tests/test_layer_skip.py ;;
    atspeed_exp/data*)
      echo tests/test_data_format.py tests/test_prepare.py tests/test_synthetic.py tests/test_tokenizer_prompts.py \
        tests/test_teacher.py tests/test_sid_build.py tests/test_sid_index.py tests/test_rq_vae.py \
        tests/test_text_embeddings.py ;;
    atspeed_exp/evaluation.py) echo tests/test_speculative_eval.py ;;
    *) return 1 ;;
  esac
}

workdir="$repo"
tests=()
if [ $# -gt 0 ]; then
  target="${1%/}"
  shift
  [ -e "$target" ] || { echo "mutation: no such path: $target" >&2; exit 2; }
  if [ "${1:-}" = "--" ]; then
    shift
    tests=("$@")
  else
    read -r -a tests <<< "$(tests_for "$target")" || true
  fi
  [ ${#tests[@]} -gt 0 ] || { echo "mutation: no tests known for $target; give them after --" >&2; exit 2; }
  pattern="$target"
  [ -d "$target" ] && pattern="$target/*"
  workdir="$repo/.mutation/$(echo "$target" | tr '/.' '__')"
  mkdir -p "$workdir"
  for link in atspeed_exp tests conf run.py; do ln -sfn "$repo/$link" "$workdir/$link"; done
  {
    # the repository's pyproject.toml (pytest settings) without its [tool.mutmut] table, then the narrower one
    awk '/^\[tool\.mutmut\]/ {skip = 1; next} /^\[/ {skip = 0} !skip' pyproject.toml
    printf '\n[tool.mutmut]\nsource_paths = ["atspeed_exp"]\nonly_mutate = ["%s"]\n' "$pattern"
    printf 'also_copy = ["conf", "run.py"]\npytest_add_cli_args = ["-p", "no:cacheprovider"]\n'
    printf 'pytest_add_cli_args_test_selection = [%s]\ntimeout_multiplier = 10.0\n' \
      "$(printf '"%s", ' "${tests[@]}" | sed 's/, $//')"
  } > "$workdir/pyproject.toml.new"
  # a changed scope or test list starts over (mutmut's cache would mix the two)
  if ! cmp -s "$workdir/pyproject.toml.new" "$workdir/pyproject.toml"; then rm -rf "$workdir/mutants"; fi
  mv "$workdir/pyproject.toml.new" "$workdir/pyproject.toml"
fi

cd "$workdir"
echo "mutation: mutmut in $workdir, $children worker(s)"
status=0
nice -n "${NICE:-15}" "$bin/mutmut" run --max-children "$children" || status=$?
"$bin/mutmut" results --all true > mutants/results.txt || true
# the score: killed (timeouts count as killed) over all mutants; mutants/score.json holds the counts
"$bin/python" - "${target:-[tool.mutmut] of pyproject.toml}" "${tests[@]}" <<'PY'
import collections, json, sys
from pathlib import Path

lines = Path("mutants/results.txt").read_text().splitlines()
status = dict(line.strip().rsplit(": ", 1) for line in lines if ": " in line)
count = collections.Counter(status.values())
killed = count["killed"] + count["timeout"]
other = len(status) - killed - count["survived"] - count["no tests"]
score = {"scope": sys.argv[1], "tests": sys.argv[2:], "mutants": len(status), "killed": count["killed"],
         "timeout": count["timeout"], "survived": count["survived"], "no_tests": count["no tests"], "other": other,
         "score": killed / len(status) if status else None}
Path("mutants/score.json").write_text(json.dumps(score, indent=1) + "\n")
print(f"mutation score: {killed}/{len(status)} killed ({100 * (score['score'] or 0):.1f}%), timeouts "
      f"{count['timeout']} of them; survived {count['survived']}, no tests {count['no tests']}, other {score['other']}")
for name, verdict in status.items():
    if verdict not in ("killed", "timeout"):
        print(f"  {verdict}: {name}")
PY
exit "$status"
