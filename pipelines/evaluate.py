"""``neuro-ood evaluate``: held-out inliers against each group of a cohort (age groups; tumour)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

from rich.console import Console

from neuro_ood.errors import CohortError, ConfigError
from neuro_ood.metrics import ood_metrics
from neuro_ood.runs import RunDir
from neuro_ood.pipelines.common import prepare_items, score_items
from neuro_ood.pipelines.datasets import dataset_adapter
from neuro_ood.pipelines.methods import method_class


def _group_order(group: str) -> tuple:
    try:
        return (0, float(group), group)
    except ValueError:
        return (1, 0.0, group)


def evaluate(run_dir: str | Path, data_dir: str | Path, group_by: str | None = None,
             cache_dir: str | Path | None = None, console: Console | None = None) -> dict[str, Any]:
    """Score the items of ``data_dir`` that the run neither trained on nor holds as its reference,
    group them (``age`` for T1 cohorts, ``tumour`` for BraTS) and compare each group with the
    run's held-out inliers (inliers positive); write and return ``RUN/metrics.json``.
    """
    console = console or Console(stderr=True)
    run = RunDir(run_dir)
    cfg = run.load_config()
    adapter = dataset_adapter(cfg)
    if group_by not in (None, adapter.group_by):
        raise ConfigError(f"--group-by {group_by!r} is not available for dataset {cfg.dataset!r}; "
                          f"use {adapter.group_by!r}")
    method = method_class(cfg).load(run, cfg)
    reference = run.load_reference()
    trained_on = set(run.load_split()["train"])
    in_reference = set(reference["items"])
    sources = [s for s in adapter.sources(data_dir) if s.subject not in trained_on]
    prepared = prepare_items(adapter, sources, cache_dir, console, "preprocess groups")
    items = [i for i in prepared.items if i.key not in in_reference and i.group is not None]
    if not items:
        raise CohortError(f"{data_dir}: nothing to evaluate — every item is in the run's training split or "
                          f"reference, or has no {adapter.group_by}")
    scores = score_items(method, items, console=console, description="score groups")
    members: dict[str, list[int]] = defaultdict(list)
    for index, item in enumerate(items):
        members[item.group].append(index)
    groups = {group: {"n": len(members[group]), "scorers": {
        name: ood_metrics(reference["scorers"][name]["scores"], values[members[group]])
        for name, values in scores.items()}} for group in sorted(members, key=_group_order)}
    metrics = {
        "run": str(run.path), "data_dir": str(data_dir), "method": cfg.method, "dataset": cfg.dataset,
        "unit": adapter.unit, "group_by": adapter.group_by,
        "inliers": {"n": len(reference["items"])},
        "groups": groups,
        "failed": [{"path": p, "reason": r} for p, r in prepared.failures],
    }
    run.save_metrics(metrics)
    return metrics
