"""Which of a target's saved checkpoints is best on ALL validation users? The target stage keeps its best epoch by
Recall@K on a validation subset (``target_training.val_users``); with 500 users one hit moves Recall@10 by 0.002,
so that choice can be noise. This script scores every checkpoint in a target stage's ``checkpoints/`` (best.ckpt,
last.ckpt, or the files named) by beam search on every validation user, with 95% bootstrap intervals over users and
the paired difference to the selected one, picks one by a validation figure (``--select``, default NDCG@10), and
reports every checkpoint's test figures beside it (Recall/NDCG and the diversity of the top 10). The selection uses
validation users only; the test columns are there to read, not to choose by.

    python benchmarks/checkpoint_selection.py artifacts/target/<T> --out results/objectives/target_checkpoints.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from atspeed_exp.data.recdata import RecData
from atspeed_exp.evaluation import generate_lists
from atspeed_exp.metrics.bootstrap import bootstrap_interval
from atspeed_exp.metrics.ranking import pad_ground_truth, recall_ndcg_per_user
from atspeed_exp.models.build import load_model
from atspeed_exp.models.lean import decoder_for
from atspeed_exp.pipeline import write_json_atomic
from atspeed_exp.reporting import dataset_list_report

CUTOFFS = (5, 10)


def load_checkpoint(model: torch.nn.Module, path: Path) -> dict[str, Any]:
    """Put a target-stage Lightning checkpoint's weights (``model.*`` keys) into ``model``; returns its epoch and
    step. Raises ValueError naming the file when its keys do not match the model."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if "state_dict" not in checkpoint:
        raise ValueError(f"{path}: not a Lightning checkpoint (no state_dict)")
    weights = {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not fit the stage's model (missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]})")
    return {"epoch": int(checkpoint.get("epoch", -1)) + 1, "global_step": int(checkpoint.get("global_step", -1))}


def per_user(items: torch.Tensor, truth: list) -> dict[str, torch.Tensor]:
    return recall_ndcg_per_user(items, pad_ground_truth(truth), CUTOFFS)


def summarise(values: dict[str, torch.Tensor], resamples: int) -> dict[str, float]:
    out = {}
    for name, v in values.items():
        lo, hi = bootstrap_interval(v, num_resamples=resamples)
        out[name], out[f"{name}_lo95"], out[f"{name}_hi95"] = float(v.mean()), lo, hi
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", type=Path, help="target stage dir (stage.json, model/, tokenizer/, checkpoints/)")
    p.add_argument("--checkpoint", action="append", type=Path,
                   help="checkpoint files to compare (default: every *.ckpt in the stage's checkpoints/)")
    p.add_argument("--select", default="ndcg@10", choices=[f"{m}@{n}" for m in ("recall", "ndcg") for n in CUTOFFS],
                   help="validation figure that picks the checkpoint")
    p.add_argument("--num-beams", type=int, default=10, help="K of the beam search")
    p.add_argument("--users", type=int, default=None, help="first N users of each split (default: all)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--resamples", type=int, default=1000)
    p.add_argument("--threads", type=int)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    stage_file = args.target / "stage.json"
    if not stage_file.is_file():
        p.error(f"{args.target}: no stage.json; expected a finished target stage dir")
    checkpoints = args.checkpoint or sorted((args.target / "checkpoints").glob("*.ckpt"))
    if not checkpoints:
        p.error(f"{args.target / 'checkpoints'}: no *.ckpt to compare")
    for path in checkpoints:
        if not path.is_file():
            p.error(f"--checkpoint {path}: no such file")
    data_settings = json.loads(stage_file.read_text())["settings"]["data"]
    data = RecData.build(data_settings["root"], data_settings["name"], index_file=data_settings.get("index_file"),
                         prompt_format=data_settings.get("prompt_format", "compact"),
                         max_history=data_settings.get("max_history", 20), tokenizer_dir=args.target / "tokenizer",
                         splits=("valid", "test"))
    trie = data.trie()
    model = load_model(args.target / "model").eval()
    rows, val_values = [], {}
    for path in checkpoints:
        row: dict[str, Any] = {"checkpoint": path.name, **load_checkpoint(model, path)}
        decoder = decoder_for(model, "auto")
        for split in ("valid", "test"):
            prompts = data.splits[split].prompts[: args.users]
            truth = data.splits[split].ground_truth()[: args.users]
            with torch.inference_mode():
                lists = generate_lists(decoder, prompts, trie, args.num_beams, data.pad_id,
                                       batch_size=args.batch_size, desc=f"{path.name} {split}")
            values = per_user(lists.items, truth)
            prefix = "val" if split == "valid" else "test"
            row.update({f"{prefix}/{k}": v for k, v in summarise(values, args.resamples).items()})
            row[f"{prefix}/users"] = len(prompts)
            if split == "valid":
                val_values[path.name] = values
            else:
                report = dataset_list_report(data.dataset, lists.items, truth, CUTOFFS)
                row["test/distinct_items@10"] = int(report["distinct_items@10"])
                row["test/mean_popularity@10"] = float(report["mean_popularity@10"])
        rows.append(row)
        print(f"{path.name}: epoch {row['epoch']}, val {args.select} {row[f'val/{args.select}']:.4f}, "
              f"test recall@10 {row['test/recall@10']:.4f}", flush=True)
    chosen = max(rows, key=lambda r: r[f"val/{args.select}"])
    for row in rows:  # paired over the same validation users: is the choice clear of each other checkpoint?
        diff = val_values[chosen["checkpoint"]][args.select] - val_values[row["checkpoint"]][args.select]
        lo, hi = bootstrap_interval(diff, num_resamples=args.resamples)
        row["selected"] = row is chosen
        row[f"val/{args.select}_selected_minus_this"] = float(diff.mean())
        row[f"val/{args.select}_selected_minus_this_lo95"], row[f"val/{args.select}_selected_minus_this_hi95"] = lo, hi
    head = ["checkpoint", "epoch", f"val/{args.select}", "val/recall@10", "test/recall@10", "test/ndcg@10",
            "test/distinct_items@10", "selected"]
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for row in rows:
        print("| " + " | ".join(f"{row[h]:.4f}" if isinstance(row[h], float) else str(row[h]) for h in head) + " |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(args.out, {"target": args.target.name, "select": f"val/{args.select}",
                                     "num_beams": args.num_beams, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
