"""Item embeddings from item text through a local transformers encoder (``sid.embedding.source: text``).

Contract of ``text_embeddings``:

- an item's text is built from its ``item_text.json`` entry (written by the split step from the metadata file):
  one line ``Name: value`` per field of ``fields`` that is not empty, in that order (``Title``, ``Description``,
  ``Categories``, the categories joined by ``", "``). An item without an entry, or with every field empty, gets the
  empty text, so all such items share one embedding (counted as ``items_without_text``);
- the encoder is ``AutoModel`` + ``AutoTokenizer`` from a local folder (``local_files_only``: nothing is
  downloaded): an encoder (BERT-like) or a decoder's base model (LLaMA-like: the LM head is not loaded) alike. A
  tokenizer without a padding token pads with its EOS (or UNK) token;
- an embedding is the mean of the last hidden states ``[B, T, H]`` over the tokens of the attention mask (right
  padding, at most ``max_length`` tokens, special tokens included as the tokenizer adds them), computed in float32
  and returned as float64 ``[N, H]``;
- determinism: eval mode (no dropout), texts batched in a fixed order (token count descending, ties by position),
  so the same encoder, texts and settings give the same embeddings on a machine; another ``batch_size`` changes
  them by float rounding only (the padding is masked out);
- with ``cache_dir``, the matrix is stored as ``text-<key>.npy`` there, ``key`` a hash of the texts, the encoder
  folder's files and the settings, and read back instead of encoding again.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from atspeed_exp.artifacts import atomic_save_to_path, sha256_file

logger = logging.getLogger(__name__)

TEXT_FIELDS = ("title", "description", "categories")


def item_texts(item_text_file: str | Path, item_ids: Sequence[int], fields: Sequence[str] = TEXT_FIELDS
               ) -> tuple[list[str], int]:
    """The text of each item of ``item_ids`` (module docstring) and the number of items whose text is empty."""
    unknown = [f for f in fields if f not in TEXT_FIELDS]
    if unknown or not fields:
        raise ValueError(f"fields {list(fields)}: expected a non-empty list of {list(TEXT_FIELDS)}")
    table = json.loads(Path(item_text_file).read_text(encoding="utf-8"))
    texts = []
    for item in item_ids:
        entry = table.get(str(item)) or {}
        lines = []
        for field in fields:
            value = entry.get(field)
            value = ", ".join(value) if isinstance(value, list) else (value or "")
            if value.strip():
                lines.append(f"{field.capitalize()}: {value.strip()}")
        texts.append("\n".join(lines))
    return texts, sum(1 for t in texts if not t)


def folder_digest(path: str | Path) -> str:
    """sha256 over the names and contents of a folder's files (hidden ones skipped), in name order."""
    path = Path(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()
                       and not any(part.startswith(".") for part in p.relative_to(path).parts)):
        digest.update(str(file.relative_to(path)).encode() + b"\0" + sha256_file(file).encode())
    return digest.hexdigest()


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu', 'cuda' or 'auto', got {device!r}")
    return torch.device(device)


def encode_texts(texts: Sequence[str], encoder: str | Path, batch_size: int = 32, max_length: int = 128,
                 device: str = "cpu") -> torch.Tensor:
    """Mean-pooled last hidden states of ``texts`` under the local encoder folder ``encoder``: ``[len(texts), H]``
    float64 (module docstring)."""
    from transformers import AutoModel, AutoTokenizer

    if batch_size < 1 or max_length < 1:
        raise ValueError(f"batch_size and max_length must be >= 1, got {batch_size}, {max_length}")
    target = resolve_device(device)
    tokenizer = AutoTokenizer.from_pretrained(str(encoder), local_files_only=True)
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is None:
            raise ValueError(f"{encoder}: the tokenizer has no pad, eos or unk token to pad batches with")
        tokenizer.pad_token = fallback
    tokenizer.padding_side = "right"
    model = AutoModel.from_pretrained(str(encoder), local_files_only=True, dtype=torch.float32).to(target).eval()
    lengths = [len(ids) for ids in tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]]
    order = sorted(range(len(texts)), key=lambda i: (-lengths[i], i))
    out = torch.empty(len(texts), model.config.hidden_size, dtype=torch.float64)
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            batch = tokenizer([texts[i] for i in rows], padding=True, truncation=True, max_length=max_length,
                              return_tensors="pt").to(target)
            hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # [B, T, 1]
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)  # [B, H]
            out[torch.tensor(rows)] = pooled.double().cpu()
    return out


def text_embeddings(
    item_text_file: str | Path, item_ids: Sequence[int], encoder: str | Path, fields: Sequence[str] = TEXT_FIELDS,
    max_length: int = 128, batch_size: int = 32, device: str = "cpu", cache_dir: str | Path | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Embeddings ``[len(item_ids), H]`` float64 of the items' text and facts for the SID report (module
    docstring)."""
    texts, empty = item_texts(item_text_file, item_ids, fields)
    facts = {"encoder": Path(encoder).name, "fields": list(fields), "max_length": max_length,
             "items_without_text": empty}
    cache = None
    if cache_dir is not None:
        key = hashlib.sha256(json.dumps([texts, folder_digest(encoder), max_length, batch_size, device]).encode())
        cache = Path(cache_dir) / f"text-{key.hexdigest()[:16]}.npy"
        if cache.is_file():
            logger.info("text embeddings: reusing %s", cache)
            return torch.from_numpy(np.load(cache, allow_pickle=False)), {**facts, "cache": cache.name}
    logger.info("text embeddings: encoding %d item texts with %s", len(texts), encoder)
    matrix = encode_texts(texts, encoder, batch_size, max_length, device)
    if cache is not None:
        def save(tmp: str) -> None:
            with open(tmp, "wb") as f:
                np.save(f, matrix.numpy())

        atomic_save_to_path(cache, save)
        facts["cache"] = cache.name
    return matrix, facts
