"""What a pipeline run shows in W&B beyond scalar metrics: the per-K tables and plots of the evaluation run, the
teacher stage's settings, sizes and examples, and the saved models as artifacts. Only the pipeline calls these, and
only with a W&B logger (``is_wandb``); the decoding, loss and metric code never sees W&B.

``read_offline_run`` reads an offline run (``wandb/offline-run-*/run-*.wandb``) back without W&B's servers: tags,
job type, config, summary, logged keys, files and artifacts. The tests use it, and it answers "what did this run
log?" before a ``wandb sync``.
"""

from __future__ import annotations

import json
import logging
import re
import struct
from pathlib import Path
from typing import Any, Iterator

log = logging.getLogger(__name__)

# per-K columns named for their K in the pipeline's tables (``recall@10``, ``recall@10_lo95``); the views name
# them for the row's K (``recall@K``) so that every row of a table fills every column
_AT_K = re.compile(r"@(\d+)")
# the figures plotted against K, one line per verification mode (beam search included where it has the figure)
PLOTTED = ("target_calls_per_list", "acceptance_rate", "recall@K")


def is_wandb(logger: Any) -> bool:
    from lightning.pytorch.loggers import WandbLogger

    return isinstance(logger, WandbLogger)


def per_k_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows of ``pipeline.speculative_table`` / ``all_users_table`` with ``@<its K>`` renamed ``@K``: one
    rectangular table, whatever the Ks."""
    out = []
    for row in rows:
        k = str(row["k"])
        out.append({_AT_K.sub(lambda m: "@K" if m.group(1) == k else m.group(0), name): value
                    for name, value in row.items()})
    return out


def _table(rows: list[dict[str, Any]]):
    import wandb

    columns = list(dict.fromkeys(c for row in rows for c in row))
    return wandb.Table(columns=columns, data=[[row.get(c) for c in columns] for row in rows])


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and value == value


def _line_plots(rows: list[dict[str, Any]], prefix: str) -> dict[str, Any]:
    """One W&B line chart per figure of ``PLOTTED``: the figure against K, one line per mode."""
    import wandb

    charts = {}
    modes = list(dict.fromkeys(row["mode"] for row in rows))
    for name in PLOTTED:
        xs, ys, keys = [], [], []
        for mode in modes:
            points = sorted((row["k"], row[name]) for row in rows if row["mode"] == mode and _finite(row.get(name)))
            if points:
                xs.append([k for k, _ in points])
                ys.append([v for _, v in points])
                keys.append(mode)
        if keys:
            charts[f"{prefix}/{name}_vs_k"] = wandb.plot.line_series(
                xs=xs, ys=ys, keys=keys, title=f"{name} against K ({prefix})", xname="K")
    return charts


def _figure(rows: list[dict[str, Any]], title: str):
    """The same figures as one matplotlib image (a file in the run, readable offline); None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib is not installed: the eval run gets W&B charts but no image")
        return None
    fig, axes = plt.subplots(1, len(PLOTTED), figsize=(4.5 * len(PLOTTED), 3.5), squeeze=False)
    modes = list(dict.fromkeys(row["mode"] for row in rows))
    for ax, name in zip(axes[0], PLOTTED):
        for index, mode in enumerate(modes):  # one colour per mode in every panel (beam has no acceptance)
            points = sorted((row["k"], row[name]) for row in rows if row["mode"] == mode and _finite(row.get(name)))
            if points:
                ax.plot([k for k, _ in points], [v for _, v in points], marker="o", label=mode, color=f"C{index}")
        ax.set_xlabel("K")
        ax.set_title(name)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def log_eval_views(logger: Any, summary: dict[str, Any]) -> None:
    """The eval run's tables and plots: ``eval/speculative_table`` (batch 1, one row per mode and K: speedup,
    calls, acceptance, walltime, Recall/NDCG@K, batched throughput) and ``eval/all_users_table`` (every test user,
    each figure with its 95% interval columns ``_lo95``/``_hi95``), each with line charts against K per mode
    (``eval/batch1/<figure>_vs_k``, ``eval/all_users/<figure>_vs_k``) and one image of them
    (``eval/batch1/plots``, ``eval/all_users/plots``)."""
    import wandb

    payload: dict[str, Any] = {}
    for key, prefix, title in (("table", "eval/batch1", "batch 1"), ("table_all_users", "eval/all_users", "all users")):
        if not summary.get(key):
            continue
        rows = per_k_rows(summary[key])
        payload["eval/speculative_table" if key == "table" else "eval/all_users_table"] = _table(rows)
        payload.update(_line_plots(rows, prefix))
        fig = _figure(rows, f"{title}: figures against K")
        if fig is not None:
            payload[f"{prefix}/plots"] = wandb.Image(fig)
            import matplotlib.pyplot as plt

            plt.close(fig)
    if payload:
        logger.experiment.log(payload)


def log_reused(logger: Any, reused: dict[str, str]) -> None:
    """The stages taken from the cache (stage -> its dir) in the run's summary; the tags say it too."""
    if reused:
        logger.experiment.summary["reused_stages"] = dict(reused)


def teacher_examples(data: Any, encoded: Any, teacher_dir: Path, examples: int = 5, beams: int = 3) -> list[dict]:
    """The first ``examples`` training examples of a teacher directory with their ``beams`` best teacher beams:
    the prompt's end, the true response and each beam's items tokens and score."""
    import torch

    shards = sorted((teacher_dir / "train").glob("shard-*.pt"))
    if not shards:
        return []
    shard = torch.load(shards[0], weights_only=True)
    rows = []
    for i in range(min(examples, shard["sequences"].shape[0], len(encoded.prompts))):
        prompt = data.tokenizer.decode(encoded.prompts[i])
        truth = data.tokenizer.decode(encoded.responses[i]) if encoded.responses else ""
        for rank in range(min(beams, shard["sequences"].shape[1])):
            rows.append({"example": i, "prompt_end": prompt[-160:], "true_response": truth, "rank": rank,
                         "beam": data.tokenizer.decode(shard["sequences"][i, rank].tolist()),
                         "score": float(shard["scores"][i, rank])})
    return rows


def log_teacher_view(logger: Any, stage: dict[str, Any], teacher_dir: Path, examples: list[dict]) -> None:
    """The teacher run: its settings (config ``teacher_settings``), the number of examples and bytes per split,
    the seconds it took, and a table of the first examples with their best teacher beams."""
    metrics: dict[str, float] = {"teacher/seconds": float(stage.get("seconds_this_run", float("nan")))}
    for split, size in stage.get("size_bytes", {}).items():
        metrics[f"teacher/{split}_size_bytes"] = float(size)
        manifest = teacher_dir / split / "manifest.json"
        if manifest.exists():
            metrics[f"teacher/{split}_examples"] = float(json.loads(manifest.read_text())["num_examples"])
    logger.log_metrics(metrics)
    if is_wandb(logger):
        logger.experiment.config.update({"teacher_settings": stage.get("settings", {}),
                                         "teacher_dir": str(teacher_dir)}, allow_val_change=True)
        logger.experiment.summary.update(metrics)
        if examples:
            logger.experiment.log({"teacher/examples": _table(examples)})


def log_model_artifact(logger: Any, stage: str, stage_dir: Path) -> None:
    """The saved model dir of a stage (``<stage_dir>/model``) as a W&B artifact of type ``model``, named
    ``<stage>-<stage dir name>``, with the stage's ``stage.json`` as metadata. Offline, the run records it and
    ``wandb sync`` uploads it."""
    import wandb

    model_dir = stage_dir / "model"
    if not model_dir.is_dir():
        return
    stage_file = stage_dir / "stage.json"
    metadata = json.loads(stage_file.read_text()) if stage_file.exists() else {}
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", f"{stage}-{stage_dir.name}")
    artifact = wandb.Artifact(name, type="model", metadata={"stage_dir": str(stage_dir), **metadata})
    artifact.add_dir(str(model_dir), policy="immutable")  # written once, before stage.json
    logger.experiment.log_artifact(artifact)


# -- reading an offline run back ---------------------------------------------------------------------------------
_BLOCK = 32768  # the .wandb file is a LevelDB-style log: 7-byte header, then 32 KiB blocks of framed records
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _records(raw: bytes) -> Iterator[bytes]:
    pos, pending = 7, b""
    while pos + 7 <= len(raw):
        if _BLOCK - pos % _BLOCK < 7:  # a block's tail too short for a header is padding
            pos += _BLOCK - pos % _BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        pos += 7
        chunk, pos = raw[pos:pos + length], pos + length
        if kind == _FULL:
            yield chunk
        elif kind == _FIRST:
            pending = chunk
        elif kind == _MIDDLE:
            pending += chunk
        elif kind == _LAST:
            yield pending + chunk
            pending = b""
        elif kind == 0 and length == 0:
            break


def _key(item: Any) -> str:
    """The logged name of a summary, history or config item (a media value is stored field by field under it)."""
    return item.key or item.nested_key[0]


def _set(target: dict, item: Any) -> None:
    path = [item.key] if item.key else list(item.nested_key)
    for name in path[:-1]:
        target = target.setdefault(name, {})
    target[path[-1]] = json.loads(item.value_json)


def read_offline_run(run_dir: str | Path) -> dict[str, Any]:
    """An offline run's record (``run_dir``: a ``wandb/offline-run-*`` folder) as plain data: ``dir``, ``name``, ``tags``,
    ``job_type``, ``group``, ``config`` (top-level keys, JSON-decoded), ``summary`` (the last value of each key),
    ``logged`` (every key logged to the history), ``charts`` (custom chart keys), ``files`` (paths in the run's
    ``files/``) and ``artifacts`` (name, type and the paths they hold)."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = Path(run_dir).glob("*.wandb")
    out: dict[str, Any] = {"dir": str(run_dir), "name": None, "tags": [], "job_type": None, "group": None, "config": {}, "summary": {},
                           "logged": set(), "charts": set(), "files": [], "artifacts": []}
    for data in _records(path.read_bytes()):
        record = pb.Record()
        record.ParseFromString(data)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
            out.update(name=run.display_name, tags=list(run.tags), job_type=run.job_type, group=run.run_group)
            for item in run.config.update:
                _set(out["config"], item)
        elif kind == "config":
            for item in record.config.update:
                if item.nested_key[:2] == ["_wandb", "visualize"] or item.key == "_wandb":
                    out["charts"].update(item.nested_key[2:3])
                else:
                    _set(out["config"], item)
        elif kind == "summary":
            for item in record.summary.update:
                _set(out["summary"], item)
        elif kind == "history":
            out["logged"].update(_key(i) for i in record.history.item)
        elif kind == "files":
            out["files"] += [f.path for f in record.files.files]
        elif kind == "artifact":
            out["artifacts"].append({"name": record.artifact.name, "type": record.artifact.type,
                                     "paths": [e.path for e in record.artifact.manifest.contents]})
    return out
