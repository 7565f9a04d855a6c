"""Semantic IDs from item embeddings: residual k-means (RQ-k-means) with collision handling, written as an index
file in the AtSpeed format (``{name}.LCRec-1e-3lr.json``: item id -> one ``<letter_code>`` token per level).

Contract of ``build_sids`` (torch only; the same embeddings, settings and seed give the same codes):

- level l runs k-means with ``codebook_sizes[l]`` centroids (k-means++ init, then Lloyd iterations, all drawn from
  one seeded ``torch.Generator``, computed in float64) on the residuals that the levels above leave: level 0 on the
  embeddings, level l on ``residual_{l-1} - centroid_{l-1}[code_{l-1}]``. A cluster that empties during Lloyd gets
  the point farthest from its centroid;
- collisions (items with the same full code) are then handled by ``collisions``:
  ``none``: kept (the loader expands a shared SID to all its items);
  ``extra_level``: one more level (TIGER style): the items of a shared code get 0, 1, 2, ... in ascending item
  order, the others 0; its codebook must fit ``codebook_sizes[-1]``;
  ``reassign_last``: the last level is re-assigned within every group of items that share the first L-1 codes
  (the aim of LC-Rec's Sinkhorn pass on the last level, done here by a greedy capacity-constrained assignment,
  not Sinkhorn): the (item, last-level centroid) pairs of the group are taken by ascending distance (ties by item,
  then code) and a pair is kept when its item has no code yet and its code has fewer than
  ``ceil(group size / C_last)`` items. A group of at most C_last items gets distinct last codes, so the index is
  collision-free unless some group outgrows C_last; groups without a collision keep their nearest codes (greedy
  gives each item its nearest code when those are distinct).

``build_index`` with ``method`` ``rq_vae`` quantises with a trained RQ-VAE instead of k-means (``rq_vae.py``) and
handles collisions the same way (``handle_collisions``), in the RQ-VAE's latent space.

``sid_report`` measures the codes: per level the codes used of the codebook, the collision rate
``(N - distinct SIDs) / N`` (LC-Rec's definition), items in a shared SID, and max / mean items per full SID and per
(L-1)-prefix. ``load_embeddings`` reads a user's ``.npy`` file (with an item-id order file), a trained SASRec stage's
item embedding matrix, or encodes the items' text with a local encoder (``text_embeddings``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from atspeed_exp.artifacts import atomic_write, sha256_file
from atspeed_exp.data.atspeed_format import SPLIT_FILES, _load_split, default_index_file
from atspeed_exp.data.text_embeddings import TEXT_FIELDS, folder_digest, text_embeddings

logger = logging.getLogger(__name__)

COLLISION_MODES = ("none", "extra_level", "reassign_last")
METHODS = ("rq_kmeans", "rq_vae", "id_digits")
EMBEDDING_SOURCES = ("file", "sasrec", "text")
LETTERS = "abcdefghijklmnopqrstuvwxyz"
INDEX_FORMAT_VERSION = 1  # bump when the same inputs and settings would give another index


# -- k-means ----------------------------------------------------------------------------------------------------
def kmeans_plus_plus(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding: ``x`` [N, D] -> ``k`` centroids [k, D] (``k <= N``), each next one drawn with probability
    proportional to the squared distance to the nearest centroid so far (uniformly when all are 0)."""
    n = x.shape[0]
    first = int(torch.randint(n, (1,), generator=generator))
    centroids = [x[first]]
    nearest = ((x - x[first]) ** 2).sum(dim=1)  # [N]
    for _ in range(1, k):
        weights = nearest if float(nearest.sum()) > 0 else torch.ones_like(nearest)
        pick = int(torch.multinomial(weights, 1, generator=generator))
        centroids.append(x[pick])
        nearest = torch.minimum(nearest, ((x - x[pick]) ** 2).sum(dim=1))
    return torch.stack(centroids)


def kmeans(x: torch.Tensor, k: int, iters: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means on ``x`` [N, D] with ``min(k, N)`` centroids; returns (centroids [k', D], codes [N] long).
    Stops early when no code changes; ties go to the lower centroid index."""
    k = min(k, x.shape[0])
    centroids = kmeans_plus_plus(x, k, generator)
    codes = torch.full((x.shape[0],), -1, dtype=torch.long)
    for _ in range(iters):
        dist = torch.cdist(x, centroids) ** 2  # [N, k]
        new = dist.argmin(dim=1)
        if torch.equal(new, codes):
            break
        codes = new
        sums = torch.zeros_like(centroids).index_add_(0, codes, x)  # [k, D]
        counts = torch.bincount(codes, minlength=k).to(x.dtype)  # [k]
        centroids = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], centroids)
        empty = torch.nonzero(counts == 0).flatten().tolist()
        if empty:  # re-seed each empty cluster with the point farthest from its own centroid
            error = dist.gather(1, codes[:, None]).squeeze(1)  # [N]
            for cluster, point in zip(empty, error.argsort(descending=True, stable=True)[: len(empty)].tolist()):
                centroids[cluster] = x[point]
    codes = (torch.cdist(x, centroids) ** 2).argmin(dim=1)
    return centroids, codes


def residual_kmeans(
    embeddings: torch.Tensor, codebook_sizes: Sequence[int], iters: int, seed: int
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """RQ-k-means: ``embeddings`` [N, D] -> (codes [N, L] long, centroids per level [C_l, D], the residual that each
    level quantised [N, D] per level)."""
    generator = torch.Generator().manual_seed(seed)
    residual = embeddings.to(torch.float64)
    codes, codebooks, inputs = [], [], []
    for size in codebook_sizes:
        centroids, level_codes = kmeans(residual, int(size), iters, generator)
        codes.append(level_codes)
        codebooks.append(centroids)
        inputs.append(residual)
        residual = residual - centroids[level_codes]
    return torch.stack(codes, dim=1), codebooks, inputs


# -- collisions --------------------------------------------------------------------------------------------------
def group_ids(codes: torch.Tensor) -> torch.Tensor:
    """[N] id of each row's code tuple in ``codes`` [N, L] (equal rows, equal id)."""
    return torch.unique(codes, dim=0, return_inverse=True)[1]


def add_disambiguation_level(codes: torch.Tensor, max_size: int) -> torch.Tensor:
    """TIGER-style extra level: [N, L] -> [N, L+1]; the items of one full code get 0, 1, 2, ... by ascending row."""
    group = group_ids(codes)
    order = torch.sort(group, stable=True).indices  # rows grouped, ascending row inside a group
    sorted_group = group[order]
    starts = torch.searchsorted(sorted_group, sorted_group, right=False)  # first position of each row's group
    rank = torch.empty_like(group)
    rank[order] = torch.arange(len(group)) - starts
    if len(rank) and int(rank.max()) >= max_size:
        raise ValueError(f"{int(rank.max()) + 1} items share one code: more than the extra level's {max_size} codes")
    return torch.cat([codes, rank[:, None]], dim=1)


def reassign_last_level(codes: torch.Tensor, residual: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Greedy capacity-constrained re-assignment of the last level inside each (L-1)-prefix group that holds a
    collision (module docstring). codes: [N, L]; residual: [N, D] the last level's input; centroids: [C, D] the last
    level's codebook. Returns new codes [N, L]."""
    codes = codes.clone()
    size = centroids.shape[0]
    prefix = group_ids(codes[:, :-1])
    full = group_ids(codes)
    collided = torch.bincount(full)[full] > 1  # [N] rows in a shared full code
    for group in torch.unique(prefix[collided]).tolist():
        rows = torch.nonzero(prefix == group).flatten()  # ascending
        capacity = math.ceil(len(rows) / size)
        dist = torch.cdist(residual[rows], centroids) ** 2  # [n_g, C]
        pairs = torch.sort(dist.flatten(), stable=True).indices.tolist()  # row-major: ties by item, then code
        assigned = [-1] * len(rows)
        load = [0] * size
        left = len(rows)
        for pair in pairs:
            item, code = divmod(pair, size)
            if assigned[item] < 0 and load[code] < capacity:
                assigned[item] = code
                load[code] += 1
                left -= 1
                if left == 0:
                    break
        codes[rows, -1] = torch.tensor(assigned, dtype=torch.long)
    return codes


def check_sid_settings(embeddings: torch.Tensor, codebook_sizes: Sequence[int], collisions: str) -> None:
    """ValueError for a collision mode, embedding shape or codebook list that ``build_sids`` cannot use."""
    if collisions not in COLLISION_MODES:
        raise ValueError(f"collisions must be one of {COLLISION_MODES}, got {collisions!r}")
    if embeddings.ndim != 2 or embeddings.shape[0] < 1:
        raise ValueError(f"embeddings must be [N, D] with N >= 1, got shape {tuple(embeddings.shape)}")
    if not codebook_sizes or min(codebook_sizes) < 1 or len(codebook_sizes) + (collisions == "extra_level") > 26:
        raise ValueError(f"codebook_sizes must be 1..26 positive sizes, got {list(codebook_sizes)}")


def handle_collisions(
    codes: torch.Tensor, last_input: torch.Tensor, last_codebook: torch.Tensor, codebook_sizes: Sequence[int],
    collisions: str,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Apply ``collisions`` to the quantiser's codes [N, L] (module docstring); ``last_input`` [N, D'] and
    ``last_codebook`` [C_L, D'] are the last level's input and codebook (``reassign_last`` re-assigns by distance
    to them). Returns the final codes and the report (``sid_report`` under ``before`` and ``after``)."""
    sizes = [int(c) for c in codebook_sizes]
    before = sid_report(codes, sizes)
    if collisions == "extra_level":
        final, sizes = add_disambiguation_level(codes, sizes[-1]), sizes + [sizes[-1]]
    elif collisions == "reassign_last":
        final = reassign_last_level(codes, last_input, last_codebook)
    else:
        final = codes
    return final, {"collisions": collisions, "before": before, "after": sid_report(final, sizes)}


def build_sids(
    embeddings: torch.Tensor, codebook_sizes: Sequence[int], collisions: str = "reassign_last", iters: int = 100,
    seed: int = 0,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Codes [N, L'] for the embedding rows (L' = L, or L + 1 with ``extra_level``) and the report (``sid_report``
    of the k-means codes under ``before`` and of the final codes under ``after``)."""
    check_sid_settings(embeddings, codebook_sizes, collisions)
    codes, codebooks, inputs = residual_kmeans(embeddings, codebook_sizes, iters, seed)
    return handle_collisions(codes, inputs[-1], codebooks[-1], codebook_sizes, collisions)


def sid_report(codes: torch.Tensor, codebook_sizes: Sequence[int]) -> dict[str, Any]:
    """Codebook usage per level and collision statistics of ``codes`` [N, L] (module docstring)."""
    n = codes.shape[0]
    full_count = torch.bincount(group_ids(codes))  # [distinct SIDs] items per SID
    prefix_count = torch.bincount(group_ids(codes[:, :-1])) if codes.shape[1] > 1 else full_count
    return {
        "items": n,
        "levels": [{"codebook_size": int(size), "codes_used": int(torch.unique(codes[:, level]).numel()),
                    "usage": int(torch.unique(codes[:, level]).numel()) / int(size)}
                   for level, size in enumerate(codebook_sizes)],
        "distinct_sids": int(full_count.numel()),
        "collision_rate": (n - full_count.numel()) / n,
        "items_in_collisions": int(full_count[full_count > 1].sum()),
        "max_items_per_sid": int(full_count.max()),
        "mean_items_per_sid": n / full_count.numel(),
        "max_items_per_prefix": int(prefix_count.max()),
        "mean_items_per_prefix": n / prefix_count.numel(),
    }


# -- embeddings in, index out ------------------------------------------------------------------------------------
def dataset_item_ids(root: str | Path) -> list[int]:
    """The item ids of a dataset folder: the values of ``item_map.json`` when present (written by ``prepare``),
    else every item of the three split files; ascending."""
    root = Path(root)
    item_map = root / "item_map.json"
    if item_map.is_file():
        return sorted(int(v) for v in json.loads(item_map.read_text(encoding="utf-8")).values())
    items = {i for split in SPLIT_FILES.values() for seq in _load_split(root / split).values() for i in seq}
    return sorted(items)


def load_embeddings(
    item_ids: Sequence[int], source: str, path: str | Path, ids_file: str | Path | None = None,
    id_kind: str = "int", item_map_file: str | Path | None = None, text_file: str | Path | None = None,
    fields: Sequence[str] = TEXT_FIELDS, max_length: int = 128, batch_size: int = 32, device: str = "cpu",
    cache_dir: str | Path | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Embeddings [len(item_ids), D] float64, row r for ``item_ids[r]``, and facts for the report.

    source ``file``: ``path`` is a ``.npy`` [M, D]; ``ids_file`` names row m's item, one id per line (``id_kind``
    ``int``: the dataset's int ids; ``original``: original ids, mapped by ``item_map_file``); without ``ids_file``
    row m is item m. Rows of items not in the dataset are ignored (counted); a dataset item without a row is an
    error. source ``sasrec``: ``path`` is a finished SASRec stage folder; its ``model.pt`` item embedding row i is
    item i (the padding row is dropped). source ``text``: ``path`` is a local transformers encoder folder, the
    texts come from ``text_file`` (the dataset's ``item_text.json``); ``fields``, ``max_length``, ``batch_size``,
    ``device`` and ``cache_dir`` as in ``text_embeddings.text_embeddings``.
    """
    if source == "file":
        matrix = torch.from_numpy(np.load(path, allow_pickle=False)).to(torch.float64)
        if matrix.ndim != 2:
            raise ValueError(f"{path}: expected an [N, D] array, got shape {tuple(matrix.shape)}")
        if ids_file is None:
            row_ids = list(range(matrix.shape[0]))
        else:
            names = [line.strip() for line in Path(ids_file).read_text(encoding="utf-8").splitlines() if line.strip()]
            if len(names) != matrix.shape[0]:
                raise ValueError(f"{ids_file}: {len(names)} ids for {matrix.shape[0]} rows of {path}")
            if id_kind == "original":
                if item_map_file is None:
                    raise ValueError("id_kind 'original' needs the dataset's item_map.json")
                mapping = json.loads(Path(item_map_file).read_text(encoding="utf-8"))
                row_ids = [int(mapping[n]) if n in mapping else -1 for n in names]
            elif id_kind == "int":
                row_ids = [int(n) for n in names]
            else:
                raise ValueError(f"id_kind must be 'int' or 'original', got {id_kind!r}")
    elif source == "sasrec":
        state = torch.load(Path(path) / "model.pt", map_location="cpu", weights_only=True)
        weight = state["item_embedding.weight"]
        matrix = weight[:-1].to(torch.float64)  # the last row is the padding embedding
        row_ids = list(range(matrix.shape[0]))
    elif source == "text":
        if text_file is None or not Path(text_file).is_file():
            raise FileNotFoundError(f"embedding source 'text' needs the dataset's item_text.json (the split step "
                                    f"writes it from prepare.metadata); got {text_file}")
        matrix, text_facts = text_embeddings(text_file, item_ids, path, fields, max_length, batch_size, device,
                                             cache_dir)
        row_ids = list(item_ids)
    else:
        raise ValueError(f"embedding source must be 'file', 'sasrec' or 'text', got {source!r}")

    row_of = {}
    for row, item in enumerate(row_ids):
        if item >= 0:
            row_of.setdefault(item, row)
    missing = [i for i in item_ids if i not in row_of]
    if missing:
        raise ValueError(f"{path}: no embedding for {len(missing)} of {len(item_ids)} dataset items "
                         f"(first: {missing[:5]})")
    rows = torch.tensor([row_of[i] for i in item_ids], dtype=torch.long)
    facts = {"source": source, "rows": int(matrix.shape[0]), "dim": int(matrix.shape[1]),
             "rows_not_in_dataset": int(matrix.shape[0]) - len(item_ids)}
    if source == "text":
        facts.update(text_facts)
    return matrix[rows], facts


def sid_tokens(codes: torch.Tensor) -> list[list[str]]:
    """[N, L] codes -> per row the tokens ``<a_c0>``, ``<b_c1>``, ..."""
    return [[f"<{LETTERS[level]}_{code}>" for level, code in enumerate(row)] for row in codes.tolist()]


def write_index(path: str | Path, item_ids: Sequence[int], codes: torch.Tensor) -> Path:
    """Write the index JSON ``{"item_id": [tokens]}`` (ascending item id) atomically."""
    index = {str(item): tokens for item, tokens in sorted(zip(item_ids, sid_tokens(codes)))}
    return atomic_write(path, lambda f: json.dump(index, f))


def id_digit_codes(num_items: int, codebook_size: int, levels: int) -> torch.Tensor:
    """A placeholder index with no meaning: item i's codes are the base-``codebook_size`` digits of i ([N, L]),
    so every item has its own SID. It makes a prepared folder loadable before real SIDs exist (e.g. to train the
    SASRec stage whose item embeddings then feed ``build_sids``)."""
    if codebook_size ** levels < num_items:
        raise ValueError(f"{levels} levels of {codebook_size} codes cannot number {num_items} items")
    ids = torch.arange(num_items)
    return torch.stack([(ids // codebook_size ** (levels - 1 - l)) % codebook_size for l in range(levels)], dim=1)


# -- what an index was made from ---------------------------------------------------------------------------------
def report_path(index: str | Path) -> Path:
    """The report beside an index file: ``<index stem>.report.json``."""
    index = Path(index)
    return index.with_name(index.stem + ".report.json")


def embedding_fingerprint(root: str | Path, embedding: dict[str, Any], key: str = "sid") -> dict[str, Any]:
    """The content of what ``load_embeddings`` would read for ``embedding`` (its config, ``key`` names it in
    errors): sha256 of the ``.npy`` and ids files (source ``file``), of the SASRec stage's ``model.pt`` (``sasrec``),
    of the encoder folder's files and ``item_text.json`` (``text``). A missing input is an error naming its key."""
    source, path = embedding.get("source"), embedding.get("path")
    if source not in EMBEDDING_SOURCES:
        raise ValueError(f"{key}.embedding.source={source!r}: expected one of {list(EMBEDDING_SOURCES)}")
    what = {"file": "an .npy file of item embeddings [N, D]", "sasrec": "a finished SASRec stage folder",
            "text": "a local transformers encoder folder"}[source]
    if path is None:
        raise ValueError(f"{key}.embedding.path=null: source {source!r} needs {what}")
    path = Path(path)
    if source == "file":
        if not path.is_file():
            raise FileNotFoundError(f"{key}.embedding.path={str(path)!r}: no such file ({what})")
        ids_file = embedding.get("ids_file")
        if ids_file is not None and not Path(ids_file).is_file():
            raise FileNotFoundError(f"{key}.embedding.ids_file={str(ids_file)!r}: no such file")
        return {"source": source, "npy": sha256_file(path), "ids_file": ids_file and sha256_file(ids_file),
                "id_kind": embedding.get("id_kind", "int")}
    if source == "sasrec":
        if not (path / "model.pt").is_file():
            raise FileNotFoundError(f"{key}.embedding.path={str(path)!r}: no model.pt there ({what})")
        return {"source": source, "model": sha256_file(path / "model.pt")}
    if not path.is_dir():
        raise FileNotFoundError(f"{key}.embedding.path={str(path)!r}: no such folder ({what})")
    text = Path(root) / "item_text.json"
    if not text.is_file():
        raise FileNotFoundError(f"{text} does not exist: source 'text' encodes the item text that the split step "
                                f"writes when given a metadata file (prepare.metadata)")
    settings = {k: v for k, v in embedding.items() if k not in ("source", "path", "ids_file", "id_kind")}
    return {"source": source, "encoder": folder_digest(path), "item_text": sha256_file(text), **settings}


def sid_inputs(
    root: str | Path, method: str, embedding: dict[str, Any], codebook_sizes: Sequence[int], collisions: str,
    iters: int, seed: int, embeddings: dict[str, Any] | None = None, key: str = "sid",
    rq_vae: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """What an index of the folder ``root`` is made from, recorded in its report under ``inputs``: the settings
    (with ``method`` ``rq_vae`` every RQ-VAE setting, defaults filled in), the dataset's items (their ids and
    ``item_map.json``) and the embeddings (``embedding_fingerprint``, or ``embeddings`` when the caller names them
    otherwise). Two indexes with equal inputs are the same index."""
    if method not in METHODS:
        raise ValueError(f"{key}.method={method!r}: expected one of {list(METHODS)}")
    root = Path(root)
    item_map = root / "item_map.json"
    ids = json.dumps(dataset_item_ids(root)).encode()
    settings: dict[str, Any] = {"method": method, "codebook_sizes": [int(c) for c in codebook_sizes]}
    if method != "id_digits":
        settings.update(collisions=collisions, iters=int(iters), seed=int(seed))
        if method == "rq_vae":
            from atspeed_exp.data.rq_vae import RQVAESettings

            settings["rq_vae"] = RQVAESettings.from_dict(rq_vae, f"{key}.rq_vae").as_dict()
        embeddings = embeddings if embeddings is not None else embedding_fingerprint(root, embedding, key)
    return {"format_version": INDEX_FORMAT_VERSION, "settings": settings,
            "items": {"ids": hashlib.sha256(ids).hexdigest(),
                      "item_map": sha256_file(item_map) if item_map.is_file() else None},
            "embeddings": embeddings if method != "id_digits" else None}


def index_differences(index: str | Path, inputs: dict[str, Any]) -> list[str]:
    """Why the index file ``index`` is not the one ``inputs`` make (empty when it is): the index or its report is
    missing, or the report records other inputs (named by part)."""
    index, report = Path(index), report_path(index)
    if not index.is_file():
        return [f"{index} does not exist"]
    if not report.is_file():
        return [f"{report} does not exist"]
    try:
        recorded = json.loads(report.read_text(encoding="utf-8")).get("inputs")
    except ValueError as error:
        return [f"{report} is not JSON ({error})"]
    if not isinstance(recorded, dict):
        return [f"{report} records no inputs"]
    why = []
    if recorded.get("format_version") != inputs["format_version"]:
        why.append(f"format version {recorded.get('format_version')} -> {inputs['format_version']}")
    old = recorded.get("settings") or {}
    why += [f"{k} {old.get(k)!r} -> {v!r}" for k, v in inputs["settings"].items() if old.get(k) != v]
    why += [f"{k} {old[k]!r} -> absent" for k in old if k not in inputs["settings"]]
    if recorded.get("items") != inputs["items"]:
        why.append("the dataset's items changed")
    if recorded.get("embeddings") != inputs["embeddings"]:
        changed = sorted(k for k in {*(recorded.get("embeddings") or {}), *(inputs["embeddings"] or {})}
                         if (recorded.get("embeddings") or {}).get(k) != (inputs["embeddings"] or {}).get(k))
        why.append(f"the embeddings changed ({', '.join(changed)})")
    return why


def build_index(
    root: str | Path, name: str, embedding: dict[str, Any], codebook_sizes: Sequence[int],
    collisions: str = "reassign_last", iters: int = 100, seed: int = 0, index_file: str | None = None,
    method: str = "rq_kmeans", inputs: dict[str, Any] | None = None, rq_vae: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Build and write the SID index of the dataset folder ``root``: ``{name}.LCRec-1e-3lr.json`` (or
    ``index_file``) and its report beside it (``<index stem>.report.json``, with ``sid_inputs`` under ``inputs``;
    pass ``inputs`` when already computed). ``embedding``: keyword arguments of ``load_embeddings`` less
    ``item_ids`` (unused by ``method`` ``id_digits``); ``rq_vae``: ``RQVAESettings`` fields (``method`` ``rq_vae``).
    The old report is removed before the index is replaced and the new one written last, so an index is never
    beside the report of another. Returns the report."""
    root = Path(root)
    if inputs is None:
        inputs = sid_inputs(root, method, embedding, codebook_sizes, collisions, iters, seed, rq_vae=rq_vae)
    item_ids = dataset_item_ids(root)
    if method == "id_digits":
        size = int(codebook_sizes[0])
        codes = id_digit_codes(max(item_ids) + 1, size, len(codebook_sizes))[torch.tensor(item_ids)]
        report: dict[str, Any] = {"method": method, "inputs": inputs,
                                  "after": sid_report(codes, [size] * len(codebook_sizes))}
    elif method in ("rq_kmeans", "rq_vae"):
        item_map = root / "item_map.json"
        vectors, facts = load_embeddings(item_ids, item_map_file=item_map if item_map.is_file() else None,
                                         text_file=root / "item_text.json", cache_dir=root / "embeddings",
                                         **embedding)
        if method == "rq_kmeans":
            codes, report = build_sids(vectors, codebook_sizes, collisions, iters, seed)
        else:
            from atspeed_exp.data.rq_vae import RQVAESettings, rq_vae_sids  # it imports this module

            settings = RQVAESettings.from_dict(rq_vae)
            codes, report = rq_vae_sids(vectors, codebook_sizes, collisions, settings, seed, iters)
            report = {"rq_vae": settings.as_dict(), **report}
        report = {"method": method, "inputs": inputs, "embeddings": facts, "iters": iters, "seed": seed, **report}
    else:
        raise ValueError(f"method must be one of {list(METHODS)}, got {method!r}")
    path = root / (index_file or default_index_file(name))
    report_path(path).unlink(missing_ok=True)
    write_index(path, item_ids, codes)
    atomic_write(report_path(path), lambda f: json.dump(report, f, indent=1))
    after = report["after"]
    logger.info("wrote %s: %d items, %d levels, collision rate %.4f (before handling: %s), codes used per level %s",
                path, after["items"], codes.shape[1], after["collision_rate"],
                report.get("before", {}).get("collision_rate", "-"), [lv["codes_used"] for lv in after["levels"]])
    return report
