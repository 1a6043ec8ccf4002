"""The normative reference: held-out inlier item scores, percentiles and flag thresholds."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from scipy.stats import percentileofscore

from neuro_ood.pipelines.datasets import Item


def build_reference(scores: dict[str, np.ndarray], items: Sequence[Item], tpr: float) -> dict[str, Any]:
    """Per score: the held-out inlier item scores and the threshold that keeps ``tpr`` of them.

    An item scoring below a score's threshold is flagged by it: on held-out inliers this flags
    1 − ``tpr`` of items (the 95%-TPR operating point of the MSMA paper by default).
    """
    return {
        "tpr": tpr,
        "items": [item.key for item in items],
        "scorers": {name: {"scores": [float(v) for v in values],
                           "threshold": float(np.quantile(values, 1.0 - tpr))}
                    for name, values in scores.items()},
    }


def percentile(reference: dict[str, Any], scorer: str, score: float) -> float:
    """Percentage of held-out inliers scoring at or below ``score`` (low = atypical)."""
    return float(percentileofscore(reference["scorers"][scorer]["scores"], score, kind="weak"))


def is_flagged(reference: dict[str, Any], scorer: str, score: float) -> bool:
    return bool(score < reference["scorers"][scorer]["threshold"])
