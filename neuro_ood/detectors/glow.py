"""Hierarchical Glow (Schirrmeister et al., NeurIPS 2020): per-scale log-likelihoods of noise-free
inputs and the anomaly scores built from them."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from monai.transforms import SpatialPad

from neuro_ood.backbones.glow import ActNorm, Glow
from neuro_ood.backbones.glow_inputs import dequantize, to_glow_input
from neuro_ood.config import ExperimentConfig
from neuro_ood.detectors.base import Detector, Progress, read_meta, to_tensor
from neuro_ood.errors import RunError
from neuro_ood.features import glow_anomaly_scores, glow_bits_per_dim, glow_log_likelihoods
from neuro_ood.trainer import merge_samplers, sample_rows
from neuro_ood.trainer.steps import glow_step_fn

N_BINS = 256
ACTNORM_INIT_IMAGES = 512


def glow_input_size(cfg: ExperimentConfig, height: int, width: int) -> tuple[int, int]:
    """Smallest size ≥ (height, width) the configured Glow accepts: a multiple of the patch for the
    local variant, of 2^n_scales otherwise."""
    if cfg.model.variant == "local":
        return -(-height // cfg.model.patch) * cfg.model.patch, -(-width // cfg.model.patch) * cfg.model.patch
    return Glow.padded_size(height, width, cfg.model.n_scales)


def pad_images(images: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """Zero-pad ``(N, C, H, W)`` symmetrically to ``size`` (H', W') ≥ (H, W): ``(N, C, H', W')``."""
    images = np.asarray(images, dtype=np.float32)
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    n, c = images.shape[:2]
    folded = images.reshape(n * c, *images.shape[2:])   # MONAI pads channel-first arrays
    padded = np.asarray(SpatialPad(tuple(size), method="symmetric")(folded))
    return padded.reshape(n, c, *padded.shape[1:])


class GlowDetector(Detector):
    """Scores (nats): ``raw`` = log p(x), ``last_scale`` = the coarsest scale's term and, with a
    general-domain Glow (``model.general_run`` or ``general``), ``diff`` = log p(x) − log p_g(x).

    Inputs are zero-padded to the Glow's multiple; the network is trained with the S4.1 recipe
    (Adamax, dequantisation, translations and flips) and, given ``outliers``, the outlier loss.
    """

    method = "glow"

    def __init__(self, cfg: ExperimentConfig, device=None, general: torch.nn.Module | None = None):
        super().__init__(cfg, device)
        self._general = general

    @property
    def general(self) -> torch.nn.Module | None:
        """The general-domain Glow (given, or loaded from ``model.general_run`` on first use)."""
        if self._general is None and self.cfg.model.general_run:
            self._general = load_glow_network(self.cfg.model.general_run, self.device)
        return self._general

    def padded(self, x: np.ndarray) -> np.ndarray:
        return pad_images(x, glow_input_size(self.cfg, *x.shape[-2:]))

    def log_likelihoods(self, x: np.ndarray, model: torch.nn.Module | None = None) -> np.ndarray:
        """Per-scale log-likelihoods ``(N, n_scales)`` in nats of zero-padded, noise-free ``x``."""
        model = model if model is not None else self.scoring_network
        padded = pad_images(x, model.padded_size(*x.shape[-2:], model.n_scales))
        return glow_log_likelihoods(model, padded, batch_size=self.cfg.training.feature_batch_size)

    def bits_per_dim(self, x: np.ndarray, generator: torch.Generator | None = None) -> float:
        """Mean bits/dim of ``x`` with one sample of dequantisation noise per image (S7.1)."""
        model = self.scoring_network
        padded = pad_images(x, model.padded_size(*x.shape[-2:], model.n_scales))
        return glow_bits_per_dim(model, torch.from_numpy(padded), generator=generator)

    def score_samples(self, x: np.ndarray) -> dict[str, np.ndarray]:
        general = self.log_likelihoods(x, self.general) if self.general is not None else None
        return glow_anomaly_scores(self.log_likelihoods(x), general)

    def fit(self, x, *, groups=None, outliers: np.ndarray | None = None, checkpoint_dir=None, resume=True,
            progress: Progress | None = None) -> "GlowDetector":
        """Train on ``x (N, C, H, W)`` in [0, 1], from ``training.init_from``'s weights if set; with
        ``outliers`` (general-domain images) add ``training.outlier_loss`` (``ratio`` needs ``general``)."""
        t = self.cfg.training
        target = glow_input_size(self.cfg, *x.shape[-2:])
        images = to_glow_input(to_tensor(pad_images(x, target)), N_BINS)
        resumed = self._start_network(images.shape[1:], checkpoint_dir, resume)
        if not resumed and t.init_from:
            source = load_glow_network(t.init_from, role="training.init_from")
            self.network.load_state_dict(source.state_dict())
        if not resumed:
            self._init_actnorm(images)
        self._start_ema()
        sample, kind = sample_rows({"x": images}, t.batch_size), None
        if outliers is not None:
            outlier_images = to_glow_input(to_tensor(pad_images(outliers, target)), N_BINS)
            sample = merge_samplers(sample, sample_rows({"outliers": outlier_images}, t.batch_size))
            kind = t.outlier_loss
        optimizer = torch.optim.Adamax(self.network.parameters(), lr=t.lr, weight_decay=t.weight_decay)
        step = glow_step_fn(self.network, optimizer, self._optimize(), augment=tuple(t.augment),
                            max_shift=t.max_shift, n_bins=N_BINS, outlier_loss_kind=kind, general_model=self.general,
                            outlier_temperature=t.outlier_temperature, outlier_weight=t.outlier_weight,
                            margin=t.margin)
        stage = "train Glow (bits/dim)" if outliers is None else "train Glow + outlier loss"
        self._run_stage(stage, step, sample, {"model": optimizer}, t.steps,
                        checkpoint_dir, progress)
        return self

    def _init_actnorm(self, images: torch.Tensor) -> None:
        """Data-dependent ActNorm initialisation: one forward pass without gradients on up to 512
        dequantised training images, for a network whose ActNorms are still uninitialised."""
        if not any(isinstance(m, ActNorm) and not bool(m.initialized) for m in self.network.modules()):
            return
        generator = torch.Generator().manual_seed(self.cfg.training.seed)
        index = torch.randperm(len(images), generator=generator)[:min(len(images), ACTNORM_INIT_IMAGES)]
        self.network.train()
        with torch.no_grad():
            self.network(dequantize(images[index], N_BINS, generator).to(self.device))


def load_glow_network(directory, device=None, role: str = "model.general_run") -> torch.nn.Module:
    """The network of the Glow detector saved in ``directory`` (``role`` names the config key that
    pointed there, for the error line when it holds another method)."""
    meta = read_meta(directory)
    if meta["method"] != "glow":
        raise RunError(f"{role} {directory} is a {meta['method']} run, not a Glow run")
    return GlowDetector.load(directory, device).network
