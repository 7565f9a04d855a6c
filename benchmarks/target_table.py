"""Targets side by side with the baselines: Recall/NDCG and list diversity of each trained target's beam search on
all test users, next to most-popular and (optionally) SASRec, as one table and one JSON file.

Each target's figures are the ones the pipeline cached when it evaluated the target (``eval/target-<key>.json`` in
its stage dir: K = ``eval.num_beams`` beam search, Recall/NDCG@n read from the top n of that list, diversity of
the top 10); nothing is decoded again. Of several cached evaluations the one over the most users (then the widest
K) is taken. Each row also names the target's training settings that tell the targets apart (epochs, seed, model)
and the training time its stage recorded.

    python benchmarks/target_table.py artifacts/target/<A> artifacts/target/<B> \
        --sasrec results/baselines/beauty_sasrec.json --out results/objectives/targets_beauty.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from atspeed_exp.pipeline import write_json_atomic

FIGURES = ("recall@5", "ndcg@5", "recall@10", "ndcg@10", "recall@20", "ndcg@20", "distinct_items@10",
           "coverage@10", "mean_popularity@10", "gini@10", "first_codes_per_list@10")


def cached_evaluation(target_dir: Path) -> dict[str, Any]:
    """The target's cached all-users evaluation with the most users (then the largest K), of its plain lists: an
    evaluation with score processors (``decoding.processors``) is another decoder's, not the target's."""
    found = []
    for path in sorted((target_dir / "eval").glob("target-*.json")):
        payload = json.loads(path.read_text())
        settings = payload.get("settings", {})
        if settings.get("processors"):
            continue
        found.append((settings.get("users", 0), settings.get("num_beams", 0), payload))
    if not found:
        raise FileNotFoundError(f"{target_dir}: no eval/target-*.json without score processors; run the pipeline on "
                                f"this target first (its target stage evaluates the target on the test users)")
    widest = max(found, key=lambda item: item[:2])
    figures = {json.dumps({k: v for k, v in payload["metrics"].items() if "walltime" not in k}, sort_keys=True)
               for *size, payload in found if size == list(widest[:2])}  # walltime: the machine's, not the lists
    if len(figures) > 1:  # e.g. two dtypes or backends: say so rather than pick one by file name
        raise ValueError(f"{target_dir}: several cached evaluations of {widest[0]} users at K={widest[1]} with "
                         f"different figures; keep the one to report in {target_dir / 'eval'}")
    return widest[2]


def target_row(target_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the target's row, the most-popular row on the same users)."""
    stage = json.loads((target_dir / "stage.json").read_text())
    settings = stage.get("settings", {})
    training = settings.get("target_training", {})
    evaluation = cached_evaluation(target_dir)
    metrics = evaluation["metrics"]
    users = int(metrics.get("eval/num_users", evaluation["settings"].get("users", 0)))
    selection = (f"best of {training.get('val_users') or 'all'} validation users by "
                 f"{training.get('val_metric', 'recall')}@{training.get('val_beams', 10)}")
    row = {"list": "target", "label": f"target, {training.get('max_epochs')} epochs, {selection}",
           "target": target_dir.name, "model": settings.get("model", {}).get("name"),
           "epochs": training.get("max_epochs"), "seed": settings.get("seed"), "users": users,
           "train_seconds": stage.get("train_seconds_this_run")}
    popular = {"list": "most_popular", "label": "most_popular", "target": None, "users": users}
    for figure in FIGURES:
        row[figure] = metrics.get(f"eval/target/{figure}")
        popular[figure] = metrics.get(f"eval/most_popular/{figure}")
    return row, popular


def sasrec_row(path: Path) -> dict[str, Any]:
    """The SASRec baseline's row from its results JSON (``baseline/sasrec/*`` metrics)."""
    metrics = json.loads(path.read_text())["metrics"]
    row = {"list": "sasrec", "label": "sasrec", "target": None, "users": int(metrics.get("baseline/sasrec/num_users", 0)) or None}
    for figure in FIGURES:
        row[figure] = metrics.get(f"baseline/sasrec/{figure}")
    return row


def markdown(rows: list[dict[str, Any]]) -> str:
    head = ["label", "seed", *FIGURES]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = []
        for key in head:
            value = row.get(key)
            cells.append("" if value is None else f"{value:.4f}" if isinstance(value, float) and value < 1
                         else f"{value:.1f}" if isinstance(value, float) else str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("targets", nargs="+", type=Path, help="target stage dirs (each holds stage.json and eval/)")
    p.add_argument("--sasrec", type=Path, help="the SASRec baseline's results JSON (results/baselines/...)")
    p.add_argument("--out", type=Path, help="also write the rows as JSON here")
    args = p.parse_args(argv)
    rows, popular = [], None
    for target_dir in args.targets:
        row, pop = target_row(target_dir)
        if popular is not None and pop["users"] != popular["users"]:
            print(f"{target_dir}: evaluated on {pop['users']} users, the first target on {popular['users']}; "
                  f"compare targets on the same users", file=sys.stderr)
            return 1
        rows.append(row)
        popular = popular or pop
    rows.append(popular)
    if args.sasrec:
        sasrec = sasrec_row(args.sasrec)
        if sasrec["users"] not in (None, popular["users"]):
            print(f"{args.sasrec}: SASRec evaluated on {sasrec['users']} users, the targets on {popular['users']}",
                  file=sys.stderr)
            return 1
        rows.append(sasrec)
    print(markdown(rows))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(args.out, {"rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
