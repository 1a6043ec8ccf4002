"""The simple baseline: hand-crafted intensity and morphometric features of each image (see
:mod:`neuro_ood.simple_features`) and the auxiliary scorers (GMM, MAF, k-NN) fitted on the inliers'
feature vectors. No network, no training loop: does the deep detector find more than this?"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from neuro_ood.detectors.base import Detector, Progress, _no_progress
from neuro_ood.scorers import AuxiliaryScorer, build_scorer, load_scorers, save_scorers
from neuro_ood.simple_features import feature_names, simple_features
from neuro_ood.trainer import TrainState


class SimpleDetector(Detector):
    """Scores: one per configured auxiliary scorer (``gmm``, ``knn``, ``maf``), each a log-density or
    a negative distance of the ``(F,)`` feature vector of :func:`~neuro_ood.simple_features.simple_features`
    (higher = more typical). Does not localise. Its state is ``model.json`` (method, input shape,
    the caller's meta) and the fitted scorers; ``training`` settings other than ``feature_batch_size``
    are unused."""

    method = "simple"
    has_network = False

    def __init__(self, cfg, device=None):
        super().__init__(cfg, device)
        self.scorers: dict[str, AuxiliaryScorer] = {}

    @property
    def feature_names(self) -> tuple[str, ...]:
        """Names of the feature-vector entries for the input shape the detector was fitted on."""
        return feature_names(self.input_shape[0], len(self.input_shape) - 1)

    def features(self, x: np.ndarray, progress: Progress | None = None, stage: str = "simple features") -> np.ndarray:
        """``x (N, C, *spatial)`` -> ``(N, F)`` float64 features, named by :attr:`feature_names`."""
        if self.input_shape is not None and (x.shape[1], x.ndim - 2) != (self.input_shape[0], len(self.input_shape) - 1):
            raise ValueError(f"the simple detector was fitted on inputs {self.input_shape}, got {tuple(x.shape[1:])}")
        progress = progress or _no_progress
        chunk = max(1, self.cfg.training.feature_batch_size)
        rows = []
        for start in range(0, len(x), chunk):
            rows.append(simple_features(x[start:start + chunk]))
            progress(stage, min(start + chunk, len(x)), len(x), float("nan"))
        return np.concatenate(rows) if rows else simple_features(x)

    def fit(self, x, *, groups: Sequence[str] | None = None, outliers=None, checkpoint_dir=None, resume=True,
            progress: Progress | None = None) -> "SimpleDetector":
        """Compute the features of the inliers ``x (N, C, *spatial)`` and fit each scorer of
        ``cfg.scorers`` on them; ``groups (N,)`` keeps a subject's rows in one CV fold of the GMM
        search. Nothing to resume: ``checkpoint_dir`` and ``resume`` are ignored."""
        self.input_shape = tuple(int(s) for s in x.shape[1:])
        self.train_state = TrainState()  # no training loop: step 0
        features = self.features(x, progress, "simple features (train)")
        progress = progress or _no_progress
        self.scorers = {}
        for name, params in self.cfg.scorers.items():
            progress(f"fit {name}", 0, 1, float("nan"))
            self.scorers[name] = build_scorer(name, **params).fit(
                features, groups=None if groups is None else np.asarray(groups))
            progress(f"fit {name}", 1, 1, float("nan"))
        return self

    def score_samples(self, x: np.ndarray) -> dict[str, np.ndarray]:
        features = self.features(x)
        return {name: scorer.score_samples(features) for name, scorer in self.scorers.items()}

    def _save_extra(self, directory: Path) -> None:
        if self.scorers:
            save_scorers(directory, self.scorers)

    def _load_extra(self, directory: Path) -> None:
        self.scorers = load_scorers(directory)
