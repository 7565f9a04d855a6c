"""How often the SID tokens of a target's beam-search lists are ghost tokens, and whether items with ghost tokens are
over-represented in the lists (the amplification bias of D3, docs/method.md section "Score processors").

A token of an item's SID is a ghost token when

- ``forced``: its prefix has a single child in the item trie (constrained decoding leaves no choice), or
- ``peaked``: the target gives it probability >= ``--threshold`` (default 0.99) at that prefix, under the scope
  the lists were decoded with (``vocab``: softmax over the whole vocabulary; ``level``: over the level's block).

For every test user the target's K-beam search is run under each ``decoding.scope``; per SID level t the table
gives the share of the lists' tokens that are forced / peaked / either (over all K list items of all users), then
the share of list items with at least one ghost token against the same share among the users' ground-truth items
(their peaked tokens scored by the target on the ground-truth prefix) and among all catalogue items (forced only:
no context). A list share above the ground-truth share means the lists favour items with ghost tokens.

    python benchmarks/ghost_tokens.py artifacts/target/<stage> --data-name beauty --users 2000 --out ghost.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from atspeed_exp.data.recdata import RecData
from atspeed_exp.decoding.beam_search import SCOPES, causal_prefill_mask, left_pad, prompt_positions
from atspeed_exp.decoding.tree import tree_beam_search
from atspeed_exp.decoding.trie import ItemTrie


def forced_along(trie: ItemTrie, sequences: torch.Tensor) -> torch.Tensor:
    """``[..., L]`` bool: the token at level t of each SID in ``sequences`` ``[..., L]`` (token ids) follows a
    prefix with one child in the trie."""
    nodes = torch.zeros(sequences.shape[:-1], dtype=torch.long)  # the root
    forced = []
    for depth, (start, _) in enumerate(trie.level_blocks):
        forced.append(trie.global_allowed[nodes].sum(-1) == 1)
        nodes = trie.global_advance(nodes, sequences[..., depth] - start)
    return torch.stack(forced, -1)


def chosen_log_probs(level_logits: list[torch.Tensor], norm: torch.Tensor, sequences: torch.Tensor,
                     trie: ItemTrie) -> torch.Tensor:
    """``[B, K, L]`` log-prob of each beam's own token at each level, from the recorded block logits and
    normalisers (the beam search's scope)."""
    columns = []
    for depth, logits in enumerate(level_logits):
        code = sequences[..., depth] - trie.level_blocks[depth][0]
        columns.append(logits.gather(-1, code[..., None]).squeeze(-1) - norm[..., depth])
    return torch.stack(columns, -1)


def ground_truth_log_probs(model, prompts: list[list[int]], sids: torch.Tensor, trie: ItemTrie, pad_id: int,
                           scope: str) -> torch.Tensor:
    """``[B, L]`` the target's log-prob of each ground-truth SID token given the prompt and the SID's prefix, under
    ``scope``: one teacher-forced call on prompt + SID."""
    num_levels = trie.num_levels
    ids, mask = left_pad([torch.tensor(p + s, dtype=torch.long) for p, s in zip(prompts, sids.tolist())], pad_id)
    hidden, _ = model.hidden(ids, prompt_positions(mask), causal_prefill_mask(mask, model.dtype), model.new_cache())
    width = ids.shape[1]
    out = []
    for depth, (start, end) in enumerate(trie.level_blocks):
        row = hidden[:, width - num_levels - 1 + depth]  # [B, H]: the context before level `depth`'s token
        logits = model.project(row) if scope == "vocab" else model.project(row, start, end)
        offset = start if scope == "vocab" else 0
        log_p = torch.log_softmax(logits, -1)
        out.append(log_p.gather(-1, (sids[:, depth] - start + offset)[:, None]).squeeze(-1))
    return torch.stack(out, -1)


def measure(model, data: RecData, prompts: list[list[int]], sids: torch.Tensor, trie: ItemTrie, ks: list[int],
            scopes: list[str], threshold: float, batch_size: int) -> list[dict]:
    log_threshold = float(torch.log(torch.tensor(threshold)))
    gt_forced = forced_along(trie, sids)  # [U, L]
    rows = []
    for scope in scopes:
        gt_peaked = []
        for first in range(0, len(prompts), batch_size):
            with torch.inference_mode():
                gt_peaked.append(ground_truth_log_probs(model, prompts[first:first + batch_size],
                                                        sids[first:first + batch_size], trie, data.pad_id, scope)
                                 >= log_threshold)
        gt_ghost = gt_forced | torch.cat(gt_peaked)
        for k in ks:
            forced, peaked, live = [], [], []
            for first in range(0, len(prompts), batch_size):
                ids, mask = left_pad([torch.tensor(p, dtype=torch.long) for p in prompts[first:first + batch_size]],
                                     data.pad_id)
                with torch.inference_mode():
                    out = tree_beam_search(model, ids, mask, trie, k, scope=scope, record_logits=True)
                forced.append(forced_along(trie, out.sequences))
                peaked.append(chosen_log_probs(out.level_logits, out.full_logsumexp, out.sequences, trie)
                              >= log_threshold)
                live.append(torch.isfinite(out.sequence_scores))
            forced_t, peaked_t, live_t = torch.cat(forced), torch.cat(peaked), torch.cat(live)  # [U, K, L], [U, K]
            ghost = forced_t | peaked_t
            weight = live_t[..., None].float()
            row: dict = {"scope": scope, "k": k, "users": len(prompts)}
            for depth in range(trie.num_levels):
                denom = float(weight.sum())
                row[f"forced_l{depth}"] = float((forced_t[..., depth] * weight[..., 0]).sum()) / denom
                row[f"peaked_l{depth}"] = float((peaked_t[..., depth] * weight[..., 0]).sum()) / denom
                row[f"ghost_l{depth}"] = float((ghost[..., depth] * weight[..., 0]).sum()) / denom
            any_ghost = ghost.any(-1)  # [U, K]
            row["list_items_with_ghost"] = float((any_ghost & live_t).sum()) / float(live_t.sum())
            row["list_items_with_forced"] = float((forced_t.any(-1) & live_t).sum()) / float(live_t.sum())
            row["gt_items_with_ghost"] = float(gt_ghost.any(-1).float().mean())
            row["gt_items_with_forced"] = float(gt_forced.any(-1).float().mean())
            rows.append(row)
    return rows


def catalogue_forced_share(trie: ItemTrie) -> float:
    """Share of the catalogue's distinct SIDs with at least one trie-forced token."""
    leaves = torch.tensor([
        [s + c for (s, _), c in zip(trie.level_blocks, codes)] for codes in _leaf_codes(trie)
    ], dtype=torch.long)
    return float(forced_along(trie, leaves).any(-1).float().mean())


def _leaf_codes(trie: ItemTrie) -> list[list[int]]:
    """Every root-to-leaf path of the trie as local codes (a walk over the trie's global tables, once)."""
    paths = [([], 0)]
    for _ in range(trie.num_levels):
        nodes = torch.tensor([node for _, node in paths], dtype=torch.long)
        allowed = trie.global_allowed[nodes]  # [n, S]
        child = trie.global_child[nodes]
        rows, codes = allowed.nonzero(as_tuple=True)
        paths = [(paths[r][0] + [c], int(child[r, c])) for r, c in zip(rows.tolist(), codes.tolist())]
    return [codes for codes, _ in paths]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", type=Path, help="target stage dir (holds model/ and tokenizer/)")
    p.add_argument("--data-root", default=None, help="dataset folder (default: data/<data-name>)")
    p.add_argument("--data-name", default="beauty")
    p.add_argument("--users", type=int, default=None, help="first N test users (default: all)")
    p.add_argument("--ks", type=int, nargs="+", default=[10, 20])
    p.add_argument("--scopes", nargs="+", default=list(SCOPES), choices=SCOPES)
    p.add_argument("--threshold", type=float, default=0.99, help="a token with probability >= this is a ghost")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int)
    p.add_argument("--out", type=Path, help="also write the rows as JSON here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from atspeed_exp.models.build import load_model  # transformers only here, after argument parsing
    from atspeed_exp.models.lean import decoder_for
    from atspeed_exp.pipeline import write_json_atomic

    start = time.perf_counter()
    data = RecData.build(args.data_root or f"data/{args.data_name}", args.data_name,
                         tokenizer_dir=args.target / "tokenizer", splits=("test",))
    split = data.splits["test"]
    prompts = split.prompts[: args.users]
    trie = data.trie()
    sids = torch.tensor([response[: trie.num_levels] for response in split.responses[: args.users]], dtype=torch.long)
    model = decoder_for(load_model(args.target / "model").eval(), "auto")
    rows = measure(model, data, prompts, sids, trie, args.ks, args.scopes, args.threshold, args.batch_size)
    catalogue = catalogue_forced_share(trie)
    levels = range(trie.num_levels)
    print(f"ghost tokens in the target's beam-search lists: {args.target.name}, {len(prompts)} test users, "
          f"ghost = trie-forced or p >= {args.threshold}; catalogue SIDs with a forced token: {catalogue:.3f}")
    header = (["scope", "K"] + [f"forced/peaked/ghost l{t}" for t in levels]
              + ["list items with ghost", "GT items with ghost", "list items with forced", "GT items with forced"])
    print("| " + " | ".join(header) + " |")
    print("|---|---:|" + "---:|" * (len(header) - 2))
    for row in rows:
        cells = [row["scope"], str(row["k"])]
        cells += [f"{row[f'forced_l{t}']:.3f}/{row[f'peaked_l{t}']:.3f}/{row[f'ghost_l{t}']:.3f}" for t in levels]
        cells += [f"{row[key]:.3f}" for key in ("list_items_with_ghost", "gt_items_with_ghost",
                                                "list_items_with_forced", "gt_items_with_forced")]
        print("| " + " | ".join(cells) + " |")
    print(f"({time.perf_counter() - start:.0f} s)")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(args.out, {"target": args.target.name, "data": args.data_name, "threshold": args.threshold,
                                     "catalogue_sids_with_forced": catalogue, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
