"""Teacher-data generation time: target-only tree beam search against strict speculative beam search with a draft
(``generate_teacher_data(..., draft=...)``), on the same training examples, in one process; checks that both wrote
the same data (fp16 storage tolerance) and prints one table.

    python benchmarks/bench_teacher.py --target-dir artifacts/target/<name>/model \
        --draft-dir artifacts/draft/<name>/model --examples 2048
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from atspeed_exp.data.atspeed_format import build_examples
from atspeed_exp.data.recdata import RecData
from atspeed_exp.data.teacher import generate_teacher_data, load_teacher_data
from atspeed_exp.models.lean import BACKENDS, decoder_for
from atspeed_exp.models.build import load_model


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target-dir", required=True, help="saved target model dir (its ../tokenizer is used)")
    p.add_argument("--draft-dir", required=True, help="saved draft model dir")
    p.add_argument("--data-root", default=None, help="dataset folder (default: data/<data-name>)")
    p.add_argument("--data-name", default="beauty")
    p.add_argument("--examples", type=int, default=2048, help="first N training users")
    p.add_argument("--num-beams", type=int, default=20, help="K_t")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--draft-beams", type=int, default=40)
    p.add_argument("--gamma", type=int, default=1)
    p.add_argument("--threads", type=int)
    p.add_argument("--backend", default="auto", choices=list(BACKENDS), help="forward pass (see decoder_for)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    target_dir = Path(args.target_dir)
    data = RecData.build(args.data_root or f"data/{args.data_name}", args.data_name,
                         tokenizer_dir=target_dir.parent / "tokenizer",
                         splits=("train",))
    examples = build_examples(data.dataset, "train", sliding_window=False)[: args.examples]
    encoded = data.encode(examples)
    target = decoder_for(load_model(target_dir).eval(), args.backend)
    draft = decoder_for(load_model(Path(args.draft_dir)).eval(), args.backend)
    trie = data.trie()
    rows, stores = [], {}
    with tempfile.TemporaryDirectory(prefix="bench_teacher-") as tmp:
        for name, with_draft in (("tree_beam_search", None), ("speculative (strict)", draft)):
            start = time.perf_counter()
            generate_teacher_data(target, encoded.prompts, trie, Path(tmp) / name.split()[0], "bench", args.num_beams,
                                  shard_size=args.examples, batch_size=args.batch_size, pad_id=data.pad_id,
                                  progress=False, draft=with_draft, draft_beams=args.draft_beams, gamma=args.gamma)
            elapsed = time.perf_counter() - start
            stores[name] = load_teacher_data(Path(tmp) / name.split()[0])
            rows.append({"method": name, "examples": len(examples), "seconds": elapsed,
                         "examples_per_s": len(examples) / elapsed})
        plain, sd = stores.values()
        same = all(torch.allclose(sd.tensors[k].float(), v.float(), atol=2e-2, rtol=1e-3)
                   for k, v in plain.tensors.items() if k != "sequences")
        same_beams = float((sd.tensors["sequences"] == plain.tensors["sequences"]).all(-1).all(-1).float().mean())
    base = rows[0]["seconds"]
    print(f"teacher data for {len(examples)} training users, K_t = {args.num_beams}, batch {args.batch_size}, "
          f"N = {args.draft_beams}, gamma = {args.gamma}, threads {torch.get_num_threads()}")
    print(f"{'method':22s} {'examples':>8s} {'seconds':>8s} {'ex/s':>8s} {'speedup':>8s}")
    for r in rows:
        print(f"{r['method']:22s} {r['examples']:8d} {r['seconds']:8.1f} {r['examples_per_s']:8.1f} "
              f"{base / r['seconds']:8.2f}")
    print(f"users whose K_t beams are identical: {same_beams:.4f}; every stored tensor within fp16 tolerance: "
          f"{same}")
    return rows


if __name__ == "__main__":
    main()
