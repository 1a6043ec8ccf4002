"""The contract every auxiliary scorer follows.

An auxiliary scorer is fitted on the score-norm vectors of inlier images and then says how
typical a new vector is. It is a scikit-learn estimator:

* the constructor only stores its parameters (so :func:`sklearn.base.clone` works);
* ``fit(X, y=None, groups=None)`` learns from ``X`` of shape ``(N, L)`` and returns ``self``;
  ``groups`` (optional, shape ``(N,)``) names the subject of each row, for scorers whose fit
  cross-validates (rows of one subject must not straddle folds); the others ignore it;
* everything learned ends in ``_``;
* ``score_samples(X)`` returns shape ``(N,)``, one float per row, HIGHER = MORE TYPICAL
  (more inlier-like).

Persistence is pickle-free: :meth:`AuxiliaryScorer.get_state` gives named numpy arrays plus
JSON-able metadata (constructor parameters included) and :meth:`AuxiliaryScorer.from_state`
rebuilds a fitted scorer from them.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.preprocessing import StandardScaler
from sklearn.utils import check_array
from sklearn.utils.validation import check_is_fitted


class AuxiliaryScorer(BaseEstimator):
    """Base class of the scorers fitted on inlier score-norm vectors.

    Subclasses implement :meth:`fit`, :meth:`score_samples`, :meth:`get_state` and
    :meth:`from_state`.
    """

    def fit(self, X, y=None, groups=None) -> "AuxiliaryScorer":
        """Learn from inlier vectors.

        Parameters
        ----------
        X : array-like of shape (N, L)
            Inlier score-norm vectors.
        y : ignored
        groups : array-like of shape (N,), optional
            The group (subject / scan) of each row. MSMA fits on per-slice vectors, several
            per scan; a scorer that cross-validates internally (:class:`GMMScorer`) keeps all
            rows of a group in the same fold, so that near-duplicate slices of one scan never
            sit on both sides of a split. Scorers that do not cross-validate accept and ignore
            it, so every scorer can be fitted the same way.

        Returns
        -------
        self
        """
        raise NotImplementedError

    def score_samples(self, X) -> np.ndarray:
        """Typicality of each row.

        Parameters
        ----------
        X : array-like of shape (N, L)

        Returns
        -------
        scores : ndarray of shape (N,), float64
            Higher means more inlier-like.
        """
        raise NotImplementedError

    def get_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Learned state as named arrays plus JSON-able metadata (with ``"params"``)."""
        raise NotImplementedError

    @classmethod
    def from_state(cls, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> "AuxiliaryScorer":
        """Rebuild a fitted scorer from the output of :meth:`get_state`."""
        raise NotImplementedError

    def _check_X(self, X, *, reset: bool) -> np.ndarray:
        """Validate ``X`` as a finite float64 (N, L) array; ``reset`` records L at fit time."""
        X = check_array(X, dtype=np.float64, ensure_2d=True)
        if reset:
            self.n_features_in_ = X.shape[1]
        else:
            check_is_fitted(self)
            if X.shape[1] != self.n_features_in_:
                raise ValueError(
                    f"X has {X.shape[1]} features, but {type(self).__name__} was fitted "
                    f"with {self.n_features_in_}."
                )
        return X

    def _meta(self, **extra: Any) -> dict[str, Any]:
        """Metadata common to all scorers: constructor parameters and L."""
        return {"params": _jsonable(self.get_params()), "n_features_in": int(self.n_features_in_),
                **extra}


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, np.ndarray)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def scaler_state(scaler: StandardScaler, prefix: str = "scaler/") -> dict[str, np.ndarray]:
    """Arrays of a fitted :class:`StandardScaler` (``mean``, ``scale``, ``var``, each (L,))."""
    return {f"{prefix}mean": np.asarray(scaler.mean_, dtype=np.float64),
            f"{prefix}scale": np.asarray(scaler.scale_, dtype=np.float64),
            f"{prefix}var": np.asarray(scaler.var_, dtype=np.float64),
            f"{prefix}n_samples_seen": np.atleast_1d(np.asarray(scaler.n_samples_seen_,
                                                                dtype=np.float64))}


def scaler_from_state(arrays: dict[str, np.ndarray], prefix: str = "scaler/") -> StandardScaler:
    """Inverse of :func:`scaler_state`."""
    scaler = StandardScaler()
    scaler.mean_ = np.array(arrays[f"{prefix}mean"], dtype=np.float64)
    scaler.scale_ = np.array(arrays[f"{prefix}scale"], dtype=np.float64)
    scaler.var_ = np.array(arrays[f"{prefix}var"], dtype=np.float64)
    scaler.n_samples_seen_ = int(arrays[f"{prefix}n_samples_seen"][0])
    scaler.n_features_in_ = scaler.mean_.shape[0]
    return scaler
