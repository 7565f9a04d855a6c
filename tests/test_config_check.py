"""The configuration is checked before any work: unknown keys (also ones added with +) and bad values fail at once,
each named with its full key and what is allowed."""

import pytest
from pipeline_helpers import CONF_DIR, compose_config, tiny_overrides

from atspeed_exp import pipeline
from atspeed_exp.config_check import ConfigError, check_config


@pytest.mark.parametrize("experiment", [None] + sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml")))
def test_check_config_accepts_every_shipped_experiment(experiment):
    check_config(compose_config([f"+experiment={experiment}"] if experiment else []), pipeline.STAGES)


@pytest.mark.parametrize("alignment", sorted(p.stem for p in (CONF_DIR / "alignment").glob("*.yaml")))
def test_check_config_accepts_every_alignment_form(alignment):
    check_config(compose_config([f"alignment={alignment}", "teacher.full_vocab_gt=true"]), pipeline.STAGES)


@pytest.mark.parametrize(("overrides", "messages"), [
    (["+decoding.beamsize=5"], ["decoding.beamsize: unknown key"]),
    (["+nonsense=1"], ["nonsense: unknown key"]),
    (["decoding.beam_size=0"], ["decoding.beam_size=0: expected an integer >= 1"]),
    (["alignment.alpha=1.5", "eval.dtype=float8"],
     ["alignment.alpha=1.5: expected a number in [0.0, 1.0]", "eval.dtype='float8': expected one of"]),
    (["alignment.objective=kd"], ["alignment.objective='kd': expected one of"]),
    (["decoding.modes=[strict,fast]"], ["decoding.modes=['strict', 'fast']: expected a list of one of"]),
    (["decoding.ks=[5,50]"], ["every K must be <= N"]),
    (["decoding.verify_beams=5"], ["decoding.verify_beams=5: expected max(decoding.ks)=20 <= M"]),
    (["decoding.gamma=0", "alignment.temperature=0"], ["decoding.gamma=0", "alignment.temperature=0"]),
    (["stages=[target,tesst]"], ["unknown ['tesst']"]),
    (["alignment=wordkd_public"], ["needs teacher.full_vocab_gt=true"]),
    (["alignment=atspeed_s", "alignment.full_vocab=true", "teacher.full_vocab_gt=true"], ["kl and tvd only"]),
    (["alignment=kl", "alignment.on_policy_ratio=0.5"], ["on-policy beams are for atspeed_s and atspeed_r"]),
    (["decoding.gamma=4"], ["decoding.gamma=4: expected 1 <= gamma <= L - 1 = 3"]),
    (["target_training.checkpoint_every_n_steps=0", "draft_training.checkpoint_every_n_steps=two"],
     ["target_training.checkpoint_every_n_steps=0: expected null or an integer >= 1",
      "draft_training.checkpoint_every_n_steps='two': expected null or an integer >= 1"]),
    (["target_training.val_metric=mrr"], ["target_training.val_metric='mrr': expected one of ['recall', 'ndcg']"]),
    (["decoding.drafter=layer_skip", "eval.backend=hf"],
     ["decoding.drafter=layer_skip with eval.backend='hf': skipping sublayers needs the lean forward"]),
    (["decoding.drafter=ngram"],
     ["decoding.drafter='ngram': expected one of ['model', 'retrieval', 'trigram', 'layer_skip']"]),
    (["decoding.layer_skip.search_mode=greedy", "decoding.layer_skip.skip_mlp=[1,-1]",
      "decoding.layer_skip.max_skipped=0"],
     ["decoding.layer_skip.search_mode='greedy': expected one of ['strict',",
      "decoding.layer_skip.skip_mlp=[1, -1]: expected a list of an integer >= 0",
      "decoding.layer_skip.max_skipped=0: expected null or an integer >= 1"]),
    (["decoding.modes=[strict,dare]", "decoding.dare_top_k=10"],
     ["decoding.dare_top_k=10: expected k >= max(decoding.ks)=20"]),
    (["decoding.dare_threshold=1.5", "decoding.retrieval.top_n=0", "decoding.retrieval.min_history=0"],
     ["decoding.dare_threshold=1.5: expected a number in [0.0, 1.0]",
      "decoding.retrieval.top_n=0: expected an integer >= 1", "decoding.retrieval.min_history=0: expected"]),
    (["+decoding.retrieval.group=4"], ["decoding.retrieval.group: unknown key"]),
    (["decoding.trigram.adapt=always", "decoding.trigram.tree=mcts", "decoding.trigram.update_weight=0",
      "decoding.trigram.value_decay=1.5", "decoding.trigram.smoothing=-1"],
     ["decoding.trigram.adapt='always': expected one of ['none', 'call', 'evaluation']",
      "decoding.trigram.tree='mcts': expected one of ['beam', 'puct']",
      "decoding.trigram.update_weight=0: expected a number in (0.0, inf]",
      "decoding.trigram.value_decay=1.5: expected a number in [0.0, 1.0]",
      "decoding.trigram.smoothing=-1: expected a number in [0.0, inf]"]),
    (["+decoding.trigram.c=2"], ["decoding.trigram.c: unknown key"]),
    (["decoding.processors=[ghost]", "decoding.ghost_threshold=0"],
     ["decoding.processors=['ghost']: expected a list of one of ['ghost_debias', 'cf_assistant']",
      "decoding.ghost_threshold=0: expected null or a number in (0.0, 1.0]"]),
    (["decoding.cf_weight=1.5", "decoding.cf_epsilon=1"],
     ["decoding.cf_weight=1.5: expected a number in [0.0, 1.0]",
      "decoding.cf_epsilon=1: expected a number in (0.0, 1.0)"]),
])
def test_check_config_names_every_problem(overrides, messages):
    with pytest.raises(ConfigError) as error:
        check_config(compose_config(overrides), pipeline.STAGES)
    for message in messages:
        assert message in str(error.value)


def test_check_config_accepts_the_retrieval_drafter_and_dare():
    check_config(compose_config(["decoding.drafter=retrieval", "decoding.modes=[strict,dare]",
                                 "decoding.dare_top_k=20", "decoding.dare_threshold=0.1"]), pipeline.STAGES)


def test_check_config_accepts_the_trigram_drafter_with_puct():
    check_config(compose_config(["decoding.drafter=trigram", "decoding.trigram.tree=puct",
                                 "decoding.trigram.adapt=call", "decoding.trigram.smoothing=0"]), pipeline.STAGES)


def test_check_config_accepts_the_layer_skip_drafter():
    check_config(compose_config(["decoding.drafter=layer_skip", "decoding.layer_skip.skip_attention=[0,2]",
                                 "decoding.layer_skip.skip_mlp=[1]"]), pipeline.STAGES)
    check_config(compose_config(["decoding.drafter=layer_skip", "decoding.layer_skip.search=true",
                                 "decoding.layer_skip.search_mode=dare", "decoding.layer_skip.max_skipped=3"]),
                 pipeline.STAGES)


def test_check_config_accepts_score_processors():
    check_config(compose_config(["decoding.processors=[ghost_debias]", "decoding.ghost_threshold=0.99"]),
                 pipeline.STAGES)
    check_config(compose_config(["decoding.processors=[ghost_debias,cf_assistant]", "decoding.cf_weight=0",
                                 "stages=[sasrec,target]"]), pipeline.STAGES)


def test_check_config_allows_arguments_of_a_groups_target():
    check_config(compose_config(["+trainer.limit_val_batches=2"]), pipeline.STAGES)  # a Trainer argument
    with pytest.raises(ConfigError, match="trainer.limit_val_batchez"):
        check_config(compose_config(["+trainer.limit_val_batchez=2"]), pipeline.STAGES)


def test_pipeline_refuses_a_bad_config_before_any_work(tmp_path):
    cfg = compose_config(tiny_overrides(tmp_path) + ["decoding.beam_size=0"])
    with pytest.raises(ConfigError, match="decoding.beam_size"):
        pipeline.run(cfg)
    assert not (tmp_path / "artifacts").exists() and not (tmp_path / "data").exists()


def test_pipeline_names_data_root_and_the_missing_files_before_any_work(tmp_path):
    (tmp_path / "beauty").mkdir()
    (tmp_path / "beauty" / "training_dict.npy").write_bytes(b"")
    overrides = [o for o in tiny_overrides(tmp_path) if not o.startswith("data.synthetic")]
    cfg = compose_config(overrides + ["data=beauty", f"data.root={tmp_path / 'beauty'}"])
    with pytest.raises(FileNotFoundError) as error:
        pipeline.run(cfg)
    message = str(error.value)
    assert "data.root=" in message and "validation_dict.npy" in message and "beauty.LCRec-1e-3lr.json" in message
    assert "training_dict.npy," not in message.split("lacks")[1].split(";")[0]  # present files are not listed
    assert "Linxyhaha/AtSpeed" in message
    assert not (tmp_path / "artifacts").exists()


def test_check_config_accepts_the_ddp_trainer_and_builds_its_strategy(tmp_path):
    from hydra.utils import instantiate
    from lightning.pytorch.strategies import DDPStrategy

    cfg = compose_config(["trainer=ddp", "trainer.devices=2"])
    check_config(cfg, pipeline.STAGES)
    trainer = instantiate(cfg.trainer, logger=False, default_root_dir=str(tmp_path))
    assert isinstance(trainer.strategy, DDPStrategy) and trainer.world_size == 2
    assert pipeline.trainer_key(cfg) != pipeline.trainer_key(compose_config([]))  # its own stage dirs


def test_cf_assistant_needs_the_sasrec_stage_built_or_in_stages_before_any_work(tmp_path):
    """Without sasrec in stages the run is refused before any work unless a sasrec stage of these settings is
    already built; the processor's cache key follows SASRec's weights, not only its stage's name."""
    from pipeline_helpers import tiny_overrides

    from atspeed_exp.baselines import sasrec_stage_dir

    cfg = compose_config(tiny_overrides(tmp_path) + ["decoding.processors=[cf_assistant]"])
    with pytest.raises(ConfigError, match=r"cf_assistant needs SASRec's item probabilities .* add sasrec to stages"):
        pipeline.run(cfg)
    assert not (tmp_path / "artifacts").exists() and not (tmp_path / "data").exists()
    pipeline.check_processor_inputs(compose_config(tiny_overrides(tmp_path) + [
        "decoding.processors=[cf_assistant]", "stages=[sasrec,target,eval]"]))  # it builds the stage first
    stage_dir = sasrec_stage_dir(cfg)
    stage_dir.mkdir(parents=True)
    (stage_dir / "model.pt").write_bytes(b"weights one")
    (stage_dir / "stage.json").write_text("{}")
    pipeline.check_processor_inputs(cfg)  # built: accepted
    before = pipeline.processor_settings(cfg)
    (stage_dir / "model.pt").write_bytes(b"weights two")
    assert pipeline.processor_settings(cfg) != before
