"""k-nearest-neighbour scorer: minus the distance to the k-th nearest inlier."""

from __future__ import annotations

import numpy as np
from sklearn.neighbors import NearestNeighbors
from sklearn.preprocessing import StandardScaler

from neuro_ood.scorers.base import AuxiliaryScorer, scaler_from_state, scaler_state


class KNNScorer(AuxiliaryScorer):
    """Standardise, then score by ``-(distance to the k-th nearest training row)``.

    Parameters
    ----------
    n_neighbors : int
        k. A training row scored against its own training set counts itself as its
        first neighbour.

    Attributes
    ----------
    scaler_ : StandardScaler
    train_ : ndarray of shape (N, L)
        Standardised training rows.
    nn_ : NearestNeighbors
        KD-tree over ``train_``.
    """

    def __init__(self, n_neighbors: int = 5):
        self.n_neighbors = n_neighbors

    def fit(self, X, y=None, groups=None) -> "KNNScorer":
        """Index the standardised rows; ``y`` and ``groups`` are ignored."""
        X = self._check_X(X, reset=True)
        if not 1 <= self.n_neighbors <= X.shape[0]:
            raise ValueError(
                f"n_neighbors={self.n_neighbors} needs 1 <= n_neighbors <= n_samples={X.shape[0]}."
            )
        self.scaler_ = StandardScaler().fit(X)
        self._set_train(self.scaler_.transform(X))
        return self

    def _set_train(self, Z: np.ndarray) -> None:
        self.train_ = Z
        self.nn_ = NearestNeighbors(n_neighbors=self.n_neighbors, algorithm="kd_tree").fit(Z)

    def score_samples(self, X) -> np.ndarray:
        """Minus the Euclidean distance (standardised space) to the k-th nearest training row.

        Parameters
        ----------
        X : array-like of shape (N, L)

        Returns
        -------
        ndarray of shape (N,)
        """
        Z = self.scaler_.transform(self._check_X(X, reset=False))
        dist, _ = self.nn_.kneighbors(Z, n_neighbors=self.n_neighbors)
        return -dist[:, -1].astype(np.float64)

    def get_state(self):
        return {"train": self.train_, **scaler_state(self.scaler_)}, self._meta()

    @classmethod
    def from_state(cls, arrays, meta) -> "KNNScorer":
        scorer = cls(**meta["params"])
        scorer.n_features_in_ = int(meta["n_features_in"])
        scorer.scaler_ = scaler_from_state(arrays)
        scorer._set_train(np.array(arrays["train"], dtype=np.float64))
        return scorer
