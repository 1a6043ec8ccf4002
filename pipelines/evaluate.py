"""``neuro-ood evaluate``: held-out inliers against each age group of a cohort."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

from rich.console import Console

from neuro_ood.data.cohort import age_group, load_cohort
from neuro_ood.errors import CohortError, ConfigError
from neuro_ood.metrics import ood_metrics
from neuro_ood.runs import RunDir, sigmas_of
from neuro_ood.scorers import load_scorers
from neuro_ood.training import resolve_device
from neuro_ood.pipelines.common import extract_features, prepare_scans, scan_scores

PAPER_METRICS = ("auroc", "aupr_in", "aupr_out", "fpr_at_95_tpr", "detection_error", "fpr_at_80_tpr")


def evaluate(run_dir: str | Path, data_dir: str | Path, group_by: str = "age", cache_dir: str | Path | None = None,
             console: Console | None = None) -> dict[str, Any]:
    """Score every scan of ``data_dir`` whose subject the run never saw, grouped by age, against
    the run's held-out inliers; write and return ``RUN/metrics.json``.

    Metrics are per scan (a scan's score is the mean of its slices' scores), inliers positive.
    """
    if group_by != "age":
        raise ConfigError(f"--group-by {group_by!r} is not supported; use 'age'")
    console = console or Console(stderr=True)
    run = RunDir(run_dir)
    cfg = run.load_config()
    model = run.load_model(cfg, resolve_device(cfg.training.device))
    scorers = load_scorers(run.path)
    reference = run.load_reference()
    split = run.load_split()
    seen = set(split["train"]) | set(split["heldout"])
    scans = [s for s in load_cohort(data_dir, cfg.data) if s.subject not in seen and s.age_years is not None]
    if not scans:
        raise CohortError(f"{data_dir}: no scan with an age from a subject outside the run's split")
    prepared = prepare_scans(scans, cfg.preprocessing, cache_dir, console, "preprocess groups")
    features = extract_features(model, sigmas_of(cfg.model), prepared.slices, cfg.training.feature_batch_size,
                                console, "score norms (groups)")
    scores = scan_scores(scorers, features)
    members: dict[str, list[int]] = defaultdict(list)
    for index, scan in enumerate(prepared.scans):
        members[age_group(scan.age_years)].append(index)
    groups = {}
    for group in sorted(members, key=float):
        index = members[group]
        groups[group] = {"n": len(index), "scorers": {
            name: ood_metrics(reference["scorers"][name]["scores"], values[index])
            for name, values in scores.items()}}
    metrics = {
        "run": str(run.path), "data_dir": str(data_dir), "unit": "scan", "group_by": group_by,
        "inliers": {"n": len(reference["subjects"]),
                    "ages": [float(a) for a in cfg.data.inlier_ages]},
        "groups": groups,
        "failed": [{"path": p, "reason": r} for p, r in prepared.failures],
    }
    run.save_metrics(metrics)
    return metrics
