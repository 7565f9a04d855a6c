"""Prompt formats and the encoding of prompts, responses and training examples.

Contract: a training sequence is ``encode_prompt(...) + encode_response(target, add_eos=True)``, with the prompt encoded
on its own (BOS via ``add_special_tokens=True``) and the response as SID token ids, never re-tokenized as text. So at
inference the model is given ``encode_prompt(...)`` and generates SID tokens from exactly the prefix it was trained on.
Labels are -100 on the prompt and cover the response only (4 SID tokens + EOS; docs/method.md section 3).

Formats (by name):
- ``"alpaca"``: the paper's template (docs/method.md section 2), history = item SID strings joined by ``", "``;
- ``"compact"``: ``<his>`` + history SID strings (concatenated) + ``<sep>``, for models trained from scratch.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

from atspeed_exp.data.tokenizer import HIS_TOKEN, SEP_TOKEN

IGNORE_INDEX = -100  # label of positions without loss (torch.nn.CrossEntropyLoss's default ignore_index)

ALPACA_TEMPLATE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\nThe user has interacted with items {history} in chronological order. Can you predict the next "
    "possible item that the user may expect?\n\n### Response:"
)
ALPACA_HISTORY_SEPARATOR = ", "
PROMPT_FORMATS = ("alpaca", "compact")

# The pieces the scratch tokenizer's pre-tokenizer (tokenizers' Whitespace: \w+|[^\w\s]+) cuts text into.
_WORD_PIECES = re.compile(r"\w+|[^\w\s]+")


def sid_string(sid_tokens: Sequence[str]) -> str:
    """An item's SID as text: its tokens concatenated, e.g. ``<a_1><b_2><c_3><d_4>``."""
    return "".join(sid_tokens)


class PromptFormatter:
    """Turns a history (each item's SID tokens) into prompt text, in one of ``PROMPT_FORMATS``."""

    def __init__(self, name: str) -> None:
        if name not in PROMPT_FORMATS:
            raise ValueError(f"unknown prompt format {name!r}; expected one of {PROMPT_FORMATS}")
        self.name = name

    def __repr__(self) -> str:
        return f"PromptFormatter({self.name!r})"

    def prompt_text(self, history_sids: Sequence[Sequence[str]]) -> str:
        """history_sids: the history items in time order, each as its SID tokens."""
        items = [sid_string(sid) for sid in history_sids]
        if self.name == "alpaca":
            return ALPACA_TEMPLATE.format(history=ALPACA_HISTORY_SEPARATOR.join(items))
        return HIS_TOKEN + "".join(items) + SEP_TOKEN

    def prompt_words(self) -> list[str]:
        """Word/punctuation pieces of the template (without SID tokens and specials), distinct, in order of appearance.

        A scratch tokenizer built with these has no ``<unk>`` on any prompt of this format.
        """
        if self.name == "compact":
            return []  # only <his>/<sep>, which are special tokens of every scratch tokenizer
        text = ALPACA_TEMPLATE.format(history="") + " " + ALPACA_HISTORY_SEPARATOR
        return list(dict.fromkeys(_WORD_PIECES.findall(text)))


def encode_prompt(
    tokenizer: PreTrainedTokenizerBase, formatter: PromptFormatter, history_sids: Sequence[Sequence[str]]
) -> list[int]:
    """Prompt ids, with the tokenizer's BOS (``add_special_tokens=True``) and never a trailing EOS."""
    ids = list(tokenizer(formatter.prompt_text(history_sids), add_special_tokens=True)["input_ids"])
    # Some pretrained tokenizers append EOS as a special token; the response must directly follow the prompt.
    if tokenizer.eos_token_id is not None and ids and ids[-1] == tokenizer.eos_token_id:
        ids.pop()
    return ids


def encode_response(tokenizer: PreTrainedTokenizerBase, sid_tokens: Sequence[str], add_eos: bool) -> list[int]:
    """The response ids: the item's SID tokens looked up one by one (+ EOS when ``add_eos``, i.e. in training)."""
    ids = tokenizer.convert_tokens_to_ids(list(sid_tokens))
    for token, token_id in zip(sid_tokens, ids):
        if token_id is None or (token_id == tokenizer.unk_token_id and token != tokenizer.unk_token):
            raise ValueError(f"SID token {token!r} is not in the tokenizer vocabulary")
    if add_eos:
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no EOS token")
        ids.append(tokenizer.eos_token_id)
    return ids


def encode_training_example(
    tokenizer: PreTrainedTokenizerBase,
    formatter: PromptFormatter,
    history_sids: Sequence[Sequence[str]],
    target_sid: Sequence[str],
) -> tuple[list[int], list[int]]:
    """(input_ids, labels) for one example: prompt + response + EOS; labels -100 on the prompt, the ids elsewhere.

    Labels are not shifted (the causal-LM loss shifts them), so ``labels[i] == input_ids[i]`` on the response.
    """
    prompt_ids = encode_prompt(tokenizer, formatter, history_sids)
    response_ids = encode_response(tokenizer, target_sid, add_eos=True)
    return prompt_ids + response_ids, [IGNORE_INDEX] * len(prompt_ids) + response_ids
