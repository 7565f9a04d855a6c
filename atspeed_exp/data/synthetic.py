"""A small synthetic dataset in the AtSpeed on-disk format, for tests and CPU runs.

``write_synthetic_dataset(root)`` writes ``training_dict.npy``, ``validation_dict.npy``, ``testing_dict.npy`` and
``{name}.LCRec-1e-3lr.json`` into ``root`` (each file atomically), readable by ``load_atspeed_dataset(root, name)``.
The same arguments always give the same files.

What the data looks like, and why:
- SIDs are hierarchical: the level-a code is an item's cluster, level b a sub-cluster inside it, and so on, so
  similar items share SID prefixes as with an RQ-VAE index.
- Exactly ``num_collisions`` SID collisions, counted as in docs/method.md section 2 (number of items minus number of distinct
  SIDs): that many items get the SID of another item of the catalogue.
- Item popularity is long-tailed (Zipf weights over a random item order).
- Sequences are learnable: every item has one fixed successor, usually in its own cluster; a user moves to the
  successor of the current item with probability ``FOLLOW_PROB`` and otherwise jumps to an item drawn by popularity
  (no item twice per user, as in the real data). A sequence model that learns the successor map beats a
  most-popular baseline by a wide margin; the popularity jumps keep that baseline non-trivial.
- Splits are a global time split like the real data: interactions get timestamps, the 80% and 90% quantiles of all
  timestamps cut train / valid / test, so many users have empty valid and/or test lists. A user whose second
  interaction falls after the first cut has their timeline moved earlier so that they keep two training items.

``ensure_synthetic_dataset`` writes only when the folder does not already hold a dataset generated with the same
parameters (recorded in ``synthetic_meta.json``, written last).
"""

from __future__ import annotations

import argparse
import inspect
import itertools
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np

from atspeed_exp.artifacts import atomic_write
from atspeed_exp.data.atspeed_format import SPLIT_FILES, default_index_file

logger = logging.getLogger(__name__)

# Bump when the generator changes what it writes for the same arguments, so cached datasets are regenerated.
GENERATOR_VERSION = 1
META_FILE = "synthetic_meta.json"

FOLLOW_PROB = 0.65  # probability that the next item is the current item's successor
SAME_CLUSTER_SUCCESSOR_PROB = 0.85  # probability that an item's successor is in its own level-a cluster
ZIPF_EXPONENT = 1.0  # popularity weight of the item of popularity rank r: 1 / (r + 1) ** ZIPF_EXPONENT
MIN_SEQ_LEN, MAX_SEQ_LEN, MEAN_EXTRA_LEN = 5, 25, 7.0  # sequence length: MIN + geometric extra, capped at MAX
TRAIN_FRACTION, VALID_FRACTION = 0.8, 0.1  # global time split of all interactions


def write_synthetic_dataset(
    root: str | Path,
    name: str = "synthetic",
    num_users: int = 600,
    num_items: int = 300,
    codes_per_level: tuple[int, ...] = (16, 8, 8, 8),
    num_collisions: int = 3,
    seed: int = 0,
) -> Path:
    """Generate the dataset and write it into the folder ``root`` (created if needed); return that folder.

    Args:
        root: dataset folder; load it back with ``load_atspeed_dataset(root, name)``.
        name: dataset name, used for the index file name ``{name}.LCRec-1e-3lr.json``.
        num_users: users in the result (all have >= 2 training items).
        num_items: items in the SID index (a few rare ones may never be interacted with).
        codes_per_level: number of codes of each SID level (level l uses letter ``chr(ord("a") + l)``).
        num_collisions: items whose SID equals another item's (``num_items`` minus the number of distinct SIDs).
        seed: seed of the one ``np.random.default_rng`` that drives everything.
    """
    _check_args(num_users, num_items, codes_per_level, num_collisions)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)

    sids = _make_sids(rng, num_items, codes_per_level, num_collisions)  # [num_items, L] codes
    popularity = _zipf_weights(rng, num_items)  # [num_items], sums to 1
    successor = _make_successors(rng, sids[:, 0], popularity)  # [num_items]
    sequences = [_make_sequence(rng, successor, popularity) for _ in range(num_users)]
    train, valid, test = _time_split(rng, sequences)

    letters = [chr(ord("a") + level) for level in range(len(codes_per_level))]
    index = {
        str(item): [f"<{letters[level]}_{int(code)}>" for level, code in enumerate(sids[item])]
        for item in range(num_items)
    }

    for split, interactions in (("train", train), ("valid", valid), ("test", test)):
        _atomic_write(root / SPLIT_FILES[split], "wb", lambda f, d=interactions: np.save(f, d, allow_pickle=True))
    _atomic_write(root / default_index_file(name), "w", lambda f: json.dump(index, f))
    # The meta file goes last: its presence means every data file above is complete.
    meta = _meta(name, num_users, num_items, codes_per_level, num_collisions, seed)
    _atomic_write(root / META_FILE, "w", lambda f: json.dump(meta, f, indent=2, sort_keys=True))
    logger.info(
        "wrote synthetic dataset %s to %s: %d users, %d items, %d/%d/%d train/valid/test interactions",
        name,
        root,
        num_users,
        num_items,
        *(sum(map(len, d.values())) for d in (train, valid, test)),
    )
    return root


def ensure_synthetic_dataset(root: str | Path, name: str = "synthetic", **kwargs: Any) -> Path:
    """Return ``root`` after making sure it holds the synthetic dataset for these arguments (see
    ``write_synthetic_dataset`` for ``kwargs``); generate it only when it is absent or was made with other ones."""
    root = Path(root)
    params = {**_default_params(), **kwargs}
    wanted = _meta(name, **params)
    files = [root / f for f in SPLIT_FILES.values()] + [root / default_index_file(name)]
    try:
        found = json.loads((root / META_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        found = None
    if found == wanted and all(f.is_file() for f in files):
        logger.debug("synthetic dataset in %s is up to date", root)
        return root
    logger.info("generating synthetic dataset %s in %s", name, root)
    return write_synthetic_dataset(root, name, **params)


def _default_params() -> dict[str, Any]:
    signature = inspect.signature(write_synthetic_dataset)
    return {k: p.default for k, p in signature.parameters.items() if k not in ("root", "name")}


def _meta(
    name: str,
    num_users: int,
    num_items: int,
    codes_per_level: tuple[int, ...],
    num_collisions: int,
    seed: int,
) -> dict[str, Any]:
    # JSON round-trip form (tuples become lists) so a freshly built dict compares equal to one read from disk.
    return {
        "generator_version": GENERATOR_VERSION,
        "name": name,
        "num_users": int(num_users),
        "num_items": int(num_items),
        "codes_per_level": [int(c) for c in codes_per_level],
        "num_collisions": int(num_collisions),
        "seed": int(seed),
    }


def _check_args(num_users: int, num_items: int, codes_per_level: tuple[int, ...], num_collisions: int) -> None:
    if num_users < 1:
        raise ValueError(f"num_users must be >= 1, got {num_users}")
    if not 1 <= len(codes_per_level) <= 26 or min(codes_per_level) < 1:
        raise ValueError(f"codes_per_level must have 1..26 positive entries, got {codes_per_level}")
    if num_items < MAX_SEQ_LEN + 1:
        # A user never repeats an item, so the catalogue must be longer than the longest sequence.
        raise ValueError(f"num_items must be > {MAX_SEQ_LEN}, got {num_items}")
    if not 0 <= 2 * num_collisions <= num_items:
        raise ValueError(f"num_collisions must be in 0..num_items/2 = {num_items // 2}, got {num_collisions}")
    capacity = int(np.prod([int(c) for c in codes_per_level], dtype=object))
    if num_items - num_collisions > capacity:
        raise ValueError(
            f"{num_items - num_collisions} distinct SIDs needed but codes_per_level={codes_per_level} allows {capacity}"
        )


def _make_sids(
    rng: np.random.Generator, num_items: int, codes_per_level: tuple[int, ...], num_collisions: int
) -> np.ndarray:
    """SID codes ``[num_items, L]``: a tree walk per item (Dirichlet child weights per node, so clusters have uneven
    sizes), the last level taken among the codes still free under the prefix."""
    num_levels = len(codes_per_level)
    child_weights: dict[tuple[int, ...], np.ndarray] = {}
    used: set[tuple[int, ...]] = set()

    def weights(prefix: tuple[int, ...]) -> np.ndarray:
        if prefix not in child_weights:
            child_weights[prefix] = rng.dirichlet(np.full(codes_per_level[len(prefix)], 2.0))
        return child_weights[prefix]

    def draw() -> tuple[int, ...] | None:
        prefix: tuple[int, ...] = ()
        for level in range(num_levels - 1):
            prefix += (int(rng.choice(codes_per_level[level], p=weights(prefix))),)
        free = [c for c in range(codes_per_level[-1]) if prefix + (c,) not in used]
        return prefix + (int(rng.choice(free)),) if free else None

    num_distinct = num_items - num_collisions
    distinct: list[tuple[int, ...]] = []
    while len(distinct) < num_distinct:
        sid = None
        for _ in range(100):
            sid = draw()
            if sid is not None:
                break
        if sid is None:  # the tree is nearly full: take the first free SID in order
            sid = next(s for s in itertools.product(*map(range, codes_per_level)) if s not in used)
        used.add(sid)
        distinct.append(sid)

    # Items that collide are placed at random ids; each takes the SID of a distinct, non-colliding item.
    order = rng.permutation(num_items)
    copies, originals = order[:num_collisions], order[num_collisions : 2 * num_collisions]
    sids = np.zeros((num_items, num_levels), dtype=np.int64)
    sids[np.sort(order[num_collisions:])] = np.array(distinct, dtype=np.int64).reshape(num_distinct, num_levels)
    sids[copies] = sids[originals]
    return sids


def _zipf_weights(rng: np.random.Generator, num_items: int) -> np.ndarray:
    rank = rng.permutation(num_items)  # rank[item] = popularity rank of the item
    weights = 1.0 / (rank + 1.0) ** ZIPF_EXPONENT
    return weights / weights.sum()


def _make_successors(rng: np.random.Generator, cluster: np.ndarray, popularity: np.ndarray) -> np.ndarray:
    """One fixed successor per item (never itself): usually a uniform pick in the same level-a cluster, otherwise an
    item anywhere drawn by popularity."""
    num_items = len(cluster)
    successor = np.empty(num_items, dtype=np.int64)
    for item in range(num_items):
        mates = np.flatnonzero((cluster == cluster[item]) & (np.arange(num_items) != item))
        if len(mates) and rng.random() < SAME_CLUSTER_SUCCESSOR_PROB:
            successor[item] = rng.choice(mates)
        else:
            p = popularity.copy()
            p[item] = 0.0
            successor[item] = rng.choice(num_items, p=p / p.sum())
    return successor


def _make_sequence(rng: np.random.Generator, successor: np.ndarray, popularity: np.ndarray) -> list[int]:
    length = min(MIN_SEQ_LEN + int(rng.geometric(1.0 / (MEAN_EXTRA_LEN + 1.0))) - 1, MAX_SEQ_LEN)
    seen = np.zeros(len(successor), dtype=bool)
    seq: list[int] = []
    item = int(rng.choice(len(successor), p=popularity))
    while True:
        seq.append(item)
        seen[item] = True
        if len(seq) == length:
            return seq
        nxt = int(successor[item])
        if seen[nxt] or rng.random() >= FOLLOW_PROB:
            p = np.where(seen, 0.0, popularity)
            nxt = int(rng.choice(len(p), p=p / p.sum()))
        item = nxt


def _time_split(
    rng: np.random.Generator, sequences: list[list[int]]
) -> tuple[dict[int, list[int]], dict[int, list[int]], dict[int, list[int]]]:
    """Timestamp every interaction and cut all of them at global time quantiles into train / valid / test."""
    times = []
    for seq in sequences:
        # Users start at different times and stay active over long, uneven spans (as reviewers do over years), so
        # the short valid/test windows catch a few items of some users and none of others.
        start = rng.uniform(-2.0, 1.0)
        span = rng.uniform(1.0, 3.0)
        times.append(start + np.sort(rng.uniform(0.0, span, size=len(seq))))
    all_times = np.concatenate(times)
    cut_valid, cut_test = np.quantile(all_times, [TRAIN_FRACTION, TRAIN_FRACTION + VALID_FRACTION])
    train, valid, test = {}, {}, {}
    for user, (seq, t) in enumerate(zip(sequences, times)):
        if t[1] >= cut_valid:
            # Keep two training items: shift the whole timeline so the second item lands just before the cut.
            t = t - (t[1] - cut_valid) - 1e-9 * (1.0 + abs(cut_valid))
        train[user] = [item for item, ti in zip(seq, t) if ti < cut_valid]
        valid[user] = [item for item, ti in zip(seq, t) if cut_valid <= ti < cut_test]
        test[user] = [item for item, ti in zip(seq, t) if ti >= cut_test]
    return train, valid, test


def _atomic_write(path: Path, mode: str, write: Callable[[IO[Any]], None]) -> None:
    # Temp file in the same folder, then os.replace: a reader never sees a half-written file (artifacts.atomic_write,
    # which also gives the file the permissions of a plain open()).
    atomic_write(path, write, mode)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, required=True, help="dataset folder to write")
    parser.add_argument("--name", default="synthetic", help="dataset name (index file {name}.LCRec-1e-3lr.json)")
    parser.add_argument("--num-users", type=int, default=600)
    parser.add_argument("--num-items", type=int, default=300)
    parser.add_argument("--codes-per-level", type=int, nargs="+", default=[16, 8, 8, 8])
    parser.add_argument("--num-collisions", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="regenerate even if an identical dataset is there")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    params = dict(
        num_users=args.num_users,
        num_items=args.num_items,
        codes_per_level=tuple(args.codes_per_level),
        num_collisions=args.num_collisions,
        seed=args.seed,
    )
    if args.force:
        write_synthetic_dataset(args.root, args.name, **params)
    else:
        ensure_synthetic_dataset(args.root, args.name, **params)


if __name__ == "__main__":
    main()
