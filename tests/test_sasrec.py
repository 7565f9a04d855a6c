import json
from pathlib import Path

import pytest
import torch
from pipeline_helpers import compose_config, tiny_overrides

from atspeed_exp import baselines, pipeline, reporting
from atspeed_exp.models.sasrec import SASRec, left_pad_histories


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a shared CPU spinning threads make them much slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _model(**kwargs) -> SASRec:
    torch.manual_seed(0)
    return SASRec(num_items=30, hidden_size=16, num_blocks=2, num_heads=2, dropout=0.3, max_len=6, **kwargs).eval()


def test_left_pad_histories_right_aligns_the_latest_items():
    out = left_pad_histories([[1, 2], [], [1, 2, 3, 4, 5]], max_len=4)
    assert out.tolist() == [[-1, -1, 1, 2], [-1, -1, -1, -1], [2, 3, 4, 5]]


def test_sasrec_forward_shapes():
    model = _model()
    items = left_pad_histories([[1, 2, 3], [4], [5, 6, 7, 8, 9, 10]], 6)  # [3, 6]
    assert model(items).shape == (3, 6, 16)
    assert model.last_scores(items).shape == (3, 30)
    assert model.item_scores(model(items)).shape == (3, 6, 30)
    assert model.recommend(items, 5).shape == (3, 5)
    with pytest.raises(ValueError, match="max_len 6"):
        model(torch.zeros(1, 7, dtype=torch.long))


def test_sasrec_is_causal():
    model = _model()
    items = torch.tensor([[-1, 3, 4, 5, 6, 7]])
    changed = items.clone()
    changed[0, 4] = 20  # a later item
    before, after = model(items), model(changed)
    assert torch.allclose(before[:, :4], after[:, :4], atol=1e-6)  # earlier positions unchanged
    assert not torch.allclose(before[:, 4:], after[:, 4:])


def test_sasrec_padding_length_does_not_change_scores():
    model = _model()
    short = torch.tensor([[3, 4, 5]])
    padded = torch.tensor([[-1, -1, -1, 3, 4, 5]])
    assert torch.allclose(model.last_scores(short), model.last_scores(padded), atol=1e-5)
    assert torch.isfinite(model(torch.full((1, 6), -1))).all()  # an empty history gives no NaN


def test_sasrec_recommend_can_exclude_history():
    model = _model()
    items = torch.tensor([[-1, -1, 1, 2, 3, 4]])
    top = model.recommend(items, 26, exclude_history=True)  # 30 items less the 4 of the history
    assert sorted(top[0].tolist()) == [i for i in range(30) if i not in (1, 2, 3, 4)]
    assert model.recommend(items, 5).shape == (1, 5)


def _sasrec_overrides(tmp_path: Path) -> list[str]:
    return tiny_overrides(tmp_path) + [
        "stages=[sasrec]", "sasrec.max_epochs=8", "sasrec.patience=8", "sasrec.batch_size=64",
        "sasrec.model.hidden_size=32", "sasrec.model.dropout=0.2", "sasrec.lr=5e-3", "eval.cutoffs=[5,10]",
    ]


def _accuracy(metrics: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if "walltime" not in k}


def test_sasrec_stage_beats_random_and_popular_and_is_reused(tmp_path):
    summary = pipeline.run(compose_config(_sasrec_overrides(tmp_path)))
    metrics = summary["metrics"]
    assert "target_dir" not in summary and not (tmp_path / "artifacts" / "target").exists()  # no target trained
    num_items = baselines.load_dataset(compose_config(_sasrec_overrides(tmp_path))).num_items
    assert metrics["baseline/sasrec/recall@10"] > 2 * 10 / num_items  # 2x the expected Recall@10 of random lists
    assert metrics["baseline/sasrec/ndcg@10"] > metrics["baseline/most_popular/ndcg@10"]
    assert metrics["baseline/most_popular/distinct_items@10"] == 10  # the same 10 items for everyone
    assert metrics["baseline/sasrec/distinct_items@10"] > 10
    for key in ("coverage@10", "mean_popularity@10", "popularity_percentile@10", "gini@10", "first_codes_per_list@10"):
        assert f"baseline/sasrec/{key}" in metrics and f"baseline/most_popular/{key}" in metrics
    stage_dir = Path(summary["sasrec_dir"])
    stage = json.loads((stage_dir / "stage.json").read_text())
    assert stage["stage"] == "sasrec" and stage["monitor"] == "sasrec/val_ndcg@10"
    assert (stage_dir / stage["best_checkpoint"]).is_file()
    assert "baseline/sasrec" in pipeline.format_summary(summary, (5, 10))

    # same settings: reused, not retrained (stage.json untouched), the same lists
    mtime = (stage_dir / "stage.json").stat().st_mtime_ns
    again = pipeline.run(compose_config(_sasrec_overrides(tmp_path)))
    assert again["sasrec_dir"] == summary["sasrec_dir"]
    assert (stage_dir / "stage.json").stat().st_mtime_ns == mtime
    assert _accuracy(again["metrics"]) == _accuracy(metrics)
    # an evaluation-only key keeps the stage; a training setting gets its own
    excluded = compose_config(_sasrec_overrides(tmp_path) + ["sasrec.exclude_history=true"])
    assert baselines.sasrec_stage_dir(excluded) == stage_dir
    other = compose_config(_sasrec_overrides(tmp_path) + ["sasrec.lr=1e-3"])
    assert baselines.sasrec_stage_dir(other) != stage_dir


def test_list_report_same_keys_for_any_recommender(tmp_path):
    dataset = baselines.load_dataset(compose_config(tiny_overrides(tmp_path)))
    codes = reporting.first_level_codes(dataset)
    for item, sid in dataset.item_sids.items():  # equal level-0 tokens <-> equal codes
        same = [other for other, s in dataset.item_sids.items() if s[0] == sid[0]]
        assert (codes[same] == codes[item]).all()
    gen = torch.Generator().manual_seed(0)
    truth = [(1, 2), (3,), (4, 5, 6)]
    lists = torch.randint(0, dataset.num_items, (3, 20), generator=gen)
    lists[0, -3:] = -1  # a list shorter than K
    report = reporting.dataset_list_report(dataset, lists, truth, cutoffs=(5, 10, 20))
    assert {"recall@20", "ndcg@5", "coverage@10", "gini@10", "first_codes_per_list@10", "num_users"} <= set(report)
    assert report["distinct_items@10"] == len(set(lists[:, :10].flatten().tolist()))
    short = reporting.dataset_list_report(dataset, lists[:, :5], truth, cutoffs=(5, 10, 20))
    assert "recall@10" not in short and "coverage@10" not in short  # n > K is skipped, not wrong


def test_sasrec_stage_next_to_the_target_reports_both(tmp_path):
    overrides = _sasrec_overrides(tmp_path) + ["stages=[target,sasrec]", "sasrec.max_epochs=1", "eval.max_users=null"]
    summary = pipeline.run(compose_config(overrides))
    metrics = summary["metrics"]
    assert "target_dir" in summary and "sasrec_dir" in summary
    # both evaluate all test users here: the most-popular numbers agree across the two reports
    assert metrics["eval/num_users"] == metrics["baseline/sasrec/num_users"]
    for n in (5, 10):
        assert metrics[f"baseline/most_popular/recall@{n}"] == pytest.approx(metrics[f"eval/most_popular/recall@{n}"])
    text = pipeline.format_summary(summary, (5, 10))
    for row in ("\ntarget ", "\nmost_popular ", "\nbaseline/sasrec "):
        assert row in text
    assert text.count("most_popular") == 1  # the same users, the same lists: reported once
    # on other users (eval.max_users) the two most-popular figures differ, and both rows stay
    fewer = {**summary, "metrics": {**metrics, "eval/num_users": metrics["eval/num_users"] - 1}}
    assert "\nbaseline/most_popular " in pipeline.format_summary(fewer, (5, 10))
