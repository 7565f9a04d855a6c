import copy
import inspect
import math

import lightning.pytorch as pl
import pytest
import torch
from omegaconf import OmegaConf
from pipeline_helpers import CONF_DIR

from atspeed_exp.data.draft_batches import DraftAlignmentDataset, DraftDataModule, collate_draft_batch
from atspeed_exp.data.recdata import EncodedSplit, RecData
from atspeed_exp.data.synthetic import write_synthetic_dataset
from atspeed_exp.data.teacher import TeacherData, TeacherDataError, generate_teacher_data, load_teacher_data
from atspeed_exp.lit.draft_module import (
    DraftAlignmentModule,
    unconstrained_rows,
    unconstrained_teacher_rows,
)
from atspeed_exp.losses.alignment import ALIGNMENT_LOSSES
from atspeed_exp.models.adapter import HFDecoderLM
from atspeed_exp.models.factory import scratch_llama

OBJECTIVES = ("kl", "tvd", "seqkd", "atspeed_s", "atspeed_r")
NUM_EXAMPLES, NUM_BEAMS = 12, 5


class Setup:
    """A tiny synthetic dataset, a tiny LLaMA target and its real teacher data (with ground-truth logits)."""

    def __init__(self, root):
        data = RecData.build(write_synthetic_dataset(root / "syn", num_users=40, num_items=60, seed=0), "synthetic",
                             splits=("train",))
        train = data.splits["train"]
        self.split = EncodedSplit(train.examples[:NUM_EXAMPLES], train.prompts[:NUM_EXAMPLES],
                                  train.responses[:NUM_EXAMPLES])
        self.data = data
        self.blocks = data.sid_index.level_blocks
        self.pad_id = data.pad_id
        self.target = self.llama(hidden=32, layers=1, seed=0).eval()
        generate_teacher_data(HFDecoderLM(self.target), self.split.prompts, data.trie(), root / "teacher", "tiny",
                              num_beams=NUM_BEAMS, shard_size=8, batch_size=4, pad_id=self.pad_id, progress=False,
                              responses=self.split.responses, full_vocab_gt=True)
        self.teacher = load_teacher_data(root / "teacher")

    def llama(self, hidden=32, layers=2, seed=1):
        sid_ids = [i for start, end in self.blocks for i in range(start, end)]
        return scratch_llama(self.data.tokenizer, sid_ids, hidden_size=hidden, intermediate_size=2 * hidden,
                             num_hidden_layers=layers, num_attention_heads=4, seed=seed)

    def batch(self, indices=(0, 1, 2, 3), teacher=None):
        dataset = DraftAlignmentDataset(self.split, teacher or self.teacher, level_blocks=self.blocks)
        return collate_draft_batch([dataset[i] for i in indices], self.pad_id, self.blocks)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return Setup(tmp_path_factory.mktemp("draft"))


def test_draft_batch_packed_tree_forward_matches_unpacked_sequences(setup):
    batch = setup.batch()
    lengths = batch["prompt_lengths"].tolist()
    assert len(set(lengths)) > 1  # different prompt lengths, so rows are padded
    mask = batch["attention_mask"]
    assert ((mask == 0).sum(-1) >= 1).all()  # every row sees at least itself: no NaN rows
    module = DraftAlignmentModule(setup.llama(layers=2), setup.blocks)
    assert module.model.training  # the training path of the attention (sdpa with a custom 4-D mask)
    with torch.no_grad():
        gt_logits, beam_logits = module.draft_logits(batch)  # [B, L+1, V], [B, K, L, V]
    num_levels = len(setup.blocks)
    for row, index in enumerate((0, 1, 2, 3)):
        prompt, response = setup.split.prompts[index], setup.split.responses[index]
        plen = len(prompt)
        with torch.no_grad():
            plain = module.model(input_ids=torch.tensor([prompt + response[:num_levels]])).logits[0]
        torch.testing.assert_close(gt_logits[row], plain[plen - 1 : plen + num_levels], atol=1e-5, rtol=1e-5)
        for beam in range(NUM_BEAMS):
            tokens = setup.teacher.tensors["sequences"][index, beam].tolist()
            with torch.no_grad():
                plain = module.model(input_ids=torch.tensor([prompt + tokens[: num_levels - 1]])).logits[0]
            torch.testing.assert_close(beam_logits[row, beam], plain[plen - 1 : plen - 1 + num_levels],
                                       atol=1e-5, rtol=1e-5)
            starts = torch.tensor([s for s, _ in setup.blocks])
            assert batch["beam_labels"][row, beam].tolist() == (torch.tensor(tokens) - starts).tolist()
        assert batch["labels"][row].tolist() == response


def test_draft_batch_missing_beams_are_masked(setup):
    tensors = dict(setup.teacher.tensors)
    tensors["scores"] = tensors["scores"].clone()
    tensors["scores"][1, -2:] = float("-inf")  # example 1 has only K - 2 beams
    batch = setup.batch(teacher=TeacherData(setup.teacher.manifest, tensors))
    assert batch["beam_mask"].sum() == 4 * NUM_BEAMS - 2 and not batch["beam_mask"][1, -2:].any()
    assert (batch["beam_labels"][1, -2:] == -100).all()
    for objective in ("seqkd", "atspeed_s"):
        losses = DraftAlignmentModule(setup.llama(), setup.blocks, objective=objective).compute_losses(batch)
        assert math.isfinite(losses["loss"].item())


@pytest.mark.parametrize("constrained", [True, False])
@pytest.mark.parametrize("objective", ["kl", "tvd", "atspeed_r", "atspeed_s"])
def test_draft_alignment_with_the_target_as_draft_is_zero(setup, objective, constrained):
    module = DraftAlignmentModule(copy.deepcopy(setup.target), setup.blocks, objective=objective,
                                  constrained=constrained, density_weight=0.0, top_k=3)
    with torch.no_grad():
        align = module.compute_losses(setup.batch(range(NUM_EXAMPLES)))["align"]
    assert abs(align.item()) < 1e-3  # fp16 teacher storage (rounding may give a tiny negative reverse KL)


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_draft_alignment_each_objective_steps_and_overfits(setup, objective):
    pl.seed_everything(0)
    module = DraftAlignmentModule(setup.llama(hidden=32, layers=1), setup.blocks, objective=objective, lr=1e-2,
                                  warmup_steps=1, min_lr_ratio=1.0, top_k=3)
    batch = setup.batch()
    losses = module.compute_losses(batch)
    losses["loss"].backward()
    assert all(math.isfinite(losses[k].item()) for k in ("loss", "ce", "align"))
    grads = [p.grad for p in module.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    module.zero_grad()

    split = EncodedSplit(setup.split.examples[:4], setup.split.prompts[:4], setup.split.responses[:4])
    teacher = TeacherData(setup.teacher.manifest, {k: v[:4] for k, v in setup.teacher.tensors.items()})
    teacher.manifest = {k: v for k, v in teacher.manifest.items() if k != "prompts_sha"}  # a 4-example subset
    datamodule = DraftDataModule(split, teacher, split, teacher, level_blocks=setup.blocks, pad_id=setup.pad_id,
                                 batch_size=4)
    recorder = _RecordLoss()
    trainer = pl.Trainer(max_epochs=30, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, check_val_every_n_epoch=30, callbacks=[recorder])
    trainer.fit(module, datamodule=datamodule)
    assert len(recorder.losses) == 30
    assert recorder.losses[-1] < 0.8 * recorder.losses[0], recorder.losses
    for name in ("train_loss", "train_ce", "train_align", "val_loss", "val_ce", "val_align", "val_topk_overlap"):
        assert math.isfinite(float(trainer.callback_metrics[f"draft/{name}"])), name


class _RecordLoss(pl.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def test_draft_alignment_unknown_objective_lists_valid_ones(setup):
    with pytest.raises(ValueError, match="valid names: atspeed_r, atspeed_s, kl, seqkd, tvd"):
        DraftAlignmentModule(setup.llama(), setup.blocks, objective="wordkd")


def test_draft_dataset_rejects_teacher_of_another_split(setup):
    short = EncodedSplit(setup.split.examples[:5], setup.split.prompts[:5], setup.split.responses[:5])
    with pytest.raises(TeacherDataError, match="teacher data has 12 examples but the split has 5"):
        DraftAlignmentDataset(short, setup.teacher)
    shuffled = EncodedSplit(setup.split.examples, setup.split.prompts[::-1], setup.split.responses)
    with pytest.raises(TeacherDataError, match="other prompts"):
        DraftAlignmentDataset(shuffled, setup.teacher)
    with pytest.raises(TeacherDataError, match="num_beams=9"):
        DraftAlignmentDataset(setup.split, setup.teacher, num_beams=9)


def test_draft_alignment_unconstrained_rows_sum_to_one(setup):
    batch = setup.batch()
    logits = torch.randn(3, 4, len(setup.blocks), len(setup.data.tokenizer)) * 3
    draft = unconstrained_rows(logits, setup.blocks)  # [3, 4, L, S_max + 1]
    torch.testing.assert_close(draft.exp().sum(-1), torch.ones(3, 4, len(setup.blocks)))
    target = unconstrained_teacher_rows(batch["teacher_logits"], batch["teacher_logsumexp"])
    torch.testing.assert_close(target.exp().sum(-1), torch.ones(target.shape[:-1]), atol=2e-3, rtol=0)
    gt = unconstrained_teacher_rows(batch["gt_teacher_logits"], batch["gt_teacher_logsumexp"])
    torch.testing.assert_close(gt.exp().sum(-1), torch.ones(gt.shape[:-1]), atol=2e-3, rtol=0)


def test_draft_batch_reduced_beams_and_no_validation_data(setup):
    datamodule = DraftDataModule(setup.split, setup.teacher, level_blocks=setup.blocks, pad_id=setup.pad_id,
                                 batch_size=5, num_beams=2)
    batch = next(iter(datamodule.train_dataloader()))
    assert batch["teacher_logits"].shape[1:3] == (2, len(setup.blocks))
    assert datamodule.val_dataloader() == []
    with pytest.raises(ValueError, match="both val_split and val_teacher"):
        DraftDataModule(setup.split, setup.teacher, setup.split, level_blocks=setup.blocks, pad_id=setup.pad_id)


@pytest.mark.parametrize("path", sorted((CONF_DIR / "alignment").glob("*.yaml")), ids=lambda p: p.stem)
def test_alignment_config_binds_to_module_signature(path):
    composed = OmegaConf.create({"decoding": {"beam_size": 10}, "alignment": OmegaConf.load(path)})
    cfg = OmegaConf.to_container(composed, resolve=True)["alignment"]
    assert cfg.pop("name") == path.stem
    assert cfg["objective"] in (*ALIGNMENT_LOSSES, "none")
    inspect.signature(DraftAlignmentModule).bind(model=None, level_blocks=[], **cfg)
    if cfg["objective"] != "none":
        DraftAlignmentModule(None, [(0, 2)], **cfg)  # the module's own checks accept every shipped form


def test_draft_alignment_full_vocab_rows_are_the_whole_vocabulary(setup):
    """full_vocab: KL over all V columns of the stored full target logits equals a naive full-vocabulary KL of
    the draft's logits at the ground-truth positions; the draft == target case gives 0."""
    batch = setup.batch(range(NUM_EXAMPLES))
    vocab = len(setup.data.tokenizer)
    assert batch["gt_teacher_full_logits"].shape == (NUM_EXAMPLES, len(setup.blocks), vocab)
    same = DraftAlignmentModule(copy.deepcopy(setup.target), setup.blocks, objective="kl", full_vocab=True)
    with torch.no_grad():
        assert abs(same.compute_losses(batch)["align"].item()) < 1e-3
    module = DraftAlignmentModule(setup.llama(), setup.blocks, objective="kl", full_vocab=True)
    with torch.no_grad():
        gt_logits, _ = module.draft_logits(batch)
        got = module.compute_losses(batch)["align"].item()
    logq = gt_logits[:, : len(setup.blocks)].double().log_softmax(-1)
    logp = batch["gt_teacher_full_logits"].double().log_softmax(-1)
    want = (logp.exp() * (logp - logq)).sum(-1).mean().item()
    assert got == pytest.approx(want, rel=1e-4)
    restricted = DraftAlignmentModule(setup.llama(), setup.blocks, objective="kl").compute_losses(batch)["align"]
    assert restricted.item() != pytest.approx(got, rel=1e-3)  # another function of the same logits


def test_draft_alignment_full_vocab_needs_the_teacher_logits(setup):
    batch = setup.batch()
    batch.pop("gt_teacher_full_logits")
    with pytest.raises(ValueError, match="full_vocab_gt"):
        DraftAlignmentModule(setup.llama(), setup.blocks, objective="tvd", full_vocab=True).compute_losses(batch)
    with pytest.raises(ValueError, match="full_vocab"):
        DraftAlignmentModule(setup.llama(), setup.blocks, objective="atspeed_s", full_vocab=True)


def test_draft_alignment_seqkd_public_labels_position_zero_with_the_ground_truth(setup):
    batch = setup.batch()
    module = DraftAlignmentModule(setup.llama(), setup.blocks, objective="seqkd", seqkd_first_label="ground_truth")
    labels = module.seqkd_labels(batch)
    first_true = [r[0] - setup.blocks[0][0] for r in (setup.split.responses[i] for i in range(4))]
    for row in range(4):
        for beam in range(NUM_BEAMS):
            own = batch["beam_labels"][row, beam].tolist()
            assert labels[row, beam].tolist() == [first_true[row], *own[1:]]
    own_module = DraftAlignmentModule(setup.llama(), setup.blocks, objective="seqkd")
    assert torch.equal(own_module.seqkd_labels(batch), batch["beam_labels"])
    with pytest.raises(ValueError, match="seqkd_first_label"):
        DraftAlignmentModule(setup.llama(), setup.blocks, objective="seqkd", seqkd_first_label="first")


def test_draft_alignment_on_policy_beams_with_the_target_as_draft_are_the_teacher_beams(setup):
    """A draft equal to the target drafts the target's own beams, so the on-policy rows reproduce the stored
    teacher rows (fp16 storage aside); the rows past ``rows`` are untouched."""
    batch = setup.batch(range(6))
    module = DraftAlignmentModule(copy.deepcopy(setup.target), setup.blocks, objective="atspeed_s",
                                  on_policy_ratio=0.5)
    module.attach_target(HFDecoderLM(setup.target), setup.data.trie())
    out = module.on_policy_batch(batch, rows=torch.tensor([0, 2, 5]))
    assert torch.equal(out["input_ids"], batch["input_ids"]) and torch.equal(out["beam_labels"], batch["beam_labels"])
    torch.testing.assert_close(out["teacher_logits"], batch["teacher_logits"], atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(out["teacher_logsumexp"], batch["teacher_logsumexp"], atol=2e-2, rtol=1e-2)
    for key in ("teacher_logits", "beam_mask", "attention_mask"):
        assert torch.equal(out[key][[1, 3, 4]], batch[key][[1, 3, 4]])


def test_draft_alignment_on_policy_beams_are_the_drafts_scored_by_the_target(setup):
    from atspeed_exp.decoding.beam_search import left_pad
    from atspeed_exp.decoding.tree import tree_beam_search

    batch = setup.batch(range(4))
    draft = setup.llama(hidden=32, layers=1, seed=7).eval()
    module = DraftAlignmentModule(draft, setup.blocks, objective="atspeed_r", on_policy_ratio=1.0)
    trie = setup.data.trie()
    module.attach_target(HFDecoderLM(setup.target), trie)
    out = module.on_policy_batch(batch, rows=torch.arange(4))
    prompts = [setup.split.prompts[i] for i in range(4)]
    ids, mask = left_pad([torch.tensor(p) for p in prompts], setup.pad_id)
    want = tree_beam_search(HFDecoderLM(draft), ids, mask, trie, NUM_BEAMS).sequences  # [4, K, L]
    starts = torch.tensor([s for s, _ in setup.blocks])
    assert torch.equal(out["beam_labels"], want - starts)
    num_levels = len(setup.blocks)
    for row in (0, 3):
        for beam in (0, NUM_BEAMS - 1):
            tokens = want[row, beam].tolist()
            with torch.no_grad():
                plain = setup.target(input_ids=torch.tensor([prompts[row] + tokens[: num_levels - 1]])).logits[0]
            plen = len(prompts[row])
            for level, (start, end) in enumerate(setup.blocks):
                torch.testing.assert_close(out["teacher_logits"][row, beam, level, : end - start],
                                           plain[plen - 1 + level, start:end], atol=1e-4, rtol=1e-4)
    # a training step on on-policy rows runs and reports its cost
    module.log = lambda name, value, **kw: logged.__setitem__(name, value)
    logged: dict = {}
    loss = module.training_step(batch, 0)
    assert math.isfinite(loss.item()) and logged["draft/on_policy_s"] > 0
    with pytest.raises(RuntimeError, match="attach_target"):
        DraftAlignmentModule(draft, setup.blocks, objective="atspeed_s", on_policy_ratio=1.0).on_policy_batch(
            batch, torch.arange(1))
    for objective in ("kl", "seqkd"):  # no target distribution on the draft's beams to learn from
        with pytest.raises(ValueError, match="on_policy_ratio"):
            DraftAlignmentModule(draft, setup.blocks, objective=objective, on_policy_ratio=0.5)


def test_draft_alignment_on_policy_rows_are_a_random_share_of_each_batch(setup):
    """The rows replaced are drawn per step (a length-sorted batch's first rows would always be its shortest
    histories), about ratio * B of them, and the same at the same global step."""
    batch = setup.batch(range(8))
    module = DraftAlignmentModule(setup.llama(), setup.blocks, objective="atspeed_s", on_policy_ratio=0.5)
    chosen = []
    module.on_policy_batch = lambda b, rows: chosen.append(rows.tolist()) or b
    module.log = lambda *args, **kwargs: None
    for _ in range(2):
        module.training_step(batch, 0)  # global_step stays 0 outside a Trainer: the same draw twice
    assert chosen[0] == chosen[1] and 0 < len(chosen[0]) < 8 and chosen[0] != list(range(len(chosen[0])))


@pytest.mark.parametrize("objective", ["kl", "tvd", "atspeed_r", "atspeed_s"])
def test_draft_alignment_passes_its_temperature_to_the_objective(setup, objective):
    """The module's align term is the objective evaluated at the configured τ (a τ that is dropped on the way
    would leave every shipped τ = 1 config unchanged and the public τ = 0.001 ones silently wrong)."""
    from atspeed_exp.lit.draft_module import constrained_rows
    from atspeed_exp.losses.alignment import get_alignment_loss

    batch = setup.batch()
    module = DraftAlignmentModule(setup.llama(), setup.blocks, objective=objective, temperature=0.3, top_k=3)
    with torch.no_grad():
        gt_logits, beam_logits = module.draft_logits(batch)
        align = module.compute_losses(batch)["align"]
    num_levels = len(setup.blocks)
    if objective in ("kl", "tvd"):
        draft, target = constrained_rows(gt_logits[:, :num_levels], setup.blocks), batch["gt_teacher_logits"]
        mask = torch.ones(draft.shape[:-1], dtype=torch.bool)
    else:
        draft, target = constrained_rows(beam_logits, setup.blocks), batch["teacher_logits"]
        mask = batch["beam_mask"][:, :, None].expand(-1, -1, num_levels)
    extra = {"top_k": 3} if objective == "atspeed_s" else {}
    loss = get_alignment_loss(objective)
    assert align.item() == pytest.approx(loss(draft, target, mask, temperature=0.3, **extra).item(), rel=1e-5)
    assert align.item() != pytest.approx(loss(draft, target, mask, temperature=1.0, **extra).item(), rel=1e-3)
