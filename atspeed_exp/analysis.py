"""Reading logged runs for analysis: every pipeline run writes ``summary.json`` next to its logs; these helpers turn
a folder of runs into rows (one per run, mode and K) and plot them. The results notebook only calls these."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

METRICS = ("speedup", "speedup_mean_ratio", "target_calls_per_list", "draft_calls_per_list", "acceptance_rate",
           "walltime_s")


def repo_root(start: str | Path | None = None) -> Path | None:
    """The repository folder (the one holding ``run.py`` and ``conf/config.yaml``): ``start`` (default: the working
    directory) or a folder above it, so a notebook running in ``notebooks/`` finds it; else the folder above this
    package (an editable install). None when neither is a checkout."""
    here = Path(start or Path.cwd()).resolve()
    for folder in (here, *here.parents, Path(__file__).resolve().parents[1]):
        if (folder / "run.py").is_file() and (folder / "conf" / "config.yaml").is_file():
            return folder
    return None


def default_runs_dirs(start: str | Path | None = None) -> list[Path]:
    """Where ``python run.py`` writes runs: the repository's ``outputs/`` (single runs) and ``multirun/`` (sweeps)."""
    root = repo_root(start)
    return [root / "outputs", root / "multirun"] if root else []


def load_summaries(*roots: str | Path) -> list[dict[str, Any]]:
    """Every ``summary.json`` below the ``roots`` (runs and multirun jobs), oldest first; a missing root has none."""
    paths = sorted((p for root in roots for p in Path(root).rglob("summary.json")), key=lambda p: p.stat().st_mtime)
    return [json.loads(p.read_text()) | {"path": str(p.parent)} for p in paths]


def speculative_rows(summaries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (run, verification mode, K) with the objective, the efficiency metrics and Recall/NDCG@K.
    Runs without a speculative stage are skipped."""
    rows = []
    for summary in summaries:
        config, metrics = summary.get("config", {}), summary.get("metrics", {})
        objective = config.get("alignment", {}).get("objective", "?")
        for mode in config.get("decoding", {}).get("modes", []):
            for k in config.get("decoding", {}).get("ks", []):
                key = f"eval/{mode}/k{k}"
                if f"{key}/speedup" not in metrics:
                    continue
                row = {"run": summary["path"], "experiment": config.get("experiment_name"), "objective": objective,
                       "mode": mode, "k": k}
                row.update({name: metrics[f"{key}/{name}"] for name in METRICS})
                row["recall"] = metrics.get(f"{key}/recall@{k}")
                row["ndcg"] = metrics.get(f"{key}/ndcg@{k}")
                row["beam_recall"] = metrics.get(f"eval/beam/k{k}/recall@{k}")
                rows.append(row)
    return rows


ALL_USERS_METRICS = ("target_calls_per_list", "acceptance_rate", "overlap")


# config keys that do not change a run's all-users figures at a given mode and K: where it ran and logged, batch-1
# timing settings, which modes and Ks were evaluated, how often training was checkpointed, and the draft seed itself
# (what runs of one group differ in)
NOT_GROUPED = ("paths", "hydra", "logger", "run_name", "threads", "stages", "eval.speculative_users",
               "eval.throughput_batch_size", "trainer.default_root_dir", "draft_training.seed", "draft.seed",
               "decoding.ks", "decoding.modes", "trainer.log_every_n_steps", "trainer.enable_progress_bar",
               "trainer.enable_model_summary", "target_training.checkpoint_every_n_steps",
               "draft_training.checkpoint_every_n_steps")


def _drop_inactive(config: dict[str, Any]) -> None:
    """Remove the settings a run does not use (and the defaults of settings added after it was made), so runs of one
    setting group together whichever version wrote them: a drafter's options unless it drafts, DARE's unless a mode
    is dare, the ghost threshold without ghost_debias, the assistant's weight and floor without cf_assistant, no
    score processors, the model drafter, the batch-1 check's user count (a measurement beside the figures, not a
    setting of them), and the target's validation metric at its default (recall)."""
    decoding = config.get("decoding")
    if isinstance(decoding, dict):
        drafter = decoding.get("drafter", "model")
        for name in ("retrieval", "trigram", "layer_skip"):
            if drafter != name:
                decoding.pop(name, None)
        if "dare" not in (decoding.get("modes") or ()):
            decoding.pop("dare_top_k", None)
            decoding.pop("dare_threshold", None)
        if "ghost_debias" not in (decoding.get("processors") or ()):
            decoding.pop("ghost_threshold", None)
        if "cf_assistant" not in (decoding.get("processors") or ()):
            decoding.pop("cf_weight", None)
            decoding.pop("cf_epsilon", None)
        if not decoding.get("processors"):
            decoding.pop("processors", None)
        if drafter == "model":
            decoding.pop("drafter", None)
    if isinstance(config.get("eval"), dict):
        config["eval"].pop("batch1_users", None)
    training = config.get("target_training")
    if isinstance(training, dict) and training.get("val_metric", "recall") == "recall":
        training.pop("val_metric", None)  # the selection every target used before the key existed


def group_key(config: dict[str, Any]) -> str:
    """A hash of a run's configuration without ``NOT_GROUPED``: runs with equal keys differ only in the draft seed
    (and where or how they were timed), so their figures are samples of one setting."""
    import copy
    import hashlib

    config = copy.deepcopy(config)
    _drop_inactive(config)
    for dotted in NOT_GROUPED:
        node = config
        *parents, last = dotted.split(".")
        for part in parents:
            node = node.get(part, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(last, None)
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:12]


def all_users_rows(summaries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (run, mode, K) of the all-users evaluation (``eval/all/...``): the alignment form (``name``),
    objective, draft seed, the hardware-independent figures with their 95% bootstrap intervals, Recall/NDCG@K and
    their change against beam search. Runs without it are skipped."""
    rows = []
    for summary in summaries:
        config, metrics = summary.get("config", {}), summary.get("metrics", {})
        alignment = config.get("alignment", {})
        for mode in config.get("decoding", {}).get("modes", []):
            for k in config.get("decoding", {}).get("ks", []):
                key = f"eval/all/{mode}/k{k}"
                if f"{key}/target_calls_per_list" not in metrics:
                    continue
                row = {"run": summary["path"], "experiment": config.get("experiment_name"),
                       "group": group_key(config),
                       "form": alignment.get("name", alignment.get("objective", "?")),
                       "objective": alignment.get("objective", "?"),
                       "seed": config.get("draft_training", {}).get("seed", config.get("seed")),
                       "mode": mode, "k": k, "users": metrics.get("eval/all/num_users")}
                for name in (*ALL_USERS_METRICS, f"recall@{k}", f"ndcg@{k}", f"recall@{k}_change",
                             f"ndcg@{k}_change"):
                    plain = name.replace(f"@{k}", "@K")
                    row[plain] = metrics.get(f"{key}/{name}")
                    row[f"{plain}_lo95"] = metrics.get(f"{key}/{name}_lo95")
                    row[f"{plain}_hi95"] = metrics.get(f"{key}/{name}_hi95")
                row["beam_recall@K"] = metrics.get(f"eval/all/beam/k{k}/recall@{k}")
                rows.append(row)
    return rows


def across_seeds(rows: list[dict[str, Any]], metrics: tuple[str, ...] = (*ALL_USERS_METRICS, "recall@K",
                                                                          "recall@K_change")) -> list[dict[str, Any]]:
    """Group ``all_users_rows`` by configuration (``group_key``: everything but the draft seed), mode and K: per
    metric the mean and the sample standard deviation over draft seeds (nan for a single seed), the seeds, and the
    widest 95% bootstrap interval of any single run (the user-sampling uncertainty of one run). A seed found twice
    (the same run in two folders, or a rerun) counts once: the later row. Groups in first-seen order."""
    groups: dict[tuple, dict[Any, dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row.get("group"), row["mode"], row["k"]), {})[row["seed"]] = row
    out = []
    for by_seed in groups.values():
        members = list(by_seed.values())
        experiment, form, mode, k = (members[0][key] for key in ("experiment", "form", "mode", "k"))
        entry: dict[str, Any] = {"experiment": experiment, "form": form, "objective": members[0]["objective"],
                                 "mode": mode, "k": k, "seeds": sorted(m["seed"] for m in members),
                                 "users": members[0]["users"]}
        for name in metrics:
            values = [m[name] for m in members if m.get(name) is not None]
            if not values:
                continue
            mean = sum(values) / len(values)
            var = sum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else float("nan")
            entry[name] = mean
            entry[f"{name}_std"] = var ** 0.5
            widths = [(m[f"{name}_lo95"], m[f"{name}_hi95"]) for m in members if m.get(f"{name}_lo95") is not None]
            if widths:
                entry[f"{name}_ci95_halfwidth"] = max((hi - lo) / 2 for lo, hi in widths)
        out.append(entry)
    return out


# the columns of the across-seeds table: (row key, title, digits)
SEED_TABLE_COLUMNS = (("target_calls_per_list", "target calls", 2), ("acceptance_rate", "acceptance", 3),
                      ("overlap", "overlap", 3), ("recall@K", "Recall@K", 4), ("recall@K_change", "ΔRecall@K", 4))


def _seed_cell(row: dict[str, Any], name: str, digits: int) -> str:
    if name not in row:
        return ""
    text = f"{row[name]:.{digits}f} ± {row[f'{name}_std']:.{digits}f}"
    half = row.get(f"{name}_ci95_halfwidth")
    return text + (f" (±{half:.{digits}f})" if half is not None else "")


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """``across_seeds`` rows as a markdown table: per figure "mean ± std over seeds (± widest 95% half-width of one
    run)", sorted by experiment, mode, K and form."""
    head = "| experiment | form | mode | K | seeds | " + " | ".join(title for _, title, _ in SEED_TABLE_COLUMNS) + " |"
    lines = [head, "|" + "---|" * (5 + len(SEED_TABLE_COLUMNS))]
    for row in sorted(rows, key=lambda r: (str(r["experiment"]), r["mode"], r["k"], r["form"])):
        seeds = ",".join(str(s) for s in row["seeds"])
        cells = " | ".join(_seed_cell(row, name, digits) for name, _, digits in SEED_TABLE_COLUMNS)
        lines.append(f"| {row['experiment']} | {row['form']} | {row['mode']} | {row['k']} | {seeds} | {cells} |")
    return "\n".join(lines)


def plot_across_seeds(rows: list[dict[str, Any]], metrics: tuple[str, ...] = ("target_calls_per_list",
                                                                               "acceptance_rate", "recall@K")):
    """``across_seeds`` rows: one panel per figure, one line per (form, mode) against K, error bars one standard
    deviation over seeds. Returns the figure (matplotlib, any backend)."""
    import matplotlib.pyplot as plt  # optional dependency (the dev extra), only for plotting

    fig, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 3.5), squeeze=False)
    series: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for row in rows:
        series.setdefault((str(row["experiment"]), row["form"], row["mode"]), []).append(row)
    several = len({experiment for experiment, _, _ in series}) > 1
    for ax, metric in zip(axes[0], metrics):
        for index, ((experiment, form, mode), points) in enumerate(sorted(series.items())):
            points = sorted((p for p in points if p.get(metric) is not None), key=lambda r: r["k"])
            if points:  # one colour per series in every panel
                label = f"{experiment}: {form} / {mode}" if several else f"{form} / {mode}"
                ax.errorbar([p["k"] for p in points], [p[metric] for p in points], color=f"C{index % 10}",
                            yerr=[p.get(f"{metric}_std", 0.0) for p in points], marker="o", capsize=3, label=label)
        ax.set_xlabel("K")
        ax.set_title(metric)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_against_k(rows: list[dict[str, Any]], metrics: tuple[str, ...] = ("speedup", "target_calls_per_list",
                                                                            "acceptance_rate")):
    """One panel per metric, one line per (objective, mode): the metric against K. Returns the figure."""
    import matplotlib.pyplot as plt  # optional dependency (the dev extra), only for plotting

    fig, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 3.5), squeeze=False)
    series: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        series.setdefault((row["objective"], row["mode"]), []).append(row)
    for ax, metric in zip(axes[0], metrics):
        for (objective, mode), points in sorted(series.items()):
            points = sorted(points, key=lambda r: r["k"])
            ax.plot([p["k"] for p in points], [p[metric] for p in points], marker="o", label=f"{objective} / {mode}")
        ax.set_xlabel("K")
        ax.set_title(metric)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    return fig
