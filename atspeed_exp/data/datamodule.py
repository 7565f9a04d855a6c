"""Lightning DataModule for target fine-tuning: batches of (prompt + response) with response-only labels."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Sampler

from atspeed_exp.data.prompts import IGNORE_INDEX
from atspeed_exp.data.recdata import EncodedSplit, RecData


class _TrainingExamples(Dataset):
    def __init__(self, split: EncodedSplit, limit: int | None = None) -> None:
        self.split = split
        self.size = len(split) if limit is None else min(limit, len(split))

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[list[int], list[int]]:
        return self.split.training_item(index)


def collate_right_padded(batch: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sequence of the batch; padding gets no loss and no attention."""
    width = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, (ids, labs) in enumerate(batch):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(labs)] = torch.tensor(labs)
        attention_mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


class LengthBucketBatchSampler(Sampler[list[int]]):
    """Random batches of similar length: shuffle, sort within pools of ``pool_batches`` batches by length, cut into
    batches, shuffle the batches. Right padding then costs little (histories range from 1 to 20 items).
    A new order every epoch, a function of (``seed``, epoch) only: Lightning calls ``set_epoch`` with the trainer's
    epoch before each one (it looks for ``batch_sampler.sampler``, hence ``self.sampler = self``), so a run resumed
    from a checkpoint sees the same order in each epoch as an uninterrupted one. Without a trainer, each pass over
    the sampler advances the epoch by one.

    Stateful within an epoch: ``state_dict`` is the epoch of the pass in progress and the batches it has yielded;
    after ``load_state_dict``, the next pass over that same epoch skips those batches, so a run resumed from a
    mid-epoch checkpoint continues with the batches an uninterrupted run would see next (a pass over another epoch
    is whole). The count is of batches handed out, so it equals the batches trained only when nothing draws ahead of
    training: ``ResumableDataLoader`` refuses worker processes.

    Across processes (DDP): every rank builds the same epoch's batches (same seed and epoch) and takes every
    ``num_replicas``-th one from position ``rank``, so the ranks together see each example once per epoch. When the
    number of batches B is not a multiple of W = ``num_replicas``, the first W - (B mod W) batches of the epoch's
    order are dealt again at the end, cyclically when B < W (the padding rule of torch's ``DistributedSampler``),
    so that every rank runs the same number of steps, ceil(B / W); the examples of those batches are seen twice (or
    more, when B < W) in that epoch. ``rank`` and
    ``num_replicas`` default to torch.distributed's when it is initialised, else 0 and 1 (one process, unchanged).
    ``batch_size`` is per rank: a step trains on up to W x ``batch_size`` examples."""

    def __init__(self, lengths: list[int], batch_size: int, seed: int = 0, pool_batches: int = 50,
                 num_replicas: int | None = None, rank: int | None = None) -> None:
        distributed = dist.is_available() and dist.is_initialized()
        self.num_replicas = num_replicas if num_replicas is not None else (dist.get_world_size() if distributed else 1)
        self.rank = rank if rank is not None else (dist.get_rank() if distributed else 0)
        if not 0 <= self.rank < self.num_replicas:
            raise ValueError(f"rank {self.rank} is outside 0..{self.num_replicas - 1}")
        self.lengths = lengths
        self.batch_size = batch_size
        self.seed = seed
        self.pool = batch_size * pool_batches
        self.epoch = 0
        self.sampler = self  # where Lightning's per-epoch set_epoch looks for it
        self._pass = {"epoch": 0, "batches_done": 0}  # the pass in progress (the last one when none is)
        self._resume: dict[str, int] | None = None  # from load_state_dict, for the next pass

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def state_dict(self) -> dict[str, int]:
        return dict(self._pass)

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._resume = {"epoch": int(state["epoch"]), "batches_done": int(state["batches_done"])}
        self._pass = dict(self._resume)

    def __len__(self) -> int:
        batches = (len(self.lengths) + self.batch_size - 1) // self.batch_size  # pools cut at multiples of batch_size
        return (batches + self.num_replicas - 1) // self.num_replicas

    def __iter__(self):
        epoch, self.epoch = self.epoch, self.epoch + 1
        resume, self._resume = self._resume, None
        skip = resume["batches_done"] if resume is not None and resume["epoch"] == epoch else 0
        self._pass = {"epoch": epoch, "batches_done": skip}
        gen = torch.Generator().manual_seed(self.seed + epoch)
        order = torch.randperm(len(self.lengths), generator=gen).tolist()
        batches = []
        for start in range(0, len(order), self.pool):
            pool = sorted(order[start : start + self.pool], key=self.lengths.__getitem__)
            batches += [pool[i : i + self.batch_size] for i in range(0, len(pool), self.batch_size)]
        order = torch.randperm(len(batches), generator=gen).tolist()
        pad = (-len(order)) % self.num_replicas  # to a multiple of the ranks (see the docstring)
        order += (order * (pad // max(len(order), 1) + 1))[:pad]
        for index in order[self.rank :: self.num_replicas][skip:]:
            self._pass["batches_done"] += 1
            yield batches[index]


class ResumableDataLoader(DataLoader):
    """A DataLoader over a stateful batch sampler (``LengthBucketBatchSampler``) whose position within an epoch goes
    into Lightning's checkpoints: Lightning 2.x saves ``state_dict()`` of every training DataLoader that has one
    (``fit_loop.state_dict()["combined_loader"]``) and calls ``load_state_dict`` on resume, before the first batch
    (``ResumeState`` makes sure it does).
    The loader draws from its own generator (``seed``), not the global RNG, so iterating it does not shift the
    random state that a checkpoint restores (``ResumeState``). Worker processes would draw batches ahead of training
    and make the saved position wrong: ``num_workers`` must be 0."""

    def __init__(self, dataset: Dataset, batch_sampler: LengthBucketBatchSampler, seed: int = 0, **kwargs) -> None:
        if kwargs.get("num_workers", 0):
            raise ValueError(f"{type(self).__name__} needs num_workers=0 (workers draw batches ahead of training, so "
                             f"a checkpoint would skip batches never trained), got {kwargs['num_workers']}")
        kwargs.setdefault("generator", torch.Generator().manual_seed(seed))
        super().__init__(dataset, batch_sampler=batch_sampler, **kwargs)

    def state_dict(self) -> dict[str, int]:
        return self.batch_sampler.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.batch_sampler.load_state_dict(state)


class TargetDataModule(pl.LightningDataModule):
    def __init__(
        self, data: RecData, batch_size: int = 64, eval_batch_size: int = 128, val_limit: int | None = None,
        num_workers: int = 0, seed: int = 0,
    ) -> None:
        super().__init__()
        self.data = data
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.val_limit = val_limit
        self.num_workers = num_workers
        self.seed = seed

    def _collate(self, batch):
        return collate_right_padded(batch, self.data.pad_id)

    def train_dataloader(self) -> DataLoader:
        split = self.data.splits["train"]
        lengths = [len(p) + len(r) for p, r in zip(split.prompts, split.responses)]
        return ResumableDataLoader(
            _TrainingExamples(split),
            batch_sampler=LengthBucketBatchSampler(lengths, self.batch_size, seed=self.seed),
            seed=self.seed,
            collate_fn=self._collate,
            num_workers=self.num_workers,
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(
            _TrainingExamples(self.data.splits["valid"], self.val_limit),
            batch_size=self.eval_batch_size,
            shuffle=False,
            collate_fn=self._collate,
            num_workers=self.num_workers,
        )
