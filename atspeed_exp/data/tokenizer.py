"""Tokenizers for SID recommendation: a from-scratch word-level one, or a local pretrained one extended with SID tokens.

Contract:
- every SID token (``<a_47>``, ...) is one whole token, matched in text even without spaces (``<a_1><b_2>`` -> 2 ids);
- each level's tokens form ONE contiguous id block, in ``level_tokens`` order, levels in order (a, b, c, d);
- ``level_token_blocks`` derives the per-level ``[start, end)`` ranges from the tokenizer itself (never an offset)
  and is the check that the two points above hold;
- the scratch tokenizer prepends ``<s>`` with ``add_special_tokens=True`` and never appends ``</s>``
  (EOS is appended explicitly to training responses, see ``prompts.encode_response``).

Vocabulary of the scratch tokenizer: ``<pad> <s> </s> <unk> <his> <sep>``, then the SID blocks, then the prompt words.

transformers v5 note: ``add_bos_token`` / ``add_eos_token`` are neither saved nor restored; the post-processor stored
in ``tokenizer.json`` is what adds BOS. Setting either flag on a tokenizer rewrites that post-processor from the flags,
so do not set them (on a reloaded tokenizer both read False although BOS is still prepended).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from atspeed_exp.artifacts import atomic_directory, corrupt

log = logging.getLogger(__name__)

PAD_TOKEN = "<pad>"
BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
UNK_TOKEN = "<unk>"
HIS_TOKEN = "<his>"  # compact prompt: start of the history
SEP_TOKEN = "<sep>"  # compact prompt: end of the history, the response follows
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN, HIS_TOKEN, SEP_TOKEN)
COMPACT_SPECIAL_TOKENS = (HIS_TOKEN, SEP_TOKEN)


def build_scratch_tokenizer(level_tokens: list[list[str]], prompt_words: Iterable[str]) -> PreTrainedTokenizerFast:
    """Build a word-level tokenizer offline.

    level_tokens: per level, its SID tokens in the order their ids must take (``RecDataset.level_tokens()``).
    prompt_words: words/punctuation of the prompt template(s) (``PromptFormatter.prompt_words()``); each entry is split
        by the same whitespace/punctuation pre-tokenizer used at encoding time and every piece enters the vocabulary,
        so a template word can never map to ``<unk>``.
    """
    sid_tokens = [token for level in level_tokens for token in level]
    _check_sid_tokens(level_tokens)
    pre_tokenizer = pre_tokenizers.Whitespace()

    vocab: dict[str, int] = {}
    for token in (*SPECIAL_TOKENS, *sid_tokens):
        vocab[token] = len(vocab)
    for word in prompt_words:
        for piece, _ in pre_tokenizer.pre_tokenize_str(word):
            if piece not in vocab:
                vocab[piece] = len(vocab)

    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    backend.pre_tokenizer = pre_tokenizer
    # Added tokens are cut out of the text before pre-tokenization, which is what makes "<a_1><b_2>" two tokens; they
    # already are in the vocab, so registering them keeps their ids (the contiguous blocks built above).
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in sid_tokens])
    bos_id = vocab[BOS_TOKEN]
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A $B:1", special_tokens=[(BOS_TOKEN, bos_id)]
    )

    # No add_bos_token/add_eos_token kwargs: they would make the wrapper regenerate the post-processor (see module doc).
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        pad_token=PAD_TOKEN,
        extra_special_tokens=list(COMPACT_SPECIAL_TOKENS),
    )
    if len(tokenizer) != len(vocab):
        raise RuntimeError(f"scratch tokenizer has {len(tokenizer)} ids, expected {len(vocab)}")
    level_token_blocks(tokenizer, level_tokens)  # the contract check
    log.info(
        "scratch tokenizer: %d ids (%d special, %d SID, %d prompt words)",
        len(vocab), len(SPECIAL_TOKENS), len(sid_tokens), len(vocab) - len(SPECIAL_TOKENS) - len(sid_tokens),
    )
    return tokenizer


def extend_pretrained_tokenizer(
    tokenizer: PreTrainedTokenizerFast,
    level_tokens: list[list[str]],
    *,
    reuse_eos_as_pad: bool = False,
    add_compact_specials: bool = False,
) -> PreTrainedTokenizerFast:
    """Add the SID tokens to a local pretrained checkpoint's tokenizer (in place; also returned).

    The SID tokens are appended in level order, so they take contiguous blocks at the end of the vocabulary (the model's
    embedding and output matrices must then be resized to ``len(tokenizer)``). A missing pad token is set to a new
    ``<pad>`` (default: padding can then never be confused with a labelled EOS) or to EOS with ``reuse_eos_as_pad``.
    ``add_compact_specials`` also adds ``<his>``/``<sep>``, for the compact prompt on a pretrained model.
    The BOS/EOS behaviour of ``add_special_tokens=True`` stays the checkpoint's own.
    """
    _check_sid_tokens(level_tokens)
    if tokenizer.pad_token is None:
        if reuse_eos_as_pad and tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        else:
            tokenizer.add_special_tokens({"pad_token": AddedToken(PAD_TOKEN, special=True, normalized=False)})
    if add_compact_specials:
        missing = [t for t in COMPACT_SPECIAL_TOKENS if t not in tokenizer.get_vocab()]
        if missing:
            tokenizer.add_special_tokens(
                {"extra_special_tokens": [AddedToken(t, special=True, normalized=False) for t in missing]},
                replace_extra_special_tokens=False,
            )

    sid_tokens = [token for level in level_tokens for token in level]
    vocab = tokenizer.get_vocab()
    present = [t for t in sid_tokens if t in vocab]
    if present:
        # add_tokens skips known tokens, which would break the contiguous blocks; level_token_blocks reports it below.
        log.warning("%d SID tokens already in the pretrained vocabulary, e.g. %s", len(present), present[:3])
    num_added = tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in sid_tokens])
    blocks = level_token_blocks(tokenizer, level_tokens)
    log.info("extended pretrained tokenizer with %d SID tokens, blocks %s, size %d", num_added, blocks, len(tokenizer))
    return tokenizer


def level_token_blocks(tokenizer: PreTrainedTokenizerFast, level_tokens: list[list[str]]) -> list[tuple[int, int]]:
    """Per level, the half-open id range ``[start, end)`` of its SID tokens, looked up in ``tokenizer``.

    Raises ValueError (naming the level and the token) when a token is not in the vocabulary, is split into several
    tokens when encoded as text, or when a level's ids are not contiguous in ``level_tokens`` order; also when a
    level's block does not come after the previous level's.
    """
    vocab = tokenizer.get_vocab()
    blocks: list[tuple[int, int]] = []
    for level, tokens in enumerate(level_tokens):
        if not tokens:
            raise ValueError(f"level {level} has no SID tokens")
        ids: list[int] = []
        for token in tokens:
            if token not in vocab:
                raise ValueError(f"level {level}: SID token {token!r} is not in the tokenizer vocabulary")
            ids.append(vocab[token])
        # In the vocab is not enough: the text "<a_1>" must also encode to that one id (an added token), or prompts
        # written as text would show the model other ids than the ones it generates.
        encoded = tokenizer(list(tokens), add_special_tokens=False)["input_ids"]
        for token, token_id, enc in zip(tokens, ids, encoded):
            if enc != [token_id]:
                pieces = tokenizer.convert_ids_to_tokens(enc)
                raise ValueError(
                    f"level {level}: SID token {token!r} (id {token_id}) encodes as {pieces} in text; "
                    "it must be added as a whole token"
                )
        start = ids[0]
        for offset, (token, token_id) in enumerate(zip(tokens, ids)):
            if token_id != start + offset:
                raise ValueError(
                    f"level {level}: SID token ids are not one contiguous block in level order: {token!r} has id "
                    f"{token_id}, expected {start + offset}"
                )
        blocks.append((start, start + len(ids)))
    for level in range(1, len(blocks)):
        # Levels in order also rules out overlapping blocks (a token listed in two levels).
        if blocks[level][0] < blocks[level - 1][1]:
            raise ValueError(
                f"level {level}: id block {blocks[level]} does not come after level {level - 1}'s {blocks[level - 1]}"
            )
    return blocks


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, directory: str | Path) -> Path:
    """Save to ``directory`` (``tokenizer.json`` + ``tokenizer_config.json``) atomically: written into a temporary
    sibling folder that then takes the name, so a crash never leaves a half-written tokenizer. Returns the
    directory."""
    directory = Path(directory)
    with atomic_directory(directory) as tmp:
        tokenizer.save_pretrained(tmp)
    return directory


def load_tokenizer(directory: str | Path) -> PreTrainedTokenizerFast:
    """Load a tokenizer saved by ``save_tokenizer`` (or any local dir with a ``tokenizer.json``), never the hub.

    ``PreTrainedTokenizerFast`` reads ``tokenizer.json`` as is; a model-specific class chosen by AutoTokenizer may
    rebuild the backend from its own defaults, and ids must stay exactly those the model was trained with.
    A folder whose files cannot be parsed (truncated or corrupt JSON) raises ``ArtifactError`` naming the file.
    """
    directory = Path(directory)
    if not (directory / "tokenizer.json").is_file():
        raise FileNotFoundError(f"no tokenizer.json in {directory}")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        path = directory / name
        if path.is_file():
            try:
                json.loads(path.read_text(encoding="utf-8"))
            except (ValueError, UnicodeDecodeError) as err:
                raise corrupt(path, "is not valid JSON (truncated or corrupt)", cause=err) from err
    try:
        return PreTrainedTokenizerFast.from_pretrained(directory, local_files_only=True)
    except Exception as err:  # valid JSON the tokenizers library cannot build a tokenizer from
        raise corrupt(directory / "tokenizer.json", "does not describe a loadable tokenizer", cause=err) from err


def _check_sid_tokens(level_tokens: Sequence[Sequence[str]]) -> None:
    seen: dict[str, int] = {}
    for level, tokens in enumerate(level_tokens):
        for token in tokens:
            if token in SPECIAL_TOKENS:
                raise ValueError(f"level {level}: SID token {token!r} collides with a special token")
            if token in seen:
                raise ValueError(f"level {level}: SID token {token!r} already listed in level {seen[token]}")
            seen[token] = level
