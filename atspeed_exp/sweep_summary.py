"""A Hydra callback that summarises a multirun when its last job ends (conf/hydra/default.yaml registers it).

It reads the ``summary.json`` of every job below the sweep dir and writes there:

- ``summary_table.md``: the across-seeds table (``analysis.across_seeds`` of ``analysis.all_users_rows``: each
  figure as mean ± std over draft seeds with the widest 95% half-width of one run) and one line per job with its
  overrides and whether it wrote a summary;
- ``summary_table.json``: the same rows, the per-run rows and the jobs;
- ``summary_plot.png``: target calls, acceptance and Recall@K against K, one line per alignment form and mode.

The table also goes to the log. Jobs without an all-users evaluation (``eval.all_users=false``, or stages without
``eval``) are listed but add no rows. No torch import here: Hydra loads this module before any job starts.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from atspeed_exp.analysis import across_seeds, all_users_rows, markdown_table, plot_across_seeds
from atspeed_exp.artifacts import atomic_write

log = logging.getLogger(__name__)
TABLE_MD, TABLE_JSON, PLOT = "summary_table.md", "summary_table.json", "summary_plot.png"


def sweep_jobs(sweep_dir: Path) -> list[dict[str, Any]]:
    """Every job dir below ``sweep_dir`` (one holding ``.hydra/``), in job-number order: its dir, overrides and
    summary (None when the job wrote none, e.g. it failed)."""
    jobs = []
    for hydra_dir in sweep_dir.rglob(".hydra"):
        job_dir = hydra_dir.parent
        overrides_file = hydra_dir / "overrides.yaml"
        overrides = OmegaConf.to_container(OmegaConf.load(overrides_file)) if overrides_file.exists() else []
        summary_file = job_dir / "summary.json"
        summary = json.loads(summary_file.read_text()) | {"path": str(job_dir)} if summary_file.exists() else None
        jobs.append({"dir": str(job_dir), "overrides": overrides, "summary": summary})
    return sorted(jobs, key=lambda j: (len(j["dir"]), j["dir"]))  # "10" after "9"


def summarise_sweep(sweep_dir: str | Path) -> dict[str, Any]:
    """Write the sweep's table (markdown and JSON) and plot into ``sweep_dir``; returns the JSON payload."""
    sweep_dir = Path(sweep_dir)
    jobs = sweep_jobs(sweep_dir)
    runs = all_users_rows([job["summary"] for job in jobs if job["summary"]])
    rows = across_seeds(runs)
    job_lines = [f"- `{Path(job['dir']).relative_to(sweep_dir)}`: {' '.join(job['overrides']) or '(no overrides)'}"
                 + ("" if job["summary"] else " (no summary.json)") for job in jobs]
    table = markdown_table(rows) if rows else "(no all-users evaluations in these jobs)"
    text = (f"# Sweep {sweep_dir}\n\n{len(jobs)} jobs, {sum(bool(j['summary']) for j in jobs)} with a summary; "
            f"figures over every test user: mean ± std over draft seeds (± widest 95% bootstrap half-width of one "
            f"run)\n\n{table}\n\n## Jobs\n\n" + "\n".join(job_lines) + "\n")
    _write_atomic(sweep_dir / TABLE_MD, text)
    payload = {"sweep_dir": str(sweep_dir), "rows": rows, "runs": runs,
               "jobs": [{"dir": j["dir"], "overrides": j["overrides"], "has_summary": bool(j["summary"])}
                        for j in jobs]}
    _write_atomic(sweep_dir / TABLE_JSON, json.dumps(payload, indent=2, default=str))
    if rows:
        _plot(rows, sweep_dir / PLOT)
    log.info("sweep summary (%s):\n%s", sweep_dir / TABLE_MD, table)
    return payload


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no %s", path.name)
        return
    fig = plot_across_seeds(rows)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _write_atomic(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text))


class SweepSummary(Callback):
    """``summarise_sweep`` of the sweep dir after every job of a multirun (so a sweep stopped by a failing job still
    has the table of the jobs before it; Hydra's basic sweeper raises before ``on_multirun_end`` then) and at its
    end. A failure to summarise is logged, never raised: the jobs' own outputs are already complete."""

    @staticmethod
    def _summarise(sweep_dir: Path) -> None:
        try:
            summarise_sweep(sweep_dir)
        except Exception:  # noqa: BLE001 - a summary problem must not turn a finished sweep into a failure
            log.exception("could not summarise the sweep in %s", sweep_dir)

    def on_job_end(self, config: DictConfig, job_return: Any = None, **kwargs: Any) -> None:
        if str(OmegaConf.select(config, "hydra.mode", default="")).endswith("MULTIRUN"):
            self._summarise(Path(config.hydra.sweep.dir))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._summarise(Path(config.hydra.sweep.dir))
