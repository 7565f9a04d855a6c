"""Writing and reading cached artifacts safely (docs/reliability.md).

- Atomic writes: ``atomic_write`` / ``write_json_atomic`` (a file) and ``atomic_directory`` (a folder) write into a
  temporary sibling and rename it into place, so a reader sees the old artifact or the new one, never half of one.
- Permissions: ``tempfile`` creates files 0600 and folders 0700 whatever the umask; ``apply_umask_mode`` gives an
  artifact the mode a plain ``open()`` / ``mkdir()`` would have (0o666 / 0o777 minus the umask), so a group can
  share a cache. Every atomic writer here applies it.
- Checksums: ``write_checksum`` stores a file's sha256 in ``<file>.sha256`` (the ``sha256sum`` format);
  ``verify_checksum`` compares.
- Corrupt files: ``ArtifactError`` is the one error type for a cached file that exists but cannot be used; its
  message names the file, what is wrong and what to do.
- ``stage_lock``: an exclusive ``flock`` on ``<stage_dir>.lock``, so concurrent runs build a stage once.
- ``load_checkpoint_state_dict``: a Lightning checkpoint's ``state_dict`` read with ``weights_only=True``.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

log = logging.getLogger(__name__)

STAGE_FILE = "stage.json"  # the file that marks a pipeline stage directory complete (written last)
CHECKSUM_SUFFIX = ".sha256"


class ArtifactError(ValueError):
    """A cached artifact exists but cannot be used (truncated, corrupt, or not what its checksum says)."""


# -- permissions -------------------------------------------------------------------------------------------------
def current_umask() -> int:
    """The process umask, read without changing it where Linux reports it (``/proc/self/status``); elsewhere set
    and restored at once."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask_mode(path: str | os.PathLike) -> None:
    """Give ``path`` the mode ``open()`` (a file: 0o666) or ``mkdir()`` (a folder: 0o777) would give it under the
    current umask; ``tempfile.mkstemp``/``mkdtemp`` create 0600/0700 whatever the umask."""
    base = 0o777 if os.path.isdir(path) else 0o666
    os.chmod(path, base & ~current_umask())


# -- atomic writes -----------------------------------------------------------------------------------------------
def atomic_write(path: str | os.PathLike, write: Callable[[IO[Any]], None], mode: str = "w") -> Path:
    """Write the file ``path`` atomically: ``write(f)`` fills a temporary file in the same folder, which then
    replaces ``path`` (same file system, so the rename is atomic). The parent folder is created if needed.
    ``mode``: ``"w"`` (text) or ``"wb"`` (bytes). Returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        apply_umask_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_save_to_path(path: str | os.PathLike, save: Callable[[str], None]) -> Path:
    """Like ``atomic_write`` for writers that take a file name (``torch.save``, ``np.save``): ``save(tmp_name)``
    writes the temporary file, which then replaces ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save(tmp)
        apply_umask_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(path: str | os.PathLike, payload: Any, **dump_kwargs: Any) -> Path:
    """``json.dump(payload)`` into ``path`` atomically (``indent=2`` unless given)."""
    dump_kwargs.setdefault("indent", 2)
    return atomic_write(path, lambda f: json.dump(payload, f, **dump_kwargs))


@contextmanager
def atomic_directory(directory: str | os.PathLike) -> Iterator[Path]:
    """Build a folder atomically: the body fills the yielded temporary sibling folder, which then takes the name
    ``directory``. An existing ``directory`` is moved aside first and removed after, so a crash never leaves a
    half-written folder under the final name. On an exception the temporary folder is removed."""
    directory = Path(os.path.abspath(directory))
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.tmp-"))
    try:
        yield tmp
        apply_umask_mode(tmp)
        replace_directory(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_directory(tmp: str | os.PathLike, directory: str | os.PathLike) -> None:
    """Move the finished folder ``tmp`` to ``directory``; an existing ``directory`` is renamed aside first and
    removed after (a folder cannot be replaced by one rename)."""
    tmp, directory = os.fspath(tmp), os.fspath(directory)
    old = None
    if os.path.lexists(directory):
        old = tempfile.mkdtemp(dir=os.path.dirname(directory), prefix=f".{os.path.basename(directory)}.old-")
        os.rmdir(old)
        os.rename(directory, old)
    os.rename(tmp, directory)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# -- checksums ---------------------------------------------------------------------------------------------------
def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def checksum_path(path: str | os.PathLike) -> Path:
    return Path(f"{os.fspath(path)}{CHECKSUM_SUFFIX}")


def write_checksum(path: str | os.PathLike) -> Path:
    """Store the sha256 of the file ``path`` in ``<path>.sha256`` (atomically, ``sha256sum -c`` can check it)."""
    path = Path(path)
    digest = sha256_file(path)
    return atomic_write(checksum_path(path), lambda f: f.write(f"{digest}  {path.name}\n"))


def recorded_checksum(path: str | os.PathLike) -> str | None:
    """The sha256 recorded for ``path``, or None when it has no (readable) checksum file."""
    try:
        text = checksum_path(path).read_text()
    except OSError:
        return None
    fields = text.split()
    return fields[0] if fields and len(fields[0]) == 64 else None


def verify_checksum(path: str | os.PathLike) -> bool | None:
    """True if ``path`` matches its recorded sha256, False if it does not, None if none is recorded."""
    expected = recorded_checksum(path)
    if expected is None:
        return None
    return sha256_file(path) == expected


# -- corrupt artifacts -------------------------------------------------------------------------------------------
def enclosing_stage_dir(path: str | os.PathLike) -> Path | None:
    """The nearest folder above ``path`` (or ``path`` itself) that is a pipeline stage directory (holds
    ``stage.json``), or None."""
    path = Path(os.path.abspath(path))
    for folder in (path, *path.parents):
        if (folder / STAGE_FILE).is_file():
            return folder
    return None


def rebuild_hint(path: str | os.PathLike) -> str:
    """What to do about a corrupt artifact at ``path``: delete its stage directory (named) and rerun."""
    stage_dir = enclosing_stage_dir(path)
    if stage_dir is not None:
        return f"delete the stage directory {stage_dir} and rerun the same command to rebuild it"
    return f"delete {path} and rerun the step that wrote it"


def corrupt(path: str | os.PathLike, problem: str, hint: str | None = None,
            cause: BaseException | None = None) -> ArtifactError:
    """The ``ArtifactError`` for a corrupt ``path``: names the file, the problem (and the underlying error) and
    what to do (``hint``, by default ``rebuild_hint``)."""
    detail = f" ({type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else 'no message'})" if cause else ""
    return ArtifactError(f"{path}: {problem}{detail}; {hint or rebuild_hint(path)}")


# -- locks -------------------------------------------------------------------------------------------------------
def lock_path(stage_dir: str | os.PathLike) -> Path:
    stage_dir = Path(os.path.abspath(stage_dir))
    return stage_dir.with_name(stage_dir.name + ".lock")


@contextmanager
def stage_lock(stage_dir: str | os.PathLike, quiet_s: float = 2.0, poll_s: float = 0.05) -> Iterator[Path]:
    """Hold an exclusive lock on ``stage_dir`` for the body: ``flock`` on the file ``<stage_dir>.lock`` beside it.

    A second process (or another open of the lock file) blocks until the holder leaves the body; after ``quiet_s``
    seconds of waiting it logs "waiting for <lock> held by pid N". The lock dies with its process (a crash or a
    kill releases it); the lock file stays, holding the last holder's pid. Use as::

        with stage_lock(stage_dir):
            if stage_done(stage_dir): reuse
            else: build, write stage.json last
    """
    path = lock_path(stage_dir)
    if distributed_follower():  # rank 0 holds the lock for its whole DDP group
        yield path
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        writable = True
    except PermissionError:  # a lock file another user made read-only for us: flock works on a read-only fd
        fd = os.open(path, os.O_RDONLY)
        writable = False
    try:
        if not _try_lock(fd):
            deadline = time.monotonic() + quiet_s
            while time.monotonic() < deadline:
                time.sleep(poll_s)
                if _try_lock(fd):
                    break
            else:
                log.info("waiting for %s held by pid %s", path, _holder(path))
                fcntl.flock(fd, fcntl.LOCK_EX)
                log.info("acquired %s", path)
        if writable:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield path
    finally:
        os.close(fd)  # closing the last descriptor releases the flock


def distributed_follower() -> bool:
    """True in a process of a multi-process (DDP) run other than global rank 0: torch.distributed's rank once it is
    initialised, before that the launchers' environment (``RANK``, ``LOCAL_RANK``, ``NODE_RANK``; under SLURM,
    where every task is a rank, ``SLURM_PROCID`` when neither of the first two is set, as Lightning reads it). Such
    a process takes no stage lock: rank 0 holds it while the group trains together, and a follower waiting on it would
    never join the fit rank 0 waits in."""
    dist = sys.modules.get("torch.distributed")  # not imported: no process group can exist (and no import cost)
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_rank() != 0
    if any(int(os.environ.get(key, "0") or 0) != 0 for key in ("RANK", "LOCAL_RANK", "NODE_RANK")):
        return True
    launcher_set = "RANK" in os.environ or "LOCAL_RANK" in os.environ
    return not launcher_set and int(os.environ.get("SLURM_PROCID") or 0) != 0


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as err:
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        raise


def _holder(path: Path) -> str:
    try:
        return path.read_text().strip() or "?"
    except OSError:
        return "?"


# -- checkpoints -------------------------------------------------------------------------------------------------
def load_checkpoint_state_dict(path: str | os.PathLike) -> dict[str, Any]:
    """The ``state_dict`` of a Lightning checkpoint, read with ``torch.load(weights_only=True)`` on the CPU.

    weights_only unpickles only tensors, numbers, strings and the standard containers, so a checkpoint cannot run
    code on load. Lightning's checkpoints of this project hold nothing else (model and optimizer states, loop
    counters, ``hyper_parameters`` of plain values), so no global needs allow-listing. Raises ``ArtifactError``
    naming the file when it is missing its ``state_dict``, truncated or corrupt."""
    import pickle

    import torch

    path = Path(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except pickle.UnpicklingError as err:  # weights_only refused a global: a checkpoint not made by this project
        raise corrupt(path, "holds objects other than tensors and plain values, refused by weights_only loading",
                      "load only checkpoints written by this project's training stages", err) from err
    except Exception as err:  # torch raises RuntimeError, EOFError, OSError... for a truncated or corrupt zip
        raise corrupt(path, "is not a readable checkpoint (truncated or corrupt)", cause=err) from err
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise corrupt(path, "has no 'state_dict' (not a Lightning checkpoint)")
    return checkpoint["state_dict"]


def resume_checkpoint(path: str | os.PathLike) -> str | None:
    """``ckpt_path`` for ``Trainer.fit``: ``str(path)`` when the checkpoint to resume from exists and its archive
    can be opened, None when it does not exist. ``ArtifactError`` when it is corrupt (naming it, and saying that
    deleting it restarts the stage's training from the beginning), instead of Lightning's bare "failed reading
    zip archive". Only the archive's index is read (memory-mapped), not the tensors."""
    import torch

    path = Path(path)
    if not path.exists():
        return None
    try:
        torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:
        raise corrupt(path, "the checkpoint to resume from is truncated or corrupt",
                      f"delete {path} to restart this stage's training from the beginning (or "
                      f"{rebuild_hint(path.parent)})", err) from err
    return str(path)
