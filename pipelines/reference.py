"""The normative reference: held-out inlier item scores, percentiles and flag thresholds."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from scipy.stats import percentileofscore

from neuro_ood.pipelines.datasets import Item


def threshold(reference_scores: np.ndarray, tpr: float) -> float:
    """The score below which an item is flagged: ``tpr`` of the reference items lie at or above it."""
    return float(np.quantile(reference_scores, 1.0 - tpr))


def build_reference(scores: dict[str, np.ndarray], items: Sequence[Item], tpr: float) -> dict[str, Any]:
    """Per score: the held-out inlier item scores and the threshold that keeps ``tpr`` of them.

    An item scoring below a score's threshold is flagged by it: on held-out inliers this flags
    1 − ``tpr`` of items (the 95%-TPR operating point of the MSMA paper by default).
    """
    return {
        "tpr": tpr,
        "items": [item.key for item in items],
        "subjects": [item.subject for item in items],
        "scorers": {name: {"scores": [float(v) for v in values], "threshold": threshold(np.asarray(values), tpr)}
                    for name, values in scores.items()},
    }


def reference_scores(reference: dict[str, Any], keep: Sequence[int] | None = None) -> dict[str, np.ndarray]:
    """``{score name: (n,)}`` of the reference items (all, or those at positions ``keep``)."""
    arrays = {name: np.asarray(entry["scores"], dtype=np.float64) for name, entry in reference["scorers"].items()}
    return arrays if keep is None else {name: values[list(keep)] for name, values in arrays.items()}


def percentile(reference_values: np.ndarray, score: float) -> float:
    """Percentage of reference items scoring at or below ``score`` (low = atypical)."""
    return float(percentileofscore(reference_values, score, kind="weak"))
