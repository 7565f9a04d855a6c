"""Raw Amazon reviews -> AtSpeed split files (atspeed_exp/data/prepare.py) and the prepare entry's configs."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import numpy as np
import pytest

from atspeed_exp.data.atspeed_format import load_atspeed_dataset
from atspeed_exp.data.prepare import (
    PrepareSettings,
    SchemaError,
    atspeed_time_cuts,
    k_core_mask,
    prepare_dataset,
)
from atspeed_exp.data.sid_build import build_index
from atspeed_exp.data.synthetic_raw import write_synthetic_metadata, write_synthetic_reviews

ALL = PrepareSettings(min_rating=None, k_core=0, min_train_items=1)  # keeps every row of a hand-made file
CONF = Path(__file__).resolve().parents[1] / "conf"


def write_lines(path: Path, rows: list, compress: bool = False) -> Path:
    text = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)
    path.write_bytes(gzip.compress(text.encode(), mtime=0) if compress else text.encode())
    return path


def review(user: str, item: str, time: int, rating: float = 5.0) -> dict:
    return {"reviewerID": user, "asin": item, "unixReviewTime": time, "overall": rating}


def read_split(root: Path, split: str) -> dict:
    return np.load(root / f"{split}_dict.npy", allow_pickle=True).item()


def sequences(root: Path) -> dict[str, list[str]]:
    """Original user -> original items over train + valid + test, in file order."""
    users = {v: k for k, v in json.loads((root / "user_map.json").read_text()).items()}
    items = {v: k for k, v in json.loads((root / "item_map.json").read_text()).items()}
    parts = [read_split(root, s) for s in ("training", "validation", "testing")]
    return {users[u]: [items[i] for p in parts for i in p[u]] for u in parts[0]}


def test_prepare_reads_2014_plain_and_2018_gzip_alike(tmp_path):
    old = write_synthetic_reviews(tmp_path / "reviews_2014.json", schema="2014")
    new = write_synthetic_reviews(tmp_path / "reviews_2018.json.gz", schema="2018", compress=True)
    assert new.read_bytes()[:2] == b"\x1f\x8b"
    a = prepare_dataset(old, tmp_path / "a", "syn", PrepareSettings(k_core=3))
    b = prepare_dataset(new, tmp_path / "b", "syn", PrepareSettings(k_core=3))
    for name in ("training_dict.npy", "validation_dict.npy", "testing_dict.npy", "item_map.json", "user_map.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert a["interactions"] == b["interactions"] and a["interactions"]["valid"] > 0
    assert a["rows"]["bad_rows"] == {} and a["rows"]["below_min_rating"] > 0


def test_prepare_python_literal_lines_are_read_and_counted(tmp_path):
    rows = [review("u1", "i1", 1), repr(review("u1", "i2", 2)), repr(review("u1", "i3", 3)), review("u1", "i4", 4)]
    manifest = prepare_dataset(write_lines(tmp_path / "r.json", rows), tmp_path / "out", "t",
                               PrepareSettings(min_rating=None, k_core=0, split="leave_one_out", min_train_items=1))
    assert manifest["rows"]["python_literal_rows"] == 2
    assert sequences(tmp_path / "out") == {"u1": ["i1", "i2", "i3", "i4"]}


def test_k_core_mask_iterates_to_a_fixed_point():
    # k = 2. A chain that one pass does not see: item c (1 user) goes first, then u3 (left with b only), then b
    # (left with u1 only), then u1, then a; the 2x2 block u4, u5 x x, y stays.
    pairs = [("u1", "a"), ("u2", "a"), ("u1", "b"), ("u3", "b"), ("u3", "c"), ("u2", "d"),
             ("u4", "x"), ("u4", "y"), ("u5", "x"), ("u5", "y")]
    users = np.array([int(u[1]) for u, _ in pairs])
    items = np.array(["abcdxy".index(i) for _, i in pairs])
    keep, passes = k_core_mask(users, items, 2)
    assert [p for p, k in zip(pairs, keep) if k] == pairs[-4:]
    assert passes > 2  # one pass keeps u3 and b
    one_pass = (np.bincount(users)[users] >= 2) & (np.bincount(items)[items] >= 2)
    assert one_pass.sum() > 4


def test_prepare_orders_by_time_then_input_position(tmp_path):
    rows = [review("u1", "late", 300), review("u1", "tie_first", 100), review("u2", "x", 50),
            review("u1", "tie_second", 100), review("u1", "mid", 200), review("u1", "early", 10),
            review("u2", "y", 60), review("u2", "z", 70)]
    prepare_dataset(write_lines(tmp_path / "r.json", rows), tmp_path / "out", "t",
                    PrepareSettings(min_rating=None, k_core=0, split="leave_one_out", min_train_items=1))
    assert sequences(tmp_path / "out")["u1"] == ["early", "tie_first", "tie_second", "mid", "late"]


def test_prepare_repeated_pair_keeps_last_time_and_first_position(tmp_path):
    rows = [review("u1", "a", 5), review("u1", "b", 5), review("u1", "c", 1), review("u1", "a", 5),
            review("u1", "d", 9), review("u1", "c", 7)]
    manifest = prepare_dataset(write_lines(tmp_path / "r.json", rows), tmp_path / "out", "t",
                               PrepareSettings(min_rating=None, k_core=0, split="leave_one_out", min_train_items=1))
    assert manifest["rows"]["duplicate_user_item_pairs"] == 2
    assert sequences(tmp_path / "out")["u1"] == ["a", "b", "c", "d"]  # c moved to time 7; a stays before b


def notebook_cuts(times: list[int]) -> tuple[int, int]:
    """The release notebook's rule for 8:1:1, written out: sorted times, test_num = int(N * 0.1), the test cut at
    position -test_num, the valid cut at position -ceil(2 * test_num)."""
    ordered = sorted(times)
    test_num = int(len(ordered) * 0.1)
    return ordered[-math.ceil(2 * test_num)], ordered[-test_num]


@pytest.mark.parametrize("times", [list(range(1, 21)), [1] * 5 + [3] * 7 + [4] * 3 + [6] * 6 + [9] * 4,
                                   [int(t) for t in np.random.default_rng(0).integers(0, 50, size=137)]])
def test_atspeed_time_cuts_match_the_release_rule(times):
    assert atspeed_time_cuts(np.array(times), (0.8, 0.1, 0.1)) == notebook_cuts(times)


def test_prepare_atspeed_time_split_on_a_hand_made_case(tmp_path):
    # 20 interactions at times 1..20: valid cut 17, test cut 19 (times at a cut go to the later split).
    # u4 keeps one training item (16) and is dropped with its valid item 18.
    times = {"u1": range(1, 11), "u2": [11, 12, 13, 17, 19], "u3": [14, 15, 20], "u4": [16, 18]}
    rows = [review(u, f"i{t}", t) for u, ts in times.items() for t in ts]
    manifest = prepare_dataset(write_lines(tmp_path / "r.json", rows), tmp_path / "out", "t",
                               PrepareSettings(min_rating=None, k_core=0, min_train_items=2))
    assert (manifest["split"]["valid_cut_time"], manifest["split"]["test_cut_time"]) == (17, 19)
    assert manifest["split"]["users_dropped_fewer_train_items"] == 1
    users = json.loads((tmp_path / "out" / "user_map.json").read_text())
    items = {v: int(k[1:]) for k, v in json.loads((tmp_path / "out" / "item_map.json").read_text()).items()}
    got = {u: [[items[i] for i in read_split(tmp_path / "out", s)[n]] for s in ("training", "validation", "testing")]
           for u, n in users.items()}
    assert got == {"u1": [list(range(1, 11)), [], []], "u2": [[11, 12, 13], [17], [19]], "u3": [[14, 15], [], [20]]}
    assert manifest["interactions"] == {"train": 15, "valid": 1, "test": 2, "total": 18}


def test_prepare_leave_one_out_holds_out_the_last_two(tmp_path):
    rows = [review("u1", f"i{t}", t) for t in range(5)] + [review("u2", f"i{t}", t) for t in (3, 1, 2)]
    manifest = prepare_dataset(write_lines(tmp_path / "r.json", rows), tmp_path / "out", "t",
                               PrepareSettings(min_rating=None, k_core=0, split="leave_one_out", min_train_items=2))
    items = {v: k for k, v in json.loads((tmp_path / "out" / "item_map.json").read_text()).items()}
    train, valid, test = (read_split(tmp_path / "out", s) for s in ("training", "validation", "testing"))
    assert manifest["users"] == 1 and manifest["split"]["users_dropped_fewer_train_items"] == 1
    assert [items[i] for i in train[0]] == ["i0", "i1", "i2"]
    assert [items[i] for i in valid[0]] == ["i3"] and [items[i] for i in test[0]] == ["i4"]


def test_prepare_is_byte_identical_across_runs(tmp_path):
    reviews = write_synthetic_reviews(tmp_path / "r.json.gz", compress=True)
    meta = write_synthetic_metadata(tmp_path / "meta.json")
    for out in ("a", "b"):
        prepare_dataset(reviews, tmp_path / out, "syn", PrepareSettings(k_core=3, item_order="shuffled"), meta)
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "b").iterdir())
    assert {"manifest.json", "item_text.json", "item_map.json", "user_map.json"} <= set(files)
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_prepare_counts_bad_rows_by_reason(tmp_path):
    rows = [review("u1", "a", 1), "{not json", "", "[1, 2]", {"asin": "a", "unixReviewTime": 3, "overall": 5},
            review("u1", 7, 2), {**review("u1", "b", 0), "unixReviewTime": "yesterday"},
            {**review("u1", "c", 4), "overall": "five"}, review("u1", "d", 5), review("u1", "e", 6),
            {"reviewerID": "u1", "asin": "f", "unixReviewTime": 8}]
    manifest = prepare_dataset(write_lines(tmp_path / "r.json", rows), tmp_path / "out", "t",
                               PrepareSettings(k_core=0, split="leave_one_out", min_train_items=1))
    assert manifest["rows"]["bad_rows"] == {
        "blank line": 1,
        "malformed (neither JSON nor a Python literal)": 1,
        "not an object": 1,
        "missing key reviewerID": 1,
        "missing key overall": 1,
        "wrong type asin (expected a non-empty string)": 1,
        "wrong type unixReviewTime (expected an integer)": 1,
        "wrong type overall (expected a number)": 1,
    }
    assert manifest["interactions"]["total"] == 3


def test_prepare_schema_error_names_file_and_line(tmp_path):
    path = write_lines(tmp_path / "meta.json", ["", *[{"asin": f"i{n}", "title": "x"} for n in range(30)]])
    with pytest.raises(SchemaError, match=rf"{path}:2: not an Amazon review file.*'reviewerID'"):
        prepare_dataset(path, tmp_path / "out", "t")
    assert not (tmp_path / "out").exists()


def test_prepare_failure_keeps_the_previous_folder(tmp_path):
    good = write_synthetic_reviews(tmp_path / "r.json")
    prepare_dataset(good, tmp_path / "out", "syn", PrepareSettings(k_core=3))
    before = (tmp_path / "out" / "training_dict.npy").read_bytes()
    with pytest.raises(ValueError, match="too few"):
        prepare_dataset(write_lines(tmp_path / "tiny.json", [review("u", "i", 1)]), tmp_path / "out", "syn", ALL)
    assert (tmp_path / "out" / "training_dict.npy").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


def test_prepare_writes_item_text_joined_by_asin(tmp_path):
    reviews = write_synthetic_reviews(tmp_path / "r.json")
    meta = write_synthetic_metadata(tmp_path / "meta.json", schema="2018")
    manifest = prepare_dataset(reviews, tmp_path / "out", "syn", PrepareSettings(k_core=3), meta)
    text = json.loads((tmp_path / "out" / "item_text.json").read_text())
    item_map = json.loads((tmp_path / "out" / "item_map.json").read_text())
    asin = next(a for a in item_map if int(a[1:]) % 3 == 0)
    assert text[str(item_map[asin])] == {"asin": asin, "title": f"Item {int(asin[1:])}",
                                         "description": f"About {int(asin[1:])} more",
                                         "categories": ["Beauty", f"Group {int(asin[1:]) % 5}"]}
    assert manifest["item_text"]["items_with_text"] + manifest["item_text"]["items_without_text"] == len(item_map)
    assert manifest["item_text"]["items_without_text"] > 0


def test_prepared_folder_loads_and_builds_recdata(tmp_path):
    from atspeed_exp.data.recdata import RecData

    reviews = write_synthetic_reviews(tmp_path / "r.json.gz", compress=True)
    manifest = prepare_dataset(reviews, tmp_path / "syn", "syn", PrepareSettings(k_core=3))
    build_index(tmp_path / "syn", "syn", {}, [8, 8, 8, 8], method="id_digits")
    dataset = load_atspeed_dataset(tmp_path / "syn", "syn")
    assert len(dataset.train) == manifest["users"] and dataset.num_items == manifest["items"]
    assert sum(map(len, dataset.test.values())) == manifest["interactions"]["test"]
    data = RecData.build(tmp_path / "syn", "syn", max_history=20, sliding_window=True)
    assert len(data.splits["train"]) > 100 and len(data.splits["test"]) == manifest["users_with_items"]["test"]


def test_prepare_entry_composes_and_runs_both_steps(tmp_path):
    from hydra import compose, initialize_config_dir

    import atspeed_exp.project_paths  # noqa: F401
    from atspeed_exp.data.recdata import RecData
    from atspeed_exp.prepare import run

    reviews = write_synthetic_reviews(tmp_path / "r.json")
    out = tmp_path / "synthetic_raw"
    items = 150
    np.save(tmp_path / "emb.npy", np.random.default_rng(0).normal(size=(items, 8)))
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("prepare_data", overrides=[
            f"prepare.reviews={reviews}", f"prepare.output={out}", "prepare.name=synthetic_raw", "prepare.k_core=3",
            "sid.codebook_sizes=[4,4,32]", f"sid.embedding.path={tmp_path / 'emb.npy'}", "sid.iters=20"])
        run(cfg)
        data_cfg = compose("config", overrides=["data=synthetic_raw", f"data.root={out}"]).data
    report = json.loads((out / "synthetic_raw.LCRec-1e-3lr.report.json").read_text())
    assert report["after"]["collision_rate"] == 0.0
    data = RecData.build(data_cfg.root, data_cfg.name, data_cfg.index_file, data_cfg.prompt_format,
                         data_cfg.max_history, data_cfg.sliding_window)
    assert data.sid_index.collisions() == {} and data.dataset.num_levels == 3


def test_synthetic_raw_cli_writes_the_default_inputs(tmp_path):
    from atspeed_exp.data.synthetic_raw import main

    main([str(tmp_path / "raw"), "--num-users", "20", "--num-items", "15"])
    manifest = prepare_dataset(tmp_path / "raw" / "reviews.json", tmp_path / "out", "x", PrepareSettings(k_core=0),
                               metadata=tmp_path / "raw" / "meta.json")
    assert manifest["inputs"]["reviews"][0]["file"] == "reviews.json" and manifest["item_text"]["items_with_text"] > 0
