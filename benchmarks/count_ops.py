"""Tensor operations per list, by where they run: the target's forwards, the draft's forwards, and the search around
them (selection, tree masks, acceptance, cache pruning). Counted at the aten dispatcher, so the numbers do not
depend on the device: on a GPU at batch 1 every counted op is a kernel launch (~5-10 us of host time each, more
than the arithmetic of a small model), which is why they predict the speedup there better than CPU walltimes do.

Counted: aten ops that compute or copy ("kernel ops"). Not counted as kernels: views (reshape, expand, slicing, ...)
and allocations (empty*), which launch nothing; host syncs (a tensor read on the host: ``.item()``, ``.tolist()``,
``bool(t)``) are counted on their own. On a CPU run the engine's few host-side tensors (per-user depths and counters,
a handful of ops per round) count as kernels too.

Takes the models, data and decoding options of ``bench_decoding.py`` (same flags; ``--ks``, ``--gamma``,
``--verify-beams``, ``--methods``, ``--users``; timing options are ignored; ``--cache-edits stacked`` counts the
lean forward's CUDA cache edits on a CPU) and prints, per K, one row per method:

    python benchmarks/count_ops.py --target-dir artifacts/target/beauty-*/model \\
        --draft-dir 'artifacts/draft/beauty-*-atspeed_s-*/model' --methods beam_tree,sd_strict --ks 10 --gamma 3

For a deep target (the GPU setting) the forward counts scale with its layers: ``--target-config
conf/model/NAME.yaml`` counts them for a model of that shape without training it (its acceptance is not the
trained model's, so read the per-call columns, not the totals, for such runs).
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from atspeed_exp.pipeline import write_json_atomic

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_decoding  # noqa: E402  (the sibling script: same setup, same runners)
from perf_tables import ops_table  # noqa: E402

PARTS = ("target", "draft", "search")
# ops that launch no kernel: tensor metadata and memory from the caching allocator
NO_KERNEL = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "lift_fresh", "alias",
             "detach"}
HOST_SYNC = {"_local_scalar_dense", "item", "is_nonzero", "equal"}  # ops that return a Python value


class OpCounter(TorchDispatchMode):
    """Counts aten ops per part (``part`` is set by ``inside``) as kernels, views or host syncs."""

    def __init__(self) -> None:
        super().__init__()
        self.part = "search"
        self.counts: collections.Counter[tuple[str, str]] = collections.Counter()
        self.names: dict[str, collections.Counter[str]] = {part: collections.Counter() for part in PARTS}

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        name = func.overloadpacket.__name__
        if name in HOST_SYNC:
            kind = "sync"
        elif func.is_view or name in NO_KERNEL:
            kind = "view"
        else:
            kind = "kernel"
            self.names[self.part][name] += 1
        self.counts[(self.part, kind)] += 1
        return func(*args, **(kwargs or {}))

    @contextmanager
    def inside(self, part: str) -> Iterator[None]:
        outer, self.part = self.part, part
        try:
            yield
        finally:
            self.part = outer


def attribute_forwards(model: Any, counter: OpCounter, part: str) -> None:
    """Count ``model``'s forward calls (``hidden``: the layers) under ``part``; ``project`` (the output head on the
    rows selection needs) stays with the search, which decides how many rows it projects."""
    hidden = model.hidden

    def counted(*args: Any, **kwargs: Any) -> Any:
        with counter.inside(part):
            return hidden(*args, **kwargs)

    model.hidden = counted


def parse_args(argv: list[str] | None) -> tuple[Any, str]:
    """bench_decoding's arguments, plus ``--cache-edits``: how the lean forward reorders and prunes its cache
    (auto: one indexing of all layers on CUDA, per layer on the CPU; ``stacked`` counts the CUDA path on a CPU)."""
    extra = argparse.ArgumentParser(add_help=False)
    extra.add_argument("--cache-edits", choices=["auto", "stacked", "per-layer"], default="auto")
    own, rest = extra.parse_known_args(argv)
    return bench_decoding.parse_args(rest), own.cache_edits


def count(argv: list[str] | None = None) -> dict[str, Any]:
    argv = argv if argv is not None else sys.argv[1:]
    args, cache_edits = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    counter = OpCounter()
    report: dict[str, Any] = {"argv": argv, "json_out": args.json_out, "rows": []}
    with tempfile.TemporaryDirectory(prefix="count_ops-") as tmp:
        setup = bench_decoding.build_setup(args, Path(tmp))
        report["header"] = bench_decoding.header(setup, args)
        report["header"]["cache_edits"] = cache_edits
        for model in (setup.target, setup.draft):
            if cache_edits != "auto" and hasattr(model, "stack_cache_edits"):  # the lean forward
                model.stack_cache_edits = cache_edits == "stacked"
        attribute_forwards(setup.target, counter, "target")
        if setup.draft is not None and setup.draft is not setup.target:
            attribute_forwards(setup.draft, counter, "draft")
        for drafter in setup.drafters.values():  # a drafter running a model of its own (layer_skip: a view)
            view = getattr(drafter, "model", None) if getattr(drafter, "runs_model", False) else None
            if view is not None and view is not setup.target and view is not setup.draft:
                attribute_forwards(view, counter, "draft")
        for k in args.ks:
            runners, _ = bench_decoding.make_runners(setup, args, k)  # not the CUDA phase-profile runs
            for name, run in runners.items():
                for user in range(min(args.warmup, len(setup.prompts))):
                    run(user)  # first calls build lazy state (kernels, caches) that later lists do not pay for
                counter.counts.clear()
                calls = collections.Counter()
                for user in range(len(setup.prompts)):
                    with counter:
                        result = run(user)
                    calls["target"] += result.target_calls
                    calls["draft"] += result.draft_calls
                lists = len(setup.prompts)
                row = {"k": k, "gamma": args.gamma, "draft_beams": args.draft_beams, "method": name,
                       "lists": lists, "target_calls": calls["target"] / lists, "draft_calls": calls["draft"] / lists}
                for part in PARTS:
                    for kind in ("kernel", "view", "sync"):
                        row[f"{part}_{kind}"] = counter.counts[(part, kind)] / lists
                row["kernel_total"] = sum(row[f"{part}_kernel"] for part in PARTS)
                row["target_kernels_per_call"] = row["target_kernel"] / max(row["target_calls"], 1e-9)
                row["draft_kernels_per_call"] = row["draft_kernel"] / max(row["draft_calls"], 1e-9)
                row["top_search_ops"] = {n: c / lists for n, c in counter.names["search"].most_common(12)}
                for part in PARTS:
                    counter.names[part].clear()
                report["rows"].append(row)
    return report


def main(argv: list[str] | None = None) -> dict[str, Any]:
    report = count(argv)
    print("count_ops: aten ops per list (kernels: ops that compute or copy; views and allocations apart)")
    print("\n".join(bench_decoding.format_header(report["header"]).splitlines()[1:6]))  # device .. decoding settings
    print(f"cache edits: {report['header']['cache_edits']}")
    print(ops_table(report["rows"]), flush=True)
    if report["json_out"]:
        write_json_atomic(Path(report["json_out"]), report)
    return report


if __name__ == "__main__":
    main()
