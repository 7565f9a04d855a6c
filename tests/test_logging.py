
import json
from pathlib import Path

import pytest
from pipeline_helpers import compose_config, tiny_overrides

from atspeed_exp import pipeline
from atspeed_exp.wandb_views import per_k_rows, read_offline_run


def test_wandb_logger_writes_offline_run_under_output_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = compose_config([f"paths.output_dir={tmp_path}"])
    logger = pipeline.make_logger(cfg, "eval")  # the logger group's own keys (wandb_artifacts) are not W&B's
    logger.log_metrics({"eval/target/recall@10": 0.5})
    logger.experiment.finish()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(p.suffix == ".wandb" for p in runs[0].iterdir())


def wandb_runs(out: Path) -> dict[str, dict]:
    """The offline runs under a run's output dir, read back, by job type (one run per job type here)."""
    runs = [read_offline_run(d) for d in sorted((out / "wandb").glob("offline-run-*"))]
    by_type = {run["job_type"]: run for run in runs}
    assert len(by_type) == len(runs), [run["job_type"] for run in runs]
    return by_type


@pytest.mark.slow
def test_pipeline_wandb_offline_logs_stage_runs_views_and_reused_tags(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    base = [o for o in tiny_overrides(tmp_path) if o != "logger=csv" and not o.startswith("paths.output_dir")]
    base += ["logger=wandb", "decoding.modes=[strict,relaxed]"]
    summary = pipeline.run(compose_config(base + [f"paths.output_dir={tmp_path / 'first'}",
                                                  "logger.wandb_artifacts=true"]))
    assert summary["table"] and summary["table_all_users"] and summary["reused_stages"] == {}
    runs = wandb_runs(tmp_path / "first")
    assert set(runs) == {"target", "teacher", "draft", "eval"}
    assert all(not any(t.startswith("reused:") for t in run["tags"]) for run in runs.values())

    teacher = runs["teacher"]
    assert teacher["summary"]["teacher/train_examples"] == 40 and teacher["summary"]["teacher/valid_examples"] == 10
    assert teacher["summary"]["teacher/train_size_bytes"] > 0 and teacher["summary"]["teacher/seconds"] > 0
    assert teacher["config"]["teacher_settings"]["num_beams"] == 10 and "teacher/examples" in teacher["logged"]

    for stage in ("target", "draft"):  # the saved model dir as an artifact, recorded offline
        (model,) = [a for a in runs[stage]["artifacts"] if a["type"] == "model"]
        assert model["name"].startswith(f"{stage}-") and any(p.endswith(".safetensors") for p in model["paths"])

    ev = runs["eval"]
    assert ev["summary"]["eval/speculative_table"]["nrows"] == 3 * 2  # (beam, strict, relaxed) x K in (5, 10)
    assert ev["summary"]["eval/all_users_table"]["nrows"] == 3 * 2
    table = json.loads((Path(ev["dir"]) / "files" / ev["summary"]["eval/all_users_table"]["path"]).read_text())
    assert {"mode", "k", "recall@K", "recall@K_lo95", "recall@K_hi95", "acceptance_rate_lo95"} <= set(table["columns"])
    assert all(row[table["columns"].index("recall@K")] is not None for row in table["data"])
    for prefix in ("eval/batch1", "eval/all_users"):
        assert {f"{prefix}/{name}_vs_k" for name in ("target_calls_per_list", "acceptance_rate", "recall@K")} \
            <= ev["charts"]
        assert ev["summary"][f"{prefix}/plots"]["_type"] == "image-file"
    assert any(f.endswith(".png") for f in ev["files"])

    # everything cached: only the eval run opens, and it names the reused stages
    again = pipeline.run(compose_config(base + [f"paths.output_dir={tmp_path / 'second'}"]))
    assert set(again["reused_stages"]) == {"target", "teacher", "draft"}
    runs = wandb_runs(tmp_path / "second")
    assert set(runs) == {"eval"}
    assert {"reused:target", "reused:teacher", "reused:draft"} <= set(runs["eval"]["tags"])
    assert runs["eval"]["config"]["reused_stages"] == again["reused_stages"]
    assert runs["eval"]["summary"]["reused_stages"] == again["reused_stages"]


def test_route_library_logs_leaves_one_handler_per_record_and_drops_noise(caplog):
    import logging

    from atspeed_exp.log_setup import route_library_logs

    library = logging.getLogger("somelibrary")
    extra = logging.StreamHandler()
    library.addHandler(extra)
    root_handler = logging.StreamHandler()
    logging.root.addHandler(root_handler)
    try:
        route_library_logs()
        assert extra not in library.handlers and library.propagate  # the root's handler prints it, once
        record = logging.LogRecord("lightning", logging.INFO, __file__, 1, "Tip: try litlogger", None, None)
        assert not all(f.filter(record) for f in root_handler.filters)
        record = logging.LogRecord("lightning", logging.INFO, __file__, 1, "Epoch 1", None, None)
        assert all(f.filter(record) for f in root_handler.filters)
    finally:
        logging.root.removeHandler(root_handler)


def test_route_library_logs_turns_off_the_weight_loading_bar(tmp_path, capsys):
    """transformers draws a "Loading weights" progress bar at every model load: carriage-return noise in log files,
    several per evaluation."""
    import transformers
    from transformers.utils import logging as hf_logging

    from atspeed_exp.log_setup import route_library_logs

    config = transformers.LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path)
    hf_logging.enable_progress_bar()
    try:
        transformers.LlamaForCausalLM.from_pretrained(tmp_path)
        assert "Loading weights" in capsys.readouterr().err  # the noise, as a model load prints it
        route_library_logs()
        transformers.LlamaForCausalLM.from_pretrained(tmp_path)
        assert "Loading weights" not in capsys.readouterr().err
    finally:
        hf_logging.enable_progress_bar()


def test_log_progress_reports_steps_and_time_left(caplog):
    import logging

    import lightning.pytorch as pl
    import torch

    from atspeed_exp.callbacks.progress import LogProgress

    class Tiny(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(2, 1)

        def training_step(self, batch, batch_idx):
            loss = self.layer(batch[0]).pow(2).mean()
            self.log("tiny/train_loss", loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(20, 2)), batch_size=2)
    trainer = pl.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[LogProgress("tiny", every_percent=50, min_seconds=0)])
    with caplog.at_level(logging.INFO, logger="atspeed_exp.callbacks.progress"):
        trainer.fit(Tiny(), data)
    lines = [r.getMessage() for r in caplog.records if r.name == "atspeed_exp.callbacks.progress"]
    assert len(lines) == 4  # 50% and 100% of each of 2 epochs
    assert lines[0].startswith("tiny epoch 1/2:  50% (5/10 steps), loss ") and "run left" in lines[0]
    assert lines[-1].startswith("tiny epoch 2/2: 100% (10/10 steps)")
    trainer = pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[LogProgress("tiny", every_percent=10)])
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="atspeed_exp.callbacks.progress"):
        trainer.fit(Tiny(), data)
    progress = [r.getMessage()[:22] for r in caplog.records if r.name == "atspeed_exp.callbacks.progress"]
    assert progress == ["tiny epoch 1/1: 100% ("]  # a short epoch: its end only


def test_log_progress_speed_counts_only_batches_run_in_this_process(caplog, monkeypatch):
    """A run resumed at batch 383 of 804 must not count the 383 batches run before the restart as run now (nor take
    its clock from whenever the process or machine started)."""
    import logging
    from types import SimpleNamespace

    from atspeed_exp.callbacks import progress

    clock = iter([1000.0, 1010.0])  # batch 383 starts at t = 1000 s; batch 392 ends 10 s later
    monkeypatch.setattr(progress.time, "perf_counter", lambda: next(clock))
    trainer = SimpleNamespace(num_training_batches=804, max_epochs=6, current_epoch=3, callback_metrics={})
    callback = progress.LogProgress("target", every_percent=1, min_seconds=0)
    with caplog.at_level(logging.INFO, logger="atspeed_exp.callbacks.progress"):
        callback.on_train_batch_start(trainer, None, None, 383)  # no on_train_epoch_start on a mid-epoch resume
        callback.on_train_batch_end(trainer, None, None, None, 392)
    (line,) = [r.getMessage() for r in caplog.records if r.name == "atspeed_exp.callbacks.progress"]
    assert "(393/804 steps)" in line and "1.00 steps/s" in line  # 10 batches in 10 s
    assert "epoch left 6m51s" in line  # 411 batches at 1 step/s


def test_per_k_rows_name_each_rows_k_columns_at_k():
    rows = [{"mode": "strict", "k": 5, "recall@5": 0.1, "recall@5_lo95": 0.05, "recall@5_change": 0.0},
            {"mode": "strict", "k": 10, "recall@10": 0.2, "recall@10_lo95": 0.15, "recall@10_change": 0.0}]
    out = per_k_rows(rows)
    assert [set(r) for r in out] == [{"mode", "k", "recall@K", "recall@K_lo95", "recall@K_change"}] * 2
    assert out[1]["recall@K"] == 0.2


def test_progress_logs_status_lines_when_the_output_is_not_a_terminal(caplog):
    import logging

    from atspeed_exp.progress import progress

    with caplog.at_level(logging.INFO, logger="atspeed_exp.progress"):
        for _ in progress(range(5), desc="decoding", unit="user", log_seconds=0):
            pass
    lines = [r.getMessage() for r in caplog.records if r.name == "atspeed_exp.progress"]
    assert lines and all("\r" not in line for line in lines)  # pytest's stderr is not a terminal
    assert lines[-1].startswith("decoding: 100%") and "5/5" in lines[-1]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="atspeed_exp.progress"):
        list(progress(range(3), desc="quiet", enabled=False))
    assert not caplog.records


def test_route_library_logs_sends_lightning_records_to_the_root_even_if_it_stopped_propagating():
    import logging

    from atspeed_exp.log_setup import route_library_logs

    lightning = logging.getLogger("lightning.pytorch")
    own = logging.StreamHandler()
    lightning.addHandler(own)
    lightning.propagate = False  # what Lightning does when imported before logging is configured
    route_library_logs()
    assert own not in lightning.handlers and lightning.propagate


def test_progress_log_lines_skip_a_status_whose_count_has_not_moved(caplog):
    import logging
    import re

    from atspeed_exp.progress import progress

    with caplog.at_level(logging.INFO, logger="atspeed_exp.progress"):
        bar = progress(total=4, desc="slow", unit="user", log_seconds=0)
        bar.update(1)
        bar.refresh()  # what tqdm's monitor and time-based refreshes do while one slow step runs
        bar.refresh()
        bar.update(3)
        bar.close()
    counts = [re.search(r"\| (\d+/\d+) ", r.getMessage())[1] for r in caplog.records
              if r.name == "atspeed_exp.progress"]
    assert counts == ["0/4", "1/4", "4/4"]  # the final 100% line stays


def test_wandb_run_end_prints_no_history_or_summary_blocks_of_its_own(tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_SILENT", raising=False)
    monkeypatch.delenv("WANDB_QUIET", raising=False)
    import wandb

    wandb.teardown()  # wandb keeps the settings of its first setup in this process (another test's WANDB_SILENT)
    cfg = compose_config([f"paths.output_dir={tmp_path}", "logger=wandb"])
    logger = pipeline.make_logger(cfg, "eval")
    logger.log_metrics({"eval/target/recall@10": 0.5})
    logger.log_metrics({"eval/target/recall@10": 0.6})
    pipeline.close_logger(logger)
    printed = capfd.readouterr()
    text = printed.out + printed.err
    assert "Run data is saved locally" in text  # wandb's own start lines stay
    assert "Run history" not in text and "Run summary" not in text
