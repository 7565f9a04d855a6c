import pytest
import torch
from decoding_fixtures import make_trie, random_prompts
from toy_lm import ToyLM

from atspeed_exp.evaluation import evaluate_all_users, evaluate_speculative


def test_evaluate_speculative_reports_every_metric_and_strict_matches_beam():
    trie, item_ids, _, vocab = make_trie(num_items=60, num_collisions=2, seed=4)
    target, draft = ToyLM(vocab, seed=4), ToyLM(vocab, seed=5)
    prompts = [p.tolist() for p in random_prompts(6, vocab, seed=4)]
    truth = [(int(item_ids[i]), int(item_ids[i + 1])) for i in range(6)]
    metrics = evaluate_speculative(target, draft, prompts, truth, trie, modes=("strict", "relaxed"), ks=(3, 5),
                                   draft_beams=10, gamma=3, cutoffs=(5,), progress=False)
    for k in (3, 5):
        for mode in ("strict", "relaxed"):
            key = f"eval/{mode}/k{k}"
            assert 0.0 <= metrics[f"{key}/acceptance_rate"] <= 1.0
            assert 1.0 <= metrics[f"{key}/target_calls_per_list"] <= 4.0
            assert metrics[f"{key}/speedup"] > 0 and metrics[f"{key}/speedup_mean_ratio"] > 0
            assert metrics[f"{key}/walltime_s"] > 0
    # lossless: strict lists have exactly the beam-search accuracy
    assert metrics["eval/strict/k5/recall@5"] == pytest.approx(metrics["eval/beam/k5/recall@5"])
    assert metrics["eval/strict/k5/ndcg@5"] == pytest.approx(metrics["eval/beam/k5/ndcg@5"])
    assert "eval/beam/k3/recall@5" not in metrics  # n > K is not reported


def test_evaluate_speculative_draft_equal_target_costs_one_call():
    trie, item_ids, _, vocab = make_trie(num_items=60, num_collisions=0, seed=6)
    target = ToyLM(vocab, seed=6)
    prompts = [p.tolist() for p in random_prompts(4, vocab, seed=6)]
    truth = [(int(item_ids[0]),)] * 4
    metrics = evaluate_speculative(target, target, prompts, truth, trie, ks=(5,), draft_beams=5, gamma=3,
                                   progress=False)
    assert metrics["eval/strict/k5/acceptance_rate"] == 1.0
    assert metrics["eval/strict/k5/target_calls_per_list"] == 1.0
    assert torch.isfinite(torch.tensor(metrics["eval/strict/k5/speedup"]))


def test_evaluate_speculative_throughput_uses_batched_strict_sd_with_the_same_lists():
    trie, item_ids, _, vocab = make_trie(num_items=60, num_collisions=2, seed=8)
    target, draft = ToyLM(vocab, seed=8), ToyLM(vocab, seed=9)
    prompts = [p.tolist() for p in random_prompts(7, vocab, seed=8)]
    truth = [(int(item_ids[i]),) for i in range(7)]
    metrics = evaluate_speculative(target, draft, prompts, truth, trie, ks=(5,), draft_beams=10, gamma=2,
                                   cutoffs=(5,), progress=False, verify_beams=6, scope="level", batch_size=3)
    assert metrics["eval/strict/k5/batched_mismatches"] == 0
    assert metrics["eval/beam/k5/throughput_lists_per_s"] > 0 and metrics["eval/strict/k5/throughput_lists_per_s"] > 0
    # the batched lists' target calls per list equal the batch-1 run's (each list takes part in its own rounds)
    assert metrics["eval/strict/k5/batched_target_calls_per_list"] == pytest.approx(
        metrics["eval/strict/k5/target_calls_per_list"])


def test_evaluate_all_users_counts_and_intervals_match_batch_one_runs():
    """Batched all-users figures: strict lists equal beam search's (overlap 1, no accuracy change), target calls
    per list equal the batch-1 evaluation's, and every figure sits inside its bootstrap interval."""
    trie, item_ids, _, vocab = make_trie(num_items=60, num_collisions=2, seed=10)
    target, draft = ToyLM(vocab, seed=10), ToyLM(vocab, seed=11)
    prompts = [p.tolist() for p in random_prompts(9, vocab, seed=10)]
    truth = [(int(item_ids[i]), int(item_ids[(3 * i) % 60])) for i in range(9)]
    settings = dict(ks=(5,), draft_beams=10, gamma=3, cutoffs=(5,), progress=False)
    metrics = evaluate_all_users(target, draft, prompts, truth, trie, pad_id=0, modes=("strict", "relaxed"),
                                 batch_size=4, resamples=200, **settings)
    single = evaluate_speculative(target, draft, prompts, truth, trie, modes=("strict",), **settings)
    key = "eval/all/strict/k5"
    assert metrics[f"{key}/overlap"] == 1.0 and metrics[f"{key}/mismatches"] == 0
    assert metrics[f"{key}/recall@5_change"] == 0.0
    assert metrics[f"{key}/recall@5"] == pytest.approx(single["eval/beam/k5/recall@5"])
    assert metrics[f"{key}/target_calls_per_list"] == pytest.approx(single["eval/strict/k5/target_calls_per_list"])
    assert metrics[f"{key}/acceptance_rate"] == pytest.approx(single["eval/strict/k5/acceptance_rate"])
    for name, value in metrics.items():
        if f"{name}_lo95" in metrics:
            assert metrics[f"{name}_lo95"] <= value + 1e-12 <= metrics[f"{name}_hi95"] + 2e-12, name
    relaxed = "eval/all/relaxed/k5"
    assert 0.0 <= metrics[f"{relaxed}/overlap"] <= 1.0
    assert metrics[f"{relaxed}/recall@5"] - metrics["eval/all/beam/k5/recall@5"] == pytest.approx(
        metrics[f"{relaxed}/recall@5_change"])


def test_evaluate_speculative_speedup_is_beam_time_over_sd_time():
    """speedup = total beam-search time / total SD time (> 1 means SD is faster), never the inverse."""
    trie, item_ids, _, vocab = make_trie(num_items=60, num_collisions=2, seed=12)
    target, draft = ToyLM(vocab, seed=12), ToyLM(vocab, seed=13)
    prompts = [p.tolist() for p in random_prompts(5, vocab, seed=12)]
    truth = [(int(item_ids[i]),) for i in range(5)]
    metrics = evaluate_speculative(target, draft, prompts, truth, trie, ks=(5,), draft_beams=10, gamma=3,
                                   cutoffs=(5,), progress=False)
    # both walltimes are means over the same users, so their ratio is the ratio of totals
    assert metrics["eval/strict/k5/speedup"] == pytest.approx(
        metrics["eval/beam/k5/walltime_s"] / metrics["eval/strict/k5/walltime_s"])


class _BatchSensitiveLM(ToyLM):
    """A ToyLM whose hidden states shift with the batch size: batched lists differ from batch-1 ones, as float
    near-ties make them differ for a few users of a real model."""

    def hidden(self, input_ids, position_ids, attention_mask, cache):
        hidden, cache = super().hidden(input_ids, position_ids, attention_mask, cache)
        return hidden + 0.3 * (input_ids.shape[0] - 1), cache


@pytest.mark.parametrize("model_class, expect_some", [(ToyLM, False), (_BatchSensitiveLM, True)])
def test_evaluate_all_users_counts_the_lists_batching_changes(model_class, expect_some):
    from atspeed_exp.evaluation import generate_lists

    trie, item_ids, _, vocab = make_trie(num_items=60, num_collisions=2, seed=14)
    target, draft = model_class(vocab, seed=14), ToyLM(vocab, seed=15)
    prompts = [p.tolist() for p in random_prompts(9, vocab, seed=14)]
    truth = [(int(item_ids[i]),) for i in range(9)]
    metrics = evaluate_all_users(target, draft, prompts, truth, trie, pad_id=0, ks=(5,), cutoffs=(5,),
                                 batch_size=4, draft_beams=10, gamma=3, resamples=0, progress=False, batch1_users=7)
    batched = generate_lists(target, prompts, trie, 5, 0, batch_size=4, progress=False).items[:7]
    single = generate_lists(target, prompts[:7], trie, 5, 0, batch_size=1, progress=False).items
    naive = sum(1 for a, b in zip(batched.tolist(), single.tolist()) if a != b)
    assert metrics["eval/all/beam/k5/batch1_users"] == 7
    assert metrics["eval/all/beam/k5/batch1_mismatches"] == naive
    assert (naive > 0) == expect_some


def test_evaluate_speculative_progress_counts_the_measured_users_not_the_warm_up(caplog):
    import logging

    trie, item_ids, _, vocab = make_trie(num_items=60, num_collisions=0, seed=12)
    target, draft = ToyLM(vocab, seed=12), ToyLM(vocab, seed=13)
    prompts = [p.tolist() for p in random_prompts(3, vocab, seed=12)]
    truth = [(int(item_ids[i]),) for i in range(3)]
    with caplog.at_level(logging.INFO, logger="atspeed_exp.progress"):
        evaluate_speculative(target, draft, prompts, truth, trie, ks=(5,), draft_beams=5, gamma=2, cutoffs=(5,),
                             warmup=2)
    lines = [r.getMessage() for r in caplog.records if r.name == "atspeed_exp.progress"]
    assert lines[-1].startswith("speculative eval K=5: 100%") and "3/3" in lines[-1]
    assert not any("/5 " in line for line in lines)  # never counted over warm-up + measured users


def test_evaluate_all_users_takes_the_beam_lists_from_the_given_source():
    trie, item_ids, _, vocab = make_trie(num_items=60, num_collisions=2, seed=14)
    target, draft = ToyLM(vocab, seed=14), ToyLM(vocab, seed=15)
    prompts = [p.tolist() for p in random_prompts(5, vocab, seed=14)]
    truth = [(int(item_ids[i]),) for i in range(5)]
    settings = dict(ks=(3, 5), cutoffs=(3, 5), batch_size=2, draft_beams=10, gamma=2, resamples=0, progress=False)
    plain = evaluate_all_users(target, draft, prompts, truth, trie, 0, **settings)
    store, asked = {}, []

    def cache(k, decode):
        asked.append(k)
        if k not in store:
            store[k] = decode()
        return store[k]

    first = evaluate_all_users(target, draft, prompts, truth, trie, 0, beam_lists=cache, **settings)
    assert first == plain and asked == [3, 5] and [tuple(v.shape) for v in store.values()] == [(5, 3), (5, 5)]
    store[5] = torch.flip(store[5], [0])  # other lists in the cache: the figures follow them
    second = evaluate_all_users(target, draft, prompts, truth, trie, 0, beam_lists=cache, **settings)
    assert second["eval/all/beam/k3/recall@3"] == plain["eval/all/beam/k3/recall@3"]
    assert second["eval/all/strict/k5/mismatches"] > 0
