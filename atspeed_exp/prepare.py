"""Building dataset folders: raw reviews -> split files (``atspeed_exp.data.prepare``) -> SID index
(``atspeed_exp.data.sid_build``). Two ways in:

- ``python -m atspeed_exp.prepare prepare.reviews=PATH [prepare.name=NAME] [key=value ...]`` (Hydra,
  ``conf/prepare_data.yaml``) runs the steps of ``steps`` in order, ``split`` then ``sid``; the folder is then used
  by the pipeline with ``data.root=`` it. ``run_split(cfg.prepare)`` and ``run_sid(cfg.sid)`` take the config groups
  and can be called on their own.
- ``prepare_for_run(cfg)``, called by ``pipeline.run`` before the data-file check, when the data config has
  ``prepare`` and/or ``sid`` (conf/data/synthetic_raw.yaml): ``data.root`` is built from ``data.prepare`` and its
  index (``data.index_file``) from ``data.sid`` when missing or made from other inputs or settings, and reused
  otherwise. The split step's ``manifest.json`` and the index's report record what they were made from
  (``dataset_differences``, ``index_differences``); a folder or index that holds no such record was not made here
  and is never replaced. ``data.sid.embedding.source: sasrec`` with ``path: null`` trains the SASRec stage of the
  run's config on a placeholder index (item-id digits) first and takes its item embeddings.

Errors about inputs name the config key (``data.prepare.reviews=...``, ``sid.embedding.path=...``).
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf, open_dict

import atspeed_exp.project_paths  # noqa: F401  (registers ${project_root:...} before Hydra resolves conf/)

log = logging.getLogger(__name__)
STEPS = ("split", "sid")
PLACEHOLDER_INDEX = "{name}.id_digits.json"  # the placeholder index the automatic SASRec embeddings train on


def _container(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def split_settings(prepare: DictConfig, key: str = "prepare") -> Any:
    """``PrepareSettings`` from a ``prepare`` config node (``key`` names it in errors)."""
    from atspeed_exp.data.prepare import PrepareSettings

    try:
        return PrepareSettings(
            min_rating=prepare.min_rating, k_core=prepare.k_core, split=prepare.split,
            ratios=tuple(float(r) for r in prepare.ratios), min_train_items=prepare.min_train_items,
            user_order=prepare.user_order, item_order=prepare.item_order, seed=prepare.seed,
        )
    except ValueError as error:
        raise ValueError(f"{key}: {error}") from None


def _input_files(prepare: DictConfig, key: str) -> tuple[list[Path], Path | None]:
    """The review files and the metadata file of ``prepare``, each checked to exist."""
    reviews = _container(prepare.reviews)
    reviews = [reviews] if isinstance(reviews, str) else list(reviews)
    for path in reviews:
        if not Path(path).is_file():
            raise FileNotFoundError(f"{key}.reviews={path!r}: no such file (raw review file, JSON lines, gzip or "
                                    f"plain)")
    metadata = prepare.get("metadata")
    if metadata is not None and not Path(metadata).is_file():
        raise FileNotFoundError(f"{key}.metadata={metadata!r}: no such file (item metadata, JSON lines)")
    return [Path(p) for p in reviews], None if metadata is None else Path(metadata)


def run_split(prepare: DictConfig, output: str | Path | None = None, name: str | None = None,
              key: str = "prepare") -> dict[str, Any]:
    """The split step from a ``prepare`` group (into ``output`` / as ``name`` when given, else its own keys);
    returns the manifest."""
    from atspeed_exp.data.prepare import SchemaError, prepare_dataset

    reviews, metadata = _input_files(prepare, key)
    settings = split_settings(prepare, key)
    output = prepare.output if output is None else output
    try:
        return prepare_dataset(reviews, output, prepare.name if name is None else name, settings, metadata=metadata)
    except SchemaError as error:
        raise SchemaError(f"{key}.reviews / {key}.metadata: {error}") from None


def run_sid(sid: DictConfig, root: str | Path | None = None, name: str | None = None,
            index_file: str | None = None, inputs: dict[str, Any] | None = None,
            embedding: dict[str, Any] | None = None) -> dict[str, Any]:
    """The sid step from a ``sid`` group (of the folder ``root`` / dataset ``name`` / ``index_file`` when given,
    else its own keys; ``embedding`` replaces ``sid.embedding``); returns the report."""
    from atspeed_exp.data.sid_build import build_index

    embedding = _container(sid.embedding) if embedding is None else embedding
    return build_index(sid.root if root is None else root, sid.name if name is None else name, embedding,
                       [int(c) for c in sid.codebook_sizes], sid.collisions, sid.iters, sid.seed,
                       sid.get("index_file") if index_file is None else index_file, sid.method, inputs=inputs,
                       rq_vae=_container(sid.get("rq_vae")))


# -- the pipeline's hook -----------------------------------------------------------------------------------------
def prepare_for_run(cfg: DictConfig) -> None:
    """Build ``cfg.data.root`` and its SID index from ``cfg.data.prepare`` / ``cfg.data.sid`` where they are set and
    the files are missing or stale (module docstring); nothing when neither is set. Concurrent runs build once (a
    lock beside the folder)."""
    from atspeed_exp.artifacts import stage_lock

    data = cfg.data
    if data.get("prepare") is None and data.get("sid") is None:
        return
    root = Path(data.root)
    with stage_lock(root):
        if data.get("prepare") is not None:
            ensure_split(data.prepare, root, data.name)
        if data.get("sid") is not None:
            ensure_sid(cfg, root)
        else:
            from atspeed_exp.data.atspeed_format import default_index_file

            index = root / (data.get("index_file") or default_index_file(data.name))
            if not index.is_file():
                raise FileNotFoundError(f"{index} does not exist and data.sid is null: data.prepare writes the "
                                        f"split files only; set data.sid (as in conf/data/synthetic_raw.yaml) to "
                                        f"build the index, or put one there")


def ensure_split(prepare: DictConfig, root: Path, name: str, key: str = "data.prepare") -> None:
    """Write the folder ``root`` from ``prepare`` unless its manifest says it was made from the same inputs and
    settings. A non-empty folder without a manifest is refused (not made by the split step)."""
    from atspeed_exp.data.prepare import MANIFEST_FILE, dataset_differences

    reviews, metadata = _input_files(prepare, key)
    why = dataset_differences(root, reviews, name, split_settings(prepare, key), metadata)
    if not why:
        log.info("data.root=%s: reusing the dataset prepared from the same inputs and settings", root)
        return
    if root.is_dir() and not (root / MANIFEST_FILE).is_file() and any(root.iterdir()):
        raise FileExistsError(
            f"data.root={str(root)!r} holds files but no {MANIFEST_FILE}, so the split step did not write it and it "
            f"is not replaced; point data.root at a new folder, or set data.prepare=null to use its files as they are")
    log.info("data.root=%s: preparing it from %s (%s)", root, ", ".join(p.name for p in reviews), "; ".join(why))
    run_split(prepare, root, name, key)


def ensure_sid(cfg: DictConfig, root: Path, key: str = "data.sid") -> None:
    """Write the SID index of ``root`` (``data.index_file``) from ``cfg.data.sid`` unless its report records the
    same inputs. An index without a report is refused (not made here)."""
    from atspeed_exp.data.atspeed_format import default_index_file
    from atspeed_exp.data.sid_build import index_differences, report_path, sid_inputs

    data, sid = cfg.data, cfg.data.sid
    index = root / (data.get("index_file") or default_index_file(data.name))
    embedding = _container(sid.embedding)
    auto_sasrec = sid.method != "id_digits" and embedding.get("source") == "sasrec" and embedding.get("path") is None
    sasrec_cfg = sasrec_embedding_config(cfg) if auto_sasrec else None
    if auto_sasrec:
        from atspeed_exp.baselines import sasrec_stage_dir

        named = {"source": "sasrec", "stage": sasrec_stage_dir(sasrec_cfg).name}  # its settings, not its weights
    else:
        named = None
    inputs = sid_inputs(root, sid.method, embedding, sid.codebook_sizes, sid.collisions, sid.iters, sid.seed,
                        embeddings=named, key=key, rq_vae=_container(sid.get("rq_vae")))
    why = index_differences(index, inputs)
    if not why:
        log.info("%s: reusing the SID index made from the same inputs and settings", index)
        return
    if index.is_file() and not report_path(index).is_file():
        raise FileExistsError(
            f"{index} exists without {report_path(index).name}, so it was not built here and is not replaced; set "
            f"data.index_file to another file name, or data.sid=null to use this index")
    log.info("%s: building the SID index (%s)", index, "; ".join(why))
    if auto_sasrec:
        embedding = {**embedding, "path": str(train_embedding_sasrec(sasrec_cfg, root))}
    run_sid(sid, root, data.name, index.name, inputs=inputs, embedding=embedding)


def split_files_digest(root: Path) -> str:
    """sha256 over the three split files of ``root``."""
    from atspeed_exp.artifacts import sha256_file
    from atspeed_exp.data.atspeed_format import SPLIT_FILES

    digest = hashlib.sha256()
    for name in SPLIT_FILES.values():
        digest.update(name.encode() + b"\0" + sha256_file(root / name).encode())
    return digest.hexdigest()


def sasrec_embedding_config(cfg: DictConfig) -> DictConfig:
    """The run's config for the SASRec whose item embeddings make the SIDs: the placeholder index, no ``sid``, and
    the split files' sha256 under ``data.split_files_sha256``, so that its stage key (settings only) changes when
    the split files do and a SASRec trained on other splits is never reused."""
    sub = copy.deepcopy(cfg)
    with open_dict(sub):
        sub.data.index_file = PLACEHOLDER_INDEX.format(name=cfg.data.name)
        sub.data.sid = None
        sub.data.split_files_sha256 = split_files_digest(Path(cfg.data.root))
    return sub


def train_embedding_sasrec(sasrec_cfg: DictConfig, root: Path) -> Path:
    """Write the placeholder index (two levels of item-id digits: every item its own code, no meaning) and train
    (or reuse) the SASRec stage of ``sasrec_cfg`` on the folder; returns the stage folder."""
    from atspeed_exp.baselines import train_sasrec
    from atspeed_exp.data.sid_build import build_index, dataset_item_ids

    size = math.isqrt(max(dataset_item_ids(root)) + 1) + 1  # size ** 2 > every item id
    build_index(root, sasrec_cfg.data.name, {}, [size, size], method="id_digits",
                index_file=sasrec_cfg.data.index_file)
    log.info("training SASRec on %s for the item embeddings of the SID index", root)
    return train_sasrec(sasrec_cfg)


# -- the entry ---------------------------------------------------------------------------------------------------
def run(cfg: DictConfig) -> None:
    unknown = [s for s in cfg.steps if s not in STEPS]
    if unknown:
        raise ValueError(f"steps {unknown} unknown; choose from {list(STEPS)}")
    for step in cfg.steps:
        if step == "split":
            run_split(cfg.prepare)
        else:
            run_sid(cfg.sid)


@hydra.main(version_base="1.3", config_path="../conf", config_name="prepare_data")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
