"""benchmarks/target_sharpness.py and sharpness_strata.py: per-user figures against a naive recomputation from the
model's logits, and equal-sized strata by rank."""

import math

import torch
from decoding_fixtures import make_trie, random_prompts
from test_benchmarks import load_script
from toy_lm import ToyLM

from atspeed_exp.decoding.beam_search import left_pad
from atspeed_exp.decoding.tree import tree_beam_search


def test_sharpness_equals_entropy_and_top1_of_each_level_block_at_the_final_beams():
    sharp = load_script("target_sharpness")
    trie, _, _, vocab = make_trie(num_items=60, num_collisions=0, seed=3)
    model = ToyLM(vocab, seed=3)
    prompts = [p.tolist() for p in random_prompts(5, vocab, seed=3)]
    figures = sharp.sharpness(model, prompts, trie, num_beams=4, pad_id=0, batch_size=2)
    assert figures["entropy_l0"].shape == (5,)
    user = 3
    ids, mask = left_pad([torch.tensor(prompts[user])], 0)
    out = tree_beam_search(model, ids, mask, trie, 4, record_logits=True)
    for t, logits in enumerate(out.level_logits):
        entropies, tops = [], []
        for k in range(4):  # naive: one beam at a time
            p = torch.softmax(logits[0, k].double(), -1)
            entropies.append(float(-(p * p.clamp_min(1e-300).log()).sum()))
            tops.append(float(p.max()))
        assert math.isclose(float(figures[f"entropy_l{t}"][user]), sum(entropies) / 4, rel_tol=1e-4)
        assert math.isclose(float(figures[f"top1_l{t}"][user]), sum(tops) / 4, rel_tol=1e-4)
    span = float(out.sequence_scores[0, 0] - out.sequence_scores[0, -1])
    assert math.isclose(float(figures["score_span"][user]), span, rel_tol=1e-5)
    assert math.isclose(float(figures["mean_gap"][user]), span / 3, rel_tol=1e-5)


def test_strata_are_equal_sized_and_ordered_by_value():
    strata = load_script("sharpness_strata").strata
    values = torch.tensor([5.0, 1.0, 3.0, 3.0, 9.0, 0.5, 2.0, 7.0, 4.0, 6.0])
    index = strata(values, 3)
    assert sorted(torch.bincount(index).tolist()) == [3, 3, 4]
    for low, high in ((0, 1), (1, 2)):  # every value of a lower stratum is <= every value of the next
        assert values[index == low].max() <= values[index == high].min()
    assert int(index[5]) == 0 and int(index[4]) == 2  # the smallest and the largest
