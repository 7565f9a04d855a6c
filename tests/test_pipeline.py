import json
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from omegaconf import OmegaConf
from pipeline_helpers import CONF_DIR, StopAtEpoch, compose_config, tiny_overrides

from atspeed_exp import pipeline

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("experiment", [None] + sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml")))
def test_config_every_experiment_composes_and_resolves(experiment, tmp_path):
    overrides = [f"paths.output_dir={tmp_path}"] + ([f"+experiment={experiment}"] if experiment else [])
    cfg = compose_config(overrides)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert resolved["model"]["_target_"].startswith("atspeed_exp.models.factory.")
    assert resolved["trainer"]["_target_"] == "lightning.pytorch.Trainer"
    if experiment:
        assert resolved["experiment_name"] == experiment


def test_pipeline_synthetic_end_to_end_and_stage_reuse(tmp_path):
    cfg = compose_config(tiny_overrides(tmp_path))
    summary = pipeline.run(cfg)
    metrics = summary["metrics"]
    for name in ("target", "most_popular"):
        for n in (5, 10):
            assert 0.0 <= metrics[f"eval/{name}/recall@{n}"] <= 1.0
    stage_dir = Path(summary["target_dir"])
    stage = json.loads((stage_dir / "stage.json").read_text())
    assert stage["stage"] == "target" and stage["best_checkpoint"]
    assert (stage_dir / "model").is_dir() and (stage_dir / "tokenizer").is_dir()
    text = pipeline.format_summary(summary, (5, 10))
    assert "most_popular" in text and "R@10" in text

    # Same settings: the stage is reused, not retrained (its stage.json stays untouched).
    mtime = (stage_dir / "stage.json").stat().st_mtime_ns
    again = pipeline.run(compose_config(tiny_overrides(tmp_path)))
    assert again["target_dir"] == summary["target_dir"]
    assert (stage_dir / "stage.json").stat().st_mtime_ns == mtime
    assert again["metrics"]["eval/target/recall@10"] == pytest.approx(metrics["eval/target/recall@10"])

    # A setting that changes the target gets its own stage.
    other = compose_config(tiny_overrides(tmp_path) + ["target_training.lr=1e-3"])
    assert pipeline.target_stage_dir(other) != stage_dir


def test_pipeline_sweep_over_objective_reuses_target_and_teacher(tmp_path):
    first = pipeline.run(compose_config(tiny_overrides(tmp_path) + ["alignment=kl"]))
    target_stamp = (Path(first["target_dir"]) / "stage.json").stat().st_mtime_ns
    teacher_dir = Path(first["teacher_dir"])
    teacher_stamp = (teacher_dir / "stage.json").stat().st_mtime_ns

    second = pipeline.run(compose_config(tiny_overrides(tmp_path) + ["alignment=atspeed_s"]))
    assert second["target_dir"] == first["target_dir"]
    assert (Path(first["target_dir"]) / "stage.json").stat().st_mtime_ns == target_stamp
    assert (teacher_dir / "stage.json").stat().st_mtime_ns == teacher_stamp  # teacher skipped
    assert second["draft_dir"] != first["draft_dir"]  # a new objective trains a new draft
    assert "atspeed_s" in second["draft_dir"] and "kl" in first["draft_dir"]
    row = {(r["mode"], r["k"]): r for r in second["table"]}
    assert row[("strict", 10)]["recall@10"] == pytest.approx(row[("beam", 10)]["recall@10"])  # lossless

    # evaluation-only settings (K values) reuse the draft as well
    third = pipeline.run(compose_config(tiny_overrides(tmp_path) + ["alignment=atspeed_s", "decoding.ks=[5]"]))
    assert third["draft_dir"] == second["draft_dir"]
    assert (Path(second["draft_dir"]) / "stage.json").stat().st_mtime_ns == (
        Path(third["draft_dir"]) / "stage.json").stat().st_mtime_ns
    assert [r["k"] for r in third["table"]] == [5, 5]


class _RecordFirstEpoch(pl.Callback):
    first: int | None = None

    def on_train_epoch_start(self, trainer, module):
        if self.first is None:
            self.first = trainer.current_epoch


def test_target_training_resumes_after_interruption(tmp_path):
    cfg = compose_config(tiny_overrides(tmp_path) + ["target_training.max_epochs=2"])
    with pytest.raises(RuntimeError, match="simulated crash"):
        pipeline.train_target(cfg, logger=False, extra_callbacks=[StopAtEpoch(1)])
    stage_dir = pipeline.target_stage_dir(cfg)
    assert (stage_dir / "checkpoints" / "last.ckpt").exists()
    assert not pipeline.stage_done(stage_dir)  # a crashed stage is never trusted

    recorder = _RecordFirstEpoch()
    pipeline.train_target(cfg, logger=False, extra_callbacks=[recorder])
    assert recorder.first == 1  # continued where it stopped, not from scratch
    assert pipeline.stage_done(stage_dir)


def _save_tiny_pretrained(directory: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>", "the", "user", "item", "next", "a", "b", "c"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    config = LlamaConfig(vocab_size=len(words), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, bos_token_id=1, eos_token_id=2, max_position_embeddings=512)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def test_pipeline_pretrained_lora_target(tmp_path):
    _save_tiny_pretrained(tmp_path / "pretrained")
    scratch_only = ("model.hidden_size", "model.intermediate_size", "model.num_hidden_layers")
    cfg = compose_config(
        [o for o in tiny_overrides(tmp_path) if not o.startswith(scratch_only)]
        + ["model=pretrained_lora", f"model.path={tmp_path / 'pretrained'}", "data.prompt_format=alpaca"]
    )
    summary = pipeline.run(cfg)
    stage_dir = Path(summary["target_dir"])
    manifest = json.loads((stage_dir / "model" / "atspeed_model.json").read_text())
    assert manifest["format"] == "peft_lora"
    assert summary["stage"]["parameters"]["trainable"] < summary["stage"]["parameters"]["total"]
    assert 0.0 <= summary["metrics"]["eval/target/recall@10"] <= 1.0


@pytest.mark.slow
def test_run_py_multirun_sweep_over_alignment_objectives(tmp_path):
    """The README's sweep form (`-m ... alignment=kl,atspeed_s draft_training.seed=1,2`) on tiny synthetic
    settings: four jobs share one target and one teacher; each (objective, draft seed) pair trains its own draft;
    the sweep callback and benchmarks/objective_table.py aggregate them over seeds into the same table."""
    overrides = [o for o in tiny_overrides(tmp_path) if not o.startswith("paths.output_dir")]
    # PYTHONPATH: the benchmark script imports this checkout's package, whatever the environment installed
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "run.py", "-m", "alignment=kl,atspeed_s", "draft_training.seed=1,2",
         f"hydra.sweep.dir={tmp_path / 'multirun'}",
         *overrides],
        cwd=REPO, env=env, capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("speculative decoding (") == 4
    artifacts = tmp_path / "artifacts"
    assert len(list((artifacts / "target").glob("*/stage.json"))) == 1
    assert len(list((artifacts / "teacher").glob("*/stage.json"))) == 1
    drafts = sorted(p.parent.name for p in (artifacts / "draft").glob("*/stage.json"))
    assert len(drafts) == 4 and sum("-kl-" in d for d in drafts) == 2 and sum("-atspeed_s-" in d for d in drafts) == 2
    assert len(list((tmp_path / "multirun").glob("*/summary.json"))) == 4

    table = subprocess.run([sys.executable, "benchmarks/objective_table.py", str(tmp_path / "multirun"), "--out",
                            str(tmp_path / "objectives.json")], cwd=REPO, env=env, capture_output=True, text=True)
    assert table.returncode == 0, table.stderr[-3000:]
    rows = json.loads((tmp_path / "objectives.json").read_text())["rows"]
    assert {(r["form"], r["k"]) for r in rows} == {(form, k) for form in ("kl", "atspeed_s") for k in (5, 10)}
    assert all(r["seeds"] == [1, 2] and r["mode"] == "strict" and r["overlap"] == 1.0 for r in rows)
    assert "| atspeed_s | strict | 10 | 1,2 |" in table.stdout

    sweep = tmp_path / "multirun"  # written by atspeed_exp.sweep_summary.SweepSummary when the last job ended
    text = (sweep / "summary_table.md").read_text()
    assert table.stdout.strip() in text and "sweep summary" in result.stdout + result.stderr
    jobs = json.loads((sweep / "summary_table.json").read_text())["jobs"]
    assert len(jobs) == 4 and all(job["has_summary"] for job in jobs)
    for form in ("kl", "atspeed_s"):
        for seed in (1, 2):
            assert f"alignment={form} draft_training.seed={seed}" in text
    assert (sweep / "summary_plot.png").stat().st_size > 0


def test_draft_with_another_vocabulary_is_refused(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = compose_config(tiny_overrides(tmp_path))
    data = pipeline.load_data(cfg)
    draft = LlamaForCausalLM(LlamaConfig(vocab_size=len(data.tokenizer) + 7, hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2))
    with pytest.raises(ValueError, match=r"draft vocabulary \(\d+ ids\) does not match the target's tokenizer"):
        pipeline.check_vocabulary_match(tmp_path / "target", draft, data.tokenizer)


def test_config_slurm_launcher_composes(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["hydra/launcher=slurm", "+experiment=beauty_gpu_strict"],
                      return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher")
    assert cfg.hydra.launcher.gpus_per_node == 1


def test_config_slurm_launcher_runs_one_task_per_ddp_device(tmp_path):
    """trainer=ddp on GPU nodes: the SLURM job asks for trainer.devices tasks and GPUs on each of trainer.num_nodes
    nodes (each task one rank), as the launcher object built from the config receives them."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    def launcher_params(*overrides: str) -> dict:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose("config", overrides=["hydra/launcher=slurm", *overrides], return_hydra_config=True)
        return instantiate(cfg.hydra.launcher).params

    one = launcher_params()
    assert (one["tasks_per_node"], one["gpus_per_node"], one["nodes"]) == (1, 1, 1)
    ddp = launcher_params("trainer=ddp", "trainer.accelerator=gpu", "trainer.devices=4", "trainer.num_nodes=2")
    assert (ddp["tasks_per_node"], ddp["gpus_per_node"], ddp["nodes"]) == (4, 4, 2)
    cpu = launcher_params("trainer=ddp", "trainer.devices=3", "hydra.launcher.gpus_per_node=0")
    assert (cpu["tasks_per_node"], cpu["gpus_per_node"], cpu["nodes"]) == (3, 0, 1)


def test_teacher_stage_key_ignores_how_the_beams_are_made(tmp_path):
    # teacher.draft_dir (strict SD with an earlier draft) changes the speed, not the data: same stage dir
    base = compose_config(tiny_overrides(tmp_path))
    with_draft = compose_config(tiny_overrides(tmp_path) + [f"teacher.draft_dir={tmp_path / 'some_draft'}",
                                                            "teacher.draft_beams=20", "teacher.draft_gamma=2"])
    target_dir = tmp_path / "artifacts" / "target" / "synthetic-abc"
    assert pipeline.teacher_stage_dir(base, target_dir) == pipeline.teacher_stage_dir(with_draft, target_dir)
    other = compose_config(tiny_overrides(tmp_path) + ["teacher.num_beams=5"])
    assert pipeline.teacher_stage_dir(other, target_dir) != pipeline.teacher_stage_dir(base, target_dir)


def test_eval_backend_setting_is_checked(tmp_path):
    cfg = compose_config(tiny_overrides(tmp_path))
    assert pipeline.eval_backend(cfg) == "auto"
    cfg.eval.backend = "hf"
    assert pipeline.eval_backend(cfg) == "hf"
    cfg.eval.backend = "fast"
    with pytest.raises(ValueError, match=r"eval.backend='fast': expected one of \['auto', 'lean', 'hf'\]"):
        pipeline.eval_backend(cfg)
