"""Teacher data for draft alignment (docs/method.md section 4): the target's top-K_t beams for every training example, with
the target's level-restricted logits at the 4 positions of each beam, stored compactly and resumably.

Layout of a teacher directory:
- ``manifest.json``: which target made it (``target_id``: the target stage and a hash of its weights), K_t, the
  level blocks, the shard size and the number of examples. Written first; a directory whose manifest names another
  target or other settings is refused, never mixed.
- ``shard-NNNNN.pt``: examples ``[first, first + shard_size)``, each written atomically (temp file + rename), so a
  shard either exists whole or not at all. A rerun computes only the missing shards; since every shard is a pure
  function of (target, examples, settings), the result equals an uninterrupted run.
- ``shard-NNNNN.pt.sha256``: the shard's sha256 (``sha256sum`` format), written atomically after the shard. Loading
  verifies it and refuses a shard whose content differs (``CorruptShardError``, naming the file), as it refuses a
  truncated or unreadable one; a rerun of ``generate_teacher_data`` replaces such shards, and
  ``remove_corrupt_shards`` removes them (with the stage's ``stage.json``) so the teacher stage regenerates them.
  A shard without a checksum file (written before checksums were recorded) is loaded unverified.
Under torch.distributed (world size W) the ranks share the work (``atspeed_exp.distributed``): every rank checks
an existing manifest, rank 0 alone writes a new one, then rank r generates (and checks for corruption) the shards i
with i % W == r: the same shards with the same examples as one process, so the files are byte for byte those of a
one-process run. A rerun resumes each rank's missing shards; a final barrier means that every shard exists when any
rank returns.
Per shard (n examples, K = K_t beams, L levels):
``sequences`` int32 ``[n, K, L]`` token ids; ``scores`` float32 ``[n, K]``; ``logits_0`` fp16 ``[n, S_0]`` (the first
position's context is the prompt, shared by all beams, stored once); ``logits_t`` fp16 ``[n, K, S_t]`` for t >= 1;
``logsumexp`` fp16 ``[n, K, L]`` (full-vocabulary normaliser, for unconstrained objectives).
With ground-truth responses given (for the objectives defined at the ground-truth positions, KL and TVD):
``gt_logits_t`` fp16 ``[n, S_t]``: the target's level logits at the true response's position t, and
``gt_logsumexp`` fp16 ``[n, L]``; with ``full_vocab_gt`` also ``gt_full_logits`` fp16 ``[n, L, V]``: the whole
vocabulary there (for the public code's full-vocabulary WordKD / TVD-KD; about 4·V·2 bytes per example).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from atspeed_exp import distributed
from atspeed_exp.artifacts import (
    STAGE_FILE,
    ArtifactError,
    atomic_save_to_path,
    checksum_path,
    corrupt,
    enclosing_stage_dir,
    verify_checksum,
    write_checksum,
    write_json_atomic,
)

from atspeed_exp.decoding.beam_search import causal_prefill_mask, left_pad, prompt_positions
from atspeed_exp.decoding.protocol import DecoderLM
from atspeed_exp.decoding.speculative import speculative_beam_search
from atspeed_exp.decoding.tree import tree_beam_search
from atspeed_exp.decoding.trie import ItemTrie
from atspeed_exp.progress import progress as progress_bar

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"


class TeacherDataError(ValueError):
    """Teacher data that is missing, incomplete, or made by another target or with other settings."""


class CorruptShardError(ArtifactError):
    """A teacher shard that is truncated, unreadable, or differs from the checksum recorded when it was written."""

    def __init__(self, message: str, path: Path) -> None:
        super().__init__(message)
        self.path = path


def weights_fingerprint(model_dir: str | Path) -> str:
    """A hash of every file in a saved model directory (weights, config, tokenizer)."""
    digest = hashlib.sha256()
    for path in sorted(Path(model_dir).rglob("*")):
        if path.is_file():
            digest.update(path.relative_to(model_dir).as_posix().encode())
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    digest.update(chunk)
    return digest.hexdigest()[:16]


def _save_shard(payload: dict, path: Path) -> None:
    """The shard atomically, then its checksum file (a crash between the two leaves a whole, unverified shard).
    Saved through a file object: torch.save names the archive inside after a path it is given (here the random
    temporary name), and after nothing for a file object, so equal payloads give equal bytes."""
    checksum_path(path).unlink(missing_ok=True)  # never pair a new shard with an old checksum

    def save(tmp: str) -> None:
        with open(tmp, "wb") as f:
            torch.save(payload, f)

    atomic_save_to_path(path, save)
    write_checksum(path)


def _write_manifest(directory: Path, manifest: dict) -> None:
    write_json_atomic(directory / MANIFEST, manifest)


def _read_manifest(directory: Path) -> dict:
    path = directory / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise corrupt(path, "is not valid JSON (truncated or corrupt)", cause=err) from err
    if not isinstance(manifest, dict):
        raise corrupt(path, f"holds a JSON {type(manifest).__name__}, expected an object")
    return manifest


def _check_manifest(directory: Path, expected: dict) -> None:
    found = _read_manifest(directory)
    for key, value in expected.items():
        if found.get(key) != value:
            raise TeacherDataError(
                f"{directory / MANIFEST}: {key} is {found.get(key)!r} but this run expects {value!r}; the teacher "
                f"data was made by another target or with other settings (delete the directory to regenerate)"
            )


def shard_path(directory: Path, index: int) -> Path:
    return directory / f"shard-{index:05d}.pt"


def generate_teacher_data(
    target: DecoderLM,
    prompts: list[list[int]],
    trie: ItemTrie,
    directory: str | Path,
    target_id: str,
    num_beams: int = 20,
    shard_size: int = 1024,
    batch_size: int = 64,
    pad_id: int = 0,
    progress: bool = True,
    responses: list[list[int]] | None = None,
    draft: DecoderLM | None = None,
    draft_beams: int = 40,
    gamma: int = 3,
    full_vocab_gt: bool = False,
) -> Path:
    """Run the target's constrained beam search over ``prompts`` and store the teacher data (see module docstring).
    ``responses``: each example's true SID token ids (at least L), to store the target at the true positions too.
    Resumes: shards already on disk are kept. Returns the directory.
    With ``draft`` (e.g. a draft aligned earlier, when teacher data is remade for more examples), the beams come
    from batched strict speculative beam search, which returns the target's own beams and the target's logits at
    their prefixes with fewer target calls; the data equals the target-only run's up to float rounding, so the
    manifest does not record it. Under torch.distributed every rank calls this with the same arguments and makes
    its share of the shards (module docstring)."""
    directory = Path(directory)
    rank, _ = distributed.rank_and_world()
    if rank == 0:
        directory.mkdir(parents=True, exist_ok=True)
    manifest = {
        "target_id": target_id,
        "num_beams": num_beams,
        "num_examples": len(prompts),
        "shard_size": shard_size,
        "level_blocks": [list(b) for b in trie.level_blocks],
        "prompts_sha": hashlib.sha256(json.dumps(prompts).encode()).hexdigest()[:16],
        "responses_sha": hashlib.sha256(json.dumps(responses).encode()).hexdigest()[:16] if responses else None,
        "full_vocab_gt": bool(full_vocab_gt and responses),
    }
    if (directory / MANIFEST).exists():
        _check_manifest(directory, manifest)  # on every rank: a directory of other data stops them all
    elif rank == 0:  # the one writer
        _write_manifest(directory, manifest)
    distributed.barrier()

    num_shards = (len(prompts) + shard_size - 1) // shard_size
    mine = distributed.my_units(num_shards)
    remove_corrupt_shards(directory, clear_stage=False, shards=mine)  # regenerated below with the missing ones
    todo = [s for s in mine if not shard_path(directory, s).exists()]
    bar = progress_bar(total=sum(min(shard_size, len(prompts) - s * shard_size) for s in todo), desc="teacher beams",
                       enabled=progress and rank == 0, unit="ex")
    for shard in todo:
        first = shard * shard_size
        rows = list(range(first, min(first + shard_size, len(prompts))))
        parts: list[dict[str, torch.Tensor]] = []
        for start in range(0, len(rows), batch_size):
            batch = rows[start : start + batch_size]
            ids, mask = left_pad([torch.tensor(prompts[i], dtype=torch.long) for i in batch], pad_id)
            ids, mask = ids.to(target.device), mask.to(target.device)
            if draft is None:
                out = tree_beam_search(target, ids, mask, trie, num_beams, record_logits=True)
            else:
                out = speculative_beam_search(target, draft, ids, mask, trie, num_beams, draft_beams, gamma,
                                              record_logits=True)
            part = {
                "sequences": out.sequences.int().cpu(),
                "scores": out.sequence_scores.float().cpu(),
                "logsumexp": out.full_logsumexp.half().cpu(),
                "logits_0": out.level_logits[0][:, 0].half().cpu(),  # [b, S_0]: every beam shares the prompt
            }
            for depth in range(1, trie.num_levels):
                part[f"logits_{depth}"] = out.level_logits[depth].half().cpu()
            if responses is not None:
                part.update(_ground_truth_logits(target, [prompts[i] for i in batch],
                                                 [responses[i] for i in batch], trie, pad_id, full_vocab_gt))
            parts.append(part)
            bar.update(len(batch))
        payload = {key: torch.cat([p[key] for p in parts]) for key in parts[0]}
        payload["example_index"] = torch.tensor(rows, dtype=torch.long)
        _save_shard(payload, shard_path(directory, shard))
    bar.close()
    distributed.barrier()  # every rank's shards are written
    return directory


@torch.inference_mode()
def _ground_truth_logits(
    target: DecoderLM, prompts: list[list[int]], responses: list[list[int]], trie: ItemTrie, pad_id: int,
    full_vocab: bool = False,
) -> dict[str, torch.Tensor]:
    """The target's level logits at each true response position (one teacher-forced call); with ``full_vocab``
    also all of its logits there."""
    levels = trie.num_levels
    ids, mask = left_pad([torch.tensor(p + r[: levels - 1], dtype=torch.long) for p, r in zip(prompts, responses)],
                         pad_id)
    logits, _ = target(ids.to(target.device), prompt_positions(mask).to(target.device),
                       causal_prefill_mask(mask.to(target.device), target.dtype), target.new_cache())
    tail = logits[:, -levels:].float()  # [b, L, V]: position t predicts response token t (left padding)
    out = {f"gt_logits_{t}": tail[:, t, slice(*trie.block(t))].half().cpu() for t in range(levels)}
    out["gt_logsumexp"] = torch.logsumexp(tail, dim=-1).half().cpu()
    if full_vocab:
        out["gt_full_logits"] = tail.half().cpu()  # [b, L, V]
    return out


@dataclass
class TeacherData:
    """All shards of a complete teacher directory, concatenated (examples in order)."""

    manifest: dict
    tensors: dict[str, torch.Tensor]

    def __len__(self) -> int:
        return int(self.tensors["example_index"].numel())

    def example(self, index: int) -> dict[str, torch.Tensor]:
        return {key: value[index] for key, value in self.tensors.items()}

    def level_logits(self, index: int, depth: int) -> torch.Tensor:
        """Target logits over level ``depth``'s block for each beam of example ``index``: ``[K, S_depth]``."""
        if depth == 0:
            return self.tensors["logits_0"][index].expand(self.manifest["num_beams"], -1)
        return self.tensors[f"logits_{depth}"][index]


def load_teacher_data(directory: str | Path, target_id: str | None = None, num_beams: int | None = None,
                      repair: bool = False) -> TeacherData:
    """Load a complete teacher directory; TeacherDataError if it is missing, incomplete or made by another target;
    CorruptShardError (naming the shard) if a shard is truncated, unreadable or differs from its recorded checksum.
    With ``repair``, once loading finds a corrupt shard, every corrupt shard is removed (``remove_corrupt_shards``,
    which also removes the teacher stage's ``stage.json``) and a TeacherDataError says that the next run
    regenerates them."""
    directory = Path(directory)
    if not (directory / MANIFEST).exists():
        raise TeacherDataError(f"no teacher data at {directory} (missing {MANIFEST}); run the teacher stage first")
    manifest = _read_manifest(directory)
    expected = {k: v for k, v in (("target_id", target_id), ("num_beams", num_beams)) if v is not None}
    _check_manifest(directory, expected)
    num_shards = (manifest["num_examples"] + manifest["shard_size"] - 1) // manifest["shard_size"]
    missing = [s for s in range(num_shards) if not shard_path(directory, s).exists()]
    if missing:
        raise TeacherDataError(
            f"teacher data at {directory} is incomplete: {len(missing)} of {num_shards} shards missing "
            f"(first: {shard_path(directory, missing[0]).name}); rerun the teacher stage to finish it"
        )
    try:
        shards = [load_shard(shard_path(directory, s)) for s in range(num_shards)]
    except CorruptShardError as err:
        if not repair:
            raise
        remove_corrupt_shards(directory)  # all of them, not only the first found
        raise TeacherDataError(
            f"teacher data at {directory} had corrupt shards (first: {err.path.name}), removed with the stage's "
            f"{STAGE_FILE} (see the log); rerun the same command: the teacher stage regenerates only those shards"
        ) from err
    tensors = {key: torch.cat([s[key] for s in shards]) for key in shards[0]}
    return TeacherData(manifest, tensors)


def _shard_hint(path: Path) -> str:
    stage_dir = enclosing_stage_dir(path)
    marker = f" and {stage_dir / STAGE_FILE}" if stage_dir is not None else ""
    return (f"delete it{marker} (atspeed_exp.data.teacher.remove_corrupt_shards({str(path.parent)!r}) does both) "
            f"and rerun the same command: the teacher stage regenerates only the missing shards")


def shard_problem(path: Path, full_load: bool = False) -> str | None:
    """Why the shard ``path`` cannot be used, or None if it can: its content differs from the recorded sha256, or
    (with no checksum recorded, or ``full_load``) torch cannot read it. Without ``full_load`` only the archive's
    index is read for that (memory-mapped)."""
    verified = verify_checksum(path)
    if verified is False:
        return "its content differs from the sha256 recorded when it was written"
    if full_load or verified is None:
        try:
            torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as err:  # torch raises RuntimeError, EOFError, OSError... for a truncated or corrupt zip
            return f"it is truncated or corrupt ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
    return None


def load_shard(path: Path) -> dict[str, torch.Tensor]:
    """One shard, verified against its recorded checksum; CorruptShardError naming it otherwise."""
    if verify_checksum(path) is False:
        raise CorruptShardError(str(corrupt(path, "its content differs from the sha256 recorded when it was "
                                                  "written", _shard_hint(path))), path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises RuntimeError, EOFError, OSError... for a truncated or corrupt zip
        raise CorruptShardError(str(corrupt(path, "is not a readable teacher shard (truncated or corrupt)",
                                            _shard_hint(path), err)), path) from err
    if not isinstance(payload, dict) or "example_index" not in payload:
        raise CorruptShardError(str(corrupt(path, "is not a teacher shard (no example_index)", _shard_hint(path))),
                                path)
    return payload


def remove_corrupt_shards(directory: str | Path, clear_stage: bool = True,
                          shards: list[int] | None = None) -> list[Path]:
    """Remove every shard of ``directory`` (of the indices ``shards`` only, when given) that ``shard_problem``
    rejects (and its checksum file), logging why; return the removed paths. Safe: a shard is a pure function of
    the target and the settings, and the teacher stage regenerates missing shards only. With ``clear_stage`` and
    something removed, the enclosing stage's ``stage.json`` is removed too, so the next run does not reuse the
    stage as complete."""
    removed = []
    paths = iter_shards(directory) if shards is None else (shard_path(Path(directory), s) for s in shards)
    for path in paths:
        if not path.exists():
            continue
        problem = shard_problem(path)
        if problem is None:
            continue
        path.unlink(missing_ok=True)
        checksum_path(path).unlink(missing_ok=True)
        removed.append(path)
        log.warning("removed teacher shard %s because %s; the teacher stage regenerates it", path, problem)
    stage_dir = enclosing_stage_dir(directory) if removed and clear_stage else None
    if stage_dir is not None:
        (stage_dir / STAGE_FILE).unlink(missing_ok=True)
        log.warning("removed %s: the teacher stage is incomplete until the removed shards are regenerated",
                    stage_dir / STAGE_FILE)
    return removed


def iter_shards(directory: str | Path) -> Iterator[Path]:
    yield from sorted(Path(directory).glob("shard-*.pt"))


def teacher_size_bytes(directory: str | Path) -> int:
    return sum(p.stat().st_size for p in iter_shards(directory))
