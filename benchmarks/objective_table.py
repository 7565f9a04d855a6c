"""The alignment-objective table: every run below the given folders (single runs or Hydra multiruns of the
pipeline), grouped by (experiment, alignment form, verification mode, K), with each hardware-independent figure of
the all-users evaluation as mean ± standard deviation over draft seeds and the widest 95% bootstrap half-width of a
single run (the user-sampling uncertainty).

    python benchmarks/objective_table.py multirun/2026-12-03/10-00-00-000000 --out results/objectives/strict.json

Prints a markdown table; with ``--out`` also writes the rows (and the runs they came from) as JSON.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from atspeed_exp.analysis import across_seeds, all_users_rows, load_summaries, markdown_table
from atspeed_exp.pipeline import write_json_atomic

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("roots", nargs="+", type=Path, help="folders holding run outputs (summary.json files)")
    parser.add_argument("--out", type=Path, help="also write the table as JSON here")
    args = parser.parse_args(argv)
    summaries = [s for root in args.roots for s in load_summaries(root)]
    runs = all_users_rows(summaries)
    if not runs:
        print(f"no all-users evaluations found below {[str(r) for r in args.roots]}", file=sys.stderr)
        return 1
    rows = across_seeds(runs)
    print(markdown_table(rows))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(args.out, {"rows": rows, "runs": runs})
    return 0


if __name__ == "__main__":
    sys.exit(main())
