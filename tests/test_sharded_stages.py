"""Teacher generation and the all-users evaluation split over torch.distributed ranks (docs/scale.md): two gloo
processes give the files and the figures of one process."""

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from decoding_fixtures import make_trie, random_prompts, tiny_llama
from toy_lm import ToyLM

from atspeed_exp import distributed
from atspeed_exp.data.teacher import generate_teacher_data, load_teacher_data, shard_path
from atspeed_exp.decoding.drafters.trigram import TrigramDrafter
from atspeed_exp.evaluation import evaluate_all_users, generate_lists, order_independent

NUM_EXAMPLES, SHARD_SIZE = 23, 4  # 6 shards, the last one short: rank 0 makes 0, 2, 4 and rank 1 makes 1, 3, 5
EVAL = dict(modes=("strict", "relaxed"), ks=(5,), draft_beams=10, gamma=3, cutoffs=(5,), batch_size=3,
            resamples=50, progress=False, batch1_users=2)


def teacher_inputs():
    trie, _, tokens, vocab = make_trie(num_items=60, num_collisions=2, seed=11)
    prompts = [p.tolist() for p in random_prompts(NUM_EXAMPLES, vocab, seed=11)]
    responses = [tokens[i % len(tokens)].tolist() + [2] for i in range(NUM_EXAMPLES)]  # SID + EOS
    return trie, vocab, prompts, responses


def make_teacher(directory: Path) -> int:
    """Teacher data of a tiny random LLaMA; returns its forward calls in this process. One thread, as each rank
    uses: bytes are equal across processes that sum in the same order (another thread count splits the matrix
    products' sums differently)."""
    trie, vocab, prompts, responses = teacher_inputs()
    target = tiny_llama(vocab, layers=1, hidden=32, seed=3)
    calls = []
    target.model.model.register_forward_hook(lambda *_: calls.append(1))  # the decoder runs once per call
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        generate_teacher_data(target, prompts, trie, directory, "tiny-3", num_beams=5, shard_size=SHARD_SIZE,
                              batch_size=2, progress=False, responses=responses)
    finally:
        torch.set_num_threads(threads)
    return len(calls)


def eval_inputs():
    trie, item_ids, _, vocab = make_trie(num_items=60, num_collisions=2, seed=10)
    prompts = [p.tolist() for p in random_prompts(11, vocab, seed=10)]
    truth = [(int(item_ids[i]), int(item_ids[(3 * i) % 60])) for i in range(11)]
    return trie, vocab, prompts, truth


def evaluate(sharded: bool) -> dict[str, float]:
    trie, vocab, prompts, truth = eval_inputs()
    return evaluate_all_users(ToyLM(vocab, seed=10), ToyLM(vocab, seed=11), prompts, truth, trie, pad_id=0,
                              sharded=sharded, **EVAL)


def rank_main(rank: int, world: int, root: str) -> None:
    """One rank: teacher data, a resumed teacher run (each rank misses one shard), the all-users evaluation."""
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{root}/rendezvous", rank=rank, world_size=world)
    try:
        out = Path(root)
        first = make_teacher(out / "two")
        distributed.barrier()
        if rank == 0:  # shard 2 is rank 0's, shard 5 rank 1's
            for shard in (2, 5):
                shard_path(out / "two", shard).unlink()
        distributed.barrier()
        resumed = make_teacher(out / "two")
        metrics = evaluate(sharded=True)
        torch.save({"calls": (first, resumed), "metrics": metrics}, out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def file_digests(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Everything the two gloo ranks produced (one spawn for every test here: process start-up dominates)."""
    root = tmp_path_factory.mktemp("ranks")
    mp.spawn(rank_main, args=(2, str(root)), nprocs=2, join=True)
    return root, [torch.load(root / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.mark.slow  # two spawned processes: about a minute on two busy cores
def test_sharded_teacher_files_are_byte_identical_to_one_process(two_ranks, tmp_path):
    root, _ = two_ranks
    calls = make_teacher(tmp_path / "one")
    two, one = file_digests(root / "two"), file_digests(tmp_path / "one")
    assert sorted(two) == sorted(one) and len([n for n in one if n.endswith(".pt")]) == 6
    assert two == one  # every shard, its checksum file and the manifest
    assert calls == 12 * (4 + 1)  # the two ranks together made as many calls (6 each)
    assert load_teacher_data(root / "two", target_id="tiny-3").tensors["example_index"].tolist() == list(
        range(NUM_EXAMPLES))


@pytest.mark.slow  # two spawned processes: about a minute on two busy cores
def test_sharded_teacher_resumes_each_ranks_missing_shards_only(two_ranks):
    _, results = two_ranks
    (first0, resumed0), (first1, resumed1) = (r["calls"] for r in results)
    per_batch = 4 + 1  # a beam-search call per SID level, one teacher-forced call for the ground truth
    # rank 0: shards 0, 2, 4 (4 examples each), rank 1: shards 1, 3 (4 each) and 5 (3): 2-example batches
    assert first0 == first1 == 6 * per_batch
    # the rerun remade only shard 2 on rank 0 and shard 5 on rank 1, two batches each
    assert resumed0 == resumed1 == 2 * per_batch


@pytest.mark.slow  # two spawned processes: about a minute on two busy cores
def test_sharded_all_users_evaluation_equals_one_process(two_ranks):
    _, results = two_ranks
    one = evaluate(sharded=False)
    for result in results:
        assert result["metrics"] == one  # exactly: the same per-user lists and counts, the same bootstrap draws


def test_order_independent_passes_are_strict_with_a_drafter_that_does_not_learn():
    trie, vocab, _, _ = eval_inputs()
    draft = ToyLM(vocab, seed=11)
    assert order_independent("strict", draft) and not order_independent("relaxed", draft)
    counts = object.__new__(TrigramDrafter)  # the property reads the settings only
    counts.settings = {"adapt": "evaluation"}
    assert not order_independent("strict", counts)
    counts.settings = {"adapt": "call"}
    assert order_independent("strict", counts)


def test_generate_lists_sharded_without_a_process_group_is_the_plain_pass():
    trie, vocab, prompts, _ = eval_inputs()
    model = ToyLM(vocab, seed=10)
    plain = generate_lists(model, prompts, trie, 5, 0, batch_size=3, progress=False)
    sharded = generate_lists(model, prompts, trie, 5, 0, batch_size=3, progress=False, sharded=True)
    assert torch.equal(plain.items, sharded.items) and plain.model_calls == sharded.model_calls


# -- the teacher stage of the pipeline on two ranks -------------------------------------------------------------
def stage_config(root: Path, artifacts: str):
    from pipeline_helpers import compose_config, tiny_overrides

    overrides = tiny_overrides(root) + [f"paths.artifacts_dir={root / artifacts}", "teacher.shard_size=8",
                                        "teacher.batch_size=8", "eval.device=cpu"]
    return compose_config(overrides)


def random_target(root: Path) -> Path:
    """A target stage dir holding an untrained tiny target and its tokenizer (the teacher stage reads no more)."""
    from pipeline_helpers import random_target_stage

    return random_target_stage(stage_config(root, "one"), root)


def make_teacher_stage(root: Path, artifacts: str, target_dir: Path) -> Path:
    """The pipeline's teacher stage, on one thread as each rank runs (see ``make_teacher``)."""
    from atspeed_exp import pipeline

    cfg = stage_config(root, artifacts)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return pipeline.make_teacher(cfg, target_dir, pipeline.load_data(cfg, target_dir / "tokenizer"))
    finally:
        torch.set_num_threads(threads)


def stage_rank_main(rank: int, world: int, root: str, target_dir: str) -> None:
    """One rank of the teacher stage, run three times: it makes the data; with its stage.json removed, it finds every
    shard there and writes stage.json again; then it reuses the stage."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{root}/rendezvous-stage", rank=rank, world_size=world)
    try:
        made = make_teacher_stage(Path(root), "two", Path(target_dir))
        distributed.barrier()
        if rank == 0:
            (made / "stage.json").rename(made / "stage.json.first")
        distributed.barrier()
        again = make_teacher_stage(Path(root), "two", Path(target_dir))
        reused = make_teacher_stage(Path(root), "two", Path(target_dir))
        torch.save({"dirs": (str(made), str(again), str(reused))}, Path(root) / f"stage-rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes that import the whole pipeline: about a minute on two busy cores
def test_teacher_stage_on_two_ranks_writes_the_one_process_files(tmp_path):
    target_dir = random_target(tmp_path)
    one = make_teacher_stage(tmp_path, "one", target_dir)
    mp.spawn(stage_rank_main, args=(2, str(tmp_path), str(target_dir)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"stage-rank{r}.pt") for r in range(2)]
    two = Path(results[0]["dirs"][0])
    assert all(r["dirs"] == (str(two),) * 3 for r in results)  # the same stage dir on both ranks, every run
    assert two.name == one.name and two != one
    for split in ("train", "valid"):
        assert len(list((one / split).glob("shard-*.pt"))) > 1
        assert file_digests(two / split) == file_digests(one / split)
    first, again = (json.loads((two / name).read_text()) for name in ("stage.json.first", "stage.json"))
    assert first["size_bytes"] == again["size_bytes"] == json.loads((one / "stage.json").read_text())["size_bytes"]
