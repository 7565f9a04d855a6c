"""Checks of a composed run configuration before any work starts.

Hydra refuses an unknown key given as ``key=value`` but accepts one added with ``+key=value``, and value errors
(K > N, alpha > 1, an unknown objective) would otherwise surface only when their stage runs, possibly after an hour
of target training. ``check_config`` reports every problem at once, each with the key's full name, the value and
what is allowed:

- unknown keys: a key of a config group must appear in one of that group's option files under ``conf/`` (their
  union), or be an argument of the group's ``_target_`` (e.g. any ``lightning.pytorch.Trainer`` argument under
  ``trainer``); a top-level key must be in ``config.yaml`` or an experiment file;
- values: the ranges and names below (``RULES``), and the relations between decoding settings
  (K <= N for every K, K <= M <= N, beam_size <= N, K <= dare_top_k, gamma <= L - 1 with L the SID levels: 4 in
  the shipped datasets, or what ``data.sid`` builds).
"""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig, ListConfig, OmegaConf

import atspeed_exp.project_paths  # noqa: F401  (registers ${project_root:...}, used by conf/paths and conf/hydra)

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
SKIPPED_GROUPS = ("hydra", "experiment")
SID_LEVELS = 4  # tokens per item in every shipped dataset (the synthetic one included)


class ConfigError(ValueError):
    """One or more configuration problems, listed one per line with the key's full name."""


def _flat_keys(node: Any, prefix: str = "") -> set[str]:
    keys: set[str] = set()
    if isinstance(node, DictConfig):
        node = OmegaConf.to_container(node, resolve=False)
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "defaults" or str(key).startswith("_") and key != "_target_":
                continue
            name = f"{prefix}{key}"
            keys.add(name)
            keys |= _flat_keys(value, f"{name}.")
    return keys


def _group_options(conf_dir: Path, group: str) -> list[dict]:
    return [OmegaConf.to_container(OmegaConf.load(path), resolve=False) or {}
            for path in sorted((conf_dir / group).glob("*.yaml"))]


def _target_arguments(target: str) -> set[str] | None:
    """The keyword arguments of a ``_target_`` callable; None when it takes ``**kwargs`` or cannot be imported."""
    module_name, _, attr = target.rpartition(".")
    try:
        obj = getattr(importlib.import_module(module_name), attr)
        params = inspect.signature(obj).parameters.values()
    except (ImportError, AttributeError, ValueError, TypeError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params}


def unknown_keys(cfg: DictConfig, conf_dir: Path = CONF_DIR) -> list[str]:
    """Full names of the keys of ``cfg`` that no option file of their group (nor the group's ``_target_``)
    defines."""
    top_allowed = _flat_keys(OmegaConf.load(conf_dir / "config.yaml"))
    for path in sorted((conf_dir / "experiment").glob("*.yaml")):
        top_allowed |= {k for k in _flat_keys(OmegaConf.load(path)) if "." not in k}
    groups = {p.name for p in conf_dir.iterdir() if p.is_dir() and p.name not in SKIPPED_GROUPS}
    problems = []
    for key in cfg:
        if key in SKIPPED_GROUPS:
            continue
        if key not in groups:
            if key not in top_allowed:
                problems.append(str(key))
            continue
        options = _group_options(conf_dir, key)
        allowed = set().union(*(_flat_keys(option) for option in options)) if options else set()
        node = cfg[key]
        if not isinstance(node, DictConfig):
            continue
        target = node.get("_target_")
        arguments = _target_arguments(target) if target else set()
        for name in sorted(_flat_keys(OmegaConf.to_container(node, resolve=False))):
            top = name.split(".")[0]
            if name in allowed or (target and (arguments is None or top in arguments)):
                continue
            if any(name.startswith(f"{a}.") for a in allowed if _is_free_mapping(options, a)):
                continue
            problems.append(f"{key}.{name}")
    return problems


def _is_free_mapping(options: list[dict], dotted: str) -> bool:
    """True when some option file sets ``dotted`` to an empty mapping or null (a place for free-form keys)."""
    for option in options:
        node: Any = option
        for part in dotted.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node == {} or (node is None and dotted in _flat_keys(option)):
            return True
    return False


# -- value rules -----------------------------------------------------------------------------------------------
def _int_at_least(low: int) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            return f"an integer >= {low}"
        return None
    return check


def _optional(check: Callable[[Any], str | None]) -> Callable[[Any], str | None]:
    def wrapped(value: Any) -> str | None:
        return None if value is None else (None if check(value) is None else f"null or {check(value)}")
    return wrapped


def _number_in(low: float, high: float, low_open: bool = False, high_open: bool = False
               ) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        ok = ok and (low < value if low_open else low <= value) and (value < high if high_open else value <= high)
        return None if ok else f"a number in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    return check


def _one_of(choices: tuple) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        return None if value in choices else f"one of {list(choices)}"
    return check


def _list_of(check_item: Callable[[Any], str | None], choices: str = "", empty: bool = False
             ) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        if not isinstance(value, (list, ListConfig)) or not (value or empty):
            return f"a {'' if empty else 'non-empty '}list{choices}"
        bad = [item for item in value if check_item(item) is not None]
        return f"a list of {check_item(bad[0])}" if bad else None
    return check


def _rules() -> dict[str, Callable[[Any], str | None]]:
    from atspeed_exp.data.prepare import ITEM_ORDERS, SPLITS, USER_ORDERS
    from atspeed_exp.data.sid_build import COLLISION_MODES, EMBEDDING_SOURCES, METHODS
    from atspeed_exp.data.text_embeddings import TEXT_FIELDS
    from atspeed_exp.decoding.beam_search import SCOPES
    from atspeed_exp.decoding.drafters import DRAFTERS
    from atspeed_exp.decoding.drafters.trigram import ADAPT_SCOPES, TREES
    from atspeed_exp.decoding.processors import PROCESSORS
    from atspeed_exp.decoding.speculative import MODES
    from atspeed_exp.losses.alignment import ALIGNMENT_LOSSES, TEMPERATURE_FORMS
    from atspeed_exp.models.build import DTYPES
    from atspeed_exp.models.lean import BACKENDS

    return {
        "seed": _int_at_least(0),
        "threads": _optional(_int_at_least(1)),
        "decoding.beam_size": _int_at_least(1),
        "decoding.ks": _list_of(_int_at_least(1)),
        "decoding.draft_beams": _int_at_least(1),
        "decoding.gamma": _int_at_least(1),
        "decoding.modes": _list_of(_one_of(MODES)),
        "decoding.drafter": _one_of(tuple(DRAFTERS)),
        "decoding.dare_top_k": _optional(_int_at_least(1)),
        "decoding.dare_threshold": _number_in(0.0, 1.0),
        "decoding.retrieval.groups": _int_at_least(0),
        "decoding.retrieval.top_n": _int_at_least(1),
        "decoding.retrieval.dim": _int_at_least(1),
        "decoding.retrieval.min_history": _int_at_least(1),
        "decoding.retrieval.iterations": _int_at_least(0),
        "decoding.trigram.smoothing": _number_in(0.0, float("inf")),
        "decoding.trigram.adapt": _one_of(ADAPT_SCOPES),
        "decoding.trigram.update_weight": _number_in(0.0, float("inf"), low_open=True),
        "decoding.trigram.tree": _one_of(TREES),
        "decoding.trigram.puct_c": _number_in(0.0, float("inf")),
        "decoding.trigram.value_decay": _number_in(0.0, 1.0),
        "decoding.layer_skip.skip_attention": _list_of(_int_at_least(0), empty=True),
        "decoding.layer_skip.skip_mlp": _list_of(_int_at_least(0), empty=True),
        "decoding.layer_skip.search": _one_of((True, False)),
        "decoding.layer_skip.search_users": _int_at_least(1),
        "decoding.layer_skip.search_mode": _one_of(MODES),
        "decoding.layer_skip.max_skipped": _optional(_int_at_least(1)),
        "decoding.verify_beams": _optional(_int_at_least(1)),
        "decoding.scope": _one_of(SCOPES),
        "decoding.processors": _list_of(_one_of(tuple(PROCESSORS)), empty=True),
        "decoding.ghost_threshold": _optional(_number_in(0.0, 1.0, low_open=True)),
        "decoding.cf_weight": _number_in(0.0, 1.0),
        "decoding.cf_epsilon": _number_in(0.0, 1.0, low_open=True, high_open=True),
        "decoding.official_top_k": _optional(_int_at_least(1)),
        "alignment.objective": _one_of((*ALIGNMENT_LOSSES, "none")),
        "alignment.alpha": _number_in(0.0, 1.0),
        "alignment.temperature": _number_in(0.0, float("inf"), low_open=True),
        "alignment.top_k": _int_at_least(1),
        "alignment.temperature_form": _one_of(TEMPERATURE_FORMS),
        "alignment.seqkd_first_label": _one_of(("beam", "ground_truth")),
        "alignment.on_policy_ratio": _number_in(0.0, 1.0),
        "teacher.num_beams": _int_at_least(1),
        "draft_training.max_epochs": _int_at_least(1),
        "draft_training.batch_size": _int_at_least(1),
        "target_training.max_epochs": _int_at_least(1),
        "target_training.batch_size": _int_at_least(1),
        "target_training.checkpoint_every_n_steps": _optional(_int_at_least(1)),
        "target_training.val_metric": _one_of(("recall", "ndcg")),
        "draft_training.checkpoint_every_n_steps": _optional(_int_at_least(1)),
        "eval.num_beams": _int_at_least(1),
        "eval.cutoffs": _list_of(_int_at_least(1)),
        "eval.batch_size": _int_at_least(1),
        "eval.speculative_users": _optional(_int_at_least(1)),
        "eval.max_users": _optional(_int_at_least(1)),
        "eval.bootstrap_resamples": _int_at_least(0),
        "eval.batch1_users": _int_at_least(0),
        "eval.dtype": _one_of(("auto", *DTYPES)),
        "eval.backend": _one_of(BACKENDS),
        "eval.device": _one_of(("auto", "cpu", "cuda")),
        "data.prepare.min_rating": _optional(_number_in(float("-inf"), float("inf"))),
        "data.prepare.k_core": _int_at_least(0),
        "data.prepare.split": _one_of(SPLITS),
        "data.prepare.min_train_items": _int_at_least(1),
        "data.prepare.user_order": _one_of(USER_ORDERS),
        "data.prepare.item_order": _one_of(ITEM_ORDERS),
        "data.prepare.seed": _int_at_least(0),
        "data.sid.method": _one_of(METHODS),
        "data.sid.codebook_sizes": _list_of(_int_at_least(1)),
        "data.sid.collisions": _one_of(COLLISION_MODES),
        "data.sid.iters": _int_at_least(1),
        "data.sid.seed": _int_at_least(0),
        "data.sid.embedding.source": _one_of(EMBEDDING_SOURCES),
        "data.sid.embedding.id_kind": _one_of(("int", "original")),
        "data.sid.embedding.fields": _list_of(_one_of(TEXT_FIELDS)),
        "data.sid.embedding.max_length": _int_at_least(1),
        "data.sid.embedding.batch_size": _int_at_least(1),
        "data.sid.embedding.device": _one_of(("cpu", "cuda", "auto")),
        "data.sid.rq_vae.hidden_sizes": _list_of(_int_at_least(1)),
        "data.sid.rq_vae.latent_dim": _int_at_least(1),
        "data.sid.rq_vae.epochs": _int_at_least(1),
        "data.sid.rq_vae.batch_size": _int_at_least(1),
        "data.sid.rq_vae.lr": _number_in(0.0, float("inf"), low_open=True),
        "data.sid.rq_vae.weight_decay": _number_in(0.0, float("inf")),
        "data.sid.rq_vae.beta": _number_in(0.0, float("inf")),
        "data.sid.rq_vae.kmeans_init": _one_of((True, False)),
    }


def sid_levels(cfg: DictConfig) -> int:
    """SID tokens per item: what ``data.sid`` builds (one per codebook, one more with ``extra_level``), else the
    shipped datasets' ``SID_LEVELS``."""
    sid = OmegaConf.select(cfg, "data.sid")
    if not isinstance(sid, DictConfig) or not isinstance(sid.get("codebook_sizes"), ListConfig):
        return SID_LEVELS
    extra = sid.get("method") != "id_digits" and sid.get("collisions") == "extra_level"
    return len(sid.codebook_sizes) + int(extra)


def value_problems(cfg: DictConfig, stages: tuple[str, ...]) -> list[str]:
    """``key=value: expected ...`` for every value outside its rule, plus the decoding relations."""
    problems = []
    for key, rule in _rules().items():
        if OmegaConf.select(cfg, key, default="<absent>") == "<absent>":
            continue
        value = OmegaConf.select(cfg, key)
        if isinstance(value, ListConfig):
            value = OmegaConf.to_container(value)
        expected = rule(value)
        if expected:
            problems.append(f"{key}={value!r}: expected {expected}")
    unknown_stages = [s for s in cfg.get("stages", []) if s not in stages]
    if unknown_stages:
        problems.append(f"stages={list(cfg.stages)!r}: unknown {unknown_stages}; expected a subset of {list(stages)}")
    if any(p.startswith("decoding.") for p in problems):  # relations only between values that passed their rule
        return problems
    alignment = cfg.get("alignment")
    if alignment is not None and alignment.get("objective") not in (None, "none"):
        objective = alignment.objective
        if alignment.get("full_vocab") and objective not in ("kl", "tvd"):
            problems.append(f"alignment.full_vocab=true with alignment.objective={objective!r}: full-vocabulary rows "
                            f"exist for kl and tvd only")
        if alignment.get("full_vocab") and not cfg.get("teacher", {}).get("full_vocab_gt", False):
            problems.append("alignment.full_vocab=true needs teacher.full_vocab_gt=true (the target's full-vocabulary "
                            "logits at the ground-truth positions are stored by the teacher stage)")
        if alignment.get("on_policy_ratio", 0) > 0 and objective not in ("atspeed_s", "atspeed_r"):
            problems.append(f"alignment.on_policy_ratio={alignment.on_policy_ratio} with alignment.objective="
                            f"{objective!r}: on-policy beams are for atspeed_s and atspeed_r")
    decoding = cfg.decoding
    levels = sid_levels(cfg)
    if decoding.gamma > levels - 1:
        problems.append(f"decoding.gamma={decoding.gamma}: expected 1 <= gamma <= L - 1 = {levels - 1} "
                        f"(L = {levels} SID tokens per item)")
    n = decoding.draft_beams
    if max(decoding.ks) > n:
        problems.append(f"decoding.ks={list(decoding.ks)} with decoding.draft_beams={n}: every K must be <= N")
    if decoding.beam_size > n:
        problems.append(f"decoding.beam_size={decoding.beam_size} with decoding.draft_beams={n}: expected K <= N")
    m = decoding.get("verify_beams")
    if m is not None and not max(decoding.ks) <= m <= n:
        problems.append(f"decoding.verify_beams={m}: expected max(decoding.ks)={max(decoding.ks)} <= M <= "
                        f"decoding.draft_beams={n}")
    k_dare = decoding.get("dare_top_k")
    if k_dare is not None and "dare" in decoding.modes and k_dare < max(decoding.ks):
        problems.append(f"decoding.dare_top_k={k_dare}: expected k >= max(decoding.ks)={max(decoding.ks)} (a depth "
                        f"needs K passing continuations)")
    if decoding.get("drafter") == "layer_skip" and OmegaConf.select(cfg, "eval.backend", default="auto") == "hf":
        problems.append("decoding.drafter=layer_skip with eval.backend='hf': skipping sublayers needs the lean "
                        "forward (eval.backend auto or lean)")
    return problems


def check_config(cfg: DictConfig, stages: tuple[str, ...], conf_dir: Path = CONF_DIR) -> None:
    """Raise ``ConfigError`` listing every unknown key and every bad value of ``cfg`` (module docstring)."""
    problems = [f"{key}: unknown key (a typo, or a key this project does not read)" for key in
                unknown_keys(cfg, conf_dir)]
    problems += value_problems(cfg, stages)
    if problems:
        raise ConfigError("configuration problems, nothing was run:\n  " + "\n  ".join(problems))
