"""``neuro-ood score``: score scans (or BraTS case folders) against a run's normative reference."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from rich.console import Console

from neuro_ood.errors import ConfigError, NeuroOODError
from neuro_ood.pipelines.common import save_item_maps, score_sources
from neuro_ood.pipelines.datasets import dataset_adapter
from neuro_ood.pipelines.domain import load_domain_model, site_verdicts
from neuro_ood.pipelines.rundir import RunDir
from neuro_ood.pipelines.reference import percentile, reference_scores, threshold
from neuro_ood.pipelines.shards import Shard, identity, share


@dataclass
class ScanResult:
    """One item's verdict. ``scores``: higher = more typical; ``percentiles``: % of held-out inliers
    scoring at or below it; ``flags``: below the 95%-TPR threshold; ``flagged``: the primary score's flag;
    ``site``: the domain-shift signal (``site_score``, ``site_percentile``, ``site_shift``; see
    :mod:`neuro_ood.pipelines.domain`), None where the run has no site model."""

    path: str
    scores: dict[str, float]
    percentiles: dict[str, float]
    flags: dict[str, bool]
    primary: str
    flagged: bool
    site: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Normative:
    """A run's normative reference as a verdict needs it: the held-out inlier scores per score name
    (after the detector's :meth:`group_view` for unknown groups), each score's flag threshold at the
    run's ``score.tpr``, and the primary score whose flag is the item's flag."""

    scores: dict[str, np.ndarray]
    thresholds: dict[str, float]
    primary: str
    tpr: float

    @classmethod
    def of_run(cls, detector, reference: dict[str, Any], cfg) -> "Normative":
        scores = detector.group_view(reference_scores(reference), None)
        thresholds = {name: threshold(values, reference["tpr"]) for name, values in scores.items()}
        primary = cfg.score.primary if cfg.score.primary in scores else next(iter(scores))
        return cls(scores=scores, thresholds=thresholds, primary=primary, tpr=float(reference["tpr"]))

    def judge(self, path: str, values: Mapping[str, float]) -> ScanResult:
        """The verdict on one item from its scores (``{name: value}``, already through ``group_view``)."""
        values = {name: float(values[name]) for name in self.scores}
        flags = {name: bool(v < self.thresholds[name]) for name, v in values.items()}
        return ScanResult(path=path, scores=values,
                          percentiles={name: percentile(self.scores[name], v) for name, v in values.items()},
                          flags=flags, primary=self.primary, flagged=flags[self.primary])

    def judge_all(self, paths: Sequence[str], scores: Mapping[str, np.ndarray]) -> list[ScanResult]:
        """:meth:`judge` for each of ``paths``, ``scores`` holding one value per path per name."""
        return [self.judge(path, {name: scores[name][index] for name in self.scores})
                for index, path in enumerate(paths)]


@dataclass
class ScoreReport:
    """Results per item, failures as ``(input, reason)``, with ``maps`` requested the written files, and
    with a shard its manifest: ``{"index", "count", "run": run fingerprint, "cohort": identity of all
    the inputs, "n_inputs"}``."""

    results: list[ScanResult]
    failures: list[tuple[str, str]]
    map_files: list[str] = field(default_factory=list)
    shard: dict[str, Any] | None = None


def sources_of_paths(adapter, paths: Sequence[str | Path]) -> tuple[list, list[tuple[str, str]]]:
    """The adapter's sources of the files (or BraTS case folders) ``paths``, and ``(path, reason)``
    for each that cannot be one."""
    sources, failures = [], []
    for path in paths:
        try:
            sources.extend(adapter.sources_from_paths([path]))
        except NeuroOODError as err:
            failures.append((str(path), str(err)))
    return sources, failures


class _MapNames:
    """A map file stem per scan, in scoring order: the scan's file name, numbered from the second
    scan of the same name in another folder so that both maps are kept."""

    def __init__(self):
        self.used: dict[str, int] = {}

    def __call__(self, label: str) -> str:
        name = Path(label).name
        self.used[name] = self.used.get(name, 0) + 1
        return name if self.used[name] == 1 else f"{name.removesuffix('.nii.gz').removesuffix('.nii')}_{self.used[name]}"


def score_scans(run_dir: str | Path, paths: Sequence[str | Path], cache_dir: str | Path | None = None,
                console: Console | None = None, maps_dir: str | Path | None = None,
                shard: Shard | None = None, workers: int | None = None) -> ScoreReport:
    """Score each input with every score of the run's method; bad inputs are reported, not fatal.

    The inputs stream through :func:`~neuro_ood.pipelines.common.score_sources`: each is
    preprocessed (through the cache; ``workers``: see
    :class:`~neuro_ood.pipelines.common.PreprocessStream`, None the model's default) while the
    network scores the ones before it, at most ``score.batch_slices`` slices at a time, so memory
    holds a chunk of scans, not the cohort. With ``maps_dir``, methods that localise (MSMA:
    per-pixel score norms or its voxel model; f-AnoGAN: residuals) also write each item's anomaly
    map there as NIfTI and PNG, from the scoring passes. With ``shard``, only that share of ``paths`` (sorted by
    path as given; :mod:`neuro_ood.pipelines.shards`) is scored.
    """
    console = console or Console(stderr=True)
    run = RunDir(run_dir)
    cfg = run.load_config()
    adapter = dataset_adapter(cfg)
    detector = run.load_detector(cfg)
    reference = run.load_reference()
    if maps_dir is not None and not detector.localises:
        raise ConfigError(f"{cfg.method} runs give no voxel-level maps; --maps needs an msma or fanogan run")
    manifest = None
    if shard is not None:
        from neuro_ood.pipelines.report import run_fingerprint

        keys = [str(path) for path in paths]
        manifest = {"index": shard.index, "count": shard.count, "run": run_fingerprint(run),
                    "cohort": identity(keys), "n_inputs": len(keys)}
        paths = [paths[i] for i in share(keys, shard)]
    sources, failures = sources_of_paths(adapter, paths)
    map_files: list[str] = []
    on_maps = None
    if maps_dir is not None:
        map_name = _MapNames()

        def on_maps(item, heat: np.ndarray, _parts) -> None:
            files = save_item_maps(Path(maps_dir), map_name(item.label), item, heat, cfg.preprocessing.spacing_mm,
                                   unit=detector.map_unit)
            map_files.extend(str(f) for f in files)
    scored = score_sources(detector, cfg, adapter, sources, cache_dir, console, "preprocess + score", workers,
                           on_maps=on_maps)
    if not scored.items:
        return ScoreReport(results=[], failures=failures + scored.failures, shard=manifest)
    scores = detector.group_view(scored.scores, None)
    results = Normative.of_run(detector, reference, cfg).judge_all([item.label for item in scored.items], scores)
    for result, site in zip(results, site_verdicts(load_domain_model(run.path), reference, scored.items)):
        result.site = site
    return ScoreReport(results=results, failures=failures + scored.failures, map_files=map_files, shard=manifest)
