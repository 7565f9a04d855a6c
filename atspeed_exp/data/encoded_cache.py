"""Encoded splits kept on disk, so a rerun on a cached target does not tokenise every example again (about half a
minute for Beauty's 102,858 sliding-window training examples on one CPU core).

A split's prompt and response ids follow from its examples, the items' SID tokens, the prompt format and the
tokenizer; the file's key is a hash of exactly these, so any change (another history length, an edited dataset
file, another tokenizer) encodes again instead of reading stale ids. A file that cannot be read, or holds another
key, is encoded again and rewritten, never trusted. Files are written atomically (``artifacts.atomic_save_to_path``).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch

from atspeed_exp import artifacts
from atspeed_exp.data.types import Example

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of everything that maps text to ids: a fast tokenizer's whole serialised pipeline (normaliser,
    pre-tokeniser, model, added tokens), else its vocabulary; plus the special-token settings."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    special = json.dumps({"special": tokenizer.special_tokens_map, "bos": tokenizer.bos_token_id,
                          "eos": tokenizer.eos_token_id}, sort_keys=True, default=str)
    return hashlib.sha256((text + special).encode()).hexdigest()[:16]


def split_key(examples: list[Example], item_sids: dict[int, tuple[str, ...]], prompt_format: str,
              tokenizer_id: str) -> str:
    """The hash the encodings of ``examples`` are a function of."""
    digest = hashlib.sha256(f"{FORMAT_VERSION}|{prompt_format}|{tokenizer_id}|".encode())
    used = sorted({i for ex in examples for i in (*ex.history, ex.target)})
    digest.update(repr([(i, item_sids[i]) for i in used]).encode())
    digest.update(repr([(ex.history, ex.target) for ex in examples]).encode())
    return digest.hexdigest()[:16]


def _flatten(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
    flat = torch.tensor([t for r in rows for t in r], dtype=torch.long)
    return flat, lengths


def _unflatten(flat: torch.Tensor, lengths: torch.Tensor) -> list[list[int]]:
    ids, ends = flat.tolist(), torch.cumsum(lengths, 0).tolist()  # one host copy each, then list slices
    return [ids[end - n:end] for end, n in zip(ends, lengths.tolist())]


def load(path: Path, key: str) -> tuple[list[list[int]], list[list[int]]] | None:
    """(prompts, responses) from ``path`` when it holds ``key``'s encodings; None when it is missing, unreadable or
    of another key (said in a log line)."""
    if not path.exists():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        if payload.get("key") != key:
            log.info("encoded split %s was made from other examples or another tokenizer; encoding again", path)
            return None
        prompts = _unflatten(payload["prompts"], payload["prompt_lengths"])
        responses = _unflatten(payload["responses"], payload["response_lengths"])
    except Exception as err:  # a damaged cache file is encoded again and rewritten
        log.warning("encoded split %s is unreadable (%s: %s); encoding again", path, type(err).__name__, err)
        return None
    if len(prompts) != len(responses):
        log.warning("encoded split %s holds %d prompts for %d responses; encoding again", path, len(prompts),
                    len(responses))
        return None
    return prompts, responses


def save(path: Path, key: str, prompts: list[list[int]], responses: list[list[int]]) -> None:
    prompt_ids, prompt_lengths = _flatten(prompts)
    response_ids, response_lengths = _flatten(responses)
    payload = {"key": key, "prompts": prompt_ids, "prompt_lengths": prompt_lengths, "responses": response_ids,
               "response_lengths": response_lengths}
    artifacts.atomic_save_to_path(path, lambda tmp: torch.save(payload, tmp))
