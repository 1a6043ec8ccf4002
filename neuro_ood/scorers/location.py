"""A normative model per location: each feature at each voxel is Gaussian over the inlier images.

Where images are aligned (a common box, or registration to a template), the inliers give, at every
voxel, a mean and a spread of each per-voxel feature; a new image's standard score there says how
far from the norm it lies at that place (the voxel-wise z-map of normative modelling). This is
the voxel-level counterpart of the auxiliary scorers: a scikit-learn estimator with ``fit`` and
``score_samples``, but on feature *maps* ``(N, F, *spatial)`` rather than vectors ``(N, L)``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.utils.validation import check_is_fitted


class LocationGaussian(BaseEstimator):
    """Independent Gaussians per feature and location, fitted on inlier feature maps.

    Parameters
    ----------
    scale_floor : float
        Added to every standard deviation (feature units), so that locations where the inliers
        barely vary (background, a feature that is constant there) do not turn noise into huge
        standard scores.

    Attributes
    ----------
    mean_, scale_ : ndarray of shape (F, *spatial), float32
        The inliers' mean and standard deviation (+ ``scale_floor``) of each feature at each voxel.
    n_samples_ : int
        Images fitted on.
    """

    def __init__(self, scale_floor: float = 0.02):
        self.scale_floor = scale_floor

    def partial_fit(self, X, y=None) -> "LocationGaussian":
        """Add inlier feature maps ``X (N, F, *spatial)`` to the running sums (float64)."""
        X = np.asarray(X, dtype=np.float64)
        if X.ndim < 3:
            raise ValueError(f"X must be (N, F, *spatial), got shape {X.shape}")
        if not hasattr(self, "_sums"):
            self._sums = [0, np.zeros(X.shape[1:]), np.zeros(X.shape[1:])]
        elif X.shape[1:] != self._sums[1].shape:
            raise ValueError(f"X maps {X.shape[1:]} differ from the fitted {self._sums[1].shape}")
        self._sums[0] += len(X)
        self._sums[1] += X.sum(axis=0)
        self._sums[2] += np.square(X).sum(axis=0)
        n, total, squares = self._sums
        mean = total / n
        self.mean_ = mean.astype(np.float32)
        self.scale_ = (np.sqrt(np.maximum(squares / n - mean ** 2, 0.0)) + self.scale_floor).astype(np.float32)
        self.n_samples_ = int(n)
        return self

    def fit(self, X, y=None) -> "LocationGaussian":
        """Fit on inlier feature maps ``X (N, F, *spatial)``; returns self."""
        if hasattr(self, "_sums"):
            del self._sums
        return self.partial_fit(X)

    def zscores(self, X, features=None) -> np.ndarray:
        """``X (N, F, *spatial)`` -> standard scores ``(X - mean_) / scale_``, float32, same shape.
        ``features``: indices of the fitted features that X's F maps are (default: all, in order)."""
        check_is_fitted(self, "mean_")
        X = np.asarray(X, dtype=np.float32)
        mean, scale = (self.mean_, self.scale_) if features is None else (self.mean_[features], self.scale_[features])
        if X.shape[1:] != mean.shape:
            raise ValueError(f"X maps {X.shape[1:]} differ from the fitted {mean.shape}")
        return (X - mean) / scale

    def score_samples(self, X, features=None) -> np.ndarray:
        """Typicality per voxel: minus the root-mean-square standard score over the features,
        ``(N, F, *spatial)`` -> ``(N, *spatial)`` float32, HIGHER = MORE TYPICAL (0 at the mean);
        ``features`` as in :meth:`zscores`."""
        return -np.sqrt(np.square(self.zscores(X, features)).mean(axis=1))

    def get_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Learned state as named arrays plus JSON-able metadata (with ``"params"``)."""
        check_is_fitted(self, "mean_")
        return {"mean_": self.mean_, "scale_": self.scale_}, {"params": self.get_params(),
                                                              "n_samples_": self.n_samples_}

    @classmethod
    def from_state(cls, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> "LocationGaussian":
        """Rebuild a fitted model from :meth:`get_state`'s output."""
        model = cls(**meta["params"])
        model.mean_ = np.asarray(arrays["mean_"], dtype=np.float32)
        model.scale_ = np.asarray(arrays["scale_"], dtype=np.float32)
        model.n_samples_ = int(meta["n_samples_"])
        return model
