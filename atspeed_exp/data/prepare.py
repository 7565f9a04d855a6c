"""Raw Amazon review files -> a dataset folder in the AtSpeed on-disk format (no SID index; ``sid_build`` adds one).

Contract of ``prepare_dataset`` (every step is deterministic: the same inputs and settings give byte-identical
files):

1. read the review files in order (JSON lines, gzip or plain; the 2014 schema ``reviewerID``, ``asin``,
   ``unixReviewTime``, ``overall`` and the 2018 schema, which adds keys that are ignored). A line that is not JSON
   is retried as a Python literal (some 2014 files are written that way); such rows are counted, not dropped. A row
   that cannot be used is counted by reason in the manifest (``bad_rows``), never dropped silently. When none of
   the first ``SCHEMA_PROBE_ROWS`` rows has the required keys, the file is not a review file: ``SchemaError`` names
   the file, the line and the keys found;
2. keep rows with ``overall >= min_rating`` (``min_rating: null`` keeps every row);
3. one interaction per (user, item) pair, as the AtSpeed release builds it: a repeated pair keeps the timestamp of
   its last row and the input position of its first;
4. k-core: drop users and items with fewer than ``k_core`` interactions, repeated until nothing changes (a fixed
   point: one pass can leave a user below k after its items were dropped);
5. every user's interactions in time order, ties broken by input position (file, then line);
6. the split, ``atspeed_time`` (the release's rule, ``atspeed_time_cuts``) or ``leave_one_out`` (last item test,
   second-to-last valid, the rest train); then users with fewer than ``min_train_items`` training items are dropped
   from every split;
7. integer ids ``0 .. n-1``: users and items by ``user_order`` / ``item_order`` (``first_appearance``: the input
   position of their first kept row; ``sorted``: by original id; ``shuffled`` (items only): the sorted original ids
   shuffled by ``random.Random(seed)``, the release's rule with seed 2023);
8. the folder ``output``: ``training_dict.npy``, ``validation_dict.npy``, ``testing_dict.npy`` (every kept user a
   key of every split, full sequences: the loader cuts histories), ``item_map.json`` and ``user_map.json``
   (original id -> int id, in id order), ``manifest.json`` (counts, settings, inputs' sha256, bad rows) and, with a
   metadata file, ``item_text.json`` (int id -> title, description, categories). The folder is written under a
   temporary name and renamed when complete, so a half-written dataset never carries the final name.
"""

from __future__ import annotations

import ast
import gzip
import json
import logging
import math
import random
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from atspeed_exp.artifacts import atomic_directory, sha256_file
from atspeed_exp.data.atspeed_format import SPLIT_FILES

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1  # bump when the same inputs and settings would give other files
USER_KEY, ITEM_KEY, TIME_KEY, RATING_KEY = "reviewerID", "asin", "unixReviewTime", "overall"
SCHEMA_PROBE_ROWS = 20  # a file whose first parsed rows all lack a user or item key is not a review file
SPLITS = ("atspeed_time", "leave_one_out")
USER_ORDERS = ("first_appearance", "sorted")
ITEM_ORDERS = ("first_appearance", "sorted", "shuffled")
MANIFEST_FILE, ITEM_MAP_FILE, USER_MAP_FILE, ITEM_TEXT_FILE = "manifest.json", "item_map.json", "user_map.json", "item_text.json"


class SchemaError(ValueError):
    """A raw file does not have the expected keys (the message names the file, the line and the keys found)."""


@dataclass(frozen=True)
class PrepareSettings:
    """What ``prepare_dataset`` does; every field is recorded in the manifest. See the module docstring."""

    min_rating: float | None = 4.0
    k_core: int = 5
    split: str = "atspeed_time"
    ratios: tuple[float, float, float] = (0.8, 0.1, 0.1)
    min_train_items: int = 2
    user_order: str = "first_appearance"
    item_order: str = "first_appearance"
    seed: int = 2023

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {self.split!r}")
        if self.user_order not in USER_ORDERS:
            raise ValueError(f"user_order must be one of {USER_ORDERS}, got {self.user_order!r}")
        if self.item_order not in ITEM_ORDERS:
            raise ValueError(f"item_order must be one of {ITEM_ORDERS}, got {self.item_order!r}")
        if len(self.ratios) != 3 or min(self.ratios) < 0 or not math.isclose(sum(self.ratios), 1.0, abs_tol=1e-6):
            raise ValueError(f"ratios must be three non-negative fractions (train, valid, test) summing to 1, "
                             f"got {list(self.ratios)}")
        if self.k_core < 0 or self.min_train_items < 1:
            raise ValueError(f"k_core must be >= 0 and min_train_items >= 1, got {self.k_core}, {self.min_train_items}")


# -- reading -----------------------------------------------------------------------------------------------------
def open_text(path: str | Path) -> IO[str]:
    """The file as text lines; gzip is recognised by its magic bytes, not by the file name."""
    path = Path(path)
    with open(path, "rb") as f:
        magic = f.read(2)
    if magic == b"\x1f\x8b":
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def parse_rows(path: str | Path, counts: Counter[str]) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for every line of ``path`` that parses as a JSON object or, failing that, a Python
    literal dict. ``counts`` gains ``python_literal`` for the latter and, per unusable line, ``blank line``,
    ``malformed (neither JSON nor a Python literal)`` or ``not an object``."""
    with open_text(path) as f:
        for number, line in enumerate(f, 1):
            text = line.strip()
            if not text:
                counts["blank line"] += 1
                continue
            try:
                row = json.loads(text)
            except ValueError:
                try:
                    row = ast.literal_eval(text)  # literals only: no names, calls or attribute access
                except (ValueError, SyntaxError, MemoryError, RecursionError):
                    counts["malformed (neither JSON nor a Python literal)"] += 1
                    continue
                counts["python_literal"] += 1
            if not isinstance(row, dict):
                counts["not an object"] += 1
                continue
            yield number, row


class _SchemaProbe:
    """Raises ``SchemaError`` when the first ``SCHEMA_PROBE_ROWS`` parsed rows of a file all lack one of ``keys``."""

    def __init__(self, path: Path, keys: Sequence[str], what: str) -> None:
        self.path, self.keys, self.what = path, tuple(keys), what
        self.seen = 0  # parsed rows without the keys so far
        self.confirmed = False  # a row with all the keys was seen
        self.first: int | None = None  # line of the first row without them
        self.first_keys: list[str] = []

    def check(self, number: int, row: dict[str, Any]) -> None:
        if self.confirmed:
            return
        if all(k in row for k in self.keys):
            self.confirmed = True
            return
        if self.first is None:
            self.first, self.first_keys = number, sorted(map(str, row))[:12]
        self.seen += 1
        if self.seen >= SCHEMA_PROBE_ROWS:
            self.fail()

    def finish(self) -> None:
        if not self.confirmed and self.first is not None:
            self.fail()

    def fail(self) -> None:
        missing = [k for k in self.keys if k not in self.first_keys]
        raise SchemaError(
            f"{self.path}:{self.first}: not {self.what}: none of the first {self.seen} rows has the keys "
            f"{list(self.keys)} (line {self.first} lacks {missing}; its keys are {self.first_keys})"
        )


@dataclass
class _Interactions:
    """Kept interactions, one per (user, item) pair, in order of first kept row."""

    users: list[str]
    items: list[str]
    times: list[int]
    order: list[int]  # input position of the pair's first kept row (file index * 2**40 + line)


def read_reviews(
    paths: Sequence[str | Path], min_rating: float | None, bad: Counter[str], notes: Counter[str]
) -> _Interactions:
    """Steps 1-3 of the module docstring over the files ``paths`` in order. ``bad`` counts unusable rows by reason,
    ``notes`` counts usable rows of note (``python_literal``, ``below min_rating``, ``duplicate user-item pair``)."""
    pairs: dict[tuple[str, str], int] = {}  # (user, item) -> index into the lists below
    out = _Interactions([], [], [], [])
    required = (USER_KEY, ITEM_KEY, TIME_KEY) + ((RATING_KEY,) if min_rating is not None else ())
    for file_index, path in enumerate(map(Path, paths)):
        probe = _SchemaProbe(path, (USER_KEY, ITEM_KEY), "an Amazon review file")
        parse_counts: Counter[str] = Counter()
        for number, row in parse_rows(path, parse_counts):
            probe.check(number, row)
            missing = next((k for k in required if k not in row), None)
            if missing is not None:
                bad[f"missing key {missing}"] += 1
                continue
            user, item, time = row[USER_KEY], row[ITEM_KEY], _as_int(row[TIME_KEY])
            if not isinstance(user, str) or not user:
                bad[f"wrong type {USER_KEY} (expected a non-empty string)"] += 1
                continue
            if not isinstance(item, str) or not item:
                bad[f"wrong type {ITEM_KEY} (expected a non-empty string)"] += 1
                continue
            if time is None:
                bad[f"wrong type {TIME_KEY} (expected an integer)"] += 1
                continue
            if min_rating is not None:
                rating = row[RATING_KEY]
                if isinstance(rating, bool) or not isinstance(rating, (int, float)) or math.isnan(rating):
                    bad[f"wrong type {RATING_KEY} (expected a number)"] += 1
                    continue
                if rating < min_rating:
                    notes["below min_rating"] += 1
                    continue
            key = (user, item)
            index = pairs.get(key)
            if index is not None:  # the release keeps one interaction per pair: last timestamp, first position
                notes["duplicate user-item pair"] += 1
                out.times[index] = time
                continue
            pairs[key] = len(out.users)
            out.users.append(user)
            out.items.append(item)
            out.times.append(time)
            out.order.append((file_index << 40) + number)
        probe.finish()
        notes["python_literal"] += parse_counts.pop("python_literal", 0)
        bad.update(parse_counts)
    return out


def _as_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


# -- filtering and splitting -------------------------------------------------------------------------------------
def k_core_mask(user_codes: np.ndarray, item_codes: np.ndarray, k: int) -> tuple[np.ndarray, int]:
    """Interactions ``[n]`` kept by the k-core filter (users and items with >= k kept interactions each), iterated
    to a fixed point; returns (mask ``[n]`` bool, passes run). ``k <= 1`` keeps everything."""
    keep = np.ones(len(user_codes), dtype=bool)
    if k <= 1 or len(user_codes) == 0:
        return keep, 0
    passes = 0
    while True:
        passes += 1
        user_count = np.bincount(user_codes[keep], minlength=user_codes.max() + 1)
        item_count = np.bincount(item_codes[keep], minlength=item_codes.max() + 1)
        new = keep & (user_count[user_codes] >= k) & (item_count[item_codes] >= k)
        if np.array_equal(new, keep):
            return keep, passes
        keep = new


def atspeed_time_cuts(times: np.ndarray, ratios: Sequence[float]) -> tuple[int, int]:
    """The release's global time split (AtSpeed ``data/data_process.ipynb``): sort all N kept timestamps,
    ``n_test = int(N * test_ratio)``, ``n_tail = n_test + int(N * valid_ratio)``; the cuts are the timestamps at
    positions ``N - n_tail`` (valid) and ``N - n_test`` (test) of the sorted list. An interaction is train when its
    time is before the valid cut, valid when before the test cut, else test; so every interaction at a cut's
    timestamp goes to the later split. Returns (valid cut, test cut)."""
    n = len(times)
    n_test = int(n * ratios[2])
    n_tail = n_test + int(n * ratios[1])
    if n_test < 1 or n_tail - n_test < 1 or n_tail >= n:
        raise ValueError(f"{n} interactions are too few for ratios {list(ratios)}: valid and test need >= 1 each")
    ordered = np.sort(times, kind="stable")
    return int(ordered[n - n_tail]), int(ordered[n - n_test])


def split_sequences(
    sequences: dict[str, list[tuple[int, str]]], settings: PrepareSettings
) -> tuple[dict[str, tuple[list[str], list[str], list[str]]], dict[str, Any]]:
    """Step 6: user -> (train, valid, test) item lists from time-ordered ``(time, item)`` sequences; returns the
    splits of the users kept (>= ``min_train_items`` training items) and facts for the manifest."""
    facts: dict[str, Any] = {}
    splits: dict[str, tuple[list[str], list[str], list[str]]] = {}
    if settings.split == "atspeed_time":
        all_times = np.array([t for seq in sequences.values() for t, _ in seq], dtype=np.int64)
        cut_valid, cut_test = atspeed_time_cuts(all_times, settings.ratios)
        facts.update(valid_cut_time=cut_valid, test_cut_time=cut_test)
        for user, seq in sequences.items():
            splits[user] = ([i for t, i in seq if t < cut_valid],
                            [i for t, i in seq if cut_valid <= t < cut_test],
                            [i for t, i in seq if t >= cut_test])
    else:
        for user, seq in sequences.items():
            items = [i for _, i in seq]
            splits[user] = (items[:-2], items[-2:-1], items[-1:]) if len(items) >= 3 else (items, [], [])
    kept = {u: s for u, s in splits.items() if len(s[0]) >= settings.min_train_items}
    facts["users_dropped_fewer_train_items"] = len(splits) - len(kept)
    return kept, facts


def _id_maps(
    splits: dict[str, tuple[list[str], list[str], list[str]]], first_seen_user: dict[str, int],
    first_seen_item: dict[str, int], settings: PrepareSettings,
) -> tuple[dict[str, int], dict[str, int]]:
    users = list(splits)
    items = sorted({i for s in splits.values() for part in s for i in part})
    users.sort(key=(lambda u: first_seen_user[u]) if settings.user_order == "first_appearance" else None)
    if settings.item_order == "first_appearance":
        items.sort(key=lambda i: first_seen_item[i])
    elif settings.item_order == "shuffled":
        random.Random(settings.seed).shuffle(items)  # sorted ids, then shuffled: the release's item map
    return {u: n for n, u in enumerate(users)}, {i: n for n, i in enumerate(items)}


# -- the whole stage ---------------------------------------------------------------------------------------------
def prepare_dataset(
    reviews: str | Path | Sequence[str | Path],
    output: str | Path,
    name: str,
    settings: PrepareSettings = PrepareSettings(),
    metadata: str | Path | None = None,
) -> dict[str, Any]:
    """Build the dataset folder ``output`` from the review file(s) ``reviews`` (module docstring); returns the
    manifest. ``name`` is recorded (the SID index written later is ``{name}.LCRec-1e-3lr.json``)."""
    paths = [Path(reviews)] if isinstance(reviews, (str, Path)) else [Path(p) for p in reviews]
    bad: Counter[str] = Counter()
    notes: Counter[str] = Counter()
    raw = read_reviews(paths, settings.min_rating, bad, notes)
    if not raw.users:
        raise ValueError(f"no usable review rows in {[str(p) for p in paths]} (bad rows: {dict(bad)})")

    user_ids, user_codes = np.unique(np.array(raw.users, dtype=object).astype(str), return_inverse=True)
    item_ids, item_codes = np.unique(np.array(raw.items, dtype=object).astype(str), return_inverse=True)
    keep, passes = k_core_mask(user_codes, item_codes, settings.k_core)
    times = np.array(raw.times, dtype=np.int64)
    order = np.array(raw.order, dtype=np.int64)
    index = np.flatnonzero(keep)
    # time order per user, ties by input position: lexsort keys go last-to-first (user, time, position)
    index = index[np.lexsort((order[index], times[index], user_codes[index]))]

    sequences: dict[str, list[tuple[int, str]]] = {}
    first_seen_user: dict[str, int] = {}
    first_seen_item: dict[str, int] = {}
    for j in index.tolist():
        user, item = raw.users[j], raw.items[j]
        sequences.setdefault(user, []).append((raw.times[j], item))
        first_seen_user[user] = min(first_seen_user.get(user, raw.order[j]), raw.order[j])
        first_seen_item[item] = min(first_seen_item.get(item, raw.order[j]), raw.order[j])
    if not sequences:
        raise ValueError(f"the {settings.k_core}-core of {[str(p) for p in paths]} is empty")
    splits, split_facts = split_sequences(sequences, settings)
    if not splits:
        raise ValueError(f"no user has >= {settings.min_train_items} training items after the split")
    user_map, item_map = _id_maps(splits, first_seen_user, first_seen_item, settings)

    by_id = sorted(splits, key=user_map.__getitem__)
    dicts = [{user_map[u]: [item_map[i] for i in splits[u][part]] for u in by_id} for part in range(3)]
    counts = _counts(dicts, len(item_map))
    for part, split in enumerate(("train", "valid", "test")):
        if split != "train" and counts["interactions"][split] == 0:
            raise ValueError(f"the {settings.split} split leaves no {split} interactions; the data is too small or "
                             f"the ratios {list(settings.ratios)} too skewed")

    item_text, text_facts = (None, None)
    if metadata is not None:
        item_text, text_facts = read_item_text(Path(metadata), item_map)

    manifest = {
        "format_version": FORMAT_VERSION,
        "name": name,
        "settings": {**settings.__dict__, "ratios": list(settings.ratios)},
        "inputs": {
            "reviews": [{"file": p.name, "sha256": sha256_file(p), "bytes": p.stat().st_size} for p in paths],
            "metadata": None if metadata is None else {"file": Path(metadata).name,
                                                       "sha256": sha256_file(metadata)},
        },
        "id_order": {"users": settings.user_order, "items": settings.item_order},
        "rows": {
            "usable_rows": len(raw.users) + notes["duplicate user-item pair"] + notes["below min_rating"],
            "bad_rows": dict(sorted(bad.items())),
            "python_literal_rows": notes["python_literal"],
            "below_min_rating": notes["below min_rating"],
            "duplicate_user_item_pairs": notes["duplicate user-item pair"],
            "pairs_before_k_core": len(raw.users),
            "pairs_after_k_core": int(keep.sum()),
            "k_core_passes": passes,
        },
        "split": {"rule": settings.split, **split_facts},
        **counts,
        "item_text": text_facts,
    }

    with atomic_directory(output) as tmp:
        for part, split in enumerate(("train", "valid", "test")):
            with open(tmp / SPLIT_FILES[split], "wb") as f:
                np.save(f, dicts[part], allow_pickle=True)
        _write_json(tmp / ITEM_MAP_FILE, item_map)
        _write_json(tmp / USER_MAP_FILE, user_map)
        if item_text is not None:
            _write_json(tmp / ITEM_TEXT_FILE, item_text)
        _write_json(tmp / MANIFEST_FILE, manifest)
    logger.info("wrote %s to %s: %d users, %d items, %d/%d/%d train/valid/test interactions; bad rows %s",
                name, output, counts["users"], counts["items"], *(counts["interactions"][k] for k in ("train", "valid", "test")), dict(bad) or "none")
    return manifest


def dataset_differences(
    output: str | Path,
    reviews: str | Path | Sequence[str | Path],
    name: str,
    settings: PrepareSettings = PrepareSettings(),
    metadata: str | Path | None = None,
) -> list[str]:
    """Why the folder ``output`` is not what ``prepare_dataset`` with these arguments writes; empty when it is.
    Compared with its ``manifest.json``: the format version, the name, every setting, and the input files by content
    (their sizes first, so a changed file is usually found without hashing; a renamed file with the same content is
    the same input). A folder whose manifest or split files are missing is reported as such."""
    output = Path(output)
    manifest_path = output / MANIFEST_FILE
    if not manifest_path.is_file():
        return [f"{manifest_path} does not exist"]
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except ValueError as error:
        return [f"{manifest_path} is not JSON ({error})"]
    why = [f"{output / f} is missing" for f in (*SPLIT_FILES.values(), ITEM_MAP_FILE) if not (output / f).is_file()]
    if manifest.get("format_version") != FORMAT_VERSION:
        why.append(f"format version {manifest.get('format_version')} -> {FORMAT_VERSION}")
    if manifest.get("name") != name:
        why.append(f"name {manifest.get('name')!r} -> {name!r}")
    recorded = manifest.get("settings") or {}
    current = {**settings.__dict__, "ratios": list(settings.ratios)}
    why += [f"{key} {recorded.get(key)!r} -> {value!r}" for key, value in current.items() if recorded.get(key) != value]
    inputs = manifest.get("inputs") or {}
    paths = [Path(reviews)] if isinstance(reviews, (str, Path)) else [Path(p) for p in reviews]
    old = inputs.get("reviews") or []
    if len(old) != len(paths):
        why.append(f"{len(old)} review files -> {len(paths)}")
    else:
        for path, entry in zip(paths, old):
            if path.stat().st_size != entry.get("bytes") or sha256_file(path) != entry.get("sha256"):
                why.append(f"review file {path} differs from the {entry.get('file')} it was made from")
    old_meta = inputs.get("metadata")
    if (metadata is None) != (old_meta is None):
        why.append(f"metadata {'none' if old_meta is None else old_meta.get('file')} -> {metadata or 'none'}")
    elif metadata is not None and sha256_file(metadata) != old_meta.get("sha256"):
        why.append(f"metadata file {metadata} differs from the {old_meta.get('file')} it was made from")
    return why


def _counts(dicts: list[dict[int, list[int]]], num_items: int) -> dict[str, Any]:
    train, valid, test = dicts
    per_split = {s: sum(map(len, d.values())) for s, d in zip(("train", "valid", "test"), dicts)}
    total = sum(per_split.values())
    train_items = {i for seq in train.values() for i in seq}
    users = len(train)
    return {
        "users": users,
        "items": num_items,
        "interactions": {**per_split, "total": total},
        "users_with_items": {"valid": sum(1 for s in valid.values() if s), "test": sum(1 for s in test.values() if s)},
        "cold_items": num_items - len(train_items),  # items seen only in valid/test
        "density": total / (users * num_items),
        "sparsity": 1.0 - total / (users * num_items),
    }


def _write_json(path: Path, payload: Any) -> None:
    # the folder is renamed into place as a whole (atomic_directory), so plain writes inside it are safe
    with open(path, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=1, ensure_ascii=False)
        f.write("\n")


# -- item text ---------------------------------------------------------------------------------------------------
def read_item_text(path: Path, item_map: dict[str, int]) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """int item id (as a string key) -> ``{"asin", "title", "description", "categories"}`` for the items of
    ``item_map`` found in the metadata file ``path`` (2014: ``categories`` a list of category paths, ``description``
    a string; 2018: ``category`` a list, ``description`` a list of strings; both JSON or Python-literal lines).
    The first row of an asin wins. Returns the table (ascending id) and facts for the manifest."""
    bad: Counter[str] = Counter()
    parse_counts: Counter[str] = Counter()
    probe = _SchemaProbe(path, (ITEM_KEY,), "an Amazon metadata file")
    found: dict[int, dict[str, Any]] = {}
    for number, row in parse_rows(path, parse_counts):
        probe.check(number, row)
        asin = row.get(ITEM_KEY)
        if not isinstance(asin, str):
            bad[f"missing key {ITEM_KEY}" if asin is None else f"wrong type {ITEM_KEY}"] += 1
            continue
        item = item_map.get(asin)
        if item is None or item in found:
            continue
        found[item] = {"asin": asin, "title": _text(row.get("title")), "description": _text(row.get("description")),
                       "categories": _categories(row.get("categories", row.get("category")))}
    probe.finish()
    python_literal = parse_counts.pop("python_literal", 0)
    bad.update(parse_counts)
    table = {str(i): found[i] for i in sorted(found)}
    facts = {"items_with_text": len(found), "items_without_text": len(item_map) - len(found),
             "bad_rows": dict(sorted(bad.items())), "python_literal_rows": python_literal}
    return table, facts


def _text(value: Any) -> str:
    if isinstance(value, list):
        return " ".join(str(v).strip() for v in value if str(v).strip())
    return str(value).strip() if value is not None else ""


def _categories(value: Any) -> list[str]:
    flat: list[str] = []
    for entry in value if isinstance(value, list) else []:
        for name in entry if isinstance(entry, list) else [entry]:
            if isinstance(name, str) and name.strip() and name.strip() not in flat:
                flat.append(name.strip())
    return flat
