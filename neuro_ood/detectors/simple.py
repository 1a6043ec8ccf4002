"""The simple baseline: hand-crafted intensity and morphometric features of each image (see
:mod:`neuro_ood.simple_features`) and the auxiliary scorers (GMM, MAF, k-NN) fitted on the inliers'
feature vectors. No network, no training loop: does the deep detector find more than this?"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from neuro_ood.detectors.base import Progress
from neuro_ood.detectors.featured import FeatureScorerDetector
from neuro_ood.simple_features import feature_names, simple_features
from neuro_ood.trainer import TrainState


class SimpleDetector(FeatureScorerDetector):
    """Features: the ``(F,)`` vector of :func:`~neuro_ood.simple_features.simple_features`; scores:
    the auxiliary scorers' on it (see :class:`~neuro_ood.detectors.featured.FeatureScorerDetector`).
    Does not localise. Its state is ``model.json`` (method, input shape, the caller's meta) and the
    fitted scorers; ``training`` settings other than ``feature_batch_size`` are unused."""

    method = "simple"
    has_network = False

    @property
    def feature_names(self) -> tuple[str, ...]:
        """Names of the feature-vector entries for the input shape the detector was fitted on."""
        return feature_names(self.input_shape[0], len(self.input_shape) - 1)

    def row_features(self, x: np.ndarray) -> np.ndarray:
        """``x (B, C, *spatial)`` -> ``(B, F)`` float64 features, named by :attr:`feature_names`."""
        if self.input_shape is not None and (x.shape[1], x.ndim - 2) != (self.input_shape[0], len(self.input_shape) - 1):
            raise ValueError(f"the simple detector was fitted on inputs {self.input_shape}, got {tuple(x.shape[1:])}")
        return simple_features(x)

    def features(self, x: np.ndarray, progress: Progress | None = None, stage: str = "simple features") -> np.ndarray:
        return super().features(x, progress, stage)

    def fit(self, x, *, groups: Sequence[str] | None = None, outliers=None, checkpoint_dir=None, resume=True,
            progress: Progress | None = None) -> "SimpleDetector":
        """Compute the features of the inliers ``x (N, C, *spatial)`` and fit each scorer of
        ``cfg.scorers`` on them; ``groups (N,)`` keeps a subject's rows in one CV fold of the GMM
        search. Nothing to resume: ``checkpoint_dir`` and ``resume`` are ignored."""
        self.input_shape = tuple(int(s) for s in x.shape[1:])
        self.train_state = TrainState()  # no training loop: step 0
        self.fit_scorers(self.features(x, progress, "simple features (train)"), groups, progress)
        return self
