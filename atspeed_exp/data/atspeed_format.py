"""Load and validate a dataset in the AtSpeed on-disk format, and build recommendation examples from it.

Format (one folder per dataset, docs/method.md section 2):
- ``training_dict.npy``, ``validation_dict.npy``, ``testing_dict.npy``: a pickled ``dict[int user -> list[int item]]``
  each, time-ordered per user. Pickle can run code while loading, so they are read with an unpickler that admits
  only numpy arrays, dtypes and scalars besides plain containers and numbers (``_load_split``); still, load only
  files from a trusted source;
- ``{name}.LCRec-1e-3lr.json``: ``{"item_id": ["<a_47>", "<b_103>", "<c_234>", "<d_99>"], ...}``, the SID of each item,
  one token ``<letter_code>`` per level, one letter per level.

``load_atspeed_dataset`` checks all of it and raises ``DataFormatError`` naming the file, the key and what was
expected, so a broken download fails at load time instead of as a shape error deep in training. A user missing from
one split is read as an empty list there, so the three split dicts of the result always have the same users.

``build_examples`` turns a split into ``Example``s the way the paper's code does (train: last item of the training
sequence; valid: first validation item; test: all test items count), in a deterministic order.
"""

from __future__ import annotations

import json
import logging
import pickle
import re
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from atspeed_exp.data.types import Example, RecDataset

logger = logging.getLogger(__name__)

SPLIT_FILES: dict[str, str] = {
    "train": "training_dict.npy",
    "valid": "validation_dict.npy",
    "test": "testing_dict.npy",
}
INDEX_FILE_TEMPLATE = "{name}.LCRec-1e-3lr.json"

# One SID token: "<a_47>" -> letter "a", code 47.
_SID_TOKEN = re.compile(r"^<([A-Za-z]+)_(\d+)>$")


class DataFormatError(ValueError):
    """A dataset file is missing or does not follow the AtSpeed format."""


def default_index_file(name: str) -> str:
    """File name of the SID index of dataset ``name`` (the LC-Rec RQ-VAE index shipped with the AtSpeed data)."""
    return INDEX_FILE_TEMPLATE.format(name=name)


def load_atspeed_dataset(root: str | Path, name: str, index_file: str | None = None) -> RecDataset:
    """Read and validate the dataset in folder ``root``.

    Args:
        root: the dataset folder (holds the three ``*_dict.npy`` files and the index JSON).
        name: dataset name; selects the default index file ``{name}.LCRec-1e-3lr.json``.
        index_file: index file name inside ``root`` (or a path), when it is not the default.

    Returns:
        A ``RecDataset`` whose ``train``/``valid``/``test`` dicts share the same users (sorted), and whose
        ``item_sids`` maps every item id (sorted) to a tuple of SID tokens.

    Raises:
        DataFormatError: a file is missing or malformed (the message names the file, the key and what was expected).
    """
    root = Path(root)
    if not root.is_dir():
        raise DataFormatError(f"dataset folder {root} does not exist (expected the AtSpeed files of {name!r} there)")

    index_path = root / (index_file if index_file is not None else default_index_file(name))
    item_sids = _load_index(index_path)

    splits: dict[str, dict[int, list[int]]] = {}
    for split, file_name in SPLIT_FILES.items():
        path = root / file_name
        splits[split] = _load_split(path)
        _check_items_known(path, splits[split], item_sids, index_path)

    # The format says every user is a key of every split; tolerate files that omit users with empty lists.
    users = sorted(set().union(*(s.keys() for s in splits.values())))
    for split, interactions in splits.items():
        missing = len(users) - len(interactions)
        if missing:
            logger.debug("%s: %d users absent from %s, read as empty lists", name, missing, SPLIT_FILES[split])
        splits[split] = {u: interactions.get(u, []) for u in users}

    _check_not_empty(root, splits)

    dataset = RecDataset(
        name=name,
        root=root,
        train=splits["train"],
        valid=splits["valid"],
        test=splits["test"],
        item_sids=item_sids,
    )
    logger.info(
        "loaded %s from %s: %d users, %d items, %d/%d/%d train/valid/test interactions",
        name,
        root,
        len(users),
        dataset.num_items,
        *(sum(map(len, splits[s].values())) for s in ("train", "valid", "test")),
    )
    return dataset


def _load_index(path: Path) -> dict[int, tuple[str, ...]]:
    if not path.is_file():
        raise DataFormatError(f"SID index file {path} does not exist")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataFormatError(
            f"{path}: malformed JSON at line {err.lineno}, column {err.colno} (char {err.pos}): {err.msg}"
        ) from err
    except UnicodeDecodeError as err:
        raise DataFormatError(f"{path}: not UTF-8 text ({err})") from err
    if not isinstance(raw, dict) or not raw:
        raise DataFormatError(
            f"{path}: expected a non-empty JSON object {{item_id: [SID tokens]}}, got {_describe(raw)}"
        )

    item_sids: dict[int, tuple[str, ...]] = {}
    # Levels and letters are taken from the first item in the file; every other item must agree with it.
    ref_key: str | None = None
    ref_letters: list[str] = []
    for key, sid in raw.items():
        if re.fullmatch(r"[0-9]+", key) is None:
            raise DataFormatError(f"{path}: key {key!r} is not an item id (expected a non-negative integer string)")
        item = int(key)
        if item in item_sids:
            raise DataFormatError(f"{path}: key {key!r} repeats item {item} (expected one key per item)")
        if not isinstance(sid, list) or not sid or not all(isinstance(t, str) for t in sid):
            raise DataFormatError(f"{path}: item {key!r}: expected a non-empty list of SID token strings, got {sid!r}")
        letters = []
        for level, token in enumerate(sid):
            match = _SID_TOKEN.match(token)
            if match is None:
                raise DataFormatError(
                    f"{path}: item {key!r}: token {token!r} at level {level} does not look like '<x_N>' "
                    f"(a letter, an underscore, a number, in angle brackets)"
                )
            letters.append(match.group(1))

        if ref_key is None:
            ref_key, ref_letters = key, letters
            reused = [letter for letter, n in Counter(letters).items() if n > 1]
            if reused:
                levels = [lvl for lvl, letter in enumerate(letters) if letter == reused[0]]
                raise DataFormatError(
                    f"{path}: item {key!r}: letter {reused[0]!r} is used by levels {levels} of SID {sid!r} "
                    f"(expected one distinct letter per level)"
                )
        elif len(sid) != len(ref_letters):
            raise DataFormatError(
                f"{path}: item {key!r}: SID {sid!r} has {len(sid)} tokens, expected {len(ref_letters)} "
                f"(the number of levels of item {ref_key!r}, the first in the file)"
            )
        else:
            for level, (letter, expected) in enumerate(zip(letters, ref_letters)):
                if letter != expected:
                    raise DataFormatError(
                        f"{path}: item {key!r}: token {sid[level]!r} at level {level} uses letter {letter!r}, "
                        f"expected {expected!r} (the letter of level {level} for item {ref_key!r}, the first in "
                        f"the file; each level has its own letter)"
                    )
        item_sids[item] = tuple(sid)
    return dict(sorted(item_sids.items()))


# The only globals a split file's pickle may name: what numpy's own pickling of an object array and of numpy
# scalars uses (numpy 1 writes numpy.core, numpy 2 numpy._core). Anything else (os.system, a class whose
# __reduce__ runs code) is refused before it is called.
_NPY_PICKLE_GLOBALS = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"),
}


class _SplitUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module.startswith("numpy.core."):  # numpy 1's module name; numpy 2 keeps it as a deprecated alias
            module = "numpy._core." + module.removeprefix("numpy.core.")
        if (module, name) not in _NPY_PICKLE_GLOBALS and not (module == "numpy.dtypes" and name.endswith("DType")):
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a split file")
        return super().find_class(module, name)


def _read_npy(path: Path) -> Any:
    """The array in ``.npy`` file ``path``; an object array is unpickled by ``_SplitUnpickler`` (numpy's own
    ``np.load(allow_pickle=True)`` would call any global the pickle names)."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                       (2, 0): np.lib.format.read_array_header_2_0}.get(version)
        if read_header is None:
            raise ValueError(f".npy format version {version} (expected 1.0 or 2.0)")
        _, _, dtype = read_header(f)
        if dtype.hasobject:
            return _SplitUnpickler(f, encoding="ASCII").load()  # what np.load does, with globals restricted
    return np.load(path, allow_pickle=False)


def _load_split(path: Path) -> dict[int, list[int]]:
    """Read one split file: a ``dict[int user -> list[int item]]`` pickled in a 0-d object array (``np.save`` of
    the dict). Pickled data is read, so load only files from a trusted source; the unpickler admits only numpy's
    array, dtype and scalar globals (anything else is refused without being called), and the result is checked to
    be a ``dict[int, list[int]]``. ``DataFormatError`` naming the file otherwise."""
    if not path.is_file():
        raise DataFormatError(f"split file {path} does not exist")
    try:
        array = _read_npy(path)
    except pickle.UnpicklingError as err:
        raise DataFormatError(f"{path}: refused: {err} (a split file holds only a pickled dict of int lists)") from err
    except Exception as err:  # np.load raises several unrelated types for a corrupt file
        raise DataFormatError(f"{path}: cannot be read as a .npy file ({type(err).__name__}: {err})") from err
    if not isinstance(array, np.ndarray) or array.shape != () or array.dtype != object:
        raise DataFormatError(
            f"{path}: expected a pickled dict[int user -> list[int item]] (a 0-d object array), "
            f"got {_describe(array)}"
        )
    raw = array.item()
    if not isinstance(raw, dict):
        raise DataFormatError(f"{path}: expected a dict[int user -> list[int item]], got {_describe(raw)}")

    interactions: dict[int, list[int]] = {}
    for user, items in raw.items():
        if not _is_int(user):
            raise DataFormatError(f"{path}: user key {user!r} is a {type(user).__name__}, expected an int")
        if isinstance(items, np.ndarray) and items.ndim == 1:
            items = items.tolist()
        if not isinstance(items, (list, tuple)):
            raise DataFormatError(
                f"{path}: user {user!r}: value is a {type(items).__name__}, expected a list of int item ids"
            )
        for position, item in enumerate(items):
            if not _is_int(item):
                raise DataFormatError(
                    f"{path}: user {user!r}: element {position} is {item!r} ({type(item).__name__}), "
                    f"expected an int item id"
                )
        interactions[int(user)] = [int(item) for item in items]
    return dict(sorted(interactions.items()))


def _check_items_known(
    path: Path, interactions: dict[int, list[int]], item_sids: dict[int, tuple[str, ...]], index_path: Path
) -> None:
    for user, items in interactions.items():
        for position, item in enumerate(items):
            if item not in item_sids:
                raise DataFormatError(
                    f"{path}: user {user}: item {item} (position {position}) has no SID in the index {index_path} "
                    f"(expected every item of every split to be a key there)"
                )


def _check_not_empty(root: Path, splits: dict[str, dict[int, list[int]]]) -> None:
    if not any(splits["train"].values()):
        raise DataFormatError(f"{root / SPLIT_FILES['train']}: no training interactions at all")
    for split in ("valid", "test"):
        if not any(splits[split].values()):
            raise DataFormatError(
                f"{root / SPLIT_FILES[split]}: every user's list is empty (expected at least one user with "
                f"{split} items)"
            )


def _is_int(value: Any) -> bool:
    # bool is an int subclass, but True as a user or item id is a bug in whatever wrote the file.
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _describe(value: Any) -> str:
    if isinstance(value, np.ndarray):
        return f"an array of dtype {value.dtype} and shape {value.shape}"
    return f"a {type(value).__name__}"


def build_examples(
    dataset: RecDataset, split: str, max_history: int = 20, sliding_window: bool = False
) -> list[Example]:
    """Build the examples of one split (docs/method.md section 2), ordered by user, then position.

    - ``train``: one example per user with >= 2 training items: target = the last training item, history = the
      earlier ones. With ``sliding_window``, one example per position instead: every prefix of length >= 1 of the
      training sequence -> the next item (more examples for small models trained from scratch).
    - ``valid``: users with a non-empty validation list: target = the first validation item, history = the training
      items.
    - ``test``: users with a non-empty test list: ground truth = all their test items (order kept, duplicates
      removed), target = the first of them, history = training + validation items.

    History is always the last ``max_history`` items; users whose history would be empty are skipped. Train and
    valid examples get ``ground_truth = (target,)``. The number of users left without an example, by reason, is
    logged (INFO).
    """
    if max_history < 1:
        raise ValueError(f"max_history must be >= 1, got {max_history}")
    examples: list[Example] = []
    dropped: Counter[str] = Counter()  # reason -> users without an example
    if split == "train":
        for user, seq in dataset.train.items():
            if sliding_window:
                positions = range(1, len(seq))
            else:
                positions = range(len(seq) - 1, len(seq)) if len(seq) >= 2 else range(0)
            if not positions:
                dropped["fewer than 2 training items"] += 1
            for i in positions:
                history = tuple(seq[max(0, i - max_history) : i])
                examples.append(Example(user=user, history=history, target=seq[i], ground_truth=(seq[i],)))
    elif split == "valid":
        for user, items in dataset.valid.items():
            history = tuple(dataset.train.get(user, [])[-max_history:])
            if not items:
                dropped["no validation items"] += 1
            elif not history:
                dropped["validation items but no training history"] += 1
            else:
                examples.append(Example(user=user, history=history, target=items[0], ground_truth=(items[0],)))
    elif split == "test":
        for user, items in dataset.test.items():
            seq = dataset.train.get(user, []) + dataset.valid.get(user, [])
            history = tuple(seq[-max_history:])
            if not items:
                dropped["no test items"] += 1
            elif not history:
                dropped["test items but no training or validation history"] += 1
            else:
                ground_truth = tuple(dict.fromkeys(items))  # dedup, first occurrence order kept
                examples.append(
                    Example(user=user, history=history, target=ground_truth[0], ground_truth=ground_truth)
                )
    else:
        raise ValueError(f"unknown split {split!r}: expected one of 'train', 'valid', 'test'")
    users = len(getattr(dataset, split))
    logger.info(
        "%s/%s: %d examples from %d of %d users%s", dataset.name, split, len(examples),
        users - sum(dropped.values()), users,
        "; dropped " + ", ".join(f"{n} users with {why}" for why, n in sorted(dropped.items())) if dropped else "",
    )
    # Loaded split dicts are already sorted by user; a hand-built dataset may not be. The sort is stable, so
    # positions within a user keep their order.
    examples.sort(key=lambda e: e.user)
    return examples


def item_popularity(dataset: RecDataset) -> np.ndarray:
    """Training interactions per item id: int64 ``[max_item_id + 1]`` (ids absent from training count 0)."""
    size = max(dataset.item_sids) + 1
    items = [item for seq in dataset.train.values() for item in seq]
    return np.bincount(np.asarray(items, dtype=np.int64), minlength=size)[:size].astype(np.int64)


def sid_to_items(dataset: RecDataset) -> dict[tuple[str, ...], list[int]]:
    """Map each SID to its items in ascending id order (several items when SIDs collide; docs/method.md section 2 expands a
    generated SID to all of them)."""
    mapping: dict[tuple[str, ...], list[int]] = {}
    for item in sorted(dataset.item_sids):
        mapping.setdefault(dataset.item_sids[item], []).append(item)
    return mapping
