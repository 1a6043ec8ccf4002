"""The baselines as methods: f-AnoGAN (MSMA A.7) and the ResNet classifier (MSMA 5.4, Glow S9).

- ``fanogan``: WGAN-GP on inlier slices, then the izif encoder; score = −(image residual +
  κ · critic-feature residual), so that higher = more typical like every neuro-ood score.
- ``resnet``: a MONAI ResNet trained on inliers against one named outlier group; unseen groups are
  scored by the maximum softmax probability, the group it saw by its outlier output (paper A.2).
"""

from __future__ import annotations

import numpy as np
import torch
from rich.console import Console

from neuro_ood.baselines.classifier import classifier_scores, score_rule, train_classifier
from neuro_ood.baselines.fanogan import FAnoGAN, GanTrainState, train_izif_encoder, train_wgan_gp
from neuro_ood.config import ExperimentConfig
from neuro_ood.runs import RunDir
from neuro_ood.training import TrainState, resolve_device
from neuro_ood.pipelines.methods import SliceMethod, _initial_model, _train_with_progress


class FAnoGANMethod(SliceMethod):
    """``images -> {"fanogan": −anomaly score}``; ``maps`` gives the per-pixel residuals."""

    def __init__(self, model: FAnoGAN, batch_size: int = 64):
        self.model, self.batch_size = model.eval(), batch_size

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        score = self.model.score(torch.from_numpy(np.ascontiguousarray(images)), batch_size=self.batch_size)
        return {"fanogan": -score.double().numpy()}

    def maps(self, images: np.ndarray) -> np.ndarray:
        """Per-pixel squared residual |x − G(E(x))|², mean over channels: ``(N, H, W)``."""
        return self.model.residual_map(torch.from_numpy(np.ascontiguousarray(images))).mean(1).numpy()

    @classmethod
    def load(cls, run: RunDir, cfg: ExperimentConfig) -> "FAnoGANMethod":
        return cls(run.load_model(cfg, resolve_device(cfg.training.device)), cfg.training.feature_batch_size)

    @classmethod
    def train(cls, cfg: ExperimentConfig, run: RunDir, images: np.ndarray, console: Console,
              resume: bool = True) -> "FAnoGANMethod":
        """WGAN-GP for ``training.steps`` generator steps, then the encoder for ``fanogan.encoder_steps``;
        one step counter runs over both stages, so a run resumes in either."""
        model, state = _initial_model(cfg, run, images.shape, resume, console)
        t, f = cfg.training, cfg.fanogan
        x = torch.from_numpy(images)
        gan_steps = t.steps
        if state is None or state.step < gan_steps:
            _, loss = _train_with_progress(
                console, cfg, run, model, images.shape, state, "train WGAN-GP (critic loss)",
                lambda st, on_step, on_ckpt: train_wgan_gp(
                    model.generator, model.critic, x, gan_steps, t.batch_size, t.lr, (0.5, 0.999), f.n_critic,
                    f.gp_weight, t.seed, GanTrainState.from_train_state(st), on_step, on_ckpt, t.checkpoint_every))
            state = None
        else:
            state = TrainState(state.step - gan_steps, state.optimizer if state.step > gan_steps else None)
        _, loss = _train_with_progress(
            console, cfg, run, model, images.shape, state, "train izif encoder",
            lambda st, on_step, on_ckpt: train_izif_encoder(
                model.encoder, model.generator, model.critic, x, f.encoder_steps, t.batch_size, t.lr, (0.5, 0.999),
                f.kappa, t.seed, st, on_step, on_ckpt, t.checkpoint_every),
            total=f.encoder_steps, offset=gan_steps)
        method = cls(model, t.feature_batch_size)
        method.final_loss = loss
        return method


class ResNetMethod(SliceMethod):
    """``images -> {"msp", "outlier_logit"}``; :meth:`group_view` applies the paper's rule per group."""

    needs_outlier_group = True

    def __init__(self, model: torch.nn.Module, seen_group: str, batch_size: int = 64):
        self.model, self.batch_size = model.eval(), batch_size
        self.seen_groups = (seen_group,)

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        scores = classifier_scores(self.model, images, self.batch_size)
        return {"msp": scores["msp"], "outlier_logit": scores["outlier_logit"]}

    def group_view(self, scores: dict[str, np.ndarray], group: str | None) -> dict[str, np.ndarray]:
        """One ``resnet`` score: the outlier output for the group seen in training, else the MSP."""
        return {"resnet": scores[score_rule(group in self.seen_groups)]}

    @classmethod
    def load(cls, run: RunDir, cfg: ExperimentConfig) -> "ResNetMethod":
        model = run.load_model(cfg, resolve_device(cfg.training.device))
        return cls(model, cfg.resnet.outlier_group, cfg.training.feature_batch_size)

    @classmethod
    def train(cls, cfg: ExperimentConfig, run: RunDir, images: np.ndarray, console: Console,
              resume: bool = True, outliers: np.ndarray | None = None) -> "ResNetMethod":
        """Cross-entropy on inlier ``images`` (class 0) against ``outliers`` (class 1), class-balanced."""
        if outliers is None or not len(outliers):
            raise ValueError("the ResNet baseline needs outlier images to train on")
        model, state = _initial_model(cfg, run, images.shape, resume, console)
        t = cfg.training
        x = np.concatenate([images, outliers])
        y = np.concatenate([np.zeros(len(images), np.int64), np.ones(len(outliers), np.int64)])
        _, loss = _train_with_progress(
            console, cfg, run, model, images.shape, state, "train ResNet classifier",
            lambda st, on_step, on_ckpt: train_classifier(model, x, y, t.steps, t.batch_size, t.lr, t.seed,
                                                          True, st, on_step, on_ckpt, t.checkpoint_every))
        method = cls(model, cfg.resnet.outlier_group, t.feature_batch_size)
        method.final_loss = loss
        return method
