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
    fitted scorers are saved beside the detector's other state (``scorers.*``). A subclass may fit
    the scorers on several column sets of the features (:meth:`feature_views`), each scorer named
    with its view's prefix (MSMA: ``gmm`` on its configured features, ``paper_gmm`` on the paper's)."""

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
        progress(stage, 0, len(x), float("nan"))   # the bar (and its clock) starts before the first chunk
        for start in range(0, len(x), chunk):
            rows.append(self.row_features(x[start:start + chunk]))
            progress(stage, min(start + chunk, len(x)), len(x), float("nan"))
        return np.concatenate(rows) if rows else self.row_features(x[:0])

    def feature_views(self, features: np.ndarray) -> dict[str, np.ndarray]:
        """``{prefix: (N, F')}``: the column sets of ``features (N, F)`` the scorers are fitted on;
        the scorers of view ``p`` are named ``p + <scorer>``. One view, all columns, by default."""
        return {"": features}

    def _view_of(self, scorer_name: str, prefixes) -> str:
        for prefix in sorted(prefixes, key=len, reverse=True):
            if scorer_name.startswith(prefix) and scorer_name[len(prefix):] in self.cfg.scorers:
                return prefix
        return ""

    def fit_scorers(self, features: np.ndarray, groups: Sequence[str] | None, progress: Progress | None) -> None:
        """Fit every configured scorer on each view of the inliers' ``features (N, F)``; ``groups (N,)``
        keeps a subject's rows in one CV fold of the GMM search."""
        progress = progress or _no_progress
        self.scorers = {}
        for prefix, view in self.feature_views(features).items():
            for name, params in self.cfg.scorers.items():
                label = prefix + name
                progress(f"fit {label}", 0, 1, float("nan"))
                self.scorers[label] = build_scorer(name, **params).fit(
                    view, groups=None if groups is None else np.asarray(groups))
                progress(f"fit {label}", 1, 1, float("nan"))

    def score_samples(self, x: np.ndarray) -> dict[str, np.ndarray]:
        views = self.feature_views(self.features(x))
        return {name: scorer.score_samples(views[self._view_of(name, views)]) for name, scorer in self.scorers.items()}

    def _save_extra(self, directory: Path) -> None:
        if self.scorers:
            save_scorers(directory, self.scorers)

    def _load_extra(self, directory: Path) -> None:
        self.scorers = load_scorers(directory)
