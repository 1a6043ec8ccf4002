"""``neuro-ood score``: score single scans against a trained run's normative reference."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from rich.console import Console

from neuro_ood.data.cohort import Scan
from neuro_ood.runs import RunDir, sigmas_of
from neuro_ood.scorers import load_scorers
from neuro_ood.training import resolve_device
from neuro_ood.pipelines.common import extract_features, prepare_scans, scan_scores
from neuro_ood.pipelines.reference import is_flagged, percentile


@dataclass
class ScanResult:
    """One scan's verdict. ``scores``: per scorer, higher = more typical; ``percentiles``: per
    scorer, % of held-out inliers scoring at or below it; ``flagged``: the primary scorer's flag."""

    path: str
    scores: dict[str, float]
    percentiles: dict[str, float]
    flags: dict[str, bool]
    primary: str
    flagged: bool
    slice_features: list[list[float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ScoreReport:
    results: list[ScanResult]
    failures: list[tuple[str, str]]


def score_scans(run_dir: str | Path, paths: Sequence[str | Path], cache_dir: str | Path | None = None,
                console: Console | None = None) -> ScoreReport:
    """Score each file with every auxiliary scorer of the run; bad files are reported, not fatal."""
    console = console or Console(stderr=True)
    run = RunDir(run_dir)
    cfg = run.load_config()
    model = run.load_model(cfg, resolve_device(cfg.training.device))
    scorers = load_scorers(run.path)
    reference = run.load_reference()
    scans = [Scan(subject=Path(p).name, path=Path(p)) for p in paths]
    prepared = prepare_scans(scans, cfg.preprocessing, cache_dir, console, "preprocess")
    features = extract_features(model, sigmas_of(cfg.model), prepared.slices, cfg.training.feature_batch_size,
                                console)
    scores = scan_scores(scorers, features)
    primary = cfg.score.primary if cfg.score.primary in scorers else next(iter(scorers))
    results = []
    for index, scan in enumerate(prepared.scans):
        values = {name: float(scores[name][index]) for name in scorers}
        flags = {name: is_flagged(reference, name, v) for name, v in values.items()}
        results.append(ScanResult(
            path=str(scan.path), scores=values,
            percentiles={name: percentile(reference, name, v) for name, v in values.items()},
            flags=flags, primary=primary, flagged=flags[primary],
            slice_features=features[index].tolist()))
    return ScoreReport(results=results, failures=prepared.failures)
