"""MSMA (Mahmood, Oliva & Styner, ICLR 2021): a noise-conditional score network, its L score norms
per image, and auxiliary scorers (GMM, MAF, k-NN) fitted on inlier norm vectors."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from neuro_ood.detectors.base import Progress, to_tensor
from neuro_ood.detectors.featured import FeatureScorerDetector
from neuro_ood.features import score_norms
from neuro_ood.trainer import sample_rows
from neuro_ood.trainer.steps import dsm_step_fn


class MSMADetector(FeatureScorerDetector):
    """Features: the ``(L,)`` score norms ‖σ_i s_θ(x, σ_i)‖₂; scores: the auxiliary scorers' on them
    (see :class:`~neuro_ood.detectors.featured.FeatureScorerDetector`). Maps: the per-voxel score
    norm ``sqrt(Σ_i ‖σ_i s_θ(x, σ_i)‖²)`` over channels."""

    method = "msma"
    localises = True

    @property
    def sigmas(self) -> torch.Tensor:
        """``(L,)`` noise levels, as stored in the network."""
        return self.network.sigmas.detach().cpu()

    def row_features(self, x: np.ndarray) -> np.ndarray:
        """``x (B, C, *spatial)`` -> ``(B, L)`` float64 score norms."""
        if not len(x):
            return np.zeros((0, len(self.sigmas)))
        return score_norms(self.scoring_network, x, self.sigmas, batch_size=max(1, self.cfg.training.feature_batch_size))

    def features(self, x: np.ndarray, progress: Progress | None = None, stage: str = "score norms") -> np.ndarray:
        return super().features(x, progress, stage)

    def fit(self, x, *, groups: Sequence[str] | None = None, outliers=None, checkpoint_dir=None, resume=True,
            progress: Progress | None = None) -> "MSMADetector":
        """Train the score network on ``x (N, C, *spatial)`` by DSM (Adam), then fit the scorers on
        the training norms; ``groups (N,)`` keeps a subject's rows in one CV fold of the GMM search."""
        t = self.cfg.training
        self._start_network(x.shape[1:], checkpoint_dir, resume)
        self._start_ema()
        optimizer = torch.optim.Adam(self.network.parameters(), lr=t.lr)
        step = dsm_step_fn(self.network, optimizer, self.sigmas, self._optimize())
        self._run_stage("train NCSN", step, sample_rows({"x": to_tensor(x)}, t.batch_size),
                        {"model": optimizer}, t.steps, checkpoint_dir, progress)
        self.fit_scorers(self.features(x, progress, "score norms (train)"), groups, progress)
        return self

    def maps(self, x: np.ndarray) -> np.ndarray:
        """``x (N, C, *spatial)`` -> ``(N, *spatial)`` float32, higher = more atypical."""
        _, per_level = score_norms(self.scoring_network, x, self.sigmas,
                                   batch_size=self.cfg.training.feature_batch_size, return_maps=True)
        return np.sqrt((per_level ** 2).sum(axis=1))
