"""MSMA (Mahmood, Oliva & Styner, ICLR 2021): a noise-conditional score network, its L score norms
per image, and auxiliary scorers (GMM, MAF, k-NN) fitted on inlier norm vectors."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from neuro_ood.detectors.base import Detector, Progress, _no_progress, to_tensor
from neuro_ood.features import score_norms
from neuro_ood.scorers import AuxiliaryScorer, build_scorer, load_scorers, save_scorers
from neuro_ood.trainer import sample_rows
from neuro_ood.trainer.steps import dsm_step_fn


class MSMADetector(Detector):
    """Scores: one per configured auxiliary scorer (``gmm``, ``maf``, ``knn``), each a log-density
    or a negative distance of the ``(L,)`` score-norm vector. Maps: the per-voxel score norm
    ``sqrt(Σ_i ‖σ_i s_θ(x, σ_i)‖²)`` over channels."""

    method = "msma"
    localises = True

    def __init__(self, cfg, device=None):
        super().__init__(cfg, device)
        self.scorers: dict[str, AuxiliaryScorer] = {}

    @property
    def sigmas(self) -> torch.Tensor:
        """``(L,)`` noise levels, as stored in the network."""
        return self.network.sigmas.detach().cpu()

    def features(self, x: np.ndarray, progress: Progress | None = None, stage: str = "score norms") -> np.ndarray:
        """``x (N, C, *spatial)`` -> ``(N, L)`` float64 score norms ‖σ_i s_θ(x, σ_i)‖₂."""
        progress = progress or _no_progress
        chunk = max(1, self.cfg.training.feature_batch_size)
        rows = []
        for start in range(0, len(x), chunk):
            rows.append(score_norms(self.scoring_network, x[start:start + chunk], self.sigmas, batch_size=chunk))
            progress(stage, min(start + chunk, len(x)), len(x), float("nan"))
        return np.concatenate(rows) if rows else np.zeros((0, len(self.sigmas)))

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
        features = self.features(x, progress, "score norms (train)")
        progress = progress or _no_progress
        for name, params in self.cfg.scorers.items():
            progress(f"fit {name}", 0, 1, float("nan"))
            self.scorers[name] = build_scorer(name, **params).fit(
                features, groups=None if groups is None else np.asarray(groups))
            progress(f"fit {name}", 1, 1, float("nan"))
        return self

    def score_samples(self, x: np.ndarray) -> dict[str, np.ndarray]:
        features = self.features(x)
        return {name: scorer.score_samples(features) for name, scorer in self.scorers.items()}

    def maps(self, x: np.ndarray) -> np.ndarray:
        """``x (N, C, *spatial)`` -> ``(N, *spatial)`` float32, higher = more atypical."""
        _, per_level = score_norms(self.scoring_network, x, self.sigmas,
                                   batch_size=self.cfg.training.feature_batch_size, return_maps=True)
        return np.sqrt((per_level ** 2).sum(axis=1))

    def _save_extra(self, directory: Path) -> None:
        if self.scorers:
            save_scorers(directory, self.scorers)

    def _load_extra(self, directory: Path) -> None:
        self.scorers = load_scorers(directory)
