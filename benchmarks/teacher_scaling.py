"""Teacher-data throughput on 1, 2, ... processes (docs/scale.md): for each world size W, W gloo processes (one
thread each) make the teacher data of the first N training examples together, the shards split over the ranks as in
the pipeline's teacher stage (``generate_teacher_data`` under torch.distributed). Each rank times its call between
two barriers; a row reports the slowest rank, the examples per second in all and per process, and the efficiency
against W = 1 (per-process throughput at W over that at W = 1). The shard files of every W are compared with those
of W = 1 (they are byte for byte the same by construction; ``same_files_as_w1``).

    python benchmarks/teacher_scaling.py artifacts/target/<name> --data-name beauty --examples 256 \
        --out results/scale/teacher_scaling_cpu.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from atspeed_exp import distributed
from atspeed_exp.data.atspeed_format import build_examples
from atspeed_exp.data.recdata import RecData
from atspeed_exp.data.teacher import generate_teacher_data
from atspeed_exp.models.build import load_model
from atspeed_exp.models.lean import decoder_for
from atspeed_exp.pipeline import write_json_atomic

COLUMNS = ("W", "examples", "seconds", "ex/s", "ex/s/proc", "efficiency")


def rank_main(rank: int, world: int, root: str, model_dir: str, inputs: dict, settings: dict) -> None:
    """One rank: load the target, meet the others, make its shards, time it, meet again; writes rank<r>.json."""
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{root}/rendezvous", rank=rank, world_size=world)
    try:
        target = decoder_for(load_model(Path(model_dir)).eval(), settings["backend"])
        distributed.barrier()
        start = time.perf_counter()
        generate_teacher_data(target, inputs["prompts"], inputs["trie"], Path(root) / "teacher", "scaling",
                              num_beams=settings["num_beams"], shard_size=settings["shard_size"],
                              batch_size=settings["batch_size"], pad_id=inputs["pad_id"], progress=False,
                              responses=inputs["responses"])
        seconds = time.perf_counter() - start
        distributed.barrier()
        (Path(root) / f"rank{rank}.json").write_text(json.dumps({"seconds": seconds}))
    finally:
        dist.destroy_process_group()


def file_digests(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def run_world(world: int, model_dir: Path, inputs: dict, settings: dict) -> tuple[float, dict[str, str]]:
    """(the slowest rank's seconds, sha256 of every teacher file) of one W-process run in a temporary folder."""
    with tempfile.TemporaryDirectory(prefix=f"teacher_scaling-w{world}-") as tmp:
        mp.spawn(rank_main, args=(world, tmp, str(model_dir), inputs, settings), nprocs=world, join=True)
        seconds = max(json.loads((Path(tmp) / f"rank{r}.json").read_text())["seconds"] for r in range(world))
        return seconds, file_digests(Path(tmp) / "teacher")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", type=Path, help="target stage dir (holds model/ and tokenizer/)")
    p.add_argument("--data-root", default=None, help="dataset folder (default: data/<data-name>)")
    p.add_argument("--data-name", default="beauty")
    p.add_argument("--examples", type=int, default=256, help="first N training examples (one per user)")
    p.add_argument("--world-sizes", default="1,2", help="comma-separated numbers of processes")
    p.add_argument("--num-beams", type=int, default=20, help="K_t (the teacher stage's default)")
    p.add_argument("--batch-size", type=int, default=64, help="users per beam-search call (teacher stage default)")
    p.add_argument("--shard-size", type=int, default=64,
                   help="examples per shard, the unit split over ranks (the stage's 1024 would leave one shard)")
    p.add_argument("--max-history", type=int, default=20, help="history items per example (data.max_history)")
    p.add_argument("--backend", default="auto", help="forward pass (see models.lean.decoder_for)")
    p.add_argument("--out", type=Path, help="also write the rows as JSON here")
    args = p.parse_args(argv)
    worlds = [int(w) for w in args.world_sizes.split(",")]
    data = RecData.build(args.data_root or f"data/{args.data_name}", args.data_name,
                         tokenizer_dir=args.target / "tokenizer", splits=("train",))
    examples = build_examples(data.dataset, "train", max_history=args.max_history)[: args.examples]
    encoded = data.encode(examples)
    inputs = {"prompts": encoded.prompts, "responses": encoded.responses, "trie": data.trie(), "pad_id": data.pad_id}
    settings = {"num_beams": args.num_beams, "batch_size": args.batch_size, "shard_size": args.shard_size,
                "backend": args.backend}
    rows, digests = [], {}
    for world in worlds:
        seconds, digests[world] = run_world(world, args.target / "model", inputs, settings)
        rows.append({"world_size": world, "examples": len(examples), "seconds": seconds,
                     "examples_per_s": len(examples) / seconds, "examples_per_s_per_process":
                     len(examples) / seconds / world})
    base = next((r for r in rows if r["world_size"] == 1), None)
    for row, world in zip(rows, worlds):
        row["efficiency"] = row["examples_per_s_per_process"] / base["examples_per_s_per_process"] if base else None
        row["same_files_as_w1"] = digests[world] == digests[1] if 1 in digests else None
        row["files_sha256"] = digests[world]
    shards = -(-len(examples) // args.shard_size)
    print(f"teacher data for {len(examples)} training examples of {args.data_name}, K_t = {args.num_beams}, "
          f"batch {args.batch_size}, {shards} shards of {args.shard_size}, 1 thread per process (gloo)")
    print(f"{COLUMNS[0]:>3s} {COLUMNS[1]:>8s} {COLUMNS[2]:>8s} {COLUMNS[3]:>8s} {COLUMNS[4]:>10s} {COLUMNS[5]:>10s}")
    for r in rows:
        eff = f"{r['efficiency']:10.2f}" if r["efficiency"] is not None else f"{'-':>10s}"
        print(f"{r['world_size']:3d} {r['examples']:8d} {r['seconds']:8.1f} {r['examples_per_s']:8.2f} "
              f"{r['examples_per_s_per_process']:10.2f} {eff}")
    report = {
        "target": args.target.name, "data": args.data_name,
        "settings": {**settings, "examples": len(examples), "shards": shards, "threads_per_process": 1},
        "machine": {"torch": torch.__version__, "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count()},
        "rows": rows,
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(args.out, report)
    return report


if __name__ == "__main__":
    main()
    sys.exit(0)
