"""Out-of-distribution detection metrics.

Conventions (as in MSMA, appendix A.3, and Hendrycks & Gimpel 2017):

* inliers are the POSITIVE class;
* a HIGHER score means MORE inlier-like;
* TPR is the fraction of inliers at or above a threshold, FPR the fraction of outliers at or
  above it;
* ``auroc``: area under the ROC curve (0.5 = chance, 1 = perfect, 0 = perfectly reversed);
* ``aupr_in``: average precision with inliers positive; ``aupr_out``: outliers positive,
  scores negated;
* ``fpr_at_95_tpr`` / ``fpr_at_80_tpr``: the smallest FPR among ROC points with TPR >= 0.95
  (0.80);
* ``detection_error``: ``min over thresholds of 0.5 (1 - TPR) + 0.5 FPR``.

All values lie in [0, 1].
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

_TPR_TOL = 1e-12


def _check(scores_in, scores_out) -> tuple[np.ndarray, np.ndarray]:
    out = []
    for name, s in (("scores_in", scores_in), ("scores_out", scores_out)):
        s = np.asarray(s, dtype=np.float64).ravel()
        if s.size == 0:
            raise ValueError(f"{name} is empty; OOD metrics need at least one inlier and one outlier.")
        if not np.all(np.isfinite(s)):
            raise ValueError(f"{name} contains {int(np.sum(~np.isfinite(s)))} non-finite value(s).")
        out.append(s)
    return out[0], out[1]


def _labelled(s_in: np.ndarray, s_out: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.concatenate([np.ones(s_in.size, dtype=int), np.zeros(s_out.size, dtype=int)])
    return y, np.concatenate([s_in, s_out])


def fpr_at_tpr(scores_in, scores_out, tpr: float) -> float:
    """Smallest FPR among ROC points whose TPR is at least ``tpr``.

    Parameters
    ----------
    scores_in : array-like of shape (N_in,)
    scores_out : array-like of shape (N_out,)
    tpr : float in (0, 1]

    Returns
    -------
    float
    """
    if not 0.0 < tpr <= 1.0:
        raise ValueError(f"tpr must be in (0, 1], got {tpr}.")
    y, s = _labelled(*_check(scores_in, scores_out))
    fpr, tprs, _ = roc_curve(y, s, drop_intermediate=False)
    return float(np.min(fpr[tprs >= tpr - _TPR_TOL]))


def ood_metrics(scores_in, scores_out) -> dict[str, float]:
    """All detection metrics for one inlier/outlier split.

    Parameters
    ----------
    scores_in : array-like of shape (N_in,)
        Scores of inliers (positives).
    scores_out : array-like of shape (N_out,)
        Scores of outliers.

    Returns
    -------
    dict
        ``auroc``, ``aupr_in``, ``aupr_out``, ``fpr_at_95_tpr``, ``detection_error``,
        ``fpr_at_80_tpr``; floats in [0, 1].
    """
    s_in, s_out = _check(scores_in, scores_out)
    y, s = _labelled(s_in, s_out)
    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
    return {
        "auroc": float(roc_auc_score(y, s)),
        # average precision can exceed 1 by a rounding error; the metric is a fraction
        "aupr_in": min(1.0, float(average_precision_score(y, s))),
        "aupr_out": min(1.0, float(average_precision_score(1 - y, -s))),
        "fpr_at_95_tpr": float(np.min(fpr[tpr >= 0.95 - _TPR_TOL])),
        "detection_error": float(np.min(0.5 * (1.0 - tpr) + 0.5 * fpr)),
        "fpr_at_80_tpr": float(np.min(fpr[tpr >= 0.80 - _TPR_TOL])),
    }
