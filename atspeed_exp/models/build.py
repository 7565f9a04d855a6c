"""Building, saving and loading the target and draft models.

- ``build_scratch_llama``: a LLaMA-architecture ``LlamaForCausalLM`` initialised from a ``LlamaConfig`` (no hub).
- ``load_pretrained_with_lora``: a LOCAL pretrained directory (safetensors or GGUF) with its vocabulary resized to the
  tokenizer and wrapped with LoRA (peft). The new SID token rows of the input embedding and of the output head are
  trained through peft's ``trainable_token_indices`` (only those rows, for tied and untied embeddings alike); every
  other base weight is frozen.
- ``save_model`` / ``load_model``: an atomic save into a directory and its exact restore (equal logits).

Saved formats (``atspeed_model.json`` in the directory says which):
- ``"full"``: a plain transformers model, ``save_pretrained`` as is.
- ``"peft_lora"``: the adapter only (``adapter_model.safetensors``: LoRA matrices and the trained token rows), plus
  ``atspeed_extra_rows.safetensors`` holding the base rows the resize appended (randomly initialised, not part of the
  pretrained checkpoint; the trained SID rows override them but other added tokens would not) and the manifest with
  the base directory (absolute path, GGUF file, dtype, vocabulary sizes). Loading rebuilds the base from that
  directory, so the pretrained directory must still exist; nothing of the multi-GB base is copied.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedModel

from atspeed_exp.artifacts import ArtifactError, apply_umask_mode, corrupt, replace_directory

MANIFEST = "atspeed_model.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}  # weights by config name
EXTRA_ROWS = "atspeed_extra_rows.safetensors"
# What a truncated or corrupt saved folder raises on load: SafetensorError (weights), OSError (transformers on
# invalid config JSON, a missing file), ValueError (json), KeyError (a manifest field), RuntimeError (torch).
_LOAD_ERRORS = (SafetensorError, OSError, ValueError, KeyError, RuntimeError)
# Where a peft model built here keeps what save_model needs to rebuild its base (set by load_pretrained_with_lora
# and load_model; a plain attribute of the PeftModel, not saved by torch).
_SOURCE_ATTR = "_atspeed_source"


def build_scratch_llama(
    vocab_size: int,
    pad_token_id: int,
    bos_token_id: int,
    eos_token_id: int,
    hidden_size: int,
    intermediate_size: int,
    num_hidden_layers: int,
    num_attention_heads: int,
    num_key_value_heads: int | None = None,
    max_position_embeddings: int = 512,
    tie_word_embeddings: bool = False,
    rms_norm_eps: float = 1e-6,
    attn_implementation: str = "sdpa",
    seed: int | None = None,
) -> LlamaForCausalLM:
    """A randomly initialised LLaMA from a ``LlamaConfig``. ``seed`` makes the initial weights reproducible without
    touching the global RNG state of the caller."""
    config = LlamaConfig(
        vocab_size=vocab_size,
        pad_token_id=pad_token_id,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,  # None -> = num_attention_heads (plain multi-head attention)
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        rms_norm_eps=rms_norm_eps,
        attn_implementation=attn_implementation,
    )
    if seed is None:
        return LlamaForCausalLM(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)


def _module_name(model: nn.Module, module: nn.Module) -> str:
    """The last component of ``module``'s qualified name in ``model`` (what peft matches against)."""
    for name, candidate in model.named_modules():
        if candidate is module:
            return name.rsplit(".", 1)[-1]
    raise ValueError("module not found in model")


def load_pretrained_with_lora(
    path: str | os.PathLike,
    tokenizer: Any,
    new_token_ids: Sequence[int],
    r: int = 8,
    alpha: int = 16,
    dropout: float = 0.05,
    target_modules: Sequence[str] = ("q_proj", "v_proj"),
    gguf_file: str | None = None,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
) -> PeftModel:
    """Load the pretrained causal LM in local directory ``path`` (``gguf_file``: a GGUF file inside it), resize its
    vocabulary to exactly ``len(tokenizer)`` (so target and draft logits have the same width) and wrap it with LoRA
    on ``target_modules``; the rows ``new_token_ids`` of the input embedding and of the output head are trainable
    too (tied heads share them).

    ``dtype`` is explicit because transformers v5 loads in the checkpoint's dtype by default (``dtype="auto"``),
    e.g. bf16, which is slow and imprecise for CPU training. Returns the peft model in training mode.
    """
    path = os.path.abspath(os.fspath(path))
    base = AutoModelForCausalLM.from_pretrained(
        path, gguf_file=gguf_file, dtype=dtype, attn_implementation=attn_implementation
    )
    base_vocab_size = base.get_input_embeddings().weight.shape[0]
    vocab_size = len(tokenizer)
    ids = sorted({int(i) for i in new_token_ids})
    if not ids or ids[0] < 0 or ids[-1] >= vocab_size:
        raise ValueError(f"new_token_ids must be non-empty and within [0, {vocab_size}), got {list(new_token_ids)}")
    if vocab_size != base_vocab_size:
        # mean_resizing (default): added rows drawn around the old rows' mean, which keeps the initial output
        # distribution close to the pretrained one; uses the global RNG, so seed it for reproducible runs.
        base.resize_token_embeddings(vocab_size)

    # Both embeddings by their module names; for tied weights peft wraps the input embedding and ties the head's
    # wrapper to it (one set of trainable rows), which it also does when both are named.
    token_layers = {_module_name(base, base.get_input_embeddings()): ids}
    output = base.get_output_embeddings()
    if output is not None:
        token_layers[_module_name(base, output)] = ids
    config = LoraConfig(
        task_type="CAUSAL_LM",
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(target_modules),
        trainable_token_indices=token_layers,
    )
    model = get_peft_model(base, config)
    setattr(
        model,
        _SOURCE_ATTR,
        {
            "base_path": path,
            "gguf_file": gguf_file,
            "dtype": str(dtype).removeprefix("torch."),
            "attn_implementation": attn_implementation,
            "base_vocab_size": int(base_vocab_size),
            "vocab_size": int(vocab_size),
        },
    )
    return model


def _raw_weight(module: nn.Module) -> torch.Tensor:
    """The base weight under a peft wrapper (``TrainableTokensWrapper.weight`` would return the merged weights)."""
    original = getattr(module, "original_module", None)
    return (original if original is not None else module).weight


def save_model(model: nn.Module, directory: str | os.PathLike, tokenizer: Any | None = None) -> None:
    """Save ``model`` (a transformers model, or a peft model from ``load_pretrained_with_lora``/``load_model``) into
    ``directory`` atomically (written into a sibling temporary directory, then renamed). ``tokenizer``, if given, is
    saved alongside. See the module docstring for the formats."""
    directory = os.path.abspath(os.fspath(directory))
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(directory)}.tmp-")
    try:
        if isinstance(model, PeftModel):
            source = getattr(model, _SOURCE_ATTR, None)
            if source is None:
                raise ValueError("save_model needs a peft model built by load_pretrained_with_lora or load_model")
            # save_embedding_layers=False: the trained rows are in the adapter already; "auto" would save both full
            # embedding matrices (the vocabulary was resized) and may query the hub for the base config.
            model.save_pretrained(tmp, save_embedding_layers=False)
            base = model.get_base_model()
            start = source["base_vocab_size"]
            rows = {"embed_tokens": _raw_weight(base.get_input_embeddings())[start:]}
            output = base.get_output_embeddings()
            if output is not None and not base.config.tie_word_embeddings:
                rows["lm_head"] = _raw_weight(output)[start:]
            save_file({k: v.detach().contiguous().cpu() for k, v in rows.items()}, os.path.join(tmp, EXTRA_ROWS))
            manifest = {"format": "peft_lora", **source}
        elif isinstance(model, PreTrainedModel):
            model.save_pretrained(tmp)
            manifest = {
                "format": "full",
                "dtype": str(model.dtype).removeprefix("torch."),
                "attn_implementation": model.config._attn_implementation,
            }
        else:
            raise TypeError(f"cannot save a {type(model).__name__}")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        with open(os.path.join(tmp, MANIFEST), "w") as f:  # inside the folder that is renamed into place below
            json.dump(manifest, f, indent=2)
        apply_umask_mode(tmp)  # mkdtemp made it 0700
        replace_directory(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_model(directory: str | os.PathLike, is_trainable: bool = False) -> nn.Module:
    """Restore what ``save_model`` wrote, in eval mode (logits equal to the saved model's). ``is_trainable`` keeps
    the LoRA parameters and token rows of a peft model trainable (to continue training).

    A saved folder that is incomplete or corrupt (a truncated weights file, invalid JSON) raises ``ArtifactError``
    naming the folder, the error and what to do (delete the stage directory holding it and rerun)."""
    directory = os.path.abspath(os.fspath(directory))
    manifest_path = os.path.join(directory, MANIFEST)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"no saved model at {directory}")
    try:
        with open(manifest_path) as f:
            manifest = json.load(f)
        return _load_saved(directory, manifest, is_trainable)
    except ArtifactError:
        raise
    except _LOAD_ERRORS as err:
        raise corrupt(directory, "the saved model cannot be loaded (incomplete or corrupt files)", cause=err) from err


def _load_saved(directory: str, manifest: dict, is_trainable: bool) -> nn.Module:
    dtype = getattr(torch, manifest["dtype"])
    if manifest["format"] == "full":
        return AutoModelForCausalLM.from_pretrained(
            directory, dtype=dtype, attn_implementation=manifest["attn_implementation"]
        )
    if manifest["format"] != "peft_lora":
        raise ValueError(f"unknown saved format {manifest['format']!r}")

    base = AutoModelForCausalLM.from_pretrained(
        manifest["base_path"],
        gguf_file=manifest["gguf_file"],
        dtype=dtype,
        attn_implementation=manifest["attn_implementation"],
    )
    if manifest["vocab_size"] != base.get_input_embeddings().weight.shape[0]:
        # mean_resizing=False: the added rows are overwritten below, no need for the covariance or the RNG
        base.resize_token_embeddings(manifest["vocab_size"], mean_resizing=False)
    rows = load_file(os.path.join(directory, EXTRA_ROWS))
    start = manifest["base_vocab_size"]
    with torch.no_grad():
        base.get_input_embeddings().weight[start:] = rows["embed_tokens"]
        if "lm_head" in rows:
            base.get_output_embeddings().weight[start:] = rows["lm_head"]
    model = PeftModel.from_pretrained(base, directory, is_trainable=is_trainable)
    setattr(model, _SOURCE_ATTR, {k: v for k, v in manifest.items() if k != "format"})
    return model


def merge_lora(model: PeftModel) -> PreTrainedModel:
    """The base model with the LoRA matrices and trained token rows merged into its weights (in place; ``model``
    is consumed). For evaluation and timing runs: the unmerged trainable-token wrappers copy the whole embedding and
    output matrices on every forward (``index_copy`` of a 50k x 576 matrix took ~70 ms on the 2-core CPU, twice per
    call). Logits agree with the unmerged model up to float rounding, not bitwise."""
    return model.merge_and_unload()


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Total and trainable parameter counts; tied weights are counted once."""
    total = trainable = 0
    for p in model.parameters():  # parameters() yields a shared (tied) Parameter once
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return {"total": total, "trainable": trainable}
