"""Tune the weight g of the cf_assistant score processor (D3's text-free assistant) on validation users: beam
search of the target with SASRec's item probabilities mixed in, Recall@K for each g of a grid, and the best g
(ties go to the larger g). Pass the best as ``decoding.cf_weight``.

    python benchmarks/tune_cf_weight.py artifacts/target/<T> artifacts/sasrec/<S> --data-name beauty \
        --weights 0 0.2 0.4 0.6 0.8 1 --k 10 --users 2000
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from atspeed_exp.baselines import SASRecItemProbabilities, load_sasrec
from atspeed_exp.data.recdata import RecData
from atspeed_exp.evaluation import tune_cf_weight
from atspeed_exp.models.build import load_model
from atspeed_exp.models.lean import decoder_for
from atspeed_exp.pipeline import write_json_atomic


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", type=Path, help="target stage dir (holds model/ and tokenizer/)")
    p.add_argument("sasrec", type=Path, help="sasrec stage dir (holds model.pt and model.json)")
    p.add_argument("--data-root", default=None, help="dataset folder (default: data/<data-name>)")
    p.add_argument("--data-name", default="beauty")
    p.add_argument("--weights", type=float, nargs="+", default=[0.0, 0.2, 0.4, 0.5, 0.6, 0.8, 1.0],
                   help="the grid of g in [0, 1]")
    p.add_argument("--k", type=int, default=10, help="K of the beam search and of Recall@K")
    p.add_argument("--users", type=int, default=None, help="first N validation users (default: all)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--scope", default="vocab", help="normaliser of the target's level log-probs: vocab | level")
    p.add_argument("--epsilon", type=float, default=1e-8, help="floor of SASRec's step probability")
    p.add_argument("--threads", type=int)
    p.add_argument("--out", type=Path, help="also write the grid and the best g as JSON here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    data = RecData.build(args.data_root or f"data/{args.data_name}", args.data_name,
                         tokenizer_dir=args.target / "tokenizer", splits=("valid",))
    valid = data.splits["valid"]
    users = min(args.users or len(valid), len(valid))
    model = decoder_for(load_model(args.target / "model").eval(), "auto")
    source = SASRecItemProbabilities(load_sasrec(args.sasrec))
    best, recall = tune_cf_weight(model, valid.prompts[:users], valid.ground_truth()[:users], data.trie(), source,
                                  args.weights, args.k, data.pad_id, batch_size=args.batch_size, scope=args.scope,
                                  epsilon=args.epsilon)
    print(f"cf_weight on {users} validation users (target {args.target.name}, sasrec {args.sasrec.name})")
    print(f"{'g':>6}  recall@{args.k}")
    for weight, value in recall.items():
        print(f"{weight:6.2f}  {value:.4f}{'  <- best' if weight == best else ''}")
    if args.out:
        write_json_atomic(args.out, {"target": args.target.name, "sasrec": args.sasrec.name, "users": users,
                                     "k": args.k, "recall": {str(g): r for g, r in recall.items()}, "best": best})
    return 0


if __name__ == "__main__":
    sys.exit(main())
