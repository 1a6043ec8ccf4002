"""Methods: how a run's network is trained on inlier slices and how it scores slices.

A method is a callable ``slices (N, C, H, W) in [0, 1] -> {score name: (N,)}`` with higher =
more typical, built by ``train`` (on a run directory) or ``load`` (from one):

- ``msma``: noise-conditional score network -> L score norms -> GMM / flow / KD-tree scores;
- ``glow``: multi-scale Glow -> per-scale log-likelihoods -> ``raw`` (total), ``last_scale``
  (the coarsest scale's contribution) and, with ``model.general_run`` set, ``diff`` (the
  log-likelihood ratio against that general-domain Glow run).

The baselines (f-AnoGAN, ResNet classifier) follow the same pattern in ``baselines.py``.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
from rich.console import Console
from rich.progress import TextColumn

from neuro_ood.backbones.glow import Glow
from neuro_ood.config import ExperimentConfig
from neuro_ood.data.natural import fit_size
from neuro_ood.errors import RunError
from neuro_ood.features import glow_anomaly_scores, glow_log_likelihoods, score_norms
from neuro_ood.runs import RunDir, build_network, sigmas_of
from neuro_ood.scorers import AuxiliaryScorer, build_scorer, load_scorers, save_scorers
from neuro_ood.training import TrainState, resolve_device, train_glow, train_score_network
from neuro_ood.pipelines.common import batched, progress_bar


def _train_with_progress(console: Console, cfg: ExperimentConfig, run: RunDir, model: torch.nn.Module,
                         images_shape: Sequence[int], state: TrainState | None, description: str,
                         fit: Callable[..., TrainState], total: int | None = None,
                         offset: int = 0) -> tuple[TrainState, float]:
    """Run ``fit(state, on_step, on_checkpoint)`` with a progress bar and checkpoints into ``run``;
    return the final state and the last training loss. ``offset`` is added to the stored step
    (for methods trained in stages that share one step counter); ``total`` defaults to the
    configured steps."""
    total = cfg.training.steps if total is None else total

    def checkpoint(train_state: TrainState) -> None:
        run.save_model(model, cfg, images_shape[1], offset + train_state.step, image_size=images_shape[2:])
        run.save_train_state(TrainState(offset + train_state.step, train_state.optimizer))

    last_loss = [float("nan")]

    def on_step(step: int, loss: float) -> None:
        last_loss[0] = loss
        progress.update(task, completed=step, loss=loss)

    with progress_bar(console, TextColumn("loss {task.fields[loss]:.3g}")) as progress:
        task = progress.add_task(description, total=total, completed=state.step if state else 0,
                                 loss=float("nan"))
        state = fit(state, on_step, checkpoint)
    if state.step == 0 or not run.file("model.safetensors").is_file():
        checkpoint(state)
    return state, last_loss[0]


def _initial_model(cfg: ExperimentConfig, run: RunDir, images_shape: Sequence[int], resume: bool,
                   console: Console):
    """A new network for images of ``images_shape`` (N, C, H, W), or the run's, resumed."""
    device = resolve_device(cfg.training.device)
    state = run.load_train_state() if resume else None
    if state is not None and run.file("model.safetensors").is_file():
        console.print(f"resuming from step {state.step}")
        return run.load_model(cfg, device), state
    torch.manual_seed(cfg.training.seed)
    return build_network(cfg, images_shape[1], image_size=images_shape[2:]).to(device), None


class SliceMethod:
    """Shared behaviour: scores are the same for every evaluation group unless a method says otherwise."""

    final_loss = float("nan")
    seen_groups: tuple[str, ...] = ()

    def group_view(self, scores: dict[str, np.ndarray], group: str | None) -> dict[str, np.ndarray]:
        """The scores that stand for ``group`` (``None``: the reference); identity by default."""
        return scores


class MSMAMethod(SliceMethod):
    """Score norms at L noise levels, scored by each fitted auxiliary scorer."""

    def __init__(self, model: torch.nn.Module, sigmas: torch.Tensor, scorers: dict[str, AuxiliaryScorer],
                 batch_size: int = 64):
        self.model, self.sigmas, self.scorers, self.batch_size = model, sigmas, scorers, batch_size

    def features(self, images: np.ndarray) -> np.ndarray:
        """``(N, C, H, W)`` -> ``(N, L)`` score norms."""
        return score_norms(self.model, images, self.sigmas, batch_size=self.batch_size)

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        features = self.features(images)
        return {name: scorer.score_samples(features) for name, scorer in self.scorers.items()}

    def maps(self, images: np.ndarray) -> np.ndarray:
        """Voxel-level view of the score norms: sqrt(Σ_i ‖σ_i s_θ(x, σ_i)‖² per pixel), ``(N, H, W)``."""
        _, per_level = score_norms(self.model, images, self.sigmas, batch_size=self.batch_size, return_maps=True)
        return np.sqrt((per_level ** 2).sum(axis=1))

    @classmethod
    def load(cls, run: RunDir, cfg: ExperimentConfig) -> "MSMAMethod":
        model = run.load_model(cfg, resolve_device(cfg.training.device))
        return cls(model, sigmas_of(cfg.model), load_scorers(run.path), cfg.training.feature_batch_size)

    @classmethod
    def train(cls, cfg: ExperimentConfig, run: RunDir, images: np.ndarray, console: Console,
              resume: bool = True) -> "MSMAMethod":
        """Train the score network on ``images`` (N, C, H, W), then fit the scorers on their score norms."""
        model, state = _initial_model(cfg, run, images.shape, resume, console)
        sigmas = sigmas_of(cfg.model)
        t = cfg.training
        _, final_loss = _train_with_progress(
            console, cfg, run, model, images.shape, state, "train NCSN",
            lambda st, on_step, on_ckpt: train_score_network(
                model, torch.from_numpy(images), sigmas, t.steps, t.batch_size, t.lr, t.seed, st, on_step, on_ckpt,
                t.checkpoint_every))
        method = cls(model, sigmas, {}, t.feature_batch_size)
        method.final_loss = final_loss
        features = batched(lambda x: {"norms": method.features(x)}, images, 64, console,
                           "score norms (train)")["norms"]
        for name, params in cfg.scorers.items():
            with console.status(f"fitting {name} on {len(features)} score vectors"):
                method.scorers[name] = build_scorer(name, **params).fit(features)
        save_scorers(run.path, method.scorers)
        return method


def _glow_input_size(cfg: ExperimentConfig, height: int, width: int) -> tuple[int, int]:
    """Smallest size ≥ (height, width) the configured Glow accepts: a multiple of the patch for the
    local variant, of 2^n_scales otherwise."""
    if cfg.model.variant == "local":
        return -(-height // cfg.model.patch) * cfg.model.patch, -(-width // cfg.model.patch) * cfg.model.patch
    return Glow.padded_size(height, width, cfg.model.n_scales)


class GlowMethod(SliceMethod):
    """Per-scale Glow log-likelihoods of noise-free inputs (slices zero-padded to the Glow's multiple)."""

    def __init__(self, model: Glow, general: Glow | None = None, batch_size: int = 64):
        self.model, self.general, self.batch_size = model, general, batch_size

    @staticmethod
    def pad(images: np.ndarray, target: Sequence[int]) -> np.ndarray:
        """Zero-pad ``(N, C, H, W)`` symmetrically to ``target`` (H', W') ≥ (H, W)."""
        return fit_size(images, tuple(target), mode="pad")

    def log_likelihoods(self, model: Glow, images: np.ndarray) -> np.ndarray:
        """Per-scale log-likelihoods ``(N, n_scales)`` in nats of zero-padded, noise-free images."""
        padded = self.pad(images, model.padded_size(*images.shape[-2:], model.n_scales))
        return glow_log_likelihoods(model, padded, batch_size=self.batch_size)

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        general = self.log_likelihoods(self.general, images) if self.general is not None else None
        return glow_anomaly_scores(self.log_likelihoods(self.model, images), general)

    def log_likelihoods_fn(self) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
        """``images -> {"loglik": (N, n_scales)}``: the model's per-scale log-likelihoods (nats)."""
        return lambda images: {"loglik": self.log_likelihoods(self.model, images)}

    @staticmethod
    def load_general(cfg: ExperimentConfig) -> Glow | None:
        """The general-domain Glow of ``model.general_run`` (for the ``diff`` score), if set."""
        if not cfg.model.general_run:
            return None
        general_run = RunDir(cfg.model.general_run)
        general_cfg = general_run.load_config()
        if general_cfg.method != "glow":
            raise RunError(f"model.general_run {general_run.path} is a {general_cfg.method} run, not a Glow run")
        return general_run.load_model(general_cfg, resolve_device(general_cfg.training.device))

    @classmethod
    def load(cls, run: RunDir, cfg: ExperimentConfig) -> "GlowMethod":
        model = run.load_model(cfg, resolve_device(cfg.training.device))
        return cls(model, cls.load_general(cfg), cfg.training.feature_batch_size)

    @classmethod
    def train(cls, cfg: ExperimentConfig, run: RunDir, images: np.ndarray, console: Console,
              resume: bool = True, outliers: np.ndarray | None = None,
              general: Glow | None = None) -> "GlowMethod":
        """Train the Glow on ``images`` (N, C, H, W) in [0, 1] with the S4.1 recipe (Adamax,
        dequantisation, augmentation), starting from ``training.init_from``'s weights if set; with
        ``outliers`` (general-domain images) add the outlier loss (S4.4; ``ratio`` needs ``general``)."""
        target = _glow_input_size(cfg, *images.shape[-2:])
        padded = torch.from_numpy(cls.pad(images, target))
        model, state = _initial_model(cfg, run, padded.shape, resume, console)
        t = cfg.training
        if state is None and t.init_from:
            source = RunDir(t.init_from)
            model.load_state_dict(source.load_model(source.load_config()).state_dict())
            console.print(f"fine-tuning from {source.path}")
        padded_outliers = torch.from_numpy(cls.pad(outliers, target)) if outliers is not None else None
        _, final_loss = _train_with_progress(
            console, cfg, run, model, padded.shape, state,
            "train Glow (bits/dim)" if outliers is None else "train Glow + outlier loss",
            lambda st, on_step, on_ckpt: train_glow(
                model, padded, t.steps, batch_size=t.batch_size, lr=t.lr, weight_decay=t.weight_decay,
                seed=t.seed, state=st, on_step=on_step, on_checkpoint=on_ckpt,
                checkpoint_every=t.checkpoint_every, augment=tuple(t.augment), max_shift=t.max_shift,
                warmup_steps=t.warmup_steps, outliers01=padded_outliers, general_model=general,
                outlier_temperature=t.outlier_temperature, outlier_weight=t.outlier_weight,
                outlier_loss_kind=t.outlier_loss, margin=t.margin))
        method = cls(model.eval(), cls.load_general(cfg), t.feature_batch_size)
        method.final_loss = final_loss
        return method


