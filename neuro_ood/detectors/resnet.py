"""The ResNet classifier baseline (Hendrycks & Gimpel 2017 as used by MSMA 5.4 and A.2; the
discriminative detector of Schirrmeister et al. S9): a MONAI ResNet trained on inliers (class 0)
against one outlier group (class 1)."""

from __future__ import annotations

import numpy as np
import torch

from neuro_ood.detectors.base import Detector, Progress, to_tensor
from neuro_ood.features import classifier_scores, score_rule
from neuro_ood.trainer import sample_rows
from neuro_ood.trainer.steps import classifier_step_fn


class ResNetDetector(Detector):
    """Scores ``msp`` (maximum softmax probability), ``outlier_logit`` (−p(outlier | x)) and
    ``p_in`` (p(inlier | x), S9). :meth:`group_view` applies MSMA A.2's rule: one ``resnet`` score,
    the outlier output for the group seen in training (``resnet.outlier_group``), else the MSP."""

    method = "resnet"
    needs_outliers = True

    @property
    def seen_groups(self) -> tuple[str, ...]:
        return (self.cfg.resnet.outlier_group,)

    def fit(self, x, *, groups=None, outliers: np.ndarray | None = None, checkpoint_dir=None, resume=True,
            progress: Progress | None = None) -> "ResNetDetector":
        """Cross-entropy (Adam) on inliers ``x`` against ``outliers``, class-balanced batches."""
        if outliers is None or not len(outliers):
            raise ValueError("the ResNet baseline needs outlier images to train on")
        t = self.cfg.training
        self._start_network(x.shape[1:], checkpoint_dir, resume)
        self._start_ema()
        images = to_tensor(np.concatenate([x, outliers]))
        labels = torch.cat([torch.zeros(len(x), dtype=torch.long), torch.ones(len(outliers), dtype=torch.long)])
        optimizer = torch.optim.Adam(self.network.parameters(), lr=t.lr)
        step = classifier_step_fn(self.network, optimizer, self._optimize())
        self._run_stage("train ResNet classifier", step, sample_rows({"x": images, "y": labels}, t.batch_size,
                                                                     labels=labels),
                        {"model": optimizer}, t.steps, checkpoint_dir, progress)
        return self

    def score_samples(self, x: np.ndarray) -> dict[str, np.ndarray]:
        scores = classifier_scores(self.scoring_network, to_tensor(x), self.cfg.training.feature_batch_size)
        return {key: scores[key] for key in ("msp", "outlier_logit", "p_in")}

    def group_view(self, scores: dict[str, np.ndarray], group: str | None) -> dict[str, np.ndarray]:
        return {"resnet": scores[score_rule(group in self.seen_groups)]}
