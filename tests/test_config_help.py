"""`python run.py --help`: config groups with their options and every key with its `# (type) meaning` comment."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from atspeed_exp.config_help import CONF_DIR, yaml_keys

REPO = Path(__file__).resolve().parents[1]


def help_text(*overrides: str) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "run.py", *overrides, "--help"], cwd=REPO, env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_help_lists_groups_with_options_and_keys_with_meanings():
    text = help_text()
    assert "alignment: atspeed_r, atspeed_r_public, atspeed_s, atspeed_s_public, kl," in text
    assert "experiment: beauty_gpu_relaxed," in text and "logger: csv, wandb" in text
    line = next(line for line in text.splitlines() if line.strip().startswith("decoding.draft_beams="))
    assert line.split()[0] == "decoding.draft_beams=40" and line.endswith("(int) N >= K, the draft's beams")
    # a comment continued on the next line is one line; interpolations are shown as written
    assert "add sasrec for the SASRec and most-popular baselines" in text
    assert "run_name=${experiment_name}-${data.name}" in text and "logger.wandb_artifacts=false" in text
    assert "alignment (alignment=atspeed_s, conf/alignment/atspeed_s.yaml):" in text


@pytest.mark.slow  # run.py --help in a subprocess; the test above covers the listing
def test_help_shows_the_option_chosen_on_the_command_line():
    text = help_text("alignment=kl", "trainer=gpu")
    assert "alignment (alignment=kl, conf/alignment/kl.yaml):" in text
    assert "trainer.precision=bf16-mixed" in text


def test_yaml_keys_nested_keys_and_continued_comments(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("defaults:\n  - a: b\n# a header\ntop: 1  # (int) one\n#        and more\nnest:  # (dict) n\n"
                    "  inner: x  # (str) in\nafter: 2  # (int) two\n# not a continuation\n")
    assert yaml_keys(path, "g") == [("g.top", "1", "(int) one and more"), ("g.nest", "", "(dict) n"),
                                    ("g.nest.inner", "x", "(str) in"), ("g.after", "2", "(int) two")]


def test_every_option_key_carries_a_typed_comment():
    missing = [f"{path.relative_to(CONF_DIR)}: {name}" for path in sorted(CONF_DIR.rglob("*.yaml"))
               if not {"hydra", "experiment"} & set(path.relative_to(CONF_DIR).parts)
               for name, _, comment in yaml_keys(path) if not name.endswith("_target_") and not comment.startswith("(")]
    assert not missing, missing
