"""``neuro-ood evaluate``: held-out inliers against each group of a cohort, for one run or several
side by side (age groups for T1 cohorts; tumour slices for BraTS)."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from rich.console import Console

from neuro_ood.config import ExperimentConfig
from neuro_ood.errors import CohortError, ConfigError, RunError
from neuro_ood.metrics import ood_metrics
from neuro_ood.pipelines.common import score_sources
from neuro_ood.pipelines.datasets import dataset_adapter
from neuro_ood.pipelines.lesions import LESION_GROUP, LesionMaps
from neuro_ood.pipelines.reference import reference_scores, reference_slice_scores
from neuro_ood.pipelines.rundir import RunDir


@dataclass
class LoadedRun:
    run: RunDir
    cfg: ExperimentConfig
    split: dict[str, list[str]]
    reference: dict[str, Any]

    @property
    def heldout(self) -> set[str]:
        return set(self.split["heldout"])


def _group_order(group: str) -> tuple:
    try:
        return (0, float(group), group)
    except ValueError:
        return (1, 0.0, group)


def _common_heldout(runs: Sequence[LoadedRun], intersection: bool) -> set[str]:
    """The held-out subjects every run's reference is built on; mismatches are refused unless
    ``intersection``, which keeps the subjects all runs hold out."""
    common = set.intersection(*(r.heldout for r in runs))
    for other in runs[1:]:
        if other.heldout != runs[0].heldout and not intersection:
            raise RunError(
                f"runs {runs[0].run.path} and {other.run.path} hold out different subjects "
                f"({len(runs[0].heldout ^ other.heldout)} differ); train them with the same data.split_seed and "
                "heldout_fraction, or pass --intersection to compare on the subjects they share")
    if not common:
        raise RunError("the runs share no held-out subject")
    return common


def _labels(runs: Sequence[LoadedRun]) -> list[str]:
    labels, seen = [], defaultdict(int)
    for run in runs:
        seen[run.cfg.method] += 1
        labels.append(run.cfg.method if seen[run.cfg.method] == 1 else f"{run.cfg.method}#{seen[run.cfg.method]}")
    return labels


def evaluate(run_dirs: str | Path | Sequence[str | Path], data_dir: str | Path, group_by: str | None = None,
             cache_dir: str | Path | None = None, console: Console | None = None,
             intersection: bool = False) -> dict[str, Any]:
    """Score the items of ``data_dir`` that no run trained on and that are not in the runs' shared
    reference, group them, and compare each group with the held-out inliers (inliers positive).

    ``group_by="lesion"`` (T1 cohorts): only the scans with lesions, and for each whole-volume run
    that localises also voxel-level metrics of its maps against the lesion masks, beside intensity
    thresholding on the same voxels (``metrics["localisation"]``, see :mod:`neuro_ood.pipelines.lesions`).

    One run: writes ``RUN/metrics.json`` with ``groups``. Several runs: every run sees the same
    held-out inliers and the same groups; the first run's ``metrics.json`` gets ``groups`` (its
    own) and ``runs`` keyed by method (``msma``, ``glow``, a second ``msma`` as ``msma#2``).
    """
    console = console or Console(stderr=True)
    paths = [run_dirs] if isinstance(run_dirs, (str, Path)) else list(run_dirs)
    runs = []
    for path in paths:
        run = RunDir(path)
        runs.append(LoadedRun(run, run.load_config(), run.load_split(), run.load_reference()))
    datasets = {r.cfg.dataset for r in runs}
    if len(datasets) > 1:
        raise ConfigError(f"the runs are of different datasets ({', '.join(sorted(datasets))})")
    adapter = dataset_adapter(runs[0].cfg)
    lesions = group_by == LESION_GROUP and adapter.group_by == "age"
    if group_by not in (None, adapter.group_by) and not lesions:
        raise ConfigError(f"--group-by {group_by!r} is not available for dataset {runs[0].cfg.dataset!r}; "
                          f"use {adapter.group_by!r}" + (" or lesion" if adapter.group_by == "age" else ""))
    heldout = _common_heldout(runs, intersection)
    trained_on = set().union(*(set(r.split["train"]) for r in runs))
    source_list = [s for s in adapter.sources(data_dir) if s.subject not in trained_on]
    if not source_list:
        raise CohortError(f"{data_dir}: every subject was used to train the run(s)")
    if lesions:   # the inliers come from the runs' references: only the lesion scans need scoring
        source_list = [s for s in source_list if s.payload.lesion]
        if not source_list:
            raise CohortError(f"{data_dir}: no scan outside the runs' training splits has a lesion "
                              "(a lesion column in the table or a lesion mask in derivatives/)")
    scans = {s.payload.key: s.payload for s in source_list} if lesions else {}

    per_run, failures = {}, []
    for label, loaded in zip(_labels(runs), runs):
        run_adapter = dataset_adapter(loaded.cfg)
        keep = [i for i, subject in enumerate(loaded.reference["subjects"]) if subject in heldout]
        in_reference = set(loaded.reference["items"])  # subjects held out by only some runs are in trained_on
        detector = loaded.run.load_detector(loaded.cfg)
        # lesion maps come from the scoring passes, judged against the masks as each scan is scored
        lesion_maps = LesionMaps(scans) if lesions and detector.localises else None
        scored = score_sources(detector, loaded.cfg, run_adapter, source_list, cache_dir, console,
                               f"preprocess + score groups ({label})",
                               keep=lambda i: (i.key not in in_reference and i.group is not None
                                               and (not lesions or i.group == LESION_GROUP)),
                               on_maps=lesion_maps, components=True)
        failures = failures or scored.failures
        items, scores, slice_scores = scored.items, scored.scores, scored.slice_scores
        if not items:
            raise CohortError(f"{data_dir}: nothing to evaluate — every item is in the runs' training splits "
                              f"or reference, or has no {'lesion' if lesions else adapter.group_by}")
        members: dict[str, list[int]] = defaultdict(list)
        for index, item in enumerate(items):
            members[item.group].append(index)
        slice_item = np.repeat(np.arange(len(items)), [len(item.slices) for item in items])
        inliers = reference_scores(loaded.reference, keep)
        # Per-slice rows (the MSMA paper's unit) where items hold several slices and the run kept them.
        inlier_slices = reference_slice_scores(loaded.reference, keep) if len(slice_item) > len(items) else None
        groups = {}
        for group in sorted(members, key=_group_order):
            index = members[group]
            group_scores = detector.group_view({name: values[index] for name, values in scores.items()}, group)
            group_inliers = detector.group_view(inliers, group)
            groups[group] = {"n": len(index), "scorers": {
                name: ood_metrics(group_inliers[name], values) for name, values in group_scores.items()}}
            if inlier_slices is not None:
                in_group = np.isin(slice_item, index)
                group_slices = detector.group_view({n: v[in_group] for n, v in slice_scores.items()}, group)
                group_inlier_slices = detector.group_view(inlier_slices, group)
                groups[group]["n_slices"] = int(in_group.sum())
                groups[group]["slice_scorers"] = {name: ood_metrics(group_inlier_slices[name], values)
                                                  for name, values in group_slices.items()}
        inlier_counts = {"n": len(keep)}
        if inlier_slices is not None:
            inlier_counts["n_slices"] = len(next(iter(inlier_slices.values())))
        per_run[label] = {"run": str(loaded.run.path), "inliers": inlier_counts, "groups": groups,
                          "seen_groups": list(detector.seen_groups)}
        if lesion_maps is not None:
            located = lesion_maps.metrics()
            if located is not None:
                per_run[label]["localisation"] = located

    first = next(iter(per_run.values()))
    metrics = {
        "run": first["run"], "data_dir": str(data_dir), "method": runs[0].cfg.method, "dataset": runs[0].cfg.dataset,
        "unit": adapter.unit, "group_by": LESION_GROUP if lesions else adapter.group_by, "inliers": first["inliers"],
        "groups": first["groups"], "seen_groups": first["seen_groups"],
        "failed": [{"path": p, "reason": r} for p, r in failures],
    }
    if lesions:
        metrics["localisation"] = {label: entry["localisation"] for label, entry in per_run.items()
                                   if "localisation" in entry}
    if len(runs) > 1:
        metrics["runs"] = per_run
    runs[0].run.save_metrics(metrics)
    return metrics
