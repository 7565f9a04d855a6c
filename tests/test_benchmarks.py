"""Smoke test of benchmarks/bench_decoding.py: its main function on tiny random models and synthetic data (no timing
assertions: the script measures, the test only checks that it runs and reports everything)."""

import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def load_script(name: str):
    """Import a benchmark script by path (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


def test_bench_decoding_prints_every_method_and_column(tmp_path, capsys):
    bench = load_script("bench_decoding")
    report = bench.main([
        "--target-config", str(REPO / "conf" / "model" / "llama_tiny.yaml"),
        "--draft-config", str(REPO / "conf" / "draft" / "draft_1l_128.yaml"),
        "--data-name", "synthetic", "--data-root", str(tmp_path / "synthetic"),
        "--users", "3", "--ks", "5", "--warmup", "1", "--threads", "1",
        "--json-out", str(tmp_path / "bench.json"),
    ])
    out = capsys.readouterr().out

    assert "K = 5" in out
    table = out.split("K = 5", 1)[1].splitlines()
    header = next(line for line in table if line.startswith("method"))
    assert header.split() == list(bench.COLUMNS)
    for method in bench.METHODS:
        row = next(line for line in table if line.startswith(method + " "))
        assert len(row.split()) == len(bench.COLUMNS)
    for field in ("device:", "threads", "target:", "draft:", "data: synthetic", "users: 3", "gamma: 3"):
        assert field in out

    summary = report["summary"]["5"]
    assert set(summary) == set(bench.METHODS)
    assert summary["beam"]["target_calls"] == 4
    assert 1 <= summary["sd_strict"]["target_calls"] <= 4
    assert len(report["lists"]) == 3 * len(bench.METHODS)
    assert (tmp_path / "bench.json").is_file()


def test_bench_decoding_top_m_rows_and_throughput_table(tmp_path, capsys):
    bench = load_script("bench_decoding")
    report = bench.main([
        "--target-config", str(REPO / "conf" / "model" / "llama_tiny.yaml"),
        "--draft-config", str(REPO / "conf" / "draft" / "draft_1l_128.yaml"),
        "--data-name", "synthetic", "--data-root", str(tmp_path / "synthetic"),
        "--users", "5", "--ks", "5", "--warmup", "1", "--threads", "1", "--methods", "beam,sd_strict,sd_relaxed",
        "--draft-beams", "10", "--verify-beams", "5,10", "--scope", "level", "--batch-sizes", "1,4",
    ])
    out = capsys.readouterr().out
    summary = report["summary"]["5"]
    assert set(summary) == {"beam", "beam_tree", "sd_strict_m5", "sd_strict", "sd_relaxed_m5", "sd_relaxed"}
    assert summary["beam"]["mismatches"] == 0  # the two beam-search layouts give the same lists
    assert summary["sd_strict_m5"]["mismatches"] == 0 and summary["sd_strict"]["mismatches"] == 0
    assert summary["sd_strict_m5"]["target_tokens"] <= summary["sd_strict"]["target_tokens"] * 2  # sane counts
    assert "M (verified beams): 5,10" in out and "scope: level" in out
    rows = report["throughput"]
    assert {(r["batch"], r["method"]) for r in rows} == {
        (b, m) for b in (1, 4)
        for m in ("beam_tree", "beam", "sd_strict_m5", "sd_strict", "sd_relaxed_m5", "sd_relaxed")}
    for row in rows:
        assert row["lists"] == 5 and row["lists_per_s"] > 0
        if row["method"].startswith("sd_strict") or row["method"] == "beam":
            assert row["mismatches"] == 0
    assert "lists per second" in out
