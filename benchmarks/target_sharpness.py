"""How peaked a target's next-code distributions are along its own beam search, for one or more targets on the same
test users: the figures behind the question whether a near-popularity target (flat distributions, many near-ties
among the top-K) makes strict top-K alignment hard.

For every test user the target's K-beam search is run with its logits recorded; at each SID level t and each of the
K final beams, the level-block distribution at that beam's context (softmax over level t's codes) gives

- ``entropy_l{t}``: its entropy in nats (mean over users and beams), and ``eff_codes_l{t}`` = exp(entropy);
- ``top1_l{t}``: the probability of its most likely code;

and per list ``score_span`` = (log-prob of item 1) - (log-prob of item K), ``mean_gap`` = that span / (K - 1): the
smaller, the closer the K items are to ties. Item-level figures need no trie: a list is the one the target ranks.

    python benchmarks/target_sharpness.py artifacts/target/<A> artifacts/target/<B> --data-name beauty \
        --out results/objectives/target_sharpness.json
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

from atspeed_exp.data.recdata import RecData
from atspeed_exp.decoding.beam_search import left_pad
from atspeed_exp.decoding.tree import tree_beam_search
from atspeed_exp.metrics.bootstrap import bootstrap_interval
from atspeed_exp.models.build import load_model
from atspeed_exp.models.lean import decoder_for
from atspeed_exp.pipeline import write_json_atomic


def sharpness(model, prompts: list[list[int]], trie, num_beams: int, pad_id: int, batch_size: int) -> dict:
    """Per-user figures (tensors over users) of ``model``'s beam search on ``prompts``."""
    per_user: dict[str, list[torch.Tensor]] = {}
    for first in range(0, len(prompts), batch_size):
        ids, mask = left_pad([torch.tensor(p, dtype=torch.long) for p in prompts[first:first + batch_size]], pad_id)
        with torch.inference_mode():
            out = tree_beam_search(model, ids, mask, trie, num_beams, record_logits=True)
        live = torch.isfinite(out.sequence_scores)  # [B, K]
        for t, logits in enumerate(out.level_logits):  # [B, K, S_t] raw block logits at each beam's context
            log_p = torch.log_softmax(logits.float(), dim=-1)
            p = log_p.exp()
            entropy = -(p * log_p).nan_to_num().sum(-1)  # [B, K]
            top1 = p.max(-1).values
            weights = live.float()
            per_user.setdefault(f"entropy_l{t}", []).append((entropy * weights).sum(-1) / weights.sum(-1))
            per_user.setdefault(f"top1_l{t}", []).append((top1 * weights).sum(-1) / weights.sum(-1))
        scores = out.sequence_scores
        span = scores[:, 0] - scores[:, -1]
        per_user.setdefault("score_span", []).append(span)
        per_user.setdefault("mean_gap", []).append(span / max(1, num_beams - 1))
    return {k: torch.cat(v) for k, v in per_user.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("targets", nargs="+", type=Path, help="target stage dirs (each holds model/ and tokenizer/)")
    p.add_argument("--data-root", default=None, help="dataset folder (default: data/<data-name>)")
    p.add_argument("--data-name", default="beauty")
    p.add_argument("--users", type=int, default=None, help="first N test users (default: all)")
    p.add_argument("--num-beams", type=int, default=10, help="K of the beam search")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples over users (95% intervals)")
    p.add_argument("--threads", type=int)
    p.add_argument("--out", type=Path, help="also write the rows as JSON here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for stage_dir in args.targets:
        data = RecData.build(args.data_root or f"data/{args.data_name}", args.data_name,
                             tokenizer_dir=stage_dir / "tokenizer", splits=("test",))
        prompts = data.splits["test"].prompts[: args.users]
        model = decoder_for(load_model(stage_dir / "model").eval(), "auto")
        figures = sharpness(model, prompts, data.trie(), args.num_beams, data.pad_id, args.batch_size)
        row: dict = {"target": stage_dir.name, "users": len(prompts), "num_beams": args.num_beams}
        for key, values in figures.items():
            row[key] = float(values.mean())
            if args.resamples:
                low, high = bootstrap_interval(values, num_resamples=args.resamples)
                row[f"{key}_ci95"] = [low, high]
        for key in [k for k in row if k.startswith("entropy_l") and not k.endswith("ci95")]:
            row["eff_codes_" + key.removeprefix("entropy_")] = math.exp(row[key])
        rows.append(row)
    keys = [k for k in rows[0] if k not in ("target", "users", "num_beams") and not k.endswith("ci95")]
    print(f"target sharpness along the K = {args.num_beams} beam search, {rows[0]['users']} test users "
          f"(means over users; entropy in nats of each level's block softmax at the final beams' contexts)")
    print("| target | " + " | ".join(keys) + " |")
    print("|---|" + "---:|" * len(keys))
    for row in rows:
        print(f"| {row['target']} | " + " | ".join(f"{row[k]:.3f}" for k in keys) + " |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(args.out, {"rows": rows, "data": args.data_name})
    return 0


if __name__ == "__main__":
    sys.exit(main())
