"""Training: one loop (:mod:`~neuro_ood.trainer.loop`) and a step function per method
(:mod:`~neuro_ood.trainer.steps`)."""

from neuro_ood.trainer import distributed
from neuro_ood.trainer.loop import (StepResult, TrainState, ema_model, merge_samplers, optimization_manager,
                                    sample_rows, train_loop)

__all__ = ["StepResult", "distributed", "TrainState", "ema_model", "merge_samplers", "optimization_manager", "sample_rows", "train_loop"]
