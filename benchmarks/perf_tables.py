"""README's CPU performance tables as markdown, from the JSON files that ``run_cpu_perf.sh`` writes (nothing is
typed by hand): the K = 10 grid over (mode, γ, M), the best setting per (mode, K), the perfect-draft bound,
tensor ops per list (``count_ops.py``), throughput per batch size, and the all-users run.

    python benchmarks/perf_tables.py results/cpu_perf
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

GRID_HEADER = ("| mode | K | γ | N | M | forward | beam_tree ms | SD ms | speedup | target calls | draft calls | "
               "target tokens | draft tokens | acceptance | profile (ms) |\n"
               "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
FORWARDS = {"LeanLlamaLM": "lean", "HFDecoderLM": "hf"}


def load(folder: Path, name: str) -> dict | None:
    path = folder / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def sd_rows(report: dict, mode: str) -> list[dict]:
    """One row per (K, SD method) of a batch-1 report, with its own beam_tree time."""
    rows = []
    gamma, draft_beams = report["header"]["gamma"], report["header"]["draft_beams"]
    forward = FORWARDS.get(report["header"].get("backend", {}).get("target", "HFDecoderLM"), "?")
    for k, methods in report["summary"].items():
        for method, s in methods.items():
            if not method.startswith(f"sd_{mode}"):
                continue
            m = int(method.rsplit("_m", 1)[1]) if "_m" in method else draft_beams
            rows.append({"mode": mode, "k": int(k), "gamma": gamma, "n": draft_beams, "m": m, "forward": forward,
                         "beam_ms": methods["beam_tree"]["median_ms"], **s})
    return rows


def grid_line(r: dict) -> str:
    profile = " / ".join(f"{r[p]:.1f}" for p in ("draft_ms", "verify_ms", "accept_ms", "other_ms"))
    return (f"| {r['mode']} | {r['k']} | {r['gamma']} | {r['n']} | {r['m']} | {r['forward']} | {r['beam_ms']:.1f} | {r['median_ms']:.1f} | "
            f"**{r['speedup_tot']:.2f}** | {r['target_calls']:.2f} | {r['draft_calls']:.2f} | "
            f"{r['target_tokens']:.0f} | {r['draft_tokens']:.0f} | {r['accept_rate']:.3f} | {profile} |")


def ops_table(rows: list[dict]) -> str:
    """``count_ops.py``'s rows: aten ops per list by where they run (kernels; views and host reads apart)."""
    head = ("| K | γ | N | method | target calls | draft calls | target kernels (per call) | draft kernels | "
            "search kernels | search views | host reads | kernels per list |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        reads = sum(r[f"{part}_sync"] for part in ("target", "draft", "search"))
        lines.append(
            f"| {r['k']} | {r.get('gamma', '-')} | {r.get('draft_beams', '-')} | {r['method']} | {r['target_calls']:.2f} | {r['draft_calls']:.2f} | "
            f"{r['target_kernel']:.0f} ({r['target_kernels_per_call']:.0f}) | {r['draft_kernel']:.0f} | "
            f"{r['search_kernel']:.0f} | {r['search_view']:.0f} | {reads:.1f} | {r['kernel_total']:.0f} |"
        )
    return "\n".join(lines)


def ops_rows(folder: Path, pattern: str) -> list[dict]:
    """The rows of the ``count_ops.py`` reports matching ``pattern``, each with its report's N (older reports keep
    N in the header only)."""
    return [{"draft_beams": report["header"]["draft_beams"], **row}
            for report in (json.loads(path.read_text()) for path in sorted(folder.glob(pattern)))
            for row in report["rows"]]


def beams_table(folder: Path) -> str:
    """``run_beams_sweep.sh``'s reports (``beams_{mode}_n{N}.json``): one row per (mode, K, N)."""
    rows = []
    for path in folder.glob("beams_*_n*.json"):
        if path.stem.startswith("beams_ops_"):  # count_ops reports of the sweep (beams_ops_table)
            continue
        report = json.loads(path.read_text())
        mode = path.stem.split("_")[1]
        for k, methods in report["summary"].items():
            s = methods[f"sd_{mode}"]
            rows.append((mode != "strict", int(k), report["header"]["draft_beams"], mode, s,
                         methods["beam_tree"]["median_ms"]))
    if not rows:
        return ""
    lines = ["| mode | K | N | target calls | draft calls | acceptance | target tokens | draft tokens | "
             "beam_tree ms | SD ms | speedup |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for _, k, n, mode, s, beam_ms in sorted(rows, key=lambda r: r[:3]):
        lines.append(f"| {mode} | {k} | {n} | {s['target_calls']:.2f} | {s['draft_calls']:.2f} | "
                     f"{s['accept_rate']:.3f} | {s['target_tokens']:.0f} | {s['draft_tokens']:.0f} | {beam_ms:.1f} | "
                     f"{s['median_ms']:.1f} | {s['speedup_tot']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folder", type=Path)
    args = p.parse_args(argv)
    folder, out = args.folder, []
    rows = []
    for mode in ("strict", "relaxed"):
        for path in sorted(folder.glob(f"{mode}_g*.json")):  # strict_g1, strict_g3_hf, ...
            rows += sd_rows(json.loads(path.read_text()), mode)
    if rows:
        out += ["K = 10, every (γ, N, M):", "", GRID_HEADER]
        out += [grid_line(r) for r in sorted(rows, key=lambda r: (r["mode"] != "strict", r["forward"], r["gamma"],
                                                                   r["n"], r["m"])) if r["k"] == 10]
        out += ["", "The best setting per K (highest speedup_tot in the grid):", "", GRID_HEADER]
        for mode in ("strict", "relaxed"):
            for k in sorted({r["k"] for r in rows}):
                candidates = [r for r in rows if r["mode"] == mode and r["k"] == k]
                if candidates:
                    out.append(grid_line(max(candidates, key=lambda r: r["speedup_tot"])))
    beams = beams_table(folder)
    if beams:
        out += ["", "Draft beams N (M = N, γ = 3; calls and acceptance are hardware-independent, walltimes this "
                "machine's):", "", beams]
    beams_ops = ops_rows(folder, "beams_ops_*.json")
    if beams_ops:  # each mode's report has its own beam_tree rows: one per N is enough
        unique = {(r["method"], r["draft_beams"]): r for r in reversed(beams_ops)}
        out += ["", "Tensor ops per list against N (`count_ops.py`, M = N, γ = 3):", "",
                ops_table([unique[key] for key in sorted(unique)])]
    bounds = [(k, load(folder, f"bound_k{k}")) for k in (5, 10, 20)]
    if any(b for _, b in bounds):
        out += ["", "Bound: the target drafts for itself (every step accepted, M = N = K, γ = 3, one target call):", "",
                "| K | beam_tree ms | SD ms | verify + accept + other ms | beam_tree / (verify + accept + other) | "
                "target tokens (beam_tree) |", "|---|---|---|---|---|---|"]
        for k, b in bounds:
            if b:
                s = b["summary"][str(k)]
                sd, beam = s["sd_strict"], s["beam_tree"]
                rest = sd["verify_ms"] + sd["accept_ms"] + sd["other_ms"]
                out.append(f"| {k} | {beam['median_ms']:.1f} | {sd['median_ms']:.1f} | {rest:.1f} | "
                           f"**{beam['median_ms'] / rest:.2f}** | {sd['target_tokens']:.0f} ({beam['target_tokens']:.0f}) |")
    ops = ops_rows(folder, "ops_*.json")
    if ops:
        out += ["", "Tensor ops per list (`count_ops.py`; kernels: ops that compute or copy, each a launch on a GPU):",
                "", ops_table(ops)]
    for path in sorted(folder.glob("*.json")):  # every report with a throughput table
        name, report = path.stem, json.loads(path.read_text())
        if not report.get("throughput"):
            continue
        out += ["", f"`{name}` (lists per second; speedup against beam_tree at the same B):", "",
                "| K | B | method | lists | total s | lists/s | speedup | target calls per list | batched target calls | "
                "target tokens per list | mismatches |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in report["throughput"]:
            mismatches = "-" if r["method"] == "beam_tree" or r["mismatches"] is None else str(r["mismatches"])
            speedup = r.get("speedup", math.nan)
            out.append(f"| {r['k']} | {r['batch']} | {r['method']} | {r['lists']} | {r['total_s']:.1f} | "
                       f"{r['lists_per_s']:.1f} | {speedup:.2f} | {r['target_calls_per_list']:.2f} | "
                       f"{r['batched_target_calls']} | {r['target_tokens_per_list']:.0f} | {mismatches} |")
    text = "\n".join(out)
    print(text)
    return text


if __name__ == "__main__":
    main()
