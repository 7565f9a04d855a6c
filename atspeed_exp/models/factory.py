"""Model factories named by the ``_target_`` of ``conf/model/*.yaml``. Each takes the run's tokenizer (vocabulary
size and special ids come from it, never from the config) and the SID token ids (trained rows for LoRA)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from atspeed_exp.models.build import build_scratch_llama, load_pretrained_with_lora


def scratch_llama(tokenizer: Any, sid_token_ids: Sequence[int], name: str = "", **sizes: Any) -> nn.Module:
    """A LLaMA initialised from scratch; ``sizes`` are ``build_scratch_llama``'s architecture arguments
    (``name`` is the config's label, not an argument)."""
    del sid_token_ids, name  # every row of a scratch model is trained
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return build_scratch_llama(
        vocab_size=len(tokenizer),
        pad_token_id=pad,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **sizes,
    )


def pretrained_lora(
    tokenizer: Any, sid_token_ids: Sequence[int], path: str, name: str = "", **lora: Any
) -> nn.Module:
    """A local pretrained checkpoint with LoRA; the SID token rows are trained and saved with the adapter."""
    del name
    lora = dict(lora)
    if "target_modules" in lora:
        lora["target_modules"] = tuple(lora["target_modules"])
    return load_pretrained_with_lora(path, tokenizer, sid_token_ids, **lora)
