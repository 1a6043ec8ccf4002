"""``neuro-ood score``: score scans (or BraTS case folders) against a run's normative reference."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from rich.console import Console

from neuro_ood.errors import NeuroOODError
from neuro_ood.runs import RunDir
from neuro_ood.pipelines.common import prepare_items, score_items
from neuro_ood.pipelines.datasets import dataset_adapter
from neuro_ood.pipelines.registry import method_class
from neuro_ood.pipelines.reference import percentile, reference_scores, threshold


@dataclass
class ScanResult:
    """One item's verdict. ``scores``: higher = more typical; ``percentiles``: % of held-out inliers
    scoring at or below it; ``flags``: below the 95%-TPR threshold; ``flagged``: the primary score's flag."""

    path: str
    scores: dict[str, float]
    percentiles: dict[str, float]
    flags: dict[str, bool]
    primary: str
    flagged: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ScoreReport:
    results: list[ScanResult]
    failures: list[tuple[str, str]]


def score_scans(run_dir: str | Path, paths: Sequence[str | Path], cache_dir: str | Path | None = None,
                console: Console | None = None) -> ScoreReport:
    """Score each input with every score of the run's method; bad inputs are reported, not fatal."""
    console = console or Console(stderr=True)
    run = RunDir(run_dir)
    cfg = run.load_config()
    adapter = dataset_adapter(cfg)
    method = method_class(cfg).load(run, cfg)
    reference = run.load_reference()
    sources, failures = [], []
    for path in paths:
        try:
            sources.extend(adapter.sources_from_paths([path]))
        except NeuroOODError as err:
            failures.append((str(path), str(err)))
    prepared = prepare_items(adapter, sources, cache_dir, console, "preprocess")
    scores = method.group_view(score_items(method, prepared.items, console=console, description="score"), None)
    normative = method.group_view(reference_scores(reference), None)
    thresholds = {name: threshold(values, reference["tpr"]) for name, values in normative.items()}
    primary = cfg.score.primary if cfg.score.primary in normative else next(iter(normative))
    results = []
    for index, item in enumerate(prepared.items):
        values = {name: float(scores[name][index]) for name in normative}
        flags = {name: bool(v < thresholds[name]) for name, v in values.items()}
        results.append(ScanResult(path=item.label, scores=values,
                                  percentiles={name: percentile(normative[name], v) for name, v in values.items()},
                                  flags=flags, primary=primary, flagged=flags[primary]))
    return ScoreReport(results=results, failures=failures + prepared.failures)
