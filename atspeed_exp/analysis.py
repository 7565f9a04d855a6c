"""Reading logged runs for analysis: every pipeline run writes ``summary.json`` next to its logs; these helpers turn
a folder of runs into rows (one per run, mode and K) and plot them. The results notebook only calls these."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

METRICS = ("speedup", "speedup_mean_ratio", "target_calls_per_list", "draft_calls_per_list", "acceptance_rate",
           "walltime_s")


def load_summaries(root: str | Path) -> list[dict[str, Any]]:
    """Every ``summary.json`` below ``root`` (runs and multirun jobs), oldest first."""
    paths = sorted(Path(root).rglob("summary.json"), key=lambda p: p.stat().st_mtime)
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
