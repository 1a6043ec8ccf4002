"""Detectors that turn each image into a feature vector and score it with the auxiliary scorers:
MSMA (score norms) and the simple baseline (intensity and size features)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from neuro_ood.detectors.base import Detector, Progress, _no_progress
from neuro_ood.scorers import AuxiliaryScorer, build_scorer, load_scorers, save_scorers


class FeatureScorerDetector(Detector):
    """Scores: one per configured auxiliary scorer (``cfg.scorers``: ``gmm``, ``maf``, ``knn``),
    each a log-density or a negative distance of the row's feature vector (higher = more typical).
    Subclasses give :meth:`row_features` and call :meth:`fit_scorers` at the end of ``fit``; the
    fitted scorers are saved beside the detector's other state (``scorers.*``)."""

    def __init__(self, cfg, device=None):
        super().__init__(cfg, device)
        self.scorers: dict[str, AuxiliaryScorer] = {}

    def row_features(self, x: np.ndarray) -> np.ndarray:
        """``x (B, C, *spatial)`` -> ``(B, F)`` float64 feature vectors."""
        raise NotImplementedError

    def features(self, x: np.ndarray, progress: Progress | None = None, stage: str = "features") -> np.ndarray:
        """:meth:`row_features` of ``x (N, C, *spatial)`` in chunks of ``training.feature_batch_size``."""
        progress = progress or _no_progress
        chunk = max(1, self.cfg.training.feature_batch_size)
        rows = []
        for start in range(0, len(x), chunk):
            rows.append(self.row_features(x[start:start + chunk]))
            progress(stage, min(start + chunk, len(x)), len(x), float("nan"))
        return np.concatenate(rows) if rows else self.row_features(x[:0])

    def fit_scorers(self, features: np.ndarray, groups: Sequence[str] | None, progress: Progress | None) -> None:
        """Fit every configured scorer on the inliers' ``features (N, F)``; ``groups (N,)`` keeps a
        subject's rows in one CV fold of the GMM search."""
        progress = progress or _no_progress
        self.scorers = {}
        for name, params in self.cfg.scorers.items():
            progress(f"fit {name}", 0, 1, float("nan"))
            self.scorers[name] = build_scorer(name, **params).fit(
                features, groups=None if groups is None else np.asarray(groups))
            progress(f"fit {name}", 1, 1, float("nan"))

    def score_samples(self, x: np.ndarray) -> dict[str, np.ndarray]:
        features = self.features(x)
        return {name: scorer.score_samples(features) for name, scorer in self.scorers.items()}

    def _save_extra(self, directory: Path) -> None:
        if self.scorers:
            save_scorers(directory, self.scorers)

    def _load_extra(self, directory: Path) -> None:
        self.scorers = load_scorers(directory)
