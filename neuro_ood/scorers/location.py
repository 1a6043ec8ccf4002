"""A normative model per location: each feature at each voxel is Gaussian over the inlier images.

Where images are aligned (a common box, or registration to a template), the inliers give, at every
voxel, a mean and a spread of each per-voxel feature; a new image's standard score there says how
far from the norm it lies at that place (the voxel-wise z-map of normative modelling), or, with a
search radius, from the best-matching norm nearby (tolerance to residual misalignment). This is
the voxel-level counterpart of the auxiliary scorers: a scikit-learn estimator with ``fit`` and
``score_samples``, but on feature *maps* ``(N, F, *spatial)`` rather than vectors ``(N, L)``.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import torch
from sklearn.base import BaseEstimator
from sklearn.utils.validation import check_is_fitted

#: Feature values (float32) per slab of :meth:`LocationGaussian.mean_squares` (~1 MB: cache-sized)
_SLAB_VALUES = 1 << 18


class LocationGaussian(BaseEstimator):
    """Independent Gaussians per feature and location, fitted on inlier feature maps.

    Parameters
    ----------
    scale_floor : float
        Added to every standard deviation (feature units), so that locations where the inliers
        barely vary (background, a feature that is constant there) do not turn noise into huge
        standard scores.
    search_radius : int
        Voxels. A new image's voxel is compared with the inlier norm at every location within this
        (Euclidean) distance and the best match is kept (the least mean-square standard score), so
        that a residual misalignment of up to ``r`` voxels — unregistered heads of different size,
        an edge one voxel off — is not read as atypical. 0 compares like with like.

    Attributes
    ----------
    mean_, scale_ : ndarray of shape (F, *spatial), float32
        The inliers' mean and standard deviation (+ ``scale_floor``) of each feature at each voxel.
    n_samples_ : int
        Images fitted on.
    """

    def __init__(self, scale_floor: float = 0.02, search_radius: int = 0):
        self.scale_floor = scale_floor
        self.search_radius = search_radius

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

    def zscores(self, X) -> np.ndarray:
        """``X (N, F, *spatial)`` -> standard scores ``(X - mean_) / scale_`` at the same location,
        float32, same shape."""
        check_is_fitted(self, "mean_")
        X = np.asarray(X, dtype=np.float32)
        if X.shape[1:] != self.mean_.shape:
            raise ValueError(f"X maps {X.shape[1:]} differ from the fitted {self.mean_.shape}")
        return (X - self.mean_) / self.scale_

    def search_offsets(self) -> list[tuple[int, ...]]:
        """The voxel offsets within ``search_radius`` of a voxel (itself first)."""
        r, dims = int(self.search_radius), self.mean_.ndim - 1
        offsets = [o for o in itertools.product(range(-r, r + 1), repeat=dims) if sum(d * d for d in o) <= r * r]
        return sorted(offsets, key=lambda o: sum(d * d for d in o))

    @torch.inference_mode()
    def mean_squares(self, X, groups: list[list[int]] | None = None) -> np.ndarray:
        """Mean squared standard score over each group of features, at the best-matching location
        within ``search_radius``: ``(N, F, *spatial)`` -> ``(N, G, *spatial)`` float32, one map per
        group of feature indices (default: one group of all). Each group picks its own location."""
        check_is_fitted(self, "mean_")
        X = torch.as_tensor(np.asarray(X, dtype=np.float32))
        if tuple(X.shape[1:]) != self.mean_.shape:
            raise ValueError(f"X maps {tuple(X.shape[1:])} differ from the fitted {self.mean_.shape}")
        groups = [list(g) for g in groups] if groups else [list(range(X.shape[1]))]
        order = [f for g in groups for f in g]   # features in group order: each group a slice
        ends = np.cumsum([len(g) for g in groups])
        spans = list(zip(ends - np.array([len(g) for g in groups]), ends))
        r, spatial = int(self.search_radius), tuple(X.shape[2:])
        # the norm padded by r (edge values) so that each offset is a view, not a copy
        pad = [(0, 0)] + [(r, r)] * len(spatial)
        mean = torch.as_tensor(np.pad(self.mean_[order], pad, mode="edge"))
        inverse = torch.as_tensor(np.pad(1.0 / self.scale_[order], pad, mode="edge"))
        X = X[:, order]
        offsets = self.search_offsets()
        out = torch.empty((len(X), len(groups), *spatial))
        # slabs along the first spatial axis small enough to stay in cache while every offset is tried
        rows = max(1, _SLAB_VALUES // max(1, X[:, :, 0].numel()))
        for start in range(0, spatial[0], rows):
            stop = min(start + rows, spatial[0])
            x = X[:, :, start:stop]
            best = out[:, :, start:stop]
            z2, here = torch.empty_like(x), torch.empty_like(best)
            for k, offset in enumerate(offsets):
                window = (slice(None), slice(r + start + offset[0], r + stop + offset[0])) + tuple(
                    slice(r + d, r + d + n) for d, n in zip(offset[1:], spatial[1:]))
                torch.sub(x, mean[window], out=z2).mul_(inverse[window]).square_()
                for j, (first, last) in enumerate(spans):
                    torch.mean(z2[:, first:last], dim=1, out=here[:, j])
                if k == 0:
                    best.copy_(here)
                else:
                    torch.minimum(best, here, out=best)
        return out.numpy()

    def score_samples(self, X) -> np.ndarray:
        """Typicality per voxel: minus the root-mean-square standard score over the features (at
        the best-matching location within ``search_radius``), ``(N, F, *spatial)`` ->
        ``(N, *spatial)`` float32, HIGHER = MORE TYPICAL (0 at the mean)."""
        return -np.sqrt(self.mean_squares(X)[:, 0])

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
