"""Everything the stages need from one dataset, built once: the loaded split, the tokenizer, the SID index, the
item trie and the encoded examples.

``RecData.build`` is the single place where dataset, tokenizer and prompt format meet, so the target stage, the
evaluation and (later) the teacher and draft stages all encode examples the same way.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from atspeed_exp.data import encoded_cache
from atspeed_exp.data.atspeed_format import DataFormatError, build_examples, item_popularity, load_atspeed_dataset
from atspeed_exp.data.prompts import PromptFormatter, encode_prompt, encode_response
from atspeed_exp.data.prompts import IGNORE_INDEX
from atspeed_exp.data.sid_index import SIDIndex
from atspeed_exp.data.tokenizer import build_scratch_tokenizer, extend_pretrained_tokenizer, load_tokenizer
from atspeed_exp.data.types import Example, RecDataset
from atspeed_exp.decoding.trie import ItemTrie

log = logging.getLogger(__name__)

MIN_TRAIN_EXAMPLES = 100  # fewer training examples than this: a warning (a model trained on them means little)


@dataclass
class EncodedSplit:
    """One split's examples and their encodings, aligned by index."""

    examples: list[Example]
    prompts: list[list[int]]  # prompt ids (BOS ... separator), what decoding starts from
    responses: list[list[int]]  # target SID ids + EOS

    def __len__(self) -> int:
        return len(self.examples)

    def training_item(self, index: int) -> tuple[list[int], list[int]]:
        """(input_ids, labels): prompt + response, labels on the response only (docs/method.md section 3)."""
        prompt, response = self.prompts[index], self.responses[index]
        return prompt + response, [IGNORE_INDEX] * len(prompt) + response

    def ground_truth(self) -> list[tuple[int, ...]]:
        return [ex.ground_truth for ex in self.examples]


def check_split_size(dataset: RecDataset, split: str, num_examples: int) -> None:
    """DataFormatError when a split has no examples; a warning when the training split has fewer than
    ``MIN_TRAIN_EXAMPLES`` (both name the dataset folder; ``build_examples`` logs why users were dropped)."""
    if num_examples == 0:
        raise DataFormatError(
            f"{dataset.root}: dataset {dataset.name!r} gives no {split} examples (every user was dropped: see the "
            f"log line of build_examples for why); a {split} example needs a user with a history and a "
            f"{'next training item' if split == 'train' else split + ' item'}"
        )
    if split == "train" and num_examples < MIN_TRAIN_EXAMPLES:
        log.warning(
            "%s: dataset %r gives only %d training examples (fewer than %d); a model trained on so few means "
            "little, check the dataset folder", dataset.root, dataset.name, num_examples, MIN_TRAIN_EXAMPLES,
        )


@dataclass
class RecData:
    dataset: RecDataset
    tokenizer: PreTrainedTokenizerBase
    formatter: PromptFormatter
    sid_index: SIDIndex
    splits: dict[str, EncodedSplit] = field(default_factory=dict)

    @classmethod
    def build(
        cls,
        root: str | Path,
        name: str,
        index_file: str | None = None,
        prompt_format: str = "compact",
        max_history: int = 20,
        sliding_window: bool = False,
        tokenizer_dir: str | Path | None = None,
        pretrained_tokenizer_dir: str | Path | None = None,
        splits: tuple[str, ...] = ("train", "valid", "test"),
        cache_dir: str | Path | None = None,
        write_cache: bool = True,
    ) -> RecData:
        """Load and encode a dataset.

        tokenizer_dir: a tokenizer saved by an earlier run (reused as is, so ids match its model);
        pretrained_tokenizer_dir: a local pretrained checkpoint whose tokenizer gets the SID tokens added;
        neither: a word-level tokenizer is built from scratch for this dataset and prompt format.
        cache_dir: where each split's encodings are kept (``encoded_cache``: ``<split>.pt``, keyed by the examples,
        SIDs, prompt format and tokenizer) and read back by a later build; ``write_cache`` False only reads (the
        non-zero ranks of a multi-process run).
        """
        dataset = load_atspeed_dataset(root, name, index_file)
        formatter = PromptFormatter(prompt_format)
        if tokenizer_dir is not None:
            tokenizer = load_tokenizer(tokenizer_dir)
        elif pretrained_tokenizer_dir is not None:
            tokenizer = extend_pretrained_tokenizer(load_tokenizer(pretrained_tokenizer_dir), dataset.level_tokens())
        else:
            tokenizer = build_scratch_tokenizer(dataset.level_tokens(), formatter.prompt_words())
        data = cls(dataset, tokenizer, formatter, SIDIndex.build(dataset, tokenizer))
        tokenizer_id = encoded_cache.tokenizer_fingerprint(tokenizer) if cache_dir is not None else ""
        for split in splits:
            window = sliding_window and split == "train"
            examples = build_examples(dataset, split, max_history=max_history, sliding_window=window)
            check_split_size(dataset, split, len(examples))
            if cache_dir is None:
                data.splits[split] = data.encode(examples)
                continue
            path = Path(cache_dir) / f"{split}.pt"
            key = encoded_cache.split_key(examples, dataset.item_sids, prompt_format, tokenizer_id)
            cached = encoded_cache.load(path, key)
            if cached is not None and len(cached[0]) == len(examples):
                log.info("%s/%s: encodings read from %s", name, split, path)
                data.splits[split] = EncodedSplit(examples, *cached)
                continue
            data.splits[split] = data.encode(examples)
            if write_cache:
                encoded_cache.save(path, key, data.splits[split].prompts, data.splits[split].responses)
        return data

    def encode(self, examples: list[Example]) -> EncodedSplit:
        sids = self.dataset.item_sids
        prompts = [encode_prompt(self.tokenizer, self.formatter, [sids[i] for i in ex.history]) for ex in examples]
        responses = [encode_response(self.tokenizer, sids[ex.target], add_eos=True) for ex in examples]
        return EncodedSplit(examples, prompts, responses)

    def trie(self) -> ItemTrie:
        return ItemTrie(self.sid_index.item_token_ids, self.sid_index.item_ids, self.sid_index.level_blocks)

    def popularity(self) -> torch.Tensor:
        return torch.as_tensor(item_popularity(self.dataset), dtype=torch.long)

    @property
    def pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return int(pad if pad is not None else self.tokenizer.eos_token_id)
