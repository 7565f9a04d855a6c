"""Does strict-verification acceptance depend on how peaked the target is, and does that change which alignment
objective wins? One target, several drafts of it, every test user: users are split into equal-sized strata by the
target's sharpness (``--by``, a per-user figure of ``target_sharpness.sharpness``: by default the entropy of the
first SID level's distribution, the flattest level), and within each stratum every draft's strict speculative beam
search gives target calls per list and acceptance (accepted / drafted steps), with 95% bootstrap intervals over the
stratum's users.

If flat target distributions were what holds an objective back, its gap to the others should shrink (or turn) in the
sharp strata. Strict lists equal beam search's, so only calls and acceptance are reported.

    python benchmarks/sharpness_strata.py artifacts/target/<T> --draft atspeed_s_public=artifacts/draft/<A> \
        --draft seqkd_public=artifacts/draft/<B> --num-beams 10 --out results/objectives/sharpness_strata.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from atspeed_exp.data.recdata import RecData
from atspeed_exp.evaluation import generate_lists
from atspeed_exp.metrics.bootstrap import bootstrap_interval
from atspeed_exp.models.build import load_model
from atspeed_exp.models.lean import decoder_for
from atspeed_exp.pipeline import write_json_atomic

sys.path.insert(0, str(Path(__file__).resolve().parent))
from target_sharpness import sharpness  # noqa: E402


def strata(values: torch.Tensor, bins: int) -> torch.Tensor:
    """Stratum index [U] in 0..bins-1 by rank of ``values`` (ties broken by user order), equal sizes up to one."""
    order = torch.argsort(values, stable=True)
    index = torch.empty_like(order)
    index[order] = torch.arange(values.numel()) * bins // values.numel()
    return index


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", type=Path, help="target stage dir (holds model/ and tokenizer/)")
    p.add_argument("--draft", action="append", required=True, metavar="NAME=DIR",
                   help="a draft stage dir (holds model/) and its label; repeat for several")
    p.add_argument("--data-root", default=None, help="dataset folder (default: data/<data-name>)")
    p.add_argument("--data-name", default="beauty")
    p.add_argument("--users", type=int, default=None, help="first N test users (default: all)")
    p.add_argument("--num-beams", type=int, default=10, help="K")
    p.add_argument("--draft-beams", type=int, default=40, help="N")
    p.add_argument("--gamma", type=int, default=3)
    p.add_argument("--by", default="entropy_l0", help="per-user sharpness figure that defines the strata")
    p.add_argument("--bins", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--resamples", type=int, default=1000)
    p.add_argument("--threads", type=int)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    drafts = {}
    for spec in args.draft:
        name, sep, path = spec.partition("=")
        if not sep or not Path(path, "model").is_dir():
            p.error(f"--draft {spec!r}: expected NAME=DIR where DIR/model is a saved draft")
        drafts[name] = Path(path)
    data = RecData.build(args.data_root or f"data/{args.data_name}", args.data_name,
                         tokenizer_dir=args.target / "tokenizer", splits=("test",))
    prompts = data.splits["test"].prompts[: args.users]
    trie = data.trie()
    target = decoder_for(load_model(args.target / "model").eval(), "auto")
    with torch.inference_mode():
        figures = sharpness(target, prompts, trie, args.num_beams, data.pad_id, args.batch_size)
    if args.by not in figures:
        p.error(f"--by {args.by!r}: expected one of {sorted(figures)}")
    stratum = strata(figures[args.by], args.bins)
    rows = []
    for name, draft_dir in drafts.items():
        draft = decoder_for(load_model(draft_dir / "model").eval(), "auto")
        with torch.inference_mode():
            lists = generate_lists(target, prompts, trie, args.num_beams, data.pad_id, batch_size=args.batch_size,
                                   progress=False, draft=draft, draft_beams=args.draft_beams, gamma=args.gamma,
                                   mode="strict")
        calls, drafted, accepted = (t.double() for t in (lists.target_calls, lists.drafted_steps,
                                                         lists.accepted_steps))
        for b in range(args.bins):
            sel = stratum == b
            by_values = figures[args.by][sel]
            row = {"draft": name, "stratum": b, "users": int(sel.sum()),
                   f"{args.by}_min": float(by_values.min()), f"{args.by}_max": float(by_values.max()),
                   "target_calls_per_list": float(calls[sel].mean()),
                   "target_calls_ci95": list(bootstrap_interval(calls[sel], num_resamples=args.resamples)),
                   "acceptance_rate": float(accepted[sel].sum() / drafted[sel].sum().clamp(min=1)),
                   "acceptance_ci95": list(bootstrap_interval(accepted[sel], drafted[sel],
                                                              num_resamples=args.resamples))}
            rows.append(row)
    print(f"strict SD, K = {args.num_beams}, N = {args.draft_beams}, gamma = {args.gamma}, {len(prompts)} test "
          f"users in {args.bins} strata by the target's {args.by} (stratum 0 = sharpest)")
    print(f"| draft | stratum | users | {args.by} range | target calls / list [95% CI] | acceptance [95% CI] |")
    print("|---|---:|---:|---|---|---|")
    for r in rows:
        lo, hi = r["target_calls_ci95"]
        alo, ahi = r["acceptance_ci95"]
        print(f"| {r['draft']} | {r['stratum']} | {r['users']} | {r[args.by + '_min']:.2f}-{r[args.by + '_max']:.2f} "
              f"| {r['target_calls_per_list']:.2f} [{lo:.2f}, {hi:.2f}] "
              f"| {r['acceptance_rate']:.3f} [{alo:.3f}, {ahi:.3f}] |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(args.out, {"target": args.target.name, "by": args.by, "bins": args.bins,
                                     "num_beams": args.num_beams, "draft_beams": args.draft_beams,
                                     "gamma": args.gamma, "users": len(prompts),
                                     "drafts": {k: str(v) for k, v in drafts.items()}, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
