"""Steps shared by the pipelines: preprocess a list of scans, extract score norms, score scans."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from neuro_ood.config import PreprocessingConfig
from neuro_ood.data.cohort import Scan
from neuro_ood.errors import ScanError
from neuro_ood.features import score_norms
from neuro_ood.preprocessing.cache import PreprocessedCache, default_cache_dir
from neuro_ood.preprocessing.presets import T1SlicePreprocessor, preprocessing_fingerprint
from neuro_ood.scorers.base import AuxiliaryScorer


@contextmanager
def progress_bar(console: Console | None, *extra_columns) -> Iterator[Progress]:
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    with Progress(*columns, *extra_columns, console=console or Console(stderr=True), transient=False,
                  disable=console is not None and console.quiet) as progress:
        yield progress


@dataclass
class PreparedScans:
    """Scans that preprocessed cleanly with their slices ``(S, C, H, W)``, and those that failed."""

    scans: list[Scan] = field(default_factory=list)
    slices: list[np.ndarray] = field(default_factory=list)
    failures: list[tuple[str, str]] = field(default_factory=list)


def prepare_scans(scans: Sequence[Scan], cfg: PreprocessingConfig, cache_dir: str | Path | None,
                  console: Console | None = None, description: str = "preprocessing") -> PreparedScans:
    """Preprocess each scan through the on-disk cache (``cache_dir``, default :func:`default_cache_dir`);
    a bad file is recorded in ``failures`` and the rest go on."""
    preprocess = T1SlicePreprocessor(cfg)
    cache = PreprocessedCache(cache_dir or default_cache_dir(), preprocessing_fingerprint(cfg))
    prepared = PreparedScans()
    with progress_bar(console) as progress:
        for scan in progress.track(scans, description=description):
            try:
                slices = cache.get_or_compute(scan.path, preprocess)
            except ScanError as err:
                prepared.failures.append((str(scan.path), err.reason))
                continue
            except OSError as err:
                prepared.failures.append((str(scan.path), f"cannot read ({err.strerror or err})"))
                continue
            prepared.scans.append(scan)
            prepared.slices.append(slices)
    return prepared


def extract_features(model: torch.nn.Module, sigmas: torch.Tensor, slices: Sequence[np.ndarray],
                     batch_size: int = 64, console: Console | None = None,
                     description: str = "score norms") -> list[np.ndarray]:
    """Score-norm vectors for each scan's slices: a list of ``(S, L)`` arrays, one per scan."""
    if not slices:
        return []
    counts = [len(s) for s in slices]
    images = torch.from_numpy(np.concatenate(slices))
    chunk = max(batch_size // len(sigmas), 1) * 8
    norms = []
    with progress_bar(console) as progress:
        task = progress.add_task(description, total=len(images))
        for start in range(0, len(images), chunk):
            norms.append(score_norms(model, images[start:start + chunk], sigmas, batch_size=batch_size))
            progress.advance(task, len(norms[-1]))
    return np.split(np.concatenate(norms), np.cumsum(counts)[:-1])


def scan_scores(scorers: dict[str, AuxiliaryScorer], features: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
    """Each scorer's score per scan: the mean of its slices' scores (higher = more typical).

    Slice scores are log-densities (GMM, flow) or negative distances (KD-tree); their mean is
    the per-slice average log-likelihood under an independence assumption for the density
    models, and it ranks scans like the sum while staying on the per-slice scale.
    """
    if not features:
        return {name: np.zeros(0) for name in scorers}
    stacked = np.concatenate(features)
    counts = np.cumsum([len(f) for f in features])[:-1]
    return {name: np.array([s.mean() for s in np.split(scorer.score_samples(stacked), counts)])
            for name, scorer in scorers.items()}
