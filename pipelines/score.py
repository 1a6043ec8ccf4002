"""``neuro-ood score``: score scans (or BraTS case folders) against a run's normative reference."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from rich.console import Console

from neuro_ood.errors import ConfigError, NeuroOODError
from neuro_ood.report import save_anomaly_maps
from neuro_ood.pipelines.common import prepare_items, score_items
from neuro_ood.pipelines.datasets import dataset_adapter
from neuro_ood.pipelines.rundir import RunDir
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
    """Results per item, failures as ``(input, reason)``, and with ``maps`` requested the written files."""

    results: list[ScanResult]
    failures: list[tuple[str, str]]
    map_files: list[str] = field(default_factory=list)


def score_scans(run_dir: str | Path, paths: Sequence[str | Path], cache_dir: str | Path | None = None,
                console: Console | None = None, maps_dir: str | Path | None = None) -> ScoreReport:
    """Score each input with every score of the run's method; bad inputs are reported, not fatal.

    With ``maps_dir``, methods that localise (MSMA: per-pixel score norms; f-AnoGAN: residuals) also
    write each item's anomaly map there as NIfTI and PNG.
    """
    console = console or Console(stderr=True)
    run = RunDir(run_dir)
    cfg = run.load_config()
    adapter = dataset_adapter(cfg)
    detector = run.load_detector(cfg)
    reference = run.load_reference()
    if maps_dir is not None and not detector.localises:
        raise ConfigError(f"{cfg.method} runs give no voxel-level maps; --maps needs an msma or fanogan run")
    sources, failures = [], []
    for path in paths:
        try:
            sources.extend(adapter.sources_from_paths([path]))
        except NeuroOODError as err:
            failures.append((str(path), str(err)))
    prepared = prepare_items(adapter, sources, cache_dir, console, "preprocess")
    if not prepared.items:
        return ScoreReport(results=[], failures=failures + prepared.failures)
    scores = detector.group_view(score_items(detector, prepared.items, console=console, description="score"), None)
    normative = detector.group_view(reference_scores(reference), None)
    thresholds = {name: threshold(values, reference["tpr"]) for name, values in normative.items()}
    primary = cfg.score.primary if cfg.score.primary in normative else next(iter(normative))
    results = []
    for index, item in enumerate(prepared.items):
        values = {name: float(scores[name][index]) for name in normative}
        flags = {name: bool(v < thresholds[name]) for name, v in values.items()}
        results.append(ScanResult(path=item.label, scores=values,
                                  percentiles={name: percentile(normative[name], v) for name, v in values.items()},
                                  flags=flags, primary=primary, flagged=flags[primary]))
    map_files = []
    if maps_dir is not None:
        spacing = cfg.preprocessing.spacing_mm
        used: dict[str, int] = {}
        for item in prepared.items:
            name = Path(item.label).name
            used[name] = used.get(name, 0) + 1
            if used[name] > 1:  # same file name in another folder: keep both maps
                name = f"{name.removesuffix('.nii.gz').removesuffix('.nii')}_{used[name]}"
            files = save_anomaly_maps(Path(maps_dir), name, item.slices, detector.maps(item.slices), spacing)
            map_files.extend(str(f) for f in files)
    return ScoreReport(results=results, failures=failures + prepared.failures, map_files=map_files)
