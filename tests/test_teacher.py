import pytest
import torch
from decoding_fixtures import make_trie, random_prompts
from toy_lm import ToyLM

from atspeed_exp.data.teacher import (
    TeacherDataError,
    generate_teacher_data,
    load_teacher_data,
    shard_path,
    teacher_size_bytes,
)
from atspeed_exp.decoding.beam_search import beam_search, left_pad


class _CrashAfter(ToyLM):
    """A ToyLM that dies after a number of calls, like a killed job."""

    def __init__(self, vocab, calls_before_crash, **kw):
        super().__init__(vocab, **kw)
        self.budget = calls_before_crash

    def hidden(self, *args):
        if self.calls >= self.budget:
            raise KeyboardInterrupt("killed")
        return super().hidden(*args)


def _setup():
    trie, _, _, vocab = make_trie(num_items=60, num_collisions=2, seed=11)
    prompts = [p.tolist() for p in random_prompts(23, vocab, seed=11)]
    return trie, vocab, prompts


def test_teacher_data_contents_match_beam_search(tmp_path):
    trie, vocab, prompts = _setup()
    model = ToyLM(vocab, seed=2)
    generate_teacher_data(model, prompts, trie, tmp_path, "toy-2", num_beams=5, shard_size=8, batch_size=4,
                          progress=False)
    data = load_teacher_data(tmp_path, target_id="toy-2", num_beams=5)
    assert len(data) == 23 and data.tensors["example_index"].tolist() == list(range(23))
    ids, mask = left_pad([torch.tensor(prompts[i]) for i in (0, 9, 22)], pad_id=0)
    ref = beam_search(model, ids, mask, trie, 5, record_logits=True)
    for row, index in enumerate((0, 9, 22)):
        example = data.example(index)
        assert torch.equal(example["sequences"].long(), ref.sequences[row])
        torch.testing.assert_close(example["scores"], ref.sequence_scores[row])
        for depth in range(4):
            torch.testing.assert_close(data.level_logits(index, depth).float(), ref.level_logits[depth][row],
                                       atol=2e-2, rtol=1e-3)  # fp16 storage
    assert data.tensors["logits_0"].dtype == torch.float16
    assert teacher_size_bytes(tmp_path) > 0


def test_teacher_data_resumes_after_interruption_and_equals_uninterrupted(tmp_path):
    trie, vocab, prompts = _setup()
    with pytest.raises(KeyboardInterrupt):
        generate_teacher_data(_CrashAfter(vocab, calls_before_crash=13, seed=2), prompts, trie, tmp_path / "a",
                              "toy-2", num_beams=5, shard_size=8, batch_size=4, progress=False)
    assert shard_path(tmp_path / "a", 0).exists() and not shard_path(tmp_path / "a", 2).exists()
    assert not list((tmp_path / "a").glob(".shard-*"))  # no half-written shard left behind
    with pytest.raises(TeacherDataError, match="incomplete: 2 of 3 shards missing"):
        load_teacher_data(tmp_path / "a")

    resumed = ToyLM(vocab, seed=2)
    generate_teacher_data(resumed, prompts, trie, tmp_path / "a", "toy-2", num_beams=5, shard_size=8, batch_size=4,
                          progress=False)
    assert resumed.calls == 4 * 4  # only the 2 missing shards (15 examples = 4 batches) were computed
    generate_teacher_data(ToyLM(vocab, seed=2), prompts, trie, tmp_path / "b", "toy-2", num_beams=5, shard_size=8,
                          batch_size=4, progress=False)
    a, b = load_teacher_data(tmp_path / "a"), load_teacher_data(tmp_path / "b")
    assert a.tensors.keys() == b.tensors.keys()
    for key in a.tensors:
        assert torch.equal(a.tensors[key], b.tensors[key]), key


def test_teacher_data_from_another_target_is_refused(tmp_path):
    trie, vocab, prompts = _setup()
    generate_teacher_data(ToyLM(vocab, seed=2), prompts, trie, tmp_path, "toy-2", num_beams=5, shard_size=8,
                          progress=False)
    with pytest.raises(TeacherDataError, match="target_id is 'toy-2' but this run expects 'toy-3'"):
        load_teacher_data(tmp_path, target_id="toy-3")
    with pytest.raises(TeacherDataError, match="target_id"):
        generate_teacher_data(ToyLM(vocab, seed=3), prompts, trie, tmp_path, "toy-3", num_beams=5, shard_size=8,
                              progress=False)
    with pytest.raises(TeacherDataError, match="num_beams"):
        load_teacher_data(tmp_path, num_beams=10)
    with pytest.raises(TeacherDataError, match="no teacher data"):
        load_teacher_data(tmp_path / "missing")


def test_teacher_data_ground_truth_logits_match_teacher_forcing(tmp_path):
    trie, vocab, prompts = _setup()
    _, _, tokens, _ = make_trie(num_items=60, num_collisions=2, seed=11)
    responses = [tokens[i % len(tokens)].tolist() + [2] for i in range(len(prompts))]  # SID + EOS
    model = ToyLM(vocab, seed=2)
    generate_teacher_data(model, prompts, trie, tmp_path, "toy-2", num_beams=5, shard_size=8, batch_size=4,
                          progress=False, responses=responses)
    data = load_teacher_data(tmp_path)
    for index in (0, 13):
        full = model.full_sequence_logits(torch.tensor(prompts[index] + responses[index][:3]))
        for depth in range(4):
            start, end = trie.block(depth)
            expected = full[len(prompts[index]) - 1 + depth, start:end]
            torch.testing.assert_close(data.tensors[f"gt_logits_{depth}"][index].float(), expected, atol=2e-2, rtol=1e-3)


def test_teacher_data_made_with_a_draft_equals_target_only(tmp_path):
    trie, vocab, prompts = _setup()
    target, draft = ToyLM(vocab, seed=2), ToyLM(vocab, seed=3)
    responses = [[trie.block(d)[0] + 1 for d in range(4)] for _ in prompts]
    generate_teacher_data(target, prompts, trie, tmp_path / "plain", "toy-2", num_beams=5, shard_size=8,
                          batch_size=4, progress=False, responses=responses)
    generate_teacher_data(target, prompts, trie, tmp_path / "sd", "toy-2", num_beams=5, shard_size=8,
                          batch_size=4, progress=False, responses=responses, draft=draft, draft_beams=10, gamma=2)
    plain = load_teacher_data(tmp_path / "plain", target_id="toy-2", num_beams=5)
    sd = load_teacher_data(tmp_path / "sd", target_id="toy-2", num_beams=5)
    assert set(plain.tensors) == set(sd.tensors)
    for key, value in plain.tensors.items():
        torch.testing.assert_close(sd.tensors[key].float(), value.float(), atol=2e-2, rtol=1e-3, msg=key)
