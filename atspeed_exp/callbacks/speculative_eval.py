"""A Lightning callback that measures what draft alignment is for: speculative beam search with the current draft
and the frozen target on a fixed sample of validation users, at validation end (every ``every_n_epochs``) and at
the end of training. It logs ``{prefix}/<mode>/k<K>/acceptance_rate``, ``target_calls_per_list``,
``draft_calls_per_list``, ``walltime_s``, ``speedup`` (against target-only beam search measured in the same call)
and Recall/NDCG (see ``atspeed_exp.evaluation.evaluate_speculative``, which is also the final test evaluation)."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl

from atspeed_exp.decoding.protocol import DecoderLM
from atspeed_exp.decoding.trie import ItemTrie
from atspeed_exp.evaluation import evaluate_speculative
from atspeed_exp.models.lean import decoder_for


class SpeculativeEvalCallback(pl.Callback):
    """``settings``: the keyword arguments of ``evaluate_speculative`` (modes, ks, draft_beams, gamma, cutoffs, seed,
    verify_beams, scope, prune, ...), passed through as they are; ``prefix`` defaults to ``draft_eval``. The draft
    runs through ``decoder_for(model, backend)``, rebuilt at each measurement (the lean forward reads the weights
    once, and they change between epochs)."""

    def __init__(
        self,
        target: DecoderLM,
        prompts: list[list[int]],
        ground_truth: list[tuple[int, ...]],
        trie: ItemTrie,
        every_n_epochs: int = 1,
        at_train_end: bool = True,
        backend: str = "auto",
        **settings: Any,
    ) -> None:
        super().__init__()
        self.target = target
        self.prompts = prompts
        self.ground_truth = ground_truth
        self.trie = trie
        self.settings = {"prefix": "draft_eval", **settings}
        self.every_n_epochs = every_n_epochs
        self.at_train_end = at_train_end
        self.backend = backend
        self.history: list[dict[str, float]] = []

    def state_dict(self) -> dict[str, Any]:
        # in checkpoints (as plain floats: they are read weights-only), so a resumed fit keeps earlier measurements
        return {"history": [{name: float(value) for name, value in metrics.items()} for metrics in self.history]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))

    def _measure(self, pl_module: pl.LightningModule) -> dict[str, float]:
        was_training = pl_module.training
        pl_module.eval()
        try:
            metrics = evaluate_speculative(self.target, decoder_for(pl_module.model, self.backend), self.prompts,
                                           self.ground_truth, self.trie, progress=False, **self.settings)
        finally:
            pl_module.train(was_training)
        self.history.append(metrics)
        return metrics

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or self.every_n_epochs <= 0:
            return
        if (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        pl_module.log_dict(self._measure(pl_module))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.at_train_end:
            return
        metrics = self._measure(pl_module)
        for logger in trainer.loggers:
            logger.log_metrics({f"{k}_final": v for k, v in metrics.items()}, step=trainer.global_step)
