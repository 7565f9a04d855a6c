"""The pipeline builds its dataset from raw reviews (``data.prepare`` / ``data.sid``, atspeed_exp/prepare.py):
end to end on a synthetic review file, reuse of what was made from the same inputs, rebuilds of what changed, and
errors that name the key of a bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from pipeline_helpers import compose_config, tiny_overrides

from atspeed_exp import pipeline
from atspeed_exp.config_check import ConfigError, check_config
from atspeed_exp.data.synthetic_raw import write_synthetic_metadata, write_synthetic_reviews
from atspeed_exp.prepare import prepare_for_run

INDEX, REPORT = "synthetic_raw.LCRec-1e-3lr.json", "synthetic_raw.LCRec-1e-3lr.report.json"


def raw_overrides(tmp_path: Path, *extra: str) -> list[str]:
    """Tiny pipeline settings on the synthetic_raw data config, reading review and metadata files from tmp_path."""
    reviews, meta = tmp_path / "raw" / "reviews.json", tmp_path / "raw" / "meta.json"
    if not reviews.exists():
        write_synthetic_reviews(reviews, num_users=120, num_items=60)
        write_synthetic_metadata(meta, num_items=60)
    base = [o for o in tiny_overrides(tmp_path) if not o.startswith("data.synthetic")]
    return base + ["data=synthetic_raw", f"data.root={tmp_path / 'prepared'}", f"data.prepare.reviews={reviews}",
                   f"data.prepare.metadata={meta}", "data.prepare.k_core=3", "data.sid.iters=20", *extra]


def with_npy(tmp_path: Path, *extra: str) -> list[str]:
    """The same with SIDs from a .npy of random item embeddings (no SASRec training)."""
    path = tmp_path / "emb.npy"
    if not path.exists():
        np.save(path, np.random.default_rng(0).normal(size=(60, 8)))
    return raw_overrides(tmp_path, "data.sid.embedding.source=file", f"data.sid.embedding.path={path}", *extra)


def stamps(root: Path) -> dict[str, int]:
    return {name: (root / name).stat().st_mtime_ns for name in ("manifest.json", INDEX, REPORT)}


def test_pipeline_from_raw_reviews_end_to_end(tmp_path):
    cfg = compose_config(raw_overrides(tmp_path, "sasrec.max_epochs=1", "sasrec.model.hidden_size=8",
                                       "sasrec.model.num_blocks=1"))
    summary = pipeline.run(cfg)
    root = tmp_path / "prepared"
    manifest = json.loads((root / "manifest.json").read_text())
    report = json.loads((root / REPORT).read_text())
    assert manifest["settings"]["k_core"] == 3 and (root / "item_text.json").is_file()
    assert report["after"]["collision_rate"] == 0.0 and report["embeddings"]["source"] == "sasrec"
    assert report["inputs"]["embeddings"]["stage"].startswith("synthetic_raw-")  # the SASRec stage trained for it
    assert (root / "synthetic_raw.id_digits.json").is_file()  # the placeholder index it trained on
    metrics = summary["metrics"]
    for n in (5, 10):
        assert 0.0 <= metrics[f"eval/target/recall@{n}"] <= 1.0 and 0.0 <= metrics[f"eval/target/ndcg@{n}"] <= 1.0
    rows = {(row["mode"], row["k"]): row for row in summary["table"]}
    assert {("strict", 5), ("strict", 10)} <= set(rows)
    for k in (5, 10):
        row = rows["strict", k]
        assert row["target_calls_per_list"] >= 1 and 0.0 <= row["acceptance_rate"] <= 1.0
        assert row[f"recall@{k}"] == pytest.approx(rows["beam", k][f"recall@{k}"])  # strict: beam search's lists
    text = pipeline.format_summary(summary, (5, 10))
    assert "R@10" in text and "speculative decoding" in text

    before = stamps(root)
    prepare_for_run(cfg)  # the same inputs and settings: nothing is rebuilt, SASRec is not retrained
    assert stamps(root) == before


def test_prepare_for_run_rebuilds_only_what_changed(tmp_path):
    root = tmp_path / "prepared"
    prepare_for_run(compose_config(with_npy(tmp_path)))
    first = stamps(root)
    prepare_for_run(compose_config(with_npy(tmp_path)))
    assert stamps(root) == first

    prepare_for_run(compose_config(with_npy(tmp_path, "data.sid.codebook_sizes=[4,4,16]")))  # the index only
    second = stamps(root)
    assert second["manifest.json"] == first["manifest.json"] and second[INDEX] != first[INDEX]
    assert len(json.loads((root / INDEX).read_text())["0"]) == 3

    np.save(tmp_path / "emb.npy", np.random.default_rng(1).normal(size=(60, 8)))  # new embeddings: the index only
    prepare_for_run(compose_config(with_npy(tmp_path)))
    third = stamps(root)
    assert third["manifest.json"] == first["manifest.json"] and third[INDEX] != second[INDEX]

    prepare_for_run(compose_config(with_npy(tmp_path, "data.prepare.k_core=4")))  # a split setting: both
    fourth = stamps(root)
    assert all(fourth[name] != third[name] for name in fourth)
    assert json.loads((root / "manifest.json").read_text())["settings"]["k_core"] == 4

    write_synthetic_reviews(tmp_path / "raw" / "reviews.json", num_users=120, num_items=60, seed=5)  # new input
    prepare_for_run(compose_config(with_npy(tmp_path, "data.prepare.k_core=4")))
    assert all(stamps(root)[name] != fourth[name] for name in fourth)


def test_prepare_for_run_leaves_folders_and_indexes_it_did_not_make(tmp_path):
    root = tmp_path / "prepared"
    root.mkdir()
    (root / "training_dict.npy").write_bytes(b"mine")
    with pytest.raises(FileExistsError, match="no manifest.json.*data.prepare=null"):
        prepare_for_run(compose_config(with_npy(tmp_path)))
    assert (root / "training_dict.npy").read_bytes() == b"mine"

    (root / "training_dict.npy").unlink()
    prepare_for_run(compose_config(with_npy(tmp_path)))
    (root / REPORT).unlink()  # an index without a report: as a released one
    with pytest.raises(FileExistsError, match="not built here.*data.index_file"):
        prepare_for_run(compose_config(with_npy(tmp_path, "data.sid.seed=1")))


def test_prepare_for_run_names_the_key_of_a_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data.prepare.reviews='.*nowhere.json': no such file"):
        prepare_for_run(compose_config(with_npy(tmp_path, f"data.prepare.reviews={tmp_path / 'nowhere.json'}")))
    not_reviews = tmp_path / "not_reviews.json"
    not_reviews.write_text('{"user": "A", "item": "B"}\n')
    with pytest.raises(ValueError, match=r"data.prepare.reviews.*not_reviews.json:1: not an Amazon review file"):
        prepare_for_run(compose_config(with_npy(tmp_path, f"data.prepare.reviews={not_reviews}")))
    with pytest.raises(ValueError, match=r"data.prepare: ratios must be three"):
        prepare_for_run(compose_config(with_npy(tmp_path, "data.prepare.ratios=[0.5,0.1,0.1]")))
    with pytest.raises(FileNotFoundError, match=r"data.sid.embedding.path='.*missing.npy': no such file"):
        prepare_for_run(compose_config(with_npy(tmp_path, f"data.sid.embedding.path={tmp_path / 'missing.npy'}")))
    with pytest.raises(ValueError, match=r"data.sid.embedding.path=null: source 'file' needs"):
        prepare_for_run(compose_config(with_npy(tmp_path, "data.sid.embedding.path=null")))


def test_automatic_sasrec_embeddings_are_keyed_by_the_split_files(tmp_path):
    from atspeed_exp.baselines import sasrec_stage_dir
    from atspeed_exp.prepare import sasrec_embedding_config

    cfg = compose_config(raw_overrides(tmp_path, "data.sid=null"))
    with pytest.raises(FileNotFoundError, match="data.sid is null"):
        prepare_for_run(cfg)  # the split files are written, the index is not
    first = sasrec_stage_dir(sasrec_embedding_config(cfg))
    assert sasrec_stage_dir(sasrec_embedding_config(cfg)) == first
    write_synthetic_reviews(tmp_path / "raw" / "reviews.json", num_users=120, num_items=60, seed=5)
    with pytest.raises(FileNotFoundError, match="data.sid is null"):
        prepare_for_run(cfg)  # new reviews, same settings: new split files
    assert sasrec_stage_dir(sasrec_embedding_config(cfg)) != first  # so a SASRec trained on the old ones is not reused


def test_prepare_for_run_with_an_rq_vae(tmp_path):
    tiny = ["data.sid.method=rq_vae", "data.sid.rq_vae.hidden_sizes=[16]", "data.sid.rq_vae.latent_dim=8",
            "data.sid.rq_vae.epochs=5"]
    prepare_for_run(compose_config(with_npy(tmp_path, *tiny)))
    report = json.loads((tmp_path / "prepared" / REPORT).read_text())
    assert report["method"] == "rq_vae" and report["inputs"]["settings"]["rq_vae"]["epochs"] == 5
    before = stamps(tmp_path / "prepared")
    prepare_for_run(compose_config(with_npy(tmp_path, *tiny)))
    assert stamps(tmp_path / "prepared") == before
    with pytest.raises(ValueError, match=r"data.sid.rq_vae: lr must be > 0"):
        prepare_for_run(compose_config(with_npy(tmp_path, *tiny, "data.sid.rq_vae.lr=0")))


def test_config_check_knows_the_prepare_and_sid_keys(tmp_path):
    check_config(compose_config(raw_overrides(tmp_path)), pipeline.STAGES)
    with pytest.raises(ConfigError) as error:
        check_config(compose_config(raw_overrides(tmp_path, "data.prepare.split=random", "+data.sid.codebooks=[4]",
                                                  "data.sid.codebook_sizes=[4,8]", "data.sid.rq_vae.latent_dim=0",
                                                  "data.sid.embedding.fields=[title,price]")), pipeline.STAGES)
    for message in ("data.prepare.split='random': expected one of", "data.sid.codebooks: unknown key",
                    "data.sid.rq_vae.latent_dim=0: expected an integer >= 1",
                    "data.sid.embedding.fields=['title', 'price']: expected a list of one of",
                    "decoding.gamma=3: expected 1 <= gamma <= L - 1 = 1 (L = 2 SID tokens per item)"):
        assert message in str(error.value)
