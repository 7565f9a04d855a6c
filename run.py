"""Entry point: `python run.py [+experiment=NAME] [key=value ...]` (Hydra). Builds the pipeline from the config."""

import logging
import os
import signal
import sys

import hydra
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig

import atspeed_exp.project_paths  # noqa: F401  (registers ${project_root:...} before Hydra resolves conf/)
from atspeed_exp.config_help import register_help_resolver

os.environ.setdefault("WANDB_MODE", "offline")  # never try to reach W&B servers without being asked
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # models come from local directories only
register_help_resolver()  # `--help` lists every key with its meaning from the conf/ files


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    from atspeed_exp.log_setup import route_library_logs
    from atspeed_exp.pipeline import format_summary, run

    route_library_logs()
    # A target or draft training stopped by SIGTERM or SIGINT logs how to resume and exits with 128 + the signal's
    # number by itself (TrainingStopped, a SystemExit: atspeed_exp/callbacks/resume.py); SASRec stops as Lightning does.
    try:
        summary = run(cfg)
    except SIGTERMException:  # Lightning stops training on SIGTERM with a SystemExit whose status is 0
        logging.getLogger("run").error(
            "stopped by SIGTERM before the run finished; nothing unfinished is trusted later: rerun the same command "
            "to resume training from its last checkpoint (each stage's checkpoints/last.ckpt)")
        sys.exit(128 + signal.SIGTERM)
    print(format_summary(summary, tuple(n for n in cfg.eval.cutoffs if n <= cfg.eval.num_beams)))


if __name__ == "__main__":
    main()
