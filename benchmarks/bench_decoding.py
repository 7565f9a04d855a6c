"""Side-by-side walltime of top-K item decoding, batch 1, in ONE process on the SAME users with the SAME models:

- ``beam_tree``: our best target-only trie-constrained beam search (KV cache, one prefill, ONE cache row per user
  with the K beams' tokens appended under tree attention: no cache copies); the baseline of every speedup;
- ``beam``: the same search keeping K reordered cache rows per user (the classic layout, as transformers does);
- ``hf_generate``: transformers ``generate(num_beams=K)`` with the trie as ``prefix_allowed_tokens_fn``;
- ``sd_strict`` / ``sd_relaxed`` / ``sd_relaxed_exact`` / ``sd_relaxed_official`` / ``sd_dare``: speculative beam
  search (draft N beams, gamma steps; strict, the project's relaxed, the exact draw-by-draw relaxed verification, the
  public code's relaxed form with its default top-k = 50 warper, or DARE's top-k and threshold rule).

Drafters (``--drafter``, comma-separated): ``model`` (the draft model of ``--draft*``), and the model-free
``retrieval`` (pools) and ``trigram`` / ``trigram_puct`` (tri-gram counts; plain top-N or PUCT tree), built from the
dataset's training split before anything is timed, with the settings of conf/decoding/default.yaml (the tri-gram's
overridable by ``--trigram-*``), and ``layer_skip``: the target itself with the sublayers of ``--skip-attention`` /
``--skip-mlp`` skipped (the lean forward only; a layer-skip stage's searched set, or any set for a shape). Every SD method runs with every drafter; rows of a drafter other than ``model`` carry
its name (``sd_strict_trigram``). A drafter that learns from the target (``trigram``, ``adapt`` not ``none``) starts
each method's pass at each K, after the warm-up lists, with nothing learned.

For each K, each user runs the methods back to back (user u: beam, beam_tree, hf_generate, sd_*; then user
u + 1), so slow drifts of a shared machine hit every method alike. ``--warmup`` lists per K run first and are not
recorded; ``--repeats R`` runs each list R times and keeps the median. While running it checks that every sd_strict
list equals the beam-search list (a mismatch is a bug: it prints a loud warning) and counts hf_generate lists whose
SIDs differ from ours. Per K it prints one table row per method: walltime per list (median, p90), speedup over
``beam_tree`` (ratio of totals and mean of per-list ratios, the paper's form), calls and tokens per list of each model,
acceptance, and SD's per-phase profile. Run ``python benchmarks/bench_decoding.py --help``; see benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import logging
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from peft import PeftModel

from atspeed_exp.data.recdata import RecData
from atspeed_exp.data.synthetic import ensure_synthetic_dataset
from atspeed_exp.decoding.beam_search import beam_search, left_pad
from atspeed_exp.decoding.drafters import (
    Drafter,
    RetrievalDrafter,
    TrigramDrafter,
    build_retrieval_pools,
    build_trigram_counts,
)
from atspeed_exp.decoding.drafters.layer_skip import LayerSkipDrafter
from atspeed_exp.decoding.drafters.trigram import ADAPT_SCOPES
from atspeed_exp.decoding.speculative import speculative_beam_search
from atspeed_exp.decoding.tree import tree_beam_search
from atspeed_exp.decoding.trie import ItemTrie
from atspeed_exp.models.adapter import HFDecoderLM
from atspeed_exp.models.lean import BACKENDS, LeanLlamaLM, decoder_for
from atspeed_exp.models.build import DTYPES, count_parameters, load_model, merge_lora
from atspeed_exp.evaluation import fresh
from atspeed_exp.pipeline import training_sid_histories, write_json_atomic

log = logging.getLogger("bench_decoding")

METHODS = ("beam", "beam_tree", "hf_generate", "sd_strict", "sd_relaxed", "sd_relaxed_exact", "sd_relaxed_official",
           "sd_dare")
BASELINE = "beam_tree"  # our best target-only beam search (one cache row per user, tree attention)
DRAFTERS = ("model", "retrieval", "trigram", "trigram_puct", "layer_skip")
DECODING_CONF = Path(__file__).resolve().parents[1] / "conf" / "decoding" / "default.yaml"  # model-free defaults
COLUMNS = (
    "method", "lists", "median_ms", "p90_ms", "speedup_tot", "speedup_mean", "tgt_calls", "drf_calls",
    "tgt_tokens", "drf_tokens", "accept_rate", "acc_steps/round", "draft_ms", "verify_ms", "accept_ms", "other_ms",
    "mismatch",
)


# -- command line --------------------------------------------------------------------------------------------------
def int_list(text: str) -> tuple[int, ...]:
    """'1,3,5' -> (1, 3, 5); '' -> ()."""
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers, e.g. 1,3,5") from None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Walltime of target-only beam search, transformers generate and speculative beam search "
        "(strict, relaxed), batch 1, same process, same users.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    m = p.add_argument_group("models (target: one of --target-dir / --target-config)")
    target = m.add_mutually_exclusive_group(required=True)
    target.add_argument("--target-dir", help="saved model dir of a pipeline run (artifacts/target/<name>-<key>/model); "
                        "a glob pattern picks the newest completed match")
    target.add_argument("--target-config", help="conf/model/NAME.yaml: random init from its sizes")
    m.add_argument("--target-seed", type=int, default=0, help="init seed of a --target-config model")
    m.add_argument("--draft", choices=["same"], help="'same': the draft is the target itself (everything accepted)")
    m.add_argument("--draft-dir", help="saved draft model dir (same tokenizer as the target)")
    m.add_argument("--draft-config", help="conf/model/NAME.yaml: random init from its sizes")
    m.add_argument("--draft-seed", type=int, default=1, help="init seed of a --draft-config model")
    m.add_argument("--tokenizer-dir", help="tokenizer to encode the data with (default: the saved model's "
                   "DIR/../tokenizer or DIR; for random models a tokenizer is built for the dataset)")
    m.add_argument("--drafter", default="model", help=f"comma-separated subset of {','.join(DRAFTERS)}: where the "
                   "SD methods' drafts come from (model: the --draft* model; the others are built from the "
                   "training split, untimed)")
    m.add_argument("--trigram-adapt", choices=list(ADAPT_SCOPES), help="tri-gram drafters: online updates "
                   "(None: conf/decoding/default.yaml's, as for the other --trigram-* flags)")
    m.add_argument("--trigram-update-weight", type=float, help="tri-gram drafters: count per updated node")
    m.add_argument("--trigram-smoothing", type=float, help="tri-gram drafters: weight of the lower orders")
    m.add_argument("--trigram-puct-c", type=float, help="trigram_puct: PUCT's exploration constant")
    m.add_argument("--skip-attention", type=int_list, default=(), help="layer_skip: decoder layers (0-based, "
                   "comma-separated) whose attention the draft skips")
    m.add_argument("--skip-mlp", type=int_list, default=(), help="layer_skip: layers whose MLP the draft skips")

    d = p.add_argument_group("data")
    d.add_argument("--data-root", help="dataset folder (default: the target run's data root, else "
                   "data/NAME; for --data-name synthetic a temporary folder, generated there)")
    d.add_argument("--data-name", help="dataset name (default: the target run's, else beauty)")
    d.add_argument("--prompt-format", choices=["compact", "alpaca"], help="default: the target run's, else compact")
    d.add_argument("--max-history", type=int, help="default: the target run's, else 20")
    d.add_argument("--users", type=int, default=50, help="first N test users (0: all)")
    d.add_argument("--hf-users", type=int, help="hf_generate runs on the first this many of them (default: all)")

    r = p.add_argument_group("decoding and measurement")
    r.add_argument("--ks", default="5,10,20", help="list lengths K (beams), comma-separated")
    r.add_argument("--draft-beams", type=int, default=40, help="N, the draft's beams (>= every K)")
    r.add_argument("--gamma", type=int, default=3, help="drafted steps per round")
    r.add_argument("--verify-beams", default="", help="M values, comma-separated (K <= M <= N): the target verifies "
                   "the draft's top-M beams per depth; each M adds a row per SD method (sd_strict_m10, ...); "
                   "default: M = N")
    r.add_argument("--scope", default="vocab", choices=["vocab", "level"], help="level log-probs normalised over "
                   "the full vocabulary (the model's likelihood) or over the level's SID block (projection "
                   "restricted to the block); applies to beam and SD alike")
    r.add_argument("--batch-sizes", default="", help="throughput mode: also decode all --users in batches of each "
                   "size (comma-separated, e.g. 1,8,32,64) with beam and the SD methods, and print lists/s")
    r.add_argument("--no-prune", action="store_true", help="SD keeps rejected branches in the caches (masked) "
                   "instead of pruning them after each round")
    r.add_argument("--skip-latency", action="store_true", help="throughput tables only (no batch-1 table)")
    r.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    r.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    r.add_argument("--dtype", default="float32", choices=list(DTYPES), help="model weights (bfloat16: for cuda)")
    r.add_argument("--backend", default="auto", choices=list(BACKENDS), help="forward pass of both models: lean "
                   "(plain torch LLaMA), hf (transformers' module), auto (lean where it can run the model)")
    r.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    r.add_argument("--dare-top-k", type=int, help="sd_dare: a drafted continuation must be among the target's "
                   "top-k (None: 2K)")
    r.add_argument("--dare-threshold", type=float, default=0.0, help="sd_dare: ... with a target step probability "
                   ">= this")
    r.add_argument("--seed", type=int, default=0, help="seeds sd_relaxed's per-user generators (and the retrieval "
                   "pools' build)")
    r.add_argument("--repeats", type=int, default=1, help="runs of each list; the median is kept")
    r.add_argument("--warmup", type=int, default=3, help="lists per K run first and not recorded")
    r.add_argument("--json-out", help="also write the header, the summaries and every per-list measurement here")
    args = p.parse_args(argv)

    args.ks = [int(k) for k in str(args.ks).split(",") if k.strip()]
    args.verify_beams = [int(m) for m in str(args.verify_beams).split(",") if m.strip()] or [args.draft_beams]
    args.batch_sizes = [int(b) for b in str(args.batch_sizes).split(",") if b.strip()]
    if any(not max(args.ks) <= m <= args.draft_beams for m in args.verify_beams):
        p.error(f"--verify-beams {args.verify_beams}: each M must satisfy max K ({max(args.ks)}) <= M <= N "
                f"({args.draft_beams})")
    if any(b < 1 for b in args.batch_sizes):
        p.error("--batch-sizes must be >= 1")
    args.methods = [x.strip() for x in str(args.methods).split(",") if x.strip()]
    unknown = sorted(set(args.methods) - set(METHODS))
    if unknown:
        p.error(f"unknown methods {unknown}; choose from {list(METHODS)}")
    if BASELINE not in args.methods:
        args.methods.insert(0, BASELINE)  # every speedup and check is against it
    args.methods = [x for x in METHODS if x in args.methods]  # fixed order within a user
    args.drafters = [x.strip() for x in str(args.drafter).split(",") if x.strip()]
    unknown = sorted(set(args.drafters) - set(DRAFTERS))
    if unknown or not args.drafters:
        p.error(f"--drafter {args.drafter!r}: choose from {list(DRAFTERS)}")
    args.drafters = [x for x in DRAFTERS if x in args.drafters]
    drafts = [x for x in (args.draft, args.draft_dir, args.draft_config) if x]
    needs_draft = any(x.startswith("sd_") for x in args.methods) and "model" in args.drafters
    if len(drafts) > 1:
        p.error("give at most one of --draft same / --draft-dir / --draft-config")
    if needs_draft and not drafts:
        p.error("sd_* methods need a draft: --draft same, --draft-dir or --draft-config")
    if needs_draft and args.draft_beams < max(args.ks):
        p.error(f"--draft-beams ({args.draft_beams}) must be >= every K ({max(args.ks)})")
    if min(args.ks) < 1 or args.users < 0 or args.repeats < 1 or args.warmup < 0:
        p.error("K and --repeats must be >= 1, --users and --warmup >= 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but CUDA is not available")
    args.hf_users = args.users if args.hf_users is None else args.hf_users
    # SD rows: one per (mode, M, drafter); named after the mode, with _m{M} when M < N and the drafter unless model
    args.variants = [(f"{name}{'' if m == args.draft_beams else f'_m{m}'}{'' if d == 'model' else f'_{d}'}",
                      name[3:], m, d)
                     for name in args.methods if name.startswith("sd_") for d in args.drafters
                     for m in args.verify_beams]
    args.rows = [x for x in args.methods if not x.startswith("sd_")] + [label for label, *_ in args.variants]
    return args


# -- models and data -----------------------------------------------------------------------------------------------
@dataclass
class ModelInfo:
    source: str
    params: int
    layers: int
    hidden: int

    def describe(self) -> str:
        return f"{self.source}: {self.params / 1e6:.2f}M params, {self.layers} layers, hidden {self.hidden}"


def resolve_model_dir(pattern: str) -> Path:
    """A saved model dir; a glob pattern picks the newest match whose stage is complete (``../stage.json``)."""
    matches = [Path(p) for p in glob.glob(pattern)] if glob.has_magic(pattern) else [Path(pattern)]
    matches = [p for p in matches if (p / "atspeed_model.json").is_file()]
    complete = [p for p in matches if (p.parent / "stage.json").is_file()] or matches
    if not complete:
        raise FileNotFoundError(f"no saved model (atspeed_model.json) at {pattern!r}")
    return max(complete, key=lambda p: p.stat().st_mtime)


def stage_data_settings(model_dir: Path) -> dict[str, Any]:
    """The data settings a pipeline run trained the model with (empty if the dir is not a stage's model)."""
    stage = model_dir.parent / "stage.json"
    if not stage.is_file():
        return {}
    return json.loads(stage.read_text()).get("settings", {}).get("data", {})


def tokenizer_dir_of(model_dir: Path) -> Path:
    for candidate in (model_dir.parent / "tokenizer", model_dir):
        if (candidate / "tokenizer.json").is_file():
            return candidate
    raise FileNotFoundError(f"no tokenizer.json next to {model_dir}")


def describe(model: torch.nn.Module, source: str) -> ModelInfo:
    config = model.config
    return ModelInfo(source, count_parameters(model)["total"], config.num_hidden_layers, config.hidden_size)


def load_saved(model_dir: Path) -> torch.nn.Module:
    model = load_model(model_dir)
    if isinstance(model, PeftModel):  # unmerged token-row wrappers copy whole matrices on every forward
        model = merge_lora(model)
    return model


def build_from_config(path: str, seed: int, data: RecData) -> torch.nn.Module:
    """``conf/model/NAME.yaml`` or ``conf/draft/NAME.yaml`` instantiated through its ``_target_`` (``${seed}`` and a
    draft's ``${draft_training.seed}`` resolved to ``seed``)."""
    cfg = OmegaConf.create({"seed": seed, "draft_training": {"seed": seed}, "model": OmegaConf.load(path)})
    blocks = data.sid_index.level_blocks
    model = instantiate(cfg.model, tokenizer=data.tokenizer, sid_token_ids=list(range(blocks[0][0], blocks[-1][1])))
    if isinstance(model, PeftModel):
        model = merge_lora(model)
    return model


def saved_or_random(model_dir: Path | None, config: str | None, seed: int, data: RecData) -> tuple[torch.nn.Module, str]:
    """The model of a saved dir, else a random one from ``config``; with a label of where it came from."""
    if model_dir:
        return load_saved(model_dir), str(model_dir)
    return build_from_config(config, seed, data), f"{Path(config).stem} (random init, seed {seed})"


@dataclass
class Setup:
    target: HFDecoderLM | LeanLlamaLM
    draft: HFDecoderLM | LeanLlamaLM | None  # the draft model (drafter "model")
    drafters: dict[str, HFDecoderLM | LeanLlamaLM | Drafter]  # by --drafter name
    drafter_info: dict[str, dict[str, Any]]  # by name: settings and build statistics of the model-free ones
    target_model: torch.nn.Module  # the transformers module (hf_generate runs it)
    target_info: ModelInfo
    draft_info: ModelInfo | None
    data: RecData
    data_root: Path
    trie: ItemTrie
    prefixes: dict[tuple[int, ...], list[int]]  # SID prefix -> allowed next tokens (hf_generate's constraint)
    prompts: list[torch.Tensor]  # the first --users test prompts, 1-D long


def build_setup(args: argparse.Namespace, tmp: Path) -> Setup:
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    target_dir = resolve_model_dir(args.target_dir) if args.target_dir else None
    draft_dir = resolve_model_dir(args.draft_dir) if args.draft_dir else None
    trained = stage_data_settings(target_dir) if target_dir else {}

    name = args.data_name or trained.get("name", "beauty")
    same_data = name == trained.get("name")
    if args.data_root:
        root = Path(args.data_root)
    elif same_data and trained.get("root"):
        root = Path(trained["root"])
    else:
        root = tmp / name if name == "synthetic" else Path("..") / "shared" / "data" / name
    if name == "synthetic":
        synthetic = trained.get("synthetic") if same_data else None
        root = ensure_synthetic_dataset(root, name, **(synthetic or {}))

    tokenizer_dir = args.tokenizer_dir or next((tokenizer_dir_of(p) for p in (target_dir, draft_dir) if p), None)
    data = RecData.build(
        root,
        name,
        index_file=trained.get("index_file") if same_data else None,
        prompt_format=args.prompt_format or trained.get("prompt_format", "compact"),
        max_history=args.max_history or trained.get("max_history", 20),
        tokenizer_dir=tokenizer_dir,
        splits=("test",),
    )
    test = data.splits["test"]
    if args.users > len(test):
        raise ValueError(f"--users {args.users} > {len(test)} test users of {name}")
    args.users = args.users or len(test)
    args.hf_users = min(args.hf_users, args.users)

    target_model, target_source = saved_or_random(target_dir, args.target_config, args.target_seed, data)
    target_info = describe(target_model, target_source)
    target_model = target_model.to(device=device, dtype=dtype).eval()
    target = decoder_for(target_model, args.backend)

    draft, draft_info = None, None
    if args.draft == "same":
        draft = target
        draft_info = ModelInfo("same as target", target_info.params, target_info.layers, target_info.hidden)
    elif draft_dir or args.draft_config:
        draft_model, draft_source = saved_or_random(draft_dir, args.draft_config, args.draft_seed, data)
        draft_info = describe(draft_model, draft_source)
        draft = decoder_for(draft_model.to(device=device, dtype=dtype).eval(), args.backend)

    for model, label in ((target, "target"), (draft, "draft")):
        vocab = model.vocab_size if model is not None else None
        if vocab is not None and vocab < len(data.tokenizer):
            raise ValueError(f"{label} has {vocab} output rows but the tokenizer has {len(data.tokenizer)} tokens")

    prefixes: dict[tuple[int, ...], set[int]] = {}
    for row in data.sid_index.item_token_ids.tolist():
        for t in range(len(row)):
            prefixes.setdefault(tuple(row[:t]), set()).add(row[t])
    prompts = [torch.tensor(p, dtype=torch.long) for p in test.prompts[: args.users]]
    drafters, drafter_info = model_free_drafters(args, data, device)
    if "model" in args.drafters and draft is not None:
        drafters["model"] = draft
    if "layer_skip" in args.drafters:
        drafters["layer_skip"] = LayerSkipDrafter(target, args.skip_attention, args.skip_mlp)  # TypeError for hf
        drafter_info["layer_skip"] = {"settings": {"skip_attention": list(drafters["layer_skip"].skip_attention),
                                                   "skip_mlp": list(drafters["layer_skip"].skip_mlp)},
                                      "kept_fraction": drafters["layer_skip"].kept_fraction, "build_s": 0.0}
    return Setup(target, draft, drafters, drafter_info, target_model, target_info, draft_info, data, root,
                 data.trie().to(device), {k: sorted(v) for k, v in prefixes.items()}, prompts)


def model_free_drafters(args: argparse.Namespace, data: RecData, device: torch.device
                        ) -> tuple[dict[str, Drafter], dict[str, dict[str, Any]]]:
    """The retrieval / tri-gram drafters ``--drafter`` names, built from the training split (conf/decoding's
    settings, ``--trigram-*`` over them), with what their build took."""
    wanted = [name for name in args.drafters if name not in ("model", "layer_skip")]
    if not wanted:
        return {}, {}
    conf = OmegaConf.to_container(OmegaConf.load(DECODING_CONF), resolve=True)
    histories, trie = training_sid_histories(data), data.trie()
    drafters: dict[str, Drafter] = {}
    info: dict[str, dict[str, Any]] = {}
    counts = None
    for name in wanted:
        start = time.perf_counter()
        if name == "retrieval":
            settings = conf["retrieval"]
            drafters[name] = RetrievalDrafter(build_retrieval_pools(histories, trie, seed=args.seed, **settings)
                                              .to(device))
        else:
            if counts is None:
                counts = build_trigram_counts(histories, trie).to(device)
            settings = dict(conf["trigram"], tree="puct" if name == "trigram_puct" else "beam")
            overrides = {"adapt": args.trigram_adapt, "update_weight": args.trigram_update_weight,
                         "smoothing": args.trigram_smoothing, "puct_c": args.trigram_puct_c}
            settings.update({k: v for k, v in overrides.items() if v is not None})
            drafters[name] = TrigramDrafter(counts, **settings)
        info[name] = {"settings": settings, "build_s": time.perf_counter() - start}
    return drafters, info


# -- one list per method ---------------------------------------------------------------------------------------------
@dataclass
class ListResult:
    """What one method did for one user's list (counters are per list)."""

    items: torch.Tensor | None  # [K] item ids (None for hf_generate)
    sequences: torch.Tensor  # [K, L] SID token ids, best first
    target_calls: int
    target_tokens: int
    draft_calls: int = 0
    draft_tokens: int = 0
    rounds: int = 0
    drafted_steps: int = 0
    accepted_steps: int = 0
    phases_s: dict[str, float] | None = None  # SD: draft / verify / accept / other


@dataclass
class Measurement:
    """One (K, user, method) list: its walltimes over the repeats and the counters of its last run."""

    k: int
    user: int
    method: str
    times_s: list[float]
    target_calls: int
    target_tokens: int
    draft_calls: int
    draft_tokens: int
    rounds: int
    drafted_steps: int
    accepted_steps: int
    phases_s: dict[str, float] | None
    mismatch: bool | None  # differs from the beam-search list (None: not compared)

    @property
    def time_s(self) -> float:
        return statistics.median(self.times_s)


class CallCounter:
    """Counts forward calls and input tokens of a transformers model (hf_generate's own loop)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.calls = self.tokens = 0
        model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.calls += 1
        self.tokens += int(ids.numel()) if ids is not None else 0

    def reset(self) -> None:
        self.calls = self.tokens = 0


def make_runners(
    setup: Setup, args: argparse.Namespace, k: int
) -> tuple[dict[str, Callable[[int], ListResult]], dict[str, Callable[[int], ListResult]]]:
    """Per method, a function of the user index that decodes that user's list of K items; and, on CUDA, per SD
    method the same list decoded with synchronised phase timers (untimed: its phases only; empty on the CPU)."""
    target, trie, pad = setup.target, setup.trie, setup.data.pad_id
    device = torch.device(args.device)
    eos = setup.data.tokenizer.eos_token_id
    inputs = {}

    def prompt(user: int) -> tuple[torch.Tensor, torch.Tensor]:
        if user not in inputs:  # moved to the device once, outside the timed region
            ids, mask = left_pad([setup.prompts[user]], pad)
            inputs[user] = (ids.to(device), mask.to(device))
        return inputs[user]

    def beam(user: int) -> ListResult:
        out = beam_search(target, *prompt(user), trie, k, scope=args.scope)
        return ListResult(out.items[0], out.sequences[0], out.model_calls, out.tokens_processed)

    def beam_tree(user: int) -> ListResult:
        out = tree_beam_search(target, *prompt(user), trie, k, scope=args.scope)
        return ListResult(out.items[0], out.sequences[0], out.model_calls, out.tokens_processed)

    counter = CallCounter(setup.target_model) if "hf_generate" in args.methods else None

    def hf_generate(user: int) -> ListResult:
        ids, mask = prompt(user)
        width = ids.shape[1]

        def allowed(batch_id: int, input_ids: torch.Tensor) -> list[int]:
            return setup.prefixes.get(tuple(input_ids[width:].tolist()), [eos])

        counter.reset()
        with torch.inference_mode():
            out = setup.target_model.generate(
                ids, attention_mask=mask.long(), num_beams=k, num_return_sequences=k,
                prefix_allowed_tokens_fn=allowed, max_new_tokens=trie.num_levels, min_new_tokens=trie.num_levels,
                do_sample=False, length_penalty=0.0, early_stopping=True, return_dict_in_generate=True,
                pad_token_id=pad, eos_token_id=eos,
            )
        return ListResult(None, out.sequences[:, width:], counter.calls, counter.tokens)

    def speculative(mode: str, verify_beams: int, drafter: str, profile: bool) -> Callable[[int], ListResult]:
        state = {"draft": fresh(setup.drafters[drafter])}

        def run(user: int) -> ListResult:
            generator = None
            if mode not in ("strict", "dare"):  # seeded per user: every repeat of a list samples the same way
                generator = torch.Generator(device=device).manual_seed(args.seed * 1_000_003 + user)
            out = speculative_beam_search(
                target, state["draft"], *prompt(user), trie, k, args.draft_beams, args.gamma, mode, generator,
                verify_beams=verify_beams, scope=args.scope, profile=profile, prune=not args.no_prune,
                verify_options=verify_options(args),
            )
            s = out.stats
            phases = {"draft": s.draft_time_s, "verify": s.verify_time_s, "accept": s.accept_time_s,
                      "other": s.other_time_s}
            return ListResult(out.items[0], out.sequences[0], s.target_calls, s.target_tokens, s.draft_calls,
                              s.draft_tokens, s.rounds, s.drafted_steps, s.accepted_steps, phases)

        run.reset = lambda: state.update(draft=fresh(setup.drafters[drafter]))  # nothing learned (Drafter.fresh)
        return run

    # On CUDA the phase profile synchronises at every phase boundary, which a timed list must not pay (beam search
    # pays no such syncs): timed runs go unprofiled and one extra, untimed run per list gives the phases
    # (the second dict). On the CPU nothing is asynchronous, so the timed run's phases are exact.
    profile = device.type != "cuda"
    runners = {"beam": beam, "beam_tree": beam_tree, "hf_generate": hf_generate}
    runners.update({label: speculative(mode, m, d, profile) for label, mode, m, d in args.variants})
    profiled = {} if profile else {label: speculative(mode, m, d, True) for label, mode, m, d in args.variants}
    return {name: runners[name] for name in args.rows}, profiled


def verify_options(args: argparse.Namespace) -> dict[str, Any]:
    """The relaxed rules' settings (only sd_dare's are flags)."""
    return {"dare_top_k": args.dare_top_k, "dare_threshold": args.dare_threshold}


def timed(fn: Callable[[int], ListResult], user: int, cuda: bool) -> tuple[float, ListResult]:
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn(user)
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start, result


def differs(result: ListResult, reference: ListResult) -> bool:
    """hf_generate: the ordered SIDs; our methods: the ordered items (SID collisions expanded)."""
    if result.items is None:
        return result.sequences.cpu().tolist() != reference.sequences.cpu().tolist()
    return result.items.cpu().tolist() != reference.items.cpu().tolist()


def run_benchmark(setup: Setup, args: argparse.Namespace) -> list[Measurement]:
    cuda = args.device == "cuda"
    measurements: list[Measurement] = []
    for k in args.ks:
        runners, profiled = make_runners(setup, args, k)
        start = time.perf_counter()
        for user in range(min(args.warmup, len(setup.prompts))):
            for name, fn in [*runners.items(), *profiled.items()]:
                if name != "hf_generate" or user < args.hf_users:
                    fn(user)
        for fn in [*runners.values(), *profiled.values()]:  # drafters that learn start the measured lists anew
            getattr(fn, "reset", lambda: None)()
        for user in range(len(setup.prompts)):
            times: dict[str, list[float]] = {name: [] for name in runners}
            last: dict[str, ListResult] = {}
            for _ in range(args.repeats):
                for name, fn in runners.items():  # interleaved: user u runs every method before user u + 1
                    if name == "hf_generate" and user >= args.hf_users:
                        continue
                    elapsed, last[name] = timed(fn, user, cuda)
                    times[name].append(elapsed)
            for name, fn in profiled.items():  # CUDA: the phases of a separate synchronised run (same list, untimed)
                last[name].phases_s = fn(user).phases_s
            for name, result in last.items():
                mismatch = None if name == BASELINE else differs(result, last[BASELINE])
                if name.startswith("sd_strict") and mismatch:
                    log.warning("!!! K=%d user %d: sd_strict list differs from beam search: %s vs %s", k, user,
                                result.items.tolist(), last[BASELINE].items.tolist())
                measurements.append(Measurement(
                    k, user, name, times[name], result.target_calls, result.target_tokens, result.draft_calls,
                    result.draft_tokens, result.rounds, result.drafted_steps, result.accepted_steps, result.phases_s,
                    mismatch,
                ))
            if (user + 1) % 10 == 0 or user + 1 == len(setup.prompts):
                log.info("K=%d: %d/%d users, %.0f s", k, user + 1, len(setup.prompts), time.perf_counter() - start)
    return measurements


# -- throughput: many users per call ---------------------------------------------------------------------------
def run_throughput(setup: Setup, args: argparse.Namespace) -> list[dict[str, Any]]:
    """For each K and batch size B: every user decoded once in batches of B (users sorted by prompt length, the
    same batches for every method), one untimed batch first; beam, then each SD variant. Strict lists are checked
    against the baseline's (``beam_tree``)."""
    cuda = args.device == "cuda"
    device = torch.device(args.device)
    order = sorted(range(len(setup.prompts)), key=lambda u: setup.prompts[u].numel())
    rows: list[dict[str, Any]] = []
    for k in args.ks:
        for size in args.batch_sizes:
            batches = [order[i : i + size] for i in range(0, len(order), size)]
            inputs = [tuple(t.to(device) for t in left_pad([setup.prompts[u] for u in b], setup.data.pad_id))
                      for b in batches]
            reference: list[torch.Tensor] = []
            baselines = [BASELINE] + (["beam"] if "beam" in args.methods else [])
            for method in baselines + [label for label, *_ in args.variants]:
                mode, verify, drafter = next(((m, v, d) for label, m, v, d in args.variants if label == method),
                                             (method, 0, None))
                draft = fresh(setup.drafters[drafter]) if drafter else None
                generator = torch.Generator(device=device).manual_seed(args.seed)

                def decode(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
                    if mode in ("beam", "beam_tree"):
                        search = beam_search if mode == "beam" else tree_beam_search
                        out = search(setup.target, ids, mask, setup.trie, k, scope=args.scope)
                        n = ids.shape[0]
                        return out.items, {"target_calls": out.model_calls * n, "target_tokens": out.tokens_processed,
                                           "batch_target_calls": out.model_calls, "draft_calls": 0}
                    out = speculative_beam_search(
                        setup.target, draft, ids, mask, setup.trie, k, args.draft_beams, args.gamma, mode,
                        None if mode in ("strict", "dare") else generator, verify_beams=verify, scope=args.scope,
                        prune=not args.no_prune, verify_options=verify_options(args),
                    )
                    return out.items, {"target_calls": sum(out.lists.target_calls),
                                       "target_tokens": out.stats.target_tokens,
                                       "batch_target_calls": out.stats.target_calls,
                                       "draft_calls": sum(out.lists.draft_calls)}

                decode(*inputs[0])  # warm-up
                totals = collections.Counter()
                items: list[torch.Tensor] = []
                if cuda:
                    torch.cuda.synchronize()
                start = time.perf_counter()
                for ids, mask in inputs:
                    batch_items, counts = decode(ids, mask)
                    items.append(batch_items)
                    totals.update(counts)
                if cuda:
                    torch.cuda.synchronize()
                elapsed = time.perf_counter() - start
                items = [t.cpu() for t in items]
                if method == BASELINE:
                    reference = items
                mismatches = sum(int((a != b).any(1).sum()) for a, b in zip(items, reference))
                users = len(order)
                rows.append({
                    "k": k, "batch": size, "method": method, "lists": users, "total_s": elapsed,
                    "lists_per_s": users / elapsed, "ms_per_list": 1e3 * elapsed / users,
                    "target_calls_per_list": totals["target_calls"] / users,
                    "batched_target_calls": totals["batch_target_calls"],
                    "draft_calls_per_list": totals["draft_calls"] / users,
                    "target_tokens_per_list": totals["target_tokens"] / users,
                    "mismatches": mismatches if method != BASELINE else 0,
                })
                log.info("throughput K=%d B=%d %s: %.1f lists/s", k, size, method, users / elapsed)
    for row in rows:  # speedup over beam at the same K and B
        base = next(r for r in rows if r["k"] == row["k"] and r["batch"] == row["batch"] and r["method"] == BASELINE)
        row["speedup"] = base["total_s"] / row["total_s"]
    return rows


def format_throughput(rows: list[dict[str, Any]]) -> str:
    header = ["K", "B", "method", "lists", "total_s", "lists/s", "ms/list", "speedup", "tgt_calls/list",
              "batched_tgt_calls", "drf_calls/list", "tgt_tokens/list", "mismatch"]
    table = [header] + [[
        str(r["k"]), str(r["batch"]), r["method"], str(r["lists"]), _fmt(r["total_s"]), _fmt(r["lists_per_s"]),
        _fmt(r["ms_per_list"], 2), _fmt(r["speedup"], 2), _fmt(r["target_calls_per_list"], 2),
        str(r["batched_target_calls"]), _fmt(r["draft_calls_per_list"], 2), _fmt(r["target_tokens_per_list"], 0),
        "-" if not (r["method"].startswith("sd_strict") or r["method"] == "beam") else f"{r['mismatches']}/{r['lists']}",
    ] for r in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    return "\n".join("  ".join(c.rjust(w) if i != 2 else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     for r in table)


# -- summary and tables --------------------------------------------------------------------------------------------
def summarize(measurements: list[Measurement], k: int, methods: list[str]) -> dict[str, dict[str, float]]:
    """Per method, aggregates over its lists at this K; speedups are over ``BASELINE`` on the same users."""
    at_k = [m for m in measurements if m.k == k]
    base = {m.user: m.time_s for m in at_k if m.method == BASELINE}
    summary = {}
    for method in methods:
        rows = [m for m in at_k if m.method == method]
        if not rows:
            continue
        times = np.array([m.time_s for m in rows])
        paired = np.array([base[m.user] for m in rows])
        drafted = sum(m.drafted_steps for m in rows)
        rounds = sum(m.rounds for m in rows)
        s: dict[str, float] = {
            "lists": len(rows),
            "median_ms": 1e3 * float(np.median(times)),
            "p90_ms": 1e3 * float(np.percentile(times, 90)),
            "total_s": float(times.sum()),
            "speedup_tot": float(paired.sum() / times.sum()),
            "speedup_mean": float(np.mean(paired / times)),
        }
        for key in ("target_calls", "draft_calls", "target_tokens", "draft_tokens"):
            s[key] = float(np.mean([getattr(m, key) for m in rows]))
        s["accept_rate"] = sum(m.accepted_steps for m in rows) / drafted if drafted else float("nan")
        s["accepted_steps_per_round"] = sum(m.accepted_steps for m in rows) / rounds if rounds else float("nan")
        for phase in ("draft", "verify", "accept", "other"):
            values = [m.phases_s[phase] for m in rows if m.phases_s is not None]
            s[f"{phase}_ms"] = 1e3 * float(np.mean(values)) if values else float("nan")
        checked = [m.mismatch for m in rows if m.mismatch is not None]
        s["mismatches"] = float(sum(checked)) if checked else float("nan")
        summary[method] = s
    return summary


def _fmt(value: float, digits: int = 1) -> str:
    return "-" if value != value else f"{value:.{digits}f}"  # NaN -> "-"


def format_table(summary: dict[str, dict[str, float]]) -> str:
    rows = [list(COLUMNS)]
    for method, s in summary.items():
        is_sd = method.startswith("sd_")
        rows.append([
            method, str(int(s["lists"])), _fmt(s["median_ms"]), _fmt(s["p90_ms"]), _fmt(s["speedup_tot"], 2),
            _fmt(s["speedup_mean"], 2), _fmt(s["target_calls"], 2), _fmt(s["draft_calls"], 2) if is_sd else "-",
            _fmt(s["target_tokens"], 0), _fmt(s["draft_tokens"], 0) if is_sd else "-", _fmt(s["accept_rate"], 3),
            _fmt(s["accepted_steps_per_round"], 2), _fmt(s["draft_ms"]), _fmt(s["verify_ms"]), _fmt(s["accept_ms"]),
            _fmt(s["other_ms"]),
            "-" if s["mismatches"] != s["mismatches"] else f"{int(s['mismatches'])}/{int(s['lists'])}",
        ])
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    return "\n".join(lines)


def device_name(device: str) -> str:
    if device == "cuda":
        return f"cuda ({torch.cuda.get_device_name()})"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return f"cpu ({cpu}, {os.cpu_count()} logical cores)"


def header(setup: Setup, args: argparse.Namespace) -> dict[str, Any]:
    test = setup.data.splits["test"]
    return {
        "device": device_name(args.device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "dtype": args.dtype,
        "backend": {"target": type(setup.target).__name__,
                    "draft": type(setup.draft).__name__ if setup.draft is not None else None},
        "target": asdict(setup.target_info),
        "draft": asdict(setup.draft_info) if setup.draft_info else None,
        "drafters": args.drafters,
        "model_free": setup.drafter_info,
        "dare": verify_options(args) if "sd_dare" in args.methods else None,
        "data": {"name": setup.data.dataset.name,
                 "root": str(setup.data_root), "items": setup.data.sid_index.num_items, "test_users": len(test),
                 "prompt_format": setup.data.formatter.name,
                 "mean_prompt_tokens": float(np.mean([p.numel() for p in setup.prompts]))},
        "users": len(setup.prompts),
        "hf_users": args.hf_users if "hf_generate" in args.methods else 0,
        "ks": args.ks,
        "draft_beams": args.draft_beams,
        "verify_beams": args.verify_beams,
        "gamma": args.gamma,
        "scope": args.scope,
        "prune": not args.no_prune,
        "methods": args.methods,
        "repeats": args.repeats,
        "phase_profile": "separate synchronised run" if args.device == "cuda" else "timed run",
        "warmup": args.warmup,
        "seed": args.seed,
    }


def format_header(h: dict[str, Any]) -> str:
    d = h["data"]
    draft = ModelInfo(**h["draft"]).describe() if h["draft"] else "none"
    return "\n".join([
        "bench_decoding: top-K decoding walltime per list, batch 1, one process, same users and models",
        f"device: {h['device']} | torch {h['torch']} | threads {h['threads']} | dtype {h['dtype']} | "
        f"forward: {h.get('backend', {}).get('target', 'HFDecoderLM')}",
        f"target: {ModelInfo(**h['target']).describe()}",
        f"draft:  {draft}",
        *[f"drafter {name}: {info['settings']} (built from the training split in {info['build_s']:.1f} s)"
          for name, info in h.get("model_free", {}).items()],
        f"data: {d['name']} ({d['root']}): {d['items']} items, {d['test_users']} test users, {d['prompt_format']} "
        f"prompts of {d['mean_prompt_tokens']:.1f} tokens on average",
        f"users: {h['users']} (hf_generate: {h['hf_users']}) | K: {','.join(map(str, h['ks']))} | N (draft beams): "
        f"{h['draft_beams']} | M (verified beams): {','.join(map(str, h['verify_beams']))} | gamma: {h['gamma']} | "
        f"scope: {h['scope']} | prune: {h.get('prune', True)} | repeats: {h['repeats']} (median) | warm-up: {h['warmup']} "
        f"lists per K | seed {h['seed']}",
        "speedup_*: beam_tree's time / the method's on the same users (tot: ratio of totals; mean: mean of per-list "
        "ratios); calls and tokens per list; mismatch: lists differing from beam (SIDs for hf_generate, items "
        "otherwise; sd_relaxed samples, so it differs by design)",
    ])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, print the header and one table per K; returns what ``--json-out`` writes."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_decoding-") as tmp:
        setup = build_setup(args, Path(tmp))
        h = header(setup, args)
        print(format_header(h), flush=True)
        measurements = [] if args.skip_latency else run_benchmark(setup, args)
        throughput = run_throughput(setup, args) if args.batch_sizes else []
    report: dict[str, Any] = {"header": h, "summary": {}, "lists": [
        {**asdict(m), "time_s": m.time_s} for m in measurements]}
    for k in args.ks if measurements else []:
        summary = summarize(measurements, k, args.rows)
        report["summary"][str(k)] = summary
        print(f"\nK = {k}\n{format_table(summary)}")
        strict = sum(s["mismatches"] for name, s in summary.items() if name.startswith("sd_strict"))
        if strict and strict == strict:
            print(f"!!! WARNING: {int(strict)} sd_strict list(s) differ from beam search at K={k}: strict speculative "
                  f"decoding must be lossless; this is a bug (or float rounding under {args.dtype}) !!!")
        if "hf_generate" in summary:
            print(f"our beam search vs transformers generate: {1 / summary['hf_generate']['speedup_tot']:.2f}x "
                  f"(ratio of totals over {int(summary['hf_generate']['lists'])} lists)")
    if throughput:
        report["throughput"] = throughput
        print(f"\nthroughput: all {args.users} users in batches of B (sorted by prompt length), lists per second\n"
              f"{format_throughput(throughput)}")
        bad = [r for r in throughput if r["method"].startswith("sd_strict") and r["mismatches"]]
        if bad:
            print(f"!!! WARNING: batched sd_strict lists differ from beam search: {bad} !!!")
    report["walltime_s"] = time.perf_counter() - start
    print(f"\ntotal walltime {report['walltime_s']:.0f} s", flush=True)
    if args.json_out:
        write_json_atomic(Path(args.json_out), report)  # never a half-written report for perf_tables.py
    return report


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    main()
