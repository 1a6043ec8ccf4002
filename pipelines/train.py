"""``neuro-ood train``: preprocess a normative cohort, train a method's network, store the run."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.markup import escape

from neuro_ood.config import ExperimentConfig
from neuro_ood.data.cohort import split_subjects
from neuro_ood.detectors import build_detector
from neuro_ood.errors import CohortError, RunError
from neuro_ood.networks import NETWORK_SECTIONS
from neuro_ood.preprocessing.presets import preprocessing_fingerprint
from neuro_ood.pipelines.common import ConsoleProgress, prepare_items, score_items
from neuro_ood.pipelines.datasets import dataset_adapter
from neuro_ood.pipelines.domain import fit_domain_model, save_domain_model
from neuro_ood.pipelines.reference import build_reference
from neuro_ood.pipelines.rundir import RunDir
from neuro_ood.trainer import distributed


@dataclass
class TrainSummary:
    run: Path
    method: str
    n_train_items: int
    n_heldout_items: int
    n_train_slices: int
    steps: int
    final_loss: float
    failures: list[tuple[str, str]]
    seconds: float


def _check_resumable(run: RunDir, cfg: ExperimentConfig) -> None:
    if not run.file("config.yaml").is_file():
        return
    previous = run.load_config()
    if previous.method != cfg.method:
        raise RunError(f"{run.path} holds a {previous.method} run; choose a new --out for a {cfg.method} run")
    if preprocessing_fingerprint(previous.preprocessing) != preprocessing_fingerprint(cfg.preprocessing):
        raise RunError(f"{run.path} holds a run made with other preprocessing; "
                       "choose a new --out or pass the same preprocessing settings")
    before, now = previous.to_dict(), cfg.to_dict()
    changed = [key for key in NETWORK_SECTIONS if before[key] != now[key]]
    if cfg.method == "fanogan" and before["training"]["steps"] != now["training"]["steps"]:
        changed.append("training.steps (the GAN/encoder boundary of f-AnoGAN)")
    if changed:
        raise RunError(f"{run.path} holds a run with other {', '.join(changed)} settings; resuming would mix two "
                       "networks — choose a new --out, or --no-resume to start this one over")


def _outlier_group_items(adapter, cfg: ExperimentConfig, sources, inlier_subjects: set[str], train_items,
                         cache_dir, console) -> tuple[list, set[str]]:
    """Training items of ``resnet.outlier_group``: that group's items in the training sources (BraTS
    tumour slices) and those of a subject split of the other sources (the paper's 1-year-olds), split
    like the inliers so that the rest of the group stays unseen for evaluation."""
    group = cfg.resnet.outlier_group
    others = prepare_items(adapter, [s for s in sources if s.subject not in inlier_subjects], cache_dir, console,
                           f"preprocess group {group}")
    candidates = [i for i in others.items if i.group == group]
    seen: set[str] = set()
    if candidates:
        subjects = sorted({i.subject for i in candidates})
        seen = set(split_subjects(candidates, cfg.data.heldout_fraction, cfg.data.split_seed)[0]
                   if len(subjects) > 1 else subjects)
    items = [i for i in candidates if i.subject in seen] + [i for i in train_items if i.group == group]
    if not items:
        raise CohortError(f"no item of the outlier group {group!r} to train the classifier on "
                          f"(set resnet.outlier_group to one of the cohort's {adapter.group_by} groups)")
    return items, seen


def train(cfg: ExperimentConfig, data_dir: str | Path, out: str | Path, cache_dir: str | Path | None = None,
          console: Console | None = None, resume: bool = True) -> TrainSummary:
    """Train ``cfg.method`` on the inliers of ``data_dir`` and store everything needed to score in ``out``.

    Sources holding inliers (scans aged within ``data.inlier_ages``; BraTS cases) are split by
    subject into training (network and scorers) and held-out (percentile reference, flag
    thresholds) sets. Re-running into the same ``out`` resumes from its last checkpoint. Where the
    preset gives acquisition vectors, a site model of the training scans is stored too
    (:mod:`neuro_ood.pipelines.domain`).

    Under torchrun (:mod:`neuro_ood.trainer.distributed`) every process trains on its share of
    each batch; rank 0 preprocesses first (the others then read its cache) and alone writes
    ``out``; the others leave once training is over.
    """
    started = time.perf_counter()
    console = console or Console(stderr=True)
    adapter = dataset_adapter(cfg)
    detector = build_detector(cfg)
    run = RunDir(out)
    if resume:
        _check_resumable(run, cfg)
    all_sources = adapter.sources(data_dir)
    sources = [s for s in all_sources if adapter.has_inliers(s)]
    if not sources:
        low, high = cfg.data.inlier_ages
        raise CohortError(f"{data_dir}: no scan with an age in {low:g}–{high:g} years "
                          f"(ages read from column(s) {', '.join(cfg.data.age_column)})")
    if resume and run.file("split.json").is_file():
        split = run.load_split()
        train_subjects, heldout_subjects = split["train"], split["heldout"]
    else:
        train_subjects, heldout_subjects = split_subjects(sources, cfg.data.heldout_fraction, cfg.data.split_seed)
    main = distributed.is_main()
    if main:
        run.save_config(cfg)
        run.save_split(train_subjects, heldout_subjects)

    train_set, heldout_set = set(train_subjects), set(heldout_subjects)
    extra = {}
    with distributed.main_first():
        prepared_train = prepare_items(adapter, [s for s in sources if s.subject in train_set], cache_dir, console,
                                       "preprocess train")
        prepared_held = prepare_items(adapter, [s for s in sources if s.subject in heldout_set], cache_dir,
                                      console, "preprocess held-out")
    failures = prepared_train.failures + prepared_held.failures
    for label, reason in failures:
        console.print(f"[yellow]skipped[/] {escape(f'{label}: {reason}')}", highlight=False)
    train_items = [i for i in prepared_train.items if adapter.is_inlier(i)]
    held_items = [i for i in prepared_held.items if adapter.is_inlier(i)]
    if not train_items or not held_items:
        raise CohortError("no usable training or held-out inlier scan after preprocessing")

    if detector.needs_outliers:
        inlier_subjects = {s.subject for s in sources}
        with distributed.main_first():
            outlier_items, seen_subjects = _outlier_group_items(adapter, cfg, all_sources, inlier_subjects,
                                                                prepared_train.items, cache_dir, console)
        if main:
            run.save_split(sorted(train_set | seen_subjects), heldout_subjects)
        extra["outliers"] = np.concatenate([item.slices for item in outlier_items])
    images = np.concatenate([item.slices for item in train_items])
    groups = np.concatenate([[item.subject] * len(item.slices) for item in train_items])
    if resume and run.trained_steps():
        console.print(f"resuming from step {run.trained_steps()}")
    detector.meta["preprocessing_fingerprint"] = preprocessing_fingerprint(cfg.preprocessing)
    if not detector.has_network:  # nothing to share out: rank 0 fits the scorers alone
        distributed.leave_unless_main()
    with ConsoleProgress(console) as progress:
        detector.fit(images, groups=groups, checkpoint_dir=run.path, resume=resume, progress=progress, **extra)
    detector.save(run.path)
    held_slice_scores: dict[str, np.ndarray] = {}
    held_scores = score_items(detector, held_items, console=console, description="score held-out",
                              slices=held_slice_scores)
    reference = build_reference(held_scores, held_items, cfg.score.tpr, held_slice_scores)
    domain = fit_domain_model(train_items, held_items, cfg.score.tpr)
    if domain is not None:
        save_domain_model(run.path, domain[0])
        reference["domain"] = domain[1]
    run.save_reference(reference)
    return TrainSummary(run=run.path, method=cfg.method, n_train_items=len(train_items),
                        n_heldout_items=len(held_items), n_train_slices=len(images),
                        steps=detector.train_state.step, final_loss=detector.final_loss,
                        failures=failures, seconds=time.perf_counter() - started)
