"""The normative reference: held-out inlier item scores, percentiles and flag thresholds."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from scipy.stats import percentileofscore

from neuro_ood.pipelines.datasets import Item


def threshold(reference_scores: np.ndarray, tpr: float) -> float:
    """The score below which an item is flagged: ``tpr`` of the reference items lie at or above it."""
    return float(np.quantile(reference_scores, 1.0 - tpr))


def build_reference(scores: dict[str, np.ndarray], items: Sequence[Item], tpr: float,
                    slice_scores: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
    """Per score: the held-out inlier item scores and the threshold that keeps ``tpr`` of them.

    An item scoring below a score's threshold is flagged by it: on held-out inliers this flags
    1 − ``tpr`` of items (the 95%-TPR operating point of the MSMA paper by default). With
    ``slice_scores`` (``{name: (S_total,)}``, the items' slices in order) the reference also keeps
    them, for per-slice metrics (``slices``: the item index of each slice and the scores).
    """
    reference = {
        "tpr": tpr,
        "items": [item.key for item in items],
        "subjects": [item.subject for item in items],
        "scorers": {name: {"scores": [float(v) for v in values], "threshold": threshold(np.asarray(values), tpr)}
                    for name, values in scores.items()},
    }
    if slice_scores:
        reference["slices"] = {
            "item": [index for index, item in enumerate(items) for _ in range(len(item.slices))],
            "scorers": {name: [float(v) for v in values] for name, values in slice_scores.items()},
        }
    return reference


def reference_scores(reference: dict[str, Any], keep: Sequence[int] | None = None) -> dict[str, np.ndarray]:
    """``{score name: (n,)}`` of the reference items (all, or those at positions ``keep``)."""
    arrays = {name: np.asarray(entry["scores"], dtype=np.float64) for name, entry in reference["scorers"].items()}
    return arrays if keep is None else {name: values[list(keep)] for name, values in arrays.items()}


def reference_slice_scores(reference: dict[str, Any], keep: Sequence[int] | None = None
                           ) -> dict[str, np.ndarray] | None:
    """``{score name: (s,)}`` of the slices of the reference items (all, or of the items at
    positions ``keep``); None for a run stored before slice scores were kept."""
    if "slices" not in reference:
        return None
    item = np.asarray(reference["slices"]["item"])
    mask = np.ones(len(item), bool) if keep is None else np.isin(item, list(keep))
    return {name: np.asarray(values, dtype=np.float64)[mask] for name, values in reference["slices"]["scorers"].items()}


def percentile(reference_values: np.ndarray, score: float) -> float:
    """Percentage of reference items scoring at or below ``score`` (low = atypical)."""
    return float(percentileofscore(reference_values, score, kind="weak"))
