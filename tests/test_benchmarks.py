"""Smoke test of benchmarks/bench_decoding.py: its main function on tiny random models and synthetic data (no timing
assertions: the script measures, the test only checks that it runs and reports everything)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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
    for field in ("device:", "threads", "target:", "draft:", "data: synthetic", "users: 3", "gamma: 3",
                  "forward: LeanLlamaLM"):
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
        "--draft-beams", "10", "--verify-beams", "5,10", "--scope", "level", "--batch-sizes", "1,4", "--backend", "hf",
    ])
    out = capsys.readouterr().out
    summary = report["summary"]["5"]
    assert set(summary) == {"beam", "beam_tree", "sd_strict_m5", "sd_strict", "sd_relaxed_m5", "sd_relaxed"}
    assert summary["beam"]["mismatches"] == 0  # the two beam-search layouts give the same lists
    assert summary["sd_strict_m5"]["mismatches"] == 0 and summary["sd_strict"]["mismatches"] == 0
    assert summary["sd_strict_m5"]["target_tokens"] <= summary["sd_strict"]["target_tokens"] * 2  # sane counts
    assert "M (verified beams): 5,10" in out and "scope: level" in out and "forward: HFDecoderLM" in out
    rows = report["throughput"]
    assert {(r["batch"], r["method"]) for r in rows} == {
        (b, m) for b in (1, 4)
        for m in ("beam_tree", "beam", "sd_strict_m5", "sd_strict", "sd_relaxed_m5", "sd_relaxed")}
    for row in rows:
        assert row["lists"] == 5 and row["lists_per_s"] > 0
        if row["method"].startswith("sd_strict") or row["method"] == "beam":
            assert row["mismatches"] == 0
    assert "lists per second" in out


def test_bench_forward_compares_both_forwards(tmp_path, capsys):
    from atspeed_exp.models.build import build_scratch_llama, save_model

    model = build_scratch_llama(vocab_size=40, pad_token_id=0, bos_token_id=1, eos_token_id=2, hidden_size=32,
                                intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, seed=0)
    save_model(model, tmp_path / "model")
    rows = load_script("bench_forward").main(["--model-dir", str(tmp_path / "model"), "--widths", "1,5",
                                              "--prompt-len", "6", "--repeats", "20", "--threads", "1"])
    assert [r["q"] for r in rows] == [1, 5]
    for row in rows:
        assert row["hf_ms"] > 0 and row["lean_ms"] > 0 and row["max_abs_diff"] < 1e-4
    assert "hf/lean" in capsys.readouterr().out


def test_op_counter_tells_kernels_from_views_and_host_reads():
    counter = load_script("count_ops").OpCounter()
    x = torch.ones(3)  # made outside: not counted
    with counter:
        y = x.add(1).mul(2)  # two kernels
        z = y.reshape(3, 1).expand(3, 4)  # views launch nothing
        with counter.inside("target"):
            z.sum()  # one kernel, charged to the target's forward
        value = y[0].item()  # a view and a host read
    assert value == 4.0
    assert counter.counts[("search", "kernel")] == 2
    assert counter.counts[("target", "kernel")] == 1
    assert counter.counts[("search", "view")] == 3
    assert counter.counts[("search", "sync")] == 1


def test_count_ops_charges_each_forward_to_its_model(tmp_path, capsys):
    common = ["--target-config", str(REPO / "conf" / "model" / "llama_tiny.yaml"), "--data-name", "synthetic",
              "--data-root", str(tmp_path / "synthetic"), "--users", "3", "--ks", "5", "--warmup", "1",
              "--threads", "1", "--methods", "beam_tree,sd_strict", "--draft-beams", "10", "--gamma", "1",
              "--json-out", str(tmp_path / "ops_strict.json")]
    report = load_script("count_ops").main(common + ["--draft-config",
                                                     str(REPO / "conf" / "draft" / "draft_1l_128.yaml")])
    rows = {row["method"]: row for row in report["rows"]}
    beam, sd = rows["beam_tree"], rows["sd_strict"]
    levels = 4  # synthetic SIDs: one target call per level in beam search
    assert beam["target_calls"] == levels and beam["draft_kernel"] == 0 and beam["draft_calls"] == 0
    # every call of the same model runs the same layers: a 2-layer target launches the same ops per call in both
    # searches (the prefill has no cache to extend: two fewer concatenations per layer)
    assert abs(beam["target_kernels_per_call"] - sd["target_kernels_per_call"]) <= 4
    assert sd["draft_calls"] >= 1 and 0 < sd["draft_kernel"] / sd["draft_calls"] < beam["target_kernels_per_call"]
    assert sd["search_kernel"] > beam["search_kernel"] > 0
    assert sd["kernel_total"] == sd["target_kernel"] + sd["draft_kernel"] + sd["search_kernel"]
    out = capsys.readouterr().out
    assert "| 5 | 1 | 10 | beam_tree | 4.00 |" in out and "| 5 | 1 | 10 | sd_strict |" in out
    # the CUDA default (all layers' caches edited by one indexing) counted on the CPU: fewer search kernels, the same
    # lists and forwards
    stacked = load_script("count_ops").main(common + ["--cache-edits", "stacked", "--draft-config",
                                                      str(REPO / "conf" / "draft" / "draft_1l_128.yaml")])
    sd_stacked = next(row for row in stacked["rows"] if row["method"] == "sd_strict")
    assert sd_stacked["target_calls"] == sd["target_calls"] and sd_stacked["target_kernel"] == sd["target_kernel"]
    assert sd_stacked["search_kernel"] < sd["search_kernel"]
    text = load_script("perf_tables").main([str(tmp_path)])  # README's table of them
    assert "search kernels" in text and f"| 5 | 1 | 10 | sd_strict | {sd['target_calls']:.2f} |" in text


def test_count_ops_charges_the_layer_skip_drafts_to_the_draft_and_they_shrink_with_the_skip_set(tmp_path):
    """The layer-skip drafter's forwards (a view of the target) count as draft kernels: with nothing skipped a draft
    call runs the target's ops (up to the prefill's concatenations), and each skipped sublayer removes its ops."""
    common = ["--target-config", str(REPO / "conf" / "model" / "llama_tiny.yaml"), "--data-name", "synthetic",
              "--data-root", str(tmp_path / "synthetic"), "--users", "2", "--ks", "5", "--warmup", "1",
              "--threads", "1", "--methods", "beam_tree,sd_strict", "--draft-beams", "10", "--gamma", "1",
              "--drafter", "layer_skip", "--backend", "lean"]
    per_call = {}
    for label, skip in (("none", []), ("mlp", ["--skip-mlp", "1"]), ("more", ["--skip-mlp", "0,1",
                                                                           "--skip-attention", "1"])):
        report = load_script("count_ops").count(common + skip)
        sd = next(row for row in report["rows"] if row["method"] == "sd_strict_layer_skip")
        assert sd["draft_calls"] >= 1 and sd["draft_kernel"] > 0
        per_call[label] = (sd["draft_kernels_per_call"], sd["target_kernels_per_call"])
    assert abs(per_call["none"][0] - per_call["none"][1]) <= 4
    assert per_call["none"][0] > per_call["mlp"][0] > per_call["more"][0] > 0
    assert load_script("bench_decoding").int_list("1, 3,") == (1, 3)


def test_perf_tables_come_from_the_benchmark_json(tmp_path, capsys):
    bench = load_script("bench_decoding")
    common = ["--target-config", str(REPO / "conf" / "model" / "llama_tiny.yaml"), "--data-name", "synthetic",
              "--data-root", str(tmp_path / "synthetic"), "--users", "3", "--ks", "5", "--warmup", "1",
              "--threads", "1"]
    report = bench.main(common + ["--draft-config", str(REPO / "conf" / "draft" / "draft_1l_128.yaml"),
                                  "--methods", "beam_tree,sd_strict", "--draft-beams", "10", "--verify-beams", "5,10",
                                  "--gamma", "1", "--json-out", str(tmp_path / "strict_g1.json")])
    bench.main(common + ["--draft", "same", "--methods", "beam_tree,sd_strict", "--draft-beams", "5",
                         "--json-out", str(tmp_path / "bound_k5.json")])
    capsys.readouterr()
    text = load_script("perf_tables").main([str(tmp_path)])
    best = max(("sd_strict_m5", "sd_strict"), key=lambda m: report["summary"]["5"][m]["speedup_tot"])
    s = report["summary"]["5"][best]
    assert f"| strict | 5 | 1 | 10 | {5 if best.endswith('m5') else 10} |" in text
    assert f"**{s['speedup_tot']:.2f}** | {s['target_calls']:.2f} |" in text
    bound_row = next(line for line in text.splitlines() if line.startswith("| 5 |"))
    assert "(" in bound_row and bound_row.count("|") == 7


def test_perf_tables_draft_beams_rows_come_from_the_sweep_reports(tmp_path, capsys):
    bench = load_script("bench_decoding")
    common = ["--target-config", str(REPO / "conf" / "model" / "llama_tiny.yaml"), "--data-name", "synthetic",
              "--data-root", str(tmp_path / "synthetic"), "--users", "2", "--ks", "5", "--warmup", "0",
              "--threads", "1", "--draft-config", str(REPO / "conf" / "draft" / "draft_1l_128.yaml"),
              "--methods", "beam_tree,sd_strict", "--gamma", "3"]
    reports = {n: bench.main(common + ["--draft-beams", str(n), "--json-out", str(tmp_path / f"beams_strict_n{n}.json")])
               for n in (5, 12)}
    capsys.readouterr()
    text = load_script("perf_tables").main([str(tmp_path)])
    rows = [line for line in text.splitlines() if line.startswith("| strict | 5 |")]
    assert [row.split(" | ")[2] for row in rows] == ["5", "12"]  # sorted by N
    for row, n in zip(rows, (5, 12)):
        s = reports[n]["summary"]["5"]["sd_strict"]
        assert f"| {s['target_calls']:.2f} | {s['draft_calls']:.2f} | {s['accept_rate']:.3f} |" in row


def gpu_script_env(tmp_path: Path, **settings: str) -> dict[str, str]:
    """Environment that runs benchmarks/run_gpu_perf.sh on the CPU with tiny models and synthetic data."""
    return {**os.environ, "PY": sys.executable, "DEVICE": "cpu", "DTYPE": "float32", "DATA_NAME": "synthetic",
            "DATA_ROOT": str(tmp_path / "data" / "synthetic"), "OUT": str(tmp_path / "out"),
            "RESULTS": str(tmp_path / "results"), "ARTIFACTS": str(tmp_path / "artifacts"), "TARGET_EPOCHS": "1",
            "DRAFT_EPOCHS": "1",
            "EXTRA": " ".join([
                "data=synthetic", "data.synthetic.num_users=150", "data.synthetic.num_items=120",
                f"paths.data_dir={tmp_path / 'data'}", "model=llama_tiny", "model.num_hidden_layers=1",
                "draft=draft_tiny", "trainer=cpu", "eval.device=cpu", "target_training=default",
                "target_training.val_users=10", "eval.max_users=10", "teacher.num_beams=10",
                "teacher.max_examples=30", "teacher.max_val_examples=5", "draft_training.batch_size=8",
                "decoding.draft_beams=40"]),
            **settings}


@pytest.mark.slow
def test_run_gpu_perf_script_runs_end_to_end_on_tiny_models(tmp_path):
    # the GPU script runs for real only on a GPU: its CPU run here catches what would break there;
    # this runs every step of it on the CPU (tiny models, synthetic data): smoke, both pipelines, every table
    env = gpu_script_env(tmp_path, SMOKE_DATA_ROOT=str(tmp_path / "smoke_data"), USERS="3", EVAL_USERS="3",
                         THROUGHPUT_USERS="8", DEADLINE="100000")
    result = subprocess.run(["bash", str(REPO / "benchmarks" / "run_gpu_perf.sh")], env=env, cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    names = {p.name for p in (tmp_path / "results").iterdir()}
    per_mode = {f"{name}.json" for mode in ("strict", "relaxed")
                for name in (f"summary_{mode}", f"{mode}_g3", f"{mode}_g3_n120", f"{mode}_g3_n80", f"{mode}_g1",
                             f"ops_{mode}_g3", f"{mode}_g3_hf", f"throughput_k10_{mode}")}
    assert per_mode | {"log.txt", "device.txt", "smoke_lean.txt", "smoke_hf.txt", "smoke_ops.txt",
                       "forward.txt"} <= names
    # one archive of everything, replaced after each step
    assert (tmp_path / "out" / "gpu_perf.tgz").stat().st_size > 0
    assert not list((tmp_path / "out").glob(".*tmp"))
    text = load_script("perf_tables").main([str(tmp_path / "results")])
    assert "| strict | 10 | 3 | 40 | 40 |" in text and "| relaxed | 10 | 3 | 40 | 10 |" in text
    assert "| strict | 10 | 3 | 120 | 120 |" in text and "| relaxed | 10 | 3 | 120 | 120 |" in text
    # both modes benchmark the one target the first pipeline trained
    assert len([p for p in (tmp_path / "artifacts" / "target").iterdir() if p.is_dir()]) == 1  # beside its lock file


@pytest.mark.slow
def test_run_gpu_perf_script_skips_optional_steps_past_its_deadline(tmp_path):
    # DEADLINE=0: the smoke is skipped (SMOKE=0), the pipelines run anyway, every table step is skipped, nothing fails
    env = gpu_script_env(tmp_path, SMOKE="0", MODES="strict", DEADLINE="0", EVAL_USERS="2")
    result = subprocess.run(["bash", str(REPO / "benchmarks" / "run_gpu_perf.sh")], env=env, cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "== strict_g3: skipped" in result.stdout
    names = {p.name for p in (tmp_path / "results").iterdir()}
    assert "summary_strict.json" in names and "strict_g3.json" not in names


def test_bench_decoding_runs_model_free_drafters_and_dare(tmp_path, capsys):
    bench = load_script("bench_decoding")
    report = bench.main([
        "--target-config", str(REPO / "conf" / "model" / "llama_tiny.yaml"),
        "--data-name", "synthetic", "--data-root", str(tmp_path / "synthetic"),
        "--users", "3", "--ks", "5", "--warmup", "1", "--threads", "1", "--methods", "beam_tree,sd_strict,sd_dare",
        "--drafter", "retrieval,trigram,trigram_puct", "--draft-beams", "10", "--batch-sizes", "2",
        "--dare-top-k", "6", "--trigram-update-weight", "2",
    ])
    out = capsys.readouterr().out
    summary = report["summary"]["5"]
    rows = {f"sd_{mode}_{drafter}" for mode in ("strict", "dare") for drafter in ("retrieval", "trigram", "trigram_puct")}
    assert set(summary) == {"beam_tree"} | rows
    for name in rows:
        assert summary[name]["draft_calls"] == 0 and 1 <= summary[name]["target_calls"] <= 4
        if name.startswith("sd_strict"):
            assert summary[name]["mismatches"] == 0  # lossless with every drafter, learning or not
    assert report["header"]["model_free"]["trigram_puct"]["settings"]["tree"] == "puct"
    assert report["header"]["model_free"]["trigram"]["settings"]["update_weight"] == 2
    assert report["header"]["dare"] == {"dare_top_k": 6, "dare_threshold": 0.0}
    assert "drafter trigram_puct:" in out and "sd_dare_trigram " in out
    assert all(r["mismatches"] == 0 for r in report["throughput"] if r["method"].startswith("sd_strict"))


def _fake_target(root: Path, name: str, epochs: int, evaluations: list[tuple[int, int, float]]) -> Path:
    """A target stage dir with stage.json and cached evaluations (users, K, recall@10)."""
    import json

    target = root / name
    (target / "eval").mkdir(parents=True)
    settings = {"model": {"name": "llama_small"}, "target_training": {"max_epochs": epochs}, "seed": 7}
    (target / "stage.json").write_text(json.dumps({"settings": settings, "train_seconds_this_run": 60.0}))
    for index, (users, k, recall) in enumerate(evaluations):
        metrics = {"eval/num_users": users, "eval/target/recall@10": recall, "eval/most_popular/recall@10": 0.01,
                   "eval/target/distinct_items@10": 100.0}
        (target / "eval" / f"target-{index}.json").write_text(
            json.dumps({"settings": {"users": users, "num_beams": k}, "metrics": metrics}))
    return target


def test_target_table_takes_each_targets_widest_cached_evaluation(tmp_path, capsys):
    import json

    table = load_script("target_table")
    short = _fake_target(tmp_path, "short", 3, [(200, 20, 0.5), (3000, 10, 0.2), (3000, 20, 0.3)])
    long = _fake_target(tmp_path, "long", 6, [(3000, 20, 0.4)])
    sasrec = tmp_path / "sasrec.json"
    sasrec.write_text(json.dumps({"metrics": {"baseline/sasrec/num_users": 3000, "baseline/sasrec/recall@10": 0.6}}))
    out = tmp_path / "rows.json"
    assert table.main([str(short), str(long), "--sasrec", str(sasrec), "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["list"], r.get("epochs"), r["recall@10"]) for r in rows] == [
        ("target", 3, 0.3), ("target", 6, 0.4), ("most_popular", None, 0.01), ("sasrec", None, 0.6)]
    assert rows[0]["users"] == 3000 and rows[0]["distinct_items@10"] == 100.0
    # targets (or SASRec) evaluated on other users are refused, not tabulated side by side
    other = _fake_target(tmp_path, "other", 6, [(2000, 20, 0.4)])
    assert table.main([str(short), str(other)]) == 1
    assert "compare targets on the same users" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="no eval/target"):
        table.cached_evaluation(_fake_target(tmp_path, "none", 1, []))
    # an evaluation with score processors is not the target's own lists, however many users it covers
    processed = _fake_target(tmp_path, "processed", 3, [(3000, 20, 0.3)])
    (processed / "eval" / "target-p.json").write_text(json.dumps(
        {"settings": {"users": 3553, "num_beams": 20, "processors": ["ghost_debias", None]},
         "metrics": {"eval/target/recall@10": 0.9}}))
    assert table.cached_evaluation(processed)["metrics"]["eval/target/recall@10"] == 0.3
    (processed / "eval" / "target-q.json").write_text(json.dumps(
        {"settings": {"users": 3000, "num_beams": 20, "dtype": "bfloat16"}, "metrics": {"eval/target/recall@10": 0.2}}))
    with pytest.raises(ValueError, match="several cached evaluations"):
        table.cached_evaluation(processed)


def _random_target_stage(root: Path) -> tuple[Path, Path]:
    """(a target stage dir with an untrained tiny target and its tokenizer, the synthetic data folder it was made on)."""
    from pipeline_helpers import compose_config, random_target_stage, tiny_overrides

    from atspeed_exp import pipeline

    cfg = compose_config(tiny_overrides(root))
    return random_target_stage(cfg, root), pipeline.data_root(cfg)


@pytest.mark.slow  # three spawned processes that import the pipeline: about a minute on two busy cores
def test_teacher_scaling_reports_every_world_size_with_the_one_process_files(tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))  # the spawned ranks import the script by module name
    bench = load_script("teacher_scaling")
    target_dir, data_root = _random_target_stage(tmp_path)
    report = bench.main([str(target_dir), "--data-name", "synthetic", "--data-root", str(data_root),
                         "--examples", "10", "--shard-size", "3", "--batch-size", "2", "--num-beams", "5",
                         "--out", str(tmp_path / "scale" / "teacher.json")])
    out = capsys.readouterr().out

    header = next(line for line in out.splitlines() if line.split()[:1] == ["W"])
    assert header.split() == list(bench.COLUMNS)
    lines = out.splitlines()
    rows = [lines[lines.index(header) + 1 + i].split() for i in range(2)]
    assert [r[:2] for r in rows] == [["1", "10"], ["2", "10"]] and all(len(r) == len(bench.COLUMNS) for r in rows)
    one, two = report["rows"]
    assert one["efficiency"] == 1.0 and two["efficiency"] > 0
    assert two["examples_per_s"] == pytest.approx(10 / two["seconds"])
    assert two["examples_per_s_per_process"] == pytest.approx(two["examples_per_s"] / 2)
    assert float(rows[1][5]) == pytest.approx(two["efficiency"], abs=0.006)
    # 4 shards (3 + 3 + 3 + 1), each with its checksum file, and the manifest: byte for byte those of one process
    assert len([n for n in one["files_sha256"] if n.endswith(".pt")]) == 4
    assert two["files_sha256"] == one["files_sha256"] and two["same_files_as_w1"] is True
    assert json.loads((tmp_path / "scale" / "teacher.json").read_text())["rows"][1]["world_size"] == 2


def test_checkpoint_selection_scores_each_checkpoint_on_validation_users_and_picks_by_them(tmp_path, capsys):
    """Two checkpoints of one target stage (its own weights and other ones): each row's validation Recall@10 equals a
    naive count of hits in that checkpoint's beam-search lists, and the selected row is the best by the chosen
    validation figure (the test figures are reported, never used to choose)."""
    import json

    from atspeed_exp.data.recdata import RecData
    from atspeed_exp.evaluation import generate_lists
    from atspeed_exp.models.build import load_model
    from atspeed_exp.models.lean import decoder_for

    bench = load_script("checkpoint_selection")
    target_dir, data_root = _random_target_stage(tmp_path)
    (target_dir / "stage.json").write_text(json.dumps({"settings": {"data": {
        "root": str(data_root), "name": "synthetic", "prompt_format": "compact", "max_history": 20}}}))
    model = load_model(target_dir / "model")
    (target_dir / "checkpoints").mkdir()
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}, "epoch": 0, "global_step": 5},
               target_dir / "checkpoints" / "a.ckpt")
    torch.manual_seed(1)
    other = {k: v + 0.5 * torch.randn_like(v) for k, v in model.state_dict().items()}
    torch.save({"state_dict": {f"model.{k}": v for k, v in other.items()}, "epoch": 1, "global_step": 10},
               target_dir / "checkpoints" / "b.ckpt")
    out = tmp_path / "selection.json"
    assert bench.main([str(target_dir), "--users", "15", "--select", "recall@10", "--resamples", "50",
                       "--out", str(out)]) == 0
    rows = {r["checkpoint"]: r for r in json.loads(out.read_text())["rows"]}
    assert (rows["a.ckpt"]["epoch"], rows["b.ckpt"]["epoch"], rows["b.ckpt"]["global_step"]) == (1, 2, 10)

    data = RecData.build(data_root, "synthetic", tokenizer_dir=target_dir / "tokenizer", splits=("valid",))
    prompts, truth = data.splits["valid"].prompts[:15], data.splits["valid"].ground_truth()[:15]
    for name, weights in (("a.ckpt", model.state_dict()), ("b.ckpt", other)):
        model.load_state_dict(weights)
        with torch.inference_mode():
            items = generate_lists(decoder_for(model.eval(), "auto"), prompts, data.trie(), 10, data.pad_id,
                                   progress=False).items.tolist()
        naive = sum(len(set(lst) & set(g)) / len(g) for lst, g in zip(items, truth)) / len(truth)
        assert rows[name]["val/recall@10"] == pytest.approx(naive), name
        assert rows[name]["val/users"] == 15 and "test/recall@10" in rows[name]
    best = max(rows.values(), key=lambda r: r["val/recall@10"])
    assert [r["checkpoint"] for r in rows.values() if r["selected"]] == [best["checkpoint"]]
    assert best["val/recall@10_selected_minus_this"] == 0.0
    with pytest.raises(SystemExit):
        bench.main([str(tmp_path / "missing")])
