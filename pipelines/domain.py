"""The domain-shift signal: how far a scan's acquisition-level properties sit from the training cohort's.

Beside the anomaly score ("is this brain atypical?") a run keeps a model of its training scans'
acquisition vectors (:mod:`neuro_ood.preprocessing.acquisition`: intensity histogram shape,
background, field of view, voxel size, registration quality, foreground outside the template
brain). A new scan's *site score* is its typicality under that model (standardised 5-NN distance,
higher = more like the training site), its *site percentile* the share of held-out inlier scans
scoring at or below it, and it is flagged ``site_shift`` below the run's ``score.tpr`` threshold —
so a user can tell "this scan is unlike the training site" from "this brain is atypical".

Stored as ``RUN/domain/scorers.*`` (the k-NN scorer, pickle-free) and the held-out scans' site
scores under ``"domain"`` in ``RUN/reference.json``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from neuro_ood.preprocessing.acquisition import ACQUISITION_FEATURES
from neuro_ood.scorers import AuxiliaryScorer, KNNScorer, load_scorers, save_scorers
from neuro_ood.pipelines.datasets import Item
from neuro_ood.pipelines.reference import percentile, threshold

DOMAIN_DIR = "domain"


def acquisition_matrix(items: Sequence[Item]) -> np.ndarray | None:
    """``(N, F)`` acquisition vectors of ``items``, or None when any item lacks them (e.g. BraTS)."""
    if not items or any(item.acquisition is None for item in items):
        return None
    return np.stack([np.asarray(item.acquisition, dtype=np.float64) for item in items])


def fit_domain_model(train: Sequence[Item], heldout: Sequence[Item], tpr: float
                     ) -> tuple[AuxiliaryScorer, dict[str, Any]] | None:
    """The k-NN model of the training scans' acquisition vectors and the held-out reference of
    site scores (``{"features", "scores", "threshold"}``); None without acquisition vectors."""
    x_train, x_held = acquisition_matrix(train), acquisition_matrix(heldout)
    if x_train is None or x_held is None or len(x_train) < 2:
        return None
    model = KNNScorer(n_neighbors=min(5, len(x_train) - 1)).fit(x_train)
    scores = model.score_samples(x_held)
    return model, {"features": list(ACQUISITION_FEATURES), "scores": [float(v) for v in scores],
                   "threshold": threshold(scores, tpr)}


def save_domain_model(run_path: str | Path, model: AuxiliaryScorer) -> None:
    save_scorers(Path(run_path) / DOMAIN_DIR, {"site": model})


def load_domain_model(run_path: str | Path) -> AuxiliaryScorer | None:
    """The run's site model, or None for runs made without one (older runs, BraTS)."""
    directory = Path(run_path) / DOMAIN_DIR
    if not (directory / "scorers.json").is_file():
        return None
    return load_scorers(directory)["site"]


def site_verdicts(model: AuxiliaryScorer | None, reference: dict[str, Any], items: Sequence[Item]
                  ) -> list[dict[str, Any] | None]:
    """Per item ``{"site_score", "site_percentile", "site_shift"}``, or None where the run or the
    item has no acquisition vector."""
    domain = reference.get("domain")
    x = acquisition_matrix(items)
    if model is None or domain is None or x is None or x.shape[1] != len(domain["features"]):
        return [None] * len(items)
    scores = model.score_samples(x)
    normative = np.asarray(domain["scores"], dtype=np.float64)
    return [{"site_score": float(s), "site_percentile": percentile(normative, float(s)),
             "site_shift": bool(s < domain["threshold"])} for s in scores]
