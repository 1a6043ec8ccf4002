"""``neuro-ood train``: preprocess a normative cohort, train the NCSN, fit the auxiliary scorers."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.progress import TextColumn

from neuro_ood.config import ExperimentConfig
from neuro_ood.data.cohort import load_cohort, select_inliers, split_subjects
from neuro_ood.errors import CohortError, RunError
from neuro_ood.preprocessing.presets import preprocessing_fingerprint
from neuro_ood.runs import RunDir, build_score_network, sigmas_of
from neuro_ood.scorers import build_scorer, save_scorers
from neuro_ood.training import resolve_device, train_score_network
from neuro_ood.pipelines.common import extract_features, prepare_scans, progress_bar, scan_scores
from neuro_ood.pipelines.reference import build_reference


@dataclass
class TrainSummary:
    run: Path
    n_train_scans: int
    n_heldout_scans: int
    n_train_slices: int
    steps: int
    final_loss: float
    failures: list[tuple[str, str]]
    seconds: float


def _check_resumable(run: RunDir, cfg: ExperimentConfig) -> None:
    if not run.file("preprocessing.json").is_file():
        return
    previous = run.load_config()
    if preprocessing_fingerprint(previous.preprocessing) != preprocessing_fingerprint(cfg.preprocessing):
        raise RunError(f"{run.path} holds a run made with other preprocessing; "
                       "choose a new --out or pass the same preprocessing settings")


def train(cfg: ExperimentConfig, data_dir: str | Path, out: str | Path, cache_dir: str | Path | None = None,
          console: Console | None = None, resume: bool = True) -> TrainSummary:
    """Train an MSMA detector on the inliers of ``data_dir`` and store it in ``out``.

    Inliers are the scans whose age lies in ``cfg.data.inlier_ages``; they are split by subject
    into a training set (network and scorers) and a held-out set (percentile reference and the
    flag threshold). Re-running into the same ``out`` resumes from its last checkpoint.
    """
    started = time.perf_counter()
    console = console or Console(stderr=True)
    run = RunDir(out)
    if resume:
        _check_resumable(run, cfg)
    scans = load_cohort(data_dir, cfg.data)
    inliers = select_inliers(scans, cfg.data)
    if not inliers:
        low, high = cfg.data.inlier_ages
        raise CohortError(f"{data_dir}: no scan with an age in {low:g}–{high:g} years "
                          f"(ages read from column(s) {', '.join(cfg.data.age_column)})")
    if resume and run.file("split.json").is_file():
        split = run.load_split()
        train_subjects, heldout_subjects = split["train"], split["heldout"]
    else:
        train_subjects, heldout_subjects = split_subjects(inliers, cfg.data.heldout_fraction, cfg.data.split_seed)
    run.save_config(cfg)
    run.save_split(train_subjects, heldout_subjects)
    train_set, heldout_set = set(train_subjects), set(heldout_subjects)

    prepared_train = prepare_scans([s for s in inliers if s.subject in train_set], cfg.preprocessing, cache_dir,
                                   console, "preprocess train")
    prepared_held = prepare_scans([s for s in inliers if s.subject in heldout_set], cfg.preprocessing, cache_dir,
                                  console, "preprocess held-out")
    failures = prepared_train.failures + prepared_held.failures
    for path, reason in failures:
        console.print(f"[yellow]skipped[/] {path}: {reason}")
    if not prepared_train.slices or not prepared_held.slices:
        raise CohortError("no usable training or held-out inlier scan after preprocessing")

    images = torch.from_numpy(np.concatenate(prepared_train.slices))
    device = resolve_device(cfg.training.device)
    in_channels = images.shape[1]
    sigmas = sigmas_of(cfg.model)
    state = run.load_train_state() if resume else None
    if state is not None and run.file("model.safetensors").is_file():
        model = run.load_model(cfg, device)
        console.print(f"resuming from step {state.step}")
    else:
        state = None
        torch.manual_seed(cfg.training.seed)
        model = build_score_network(cfg.model, in_channels).to(device)

    def checkpoint(train_state):
        run.save_model(model, cfg, in_channels, train_state.step)
        run.save_train_state(train_state)

    last_loss = [float("nan")]
    with progress_bar(console, TextColumn("loss {task.fields[loss]:.2f}")) as progress:
        task = progress.add_task("train NCSN", total=cfg.training.steps, completed=state.step if state else 0,
                                 loss=float("nan"))

        def on_step(step, loss):
            last_loss[0] = loss
            progress.update(task, completed=step, loss=loss)

        state = train_score_network(model, images, sigmas, cfg.training.steps, cfg.training.batch_size,
                                    cfg.training.lr, cfg.training.seed, state, on_step, checkpoint,
                                    cfg.training.checkpoint_every)
    if not run.file("model.safetensors").is_file():  # steps already reached: nothing was trained
        checkpoint(state)

    train_features = extract_features(model, sigmas, prepared_train.slices, cfg.training.feature_batch_size,
                                      console, "score norms (train)")
    held_features = extract_features(model, sigmas, prepared_held.slices, cfg.training.feature_batch_size,
                                     console, "score norms (held-out)")
    stacked = np.concatenate(train_features)
    scorers = {}
    for name, params in cfg.scorers.items():
        with console.status(f"fitting {name} on {len(stacked)} score vectors"):
            scorers[name] = build_scorer(name, **params).fit(stacked)
    save_scorers(run.path, scorers)
    run.save_reference(build_reference(scan_scores(scorers, held_features), prepared_held.scans, cfg.score.tpr))
    return TrainSummary(run=run.path, n_train_scans=len(prepared_train.scans),
                        n_heldout_scans=len(prepared_held.scans), n_train_slices=len(stacked),
                        steps=state.step, final_loss=last_loss[0], failures=failures,
                        seconds=time.perf_counter() - started)
