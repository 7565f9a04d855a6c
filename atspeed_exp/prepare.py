"""Entry: ``python -m atspeed_exp.prepare prepare.reviews=PATH [prepare.name=NAME] [key=value ...]`` (Hydra,
``conf/prepare_data.yaml``). Runs the steps of ``steps`` in order: ``split`` (raw reviews -> dataset folder,
``atspeed_exp.data.prepare``) and ``sid`` (item embeddings -> SID index in that folder,
``atspeed_exp.data.sid_build``). The dataset is then used by the pipeline with ``data.root=`` that folder.

``run_split(cfg.prepare)`` and ``run_sid(cfg.sid)`` take the config groups and can be called on their own.
"""

from __future__ import annotations

import logging
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

import atspeed_exp.project_paths  # noqa: F401  (registers ${project_root:...} before Hydra resolves conf/)

log = logging.getLogger(__name__)
STEPS = ("split", "sid")


def run_split(prepare: DictConfig) -> dict[str, Any]:
    """The split step from the ``prepare`` group; returns the manifest."""
    from atspeed_exp.data.prepare import PrepareSettings, prepare_dataset

    reviews = OmegaConf.to_container(prepare.reviews) if OmegaConf.is_list(prepare.reviews) else prepare.reviews
    settings = PrepareSettings(
        min_rating=prepare.min_rating, k_core=prepare.k_core, split=prepare.split,
        ratios=tuple(float(r) for r in prepare.ratios), min_train_items=prepare.min_train_items,
        user_order=prepare.user_order, item_order=prepare.item_order, seed=prepare.seed,
    )
    return prepare_dataset(reviews, prepare.output, prepare.name, settings, metadata=prepare.metadata)


def run_sid(sid: DictConfig) -> dict[str, Any]:
    """The sid step from the ``sid`` group; returns the report."""
    from atspeed_exp.data.sid_build import build_index

    embedding = OmegaConf.to_container(sid.embedding, resolve=True)
    return build_index(sid.root, sid.name, embedding, [int(c) for c in sid.codebook_sizes], sid.collisions,
                       sid.iters, sid.seed, sid.index_file, sid.method)


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
