"""Scratch and extended-pretrained tokenizers, prompt formats and training-example encoding (all offline)."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402

from atspeed_exp.data.prompts import (  # noqa: E402
    IGNORE_INDEX,
    PromptFormatter,
    encode_prompt,
    encode_response,
    encode_training_example,
)
from atspeed_exp.data.tokenizer import (  # noqa: E402
    SPECIAL_TOKENS,
    build_scratch_tokenizer,
    extend_pretrained_tokenizer,
    level_token_blocks,
    load_tokenizer,
    save_tokenizer,
)

LEVEL_SIZES = (5, 7, 7, 9)
LEVEL_TOKENS = [[f"<{'abcd'[level]}_{code}>" for code in range(size)] for level, size in enumerate(LEVEL_SIZES)]

ALPACA_TWO_ITEMS = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\nThe user has interacted with items <a_1><b_2><c_3><d_4>, <a_0><b_6><c_0><d_8> in "
    "chronological order. Can you predict the next possible item that the user may expect?\n\n### Response:"
)


def random_history(n: int, seed: int = 0) -> list[tuple[str, ...]]:
    rng = random.Random(seed)
    return [tuple(rng.choice(level) for level in LEVEL_TOKENS) for _ in range(n)]


@pytest.fixture(scope="module")
def scratch() -> PreTrainedTokenizerFast:
    return build_scratch_tokenizer(LEVEL_TOKENS, PromptFormatter("alpaca").prompt_words())


@pytest.fixture()
def pretrained_dir(tmp_path: Path) -> Path:
    """A tiny byte-level BPE tokenizer (GPT-2 style, no pad token) trained here and saved like a checkpoint's."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    corpus = [PromptFormatter("alpaca").prompt_text(random_history(3, seed)) for seed in range(20)]
    backend.train_from_iterator(corpus + ["hello world, a tiny corpus"] * 5, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    assert tok.pad_token is None
    tok.save_pretrained(tmp_path / "pretrained")
    return tmp_path / "pretrained"


def test_scratch_tokenizer_level_blocks_contiguous_in_order(scratch: PreTrainedTokenizerFast) -> None:
    blocks = level_token_blocks(scratch, LEVEL_TOKENS)
    start = len(SPECIAL_TOKENS)  # the specials come first, then level a, b, c, d
    expected = []
    for size in LEVEL_SIZES:
        expected.append((start, start + size))
        start += size
    assert blocks == expected
    for (begin, _), tokens in zip(blocks, LEVEL_TOKENS):
        assert scratch.convert_tokens_to_ids(tokens) == list(range(begin, begin + len(tokens)))
    assert scratch.convert_tokens_to_ids(list(SPECIAL_TOKENS)) == list(range(len(SPECIAL_TOKENS)))


def test_scratch_tokenizer_sid_tokens_without_spaces(scratch: PreTrainedTokenizerFast) -> None:
    ids = scratch("<a_1><b_2>", add_special_tokens=False)["input_ids"]
    assert ids == scratch.convert_tokens_to_ids(["<a_1>", "<b_2>"])
    assert scratch("items<a_1><b_2>,<c_3>", add_special_tokens=False)["input_ids"] == scratch.convert_tokens_to_ids(
        ["items", "<a_1>", "<b_2>", ",", "<c_3>"]
    )


def test_scratch_tokenizer_prepends_bos_never_eos(scratch: PreTrainedTokenizerFast) -> None:
    ids = scratch("<a_1><b_2>", add_special_tokens=True)["input_ids"]
    assert ids[0] == scratch.bos_token_id
    assert scratch.eos_token_id not in ids
    assert len(ids) == 3


@pytest.mark.parametrize("name", ["alpaca", "compact"])
def test_prompt_formats_no_unk(scratch: PreTrainedTokenizerFast, name: str) -> None:
    formatter = PromptFormatter(name)
    for seed, n in [(0, 1), (1, 7), (2, 20)]:
        ids = encode_prompt(scratch, formatter, random_history(n, seed))
        assert scratch.unk_token_id not in ids
        assert sum(1 for i in ids if scratch.convert_ids_to_tokens(i)[1:3] in ("a_", "b_", "c_", "d_")) == 4 * n


def test_compact_scratch_tokenizer_needs_no_prompt_words() -> None:
    tok = build_scratch_tokenizer(LEVEL_TOKENS, PromptFormatter("compact").prompt_words())
    assert len(tok) == len(SPECIAL_TOKENS) + sum(LEVEL_SIZES)
    assert tok.unk_token_id not in encode_prompt(tok, PromptFormatter("compact"), random_history(5))


def test_alpaca_prompt_text_exact() -> None:
    history = [("<a_1>", "<b_2>", "<c_3>", "<d_4>"), ("<a_0>", "<b_6>", "<c_0>", "<d_8>")]
    assert PromptFormatter("alpaca").prompt_text(history) == ALPACA_TWO_ITEMS
    assert PromptFormatter("compact").prompt_text(history) == "<his><a_1><b_2><c_3><d_4><a_0><b_6><c_0><d_8><sep>"


def test_prompt_formatter_unknown_name() -> None:
    with pytest.raises(ValueError, match="unknown prompt format"):
        PromptFormatter("chatml")


def test_tokenizer_save_load_round_trip(scratch: PreTrainedTokenizerFast, tmp_path: Path) -> None:
    loaded = load_tokenizer(save_tokenizer(scratch, tmp_path / "tok"))
    assert loaded.get_vocab() == scratch.get_vocab()
    assert level_token_blocks(loaded, LEVEL_TOKENS) == level_token_blocks(scratch, LEVEL_TOKENS)
    for name in ("alpaca", "compact"):
        history = random_history(20, seed=3)
        assert encode_prompt(loaded, PromptFormatter(name), history) == encode_prompt(
            scratch, PromptFormatter(name), history
        )
    for attr in ("pad_token_id", "bos_token_id", "eos_token_id", "unk_token_id"):
        assert getattr(loaded, attr) == getattr(scratch, attr)
    assert loaded.convert_tokens_to_ids(["<his>", "<sep>"]) == scratch.convert_tokens_to_ids(["<his>", "<sep>"])


def test_compact_prompt_much_shorter_than_alpaca(scratch: PreTrainedTokenizerFast) -> None:
    # Tokens: alpaca = BOS + 47 template pieces + 4n SID tokens + (n - 1) commas; compact = BOS + <his> + 4n + <sep>.
    # Both carry the 4n SID tokens, so the ratio depends on n: ~1/3 at Beauty's typical history (~5 items), 0.56 at 20.
    def lengths(n: int) -> tuple[int, int]:
        history = random_history(n, seed=n)
        return (
            len(encode_prompt(scratch, PromptFormatter("compact"), history)),
            len(encode_prompt(scratch, PromptFormatter("alpaca"), history)),
        )

    assert lengths(20) == (83, 147)
    assert lengths(5) == (23, 72)
    compact, alpaca = lengths(5)
    assert compact / alpaca < 0.35


def test_training_labels_mask_prompt_exactly(scratch: PreTrainedTokenizerFast) -> None:
    formatter = PromptFormatter("alpaca")
    history, target = random_history(6, seed=4), ("<a_2>", "<b_5>", "<c_1>", "<d_7>")
    input_ids, labels = encode_training_example(scratch, formatter, history, target)
    prompt_ids = encode_prompt(scratch, formatter, history)
    response_ids = scratch.convert_tokens_to_ids(list(target)) + [scratch.eos_token_id]
    assert input_ids == prompt_ids + response_ids  # inference sees exactly the training prefix
    assert labels == [IGNORE_INDEX] * len(prompt_ids) + response_ids
    assert encode_response(scratch, target, add_eos=False) == response_ids[:4]


def test_encode_response_unknown_sid_token(scratch: PreTrainedTokenizerFast) -> None:
    with pytest.raises(ValueError, match="<d_99>"):
        encode_response(scratch, ("<a_1>", "<b_1>", "<c_1>", "<d_99>"), add_eos=True)


def test_extend_pretrained_tokenizer_blocks_at_end(pretrained_dir: Path, tmp_path: Path) -> None:
    tok = load_tokenizer(pretrained_dir)
    base_size = len(tok)
    tok = extend_pretrained_tokenizer(tok, LEVEL_TOKENS)
    assert tok.pad_token == "<pad>" and tok.pad_token_id == base_size  # pad first, then the SID blocks
    blocks = level_token_blocks(tok, LEVEL_TOKENS)
    assert blocks[0][0] == base_size + 1
    assert blocks[-1][1] == len(tok)
    assert all(end == next_start for (_, end), (next_start, _) in zip(blocks, blocks[1:]))
    assert tok("<a_1><b_2>", add_special_tokens=False)["input_ids"] == tok.convert_tokens_to_ids(["<a_1>", "<b_2>"])

    history, target = random_history(4, seed=5), ("<a_2>", "<b_5>", "<c_1>", "<d_7>")
    input_ids, labels = encode_training_example(tok, PromptFormatter("alpaca"), history, target)
    assert input_ids[-5:] == tok.convert_tokens_to_ids(list(target)) + [tok.eos_token_id]
    assert labels.count(IGNORE_INDEX) == len(input_ids) - 5
    sid_ids = [i for i in input_ids if blocks[0][0] <= i < blocks[-1][1]]
    assert len(sid_ids) == 4 * len(history) + 4

    reloaded = load_tokenizer(save_tokenizer(tok, tmp_path / "extended"))
    assert reloaded.get_vocab() == tok.get_vocab()
    assert level_token_blocks(reloaded, LEVEL_TOKENS) == blocks
    assert encode_training_example(reloaded, PromptFormatter("alpaca"), history, target) == (input_ids, labels)


def test_extend_pretrained_tokenizer_reuse_eos_and_compact_specials(pretrained_dir: Path) -> None:
    tok = extend_pretrained_tokenizer(
        load_tokenizer(pretrained_dir), LEVEL_TOKENS, reuse_eos_as_pad=True, add_compact_specials=True
    )
    assert tok.pad_token_id == tok.eos_token_id
    ids = encode_prompt(tok, PromptFormatter("compact"), random_history(3))
    assert tok.convert_ids_to_tokens(ids[:1] + ids[-1:]) == ["<his>", "<sep>"]  # this checkpoint adds no BOS
    assert len(ids) == 2 + 12


def test_level_token_blocks_raises_on_non_contiguous(pretrained_dir: Path, scratch: PreTrainedTokenizerFast) -> None:
    # A checkpoint that already knows one SID token: add_tokens skips it and level b's block gets a hole.
    tok = load_tokenizer(pretrained_dir)
    tok.add_tokens([AddedToken("<b_3>", special=False, normalized=False)])
    with pytest.raises(ValueError, match=r"level 1: .*'<b_3>' has id"):
        extend_pretrained_tokenizer(tok, LEVEL_TOKENS)

    swapped = [list(level) for level in LEVEL_TOKENS]
    swapped[2][1], swapped[2][2] = swapped[2][2], swapped[2][1]
    with pytest.raises(ValueError, match=r"level 2: .*'<c_2>'"):
        level_token_blocks(scratch, swapped)
    with pytest.raises(ValueError, match=r"level 3: SID token '<d_42>' is not in the tokenizer"):
        level_token_blocks(scratch, [*LEVEL_TOKENS[:3], ["<d_42>"]])
    with pytest.raises(ValueError, match="level 1"):
        level_token_blocks(scratch, [LEVEL_TOKENS[1], LEVEL_TOKENS[0]])  # levels out of order
