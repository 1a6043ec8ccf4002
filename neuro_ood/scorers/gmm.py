"""Gaussian-mixture scorer with the number of components chosen by cross-validated likelihood."""

from __future__ import annotations

from contextlib import nullcontext

import numpy as np
from sklearn.mixture import GaussianMixture
from sklearn.model_selection import GridSearchCV, GroupKFold, KFold
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from neuro_ood.scorers.base import AuxiliaryScorer, scaler_from_state, scaler_state

_GMM_ARRAYS = ("weights_", "means_", "covariances_", "precisions_cholesky_", "precisions_")


class GMMScorer(AuxiliaryScorer):
    """Standardise, pick the component count by K-fold CV of the mean log-likelihood, refit.

    Parameters
    ----------
    n_components : int or sequence of int
        Candidate component counts. Candidates larger than the smallest CV training fold (the
        actual folds, so also with uneven group folds) are dropped; if none is left, the
        smallest training fold size is used. Needs >= 3 rows.
    cv : int
        Number of folds. Without ``groups``: shuffled ``KFold`` with ``min(cv, n_samples)``
        folds. With ``groups`` (see :meth:`fit`): ``GroupKFold`` over shuffled groups with
        ``min(cv, n_groups)`` folds, so all rows of a group land in the same fold.
    covariance_type : {"full", "tied", "diag", "spherical"}
    n_jobs : int or None
        Passed to ``GridSearchCV``. Unless it is 1, BLAS runs single-threaded during the
        search (tiny matrices: thread start-up costs more than it saves).
    random_state : int
        Seeds the fold split and every mixture.
    reg_covar : float

    Attributes
    ----------
    scaler_ : StandardScaler
    gmm_ : GaussianMixture
        Refitted on all data with ``n_components_`` components.
    n_components_ : int
    cv_results_ : dict
        ``{"n_components": [...], "mean_test_score": [...], "std_test_score": [...],
        "splitter": "KFold" | "GroupKFold", "n_splits": int}`` (saved with the scorer; states
        saved before the group-aware search lack the last two keys).
    cv_splitter_ : KFold or GroupKFold
        The splitter of the search; ``split(X, groups=groups)`` gives the folds that were used
        (on scikit-learn < 1.6, whose ``GroupKFold`` cannot shuffle, the groups were relabelled
        at random first, so the folds differ). Set by :meth:`fit` only, not by :meth:`from_state`.
    """

    def __init__(self, n_components=(2, 4, 6, 8, 10, 12, 14, 16, 18, 20), cv: int = 10,
                 covariance_type: str = "full", n_jobs=None, random_state=0,
                 reg_covar: float = 1e-6):
        self.n_components = n_components
        self.cv = cv
        self.covariance_type = covariance_type
        self.n_jobs = n_jobs
        self.random_state = random_state
        self.reg_covar = reg_covar

    def _mixture(self, n_components: int = 1) -> GaussianMixture:
        return GaussianMixture(n_components=n_components, covariance_type=self.covariance_type,
                               reg_covar=self.reg_covar, random_state=self.random_state)

    def fit(self, X, y=None, groups=None) -> "GMMScorer":
        """Standardise ``X``, search the component count by CV, refit on all rows.

        Parameters
        ----------
        X : array-like of shape (N, L)
        y : ignored
        groups : array-like of shape (N,), optional
            Group (subject) of each row. Given, the CV folds never split a group between
            training and test rows (``GroupKFold``); needs >= 2 distinct groups and training
            folds of >= 2 rows.

        Returns
        -------
        self
        """
        X = self._check_X(X, reset=True)
        n = X.shape[0]
        if n < 3:
            raise ValueError(f"GMMScorer needs at least 3 samples (training folds of >= 2), got {n}.")
        candidates = sorted({int(k) for k in np.atleast_1d(self.n_components)})
        if not candidates or candidates[0] < 1:
            raise ValueError(f"n_components must be positive integers, got {self.n_components!r}.")
        self.cv_splitter_, groups = self._splitter(n, groups)
        folds = list(self.cv_splitter_.split(X, groups=groups))
        min_train = min(len(train) for train, _ in folds)
        if min_train < 2:
            raise ValueError(f"GMMScorer needs training folds of >= 2 rows; the smallest of the "
                             f"{len(folds)} group folds has {min_train} (too few groups or one "
                             "group holding nearly all rows).")
        candidates = [k for k in candidates if k <= min_train] or [min(candidates[0], min_train)]

        self.scaler_ = StandardScaler().fit(X)
        Z = self.scaler_.transform(X)
        search = GridSearchCV(
            self._mixture(), {"n_components": candidates},
            cv=folds,
            n_jobs=self.n_jobs, refit=True,
        )
        with threadpool_limits(1) if self.n_jobs != 1 else nullcontext():
            search.fit(Z)
        self.gmm_ = search.best_estimator_
        self.n_components_ = int(self.gmm_.n_components)
        self.cv_results_ = {
            "n_components": [int(k) for k in search.cv_results_["param_n_components"]],
            "mean_test_score": [float(s) for s in search.cv_results_["mean_test_score"]],
            "std_test_score": [float(s) for s in search.cv_results_["std_test_score"]],
            "splitter": type(self.cv_splitter_).__name__,
            "n_splits": len(folds),
        }
        return self

    def _splitter(self, n: int, groups):
        """The CV splitter and the groups to split with (``None`` without groups)."""
        if groups is None:
            return KFold(min(int(self.cv), n), shuffle=True, random_state=self.random_state), None
        groups = np.asarray(groups)
        if groups.ndim != 1 or groups.shape[0] != n:
            raise ValueError(f"groups must have shape ({n},) (one group per row of X), "
                             f"got {groups.shape}.")
        labels, codes = np.unique(groups, return_inverse=True)
        if len(labels) < 2:
            raise ValueError(f"GMMScorer needs at least 2 distinct groups to cross-validate, "
                             f"got {len(labels)}.")
        n_splits = min(int(self.cv), len(labels))
        try:  # scikit-learn >= 1.6 shuffles the groups itself
            return GroupKFold(n_splits, shuffle=True, random_state=self.random_state), codes
        except TypeError:  # older: shuffle by relabelling the groups at random
            order = np.random.default_rng(self.random_state).permutation(len(labels))
            return GroupKFold(n_splits), order[codes]

    def score_samples(self, X) -> np.ndarray:
        """Log density of the standardised rows under the mixture.

        Parameters
        ----------
        X : array-like of shape (N, L)

        Returns
        -------
        ndarray of shape (N,)
        """
        Z = self.scaler_.transform(self._check_X(X, reset=False))
        return self.gmm_.score_samples(Z).astype(np.float64)

    def get_state(self):
        arrays = {f"gmm/{name[:-1]}": np.asarray(getattr(self.gmm_, name), dtype=np.float64)
                  for name in _GMM_ARRAYS}
        arrays.update(scaler_state(self.scaler_))
        meta = self._meta(n_components_=self.n_components_, cv_results_=self.cv_results_,
                          converged=bool(self.gmm_.converged_), n_iter=int(self.gmm_.n_iter_),
                          lower_bound=float(self.gmm_.lower_bound_))
        return arrays, meta

    @classmethod
    def from_state(cls, arrays, meta) -> "GMMScorer":
        params = dict(meta["params"])
        if isinstance(params.get("n_components"), list):
            params["n_components"] = tuple(params["n_components"])
        scorer = cls(**params)
        scorer.n_features_in_ = int(meta["n_features_in"])
        scorer.scaler_ = scaler_from_state(arrays)
        gmm = scorer._mixture(int(meta["n_components_"]))
        for name in _GMM_ARRAYS:
            setattr(gmm, name, np.array(arrays[f"gmm/{name[:-1]}"], dtype=np.float64))
        gmm.converged_ = meta["converged"]
        gmm.n_iter_ = meta["n_iter"]
        gmm.lower_bound_ = meta["lower_bound"]
        gmm.n_features_in_ = scorer.n_features_in_
        scorer.gmm_ = gmm
        scorer.n_components_ = int(meta["n_components_"])
        scorer.cv_results_ = meta["cv_results_"]
        return scorer
