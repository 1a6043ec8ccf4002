"""f-AnoGAN (Schlegl et al., Medical Image Analysis 2019; MSMA A.7): WGAN-GP on inliers, then the
izif encoder with generator and critic frozen; the anomaly score is the izif residual."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import numpy as np
import torch
from torch import nn

from neuro_ood.detectors.base import Detector, Progress, to_tensor
from neuro_ood.trainer import sample_rows
from neuro_ood.trainer.steps import izif_step_fn, wgan_gp_step_fn


@contextmanager
def frozen(*modules: nn.Module) -> Iterator[None]:
    """``modules`` in eval mode with ``requires_grad=False`` for the block; modes and flags restored."""
    modes = [(m, m.training) for module in modules for m in module.modules()]
    flags = [(p, p.requires_grad) for module in modules for p in module.parameters()]
    for module in modules:
        module.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for m, training in modes:
            m.train(training)
        for p, flag in flags:
            p.requires_grad_(flag)


class FAnoGANDetector(Detector):
    """Score ``fanogan`` = −(image residual + κ · critic-feature residual), so higher = more typical
    like every neuro-ood score. Maps: the per-pixel squared residual ``|x − G(E(x))|²`` (channel mean).

    Training runs ``training.steps`` generator steps (``fanogan.n_critic`` critic steps each), then
    ``fanogan.encoder_steps`` encoder steps, on one step counter, so a run resumes in either stage;
    Adam at ``training.lr`` with ``fanogan.betas`` (the original code: 1e-4, (0, 0.9)).
    """

    method = "fanogan"
    localises = True
    map_unit = "squared residual of the reconstruction"

    def training_steps(self) -> int:
        """``training.steps`` generator steps, then ``fanogan.encoder_steps`` encoder steps."""
        return self.cfg.training.steps + self.cfg.fanogan.encoder_steps

    def fit(self, x, *, groups=None, outliers=None, checkpoint_dir=None, resume=True,
            progress: Progress | None = None) -> "FAnoGANDetector":
        t, f = self.cfg.training, self.cfg.fanogan
        self._start_network(x.shape[1:], checkpoint_dir, resume)
        self._start_ema()
        model, images = self.network, to_tensor(x)
        betas = tuple(f.betas)
        opt_g = torch.optim.Adam(model.generator.parameters(), lr=t.lr, betas=betas)
        opt_d = torch.optim.Adam(model.critic.parameters(), lr=t.lr, betas=betas)
        gan_step = wgan_gp_step_fn(model.generator, model.critic, opt_g, opt_d, self._optimize(), f.gp_weight)
        self._run_stage("train WGAN-GP (critic loss)", gan_step, sample_rows({"x": images}, t.batch_size, f.n_critic),
                        {"generator": opt_g, "critic": opt_d}, t.steps, checkpoint_dir, progress)
        opt_e = torch.optim.Adam(model.encoder.parameters(), lr=t.lr, betas=betas)
        izif_step = izif_step_fn(model.encoder, model.generator, model.critic, opt_e, self._optimize(), f.kappa)
        with frozen(model.generator, model.critic):
            self._run_stage("train izif encoder", izif_step, sample_rows({"x": images}, t.batch_size),
                            {"encoder": opt_e}, t.steps + f.encoder_steps, checkpoint_dir, progress, start=t.steps)
        return self

    def score_samples(self, x: np.ndarray) -> dict[str, np.ndarray]:
        score = self.scoring_network.score(to_tensor(x), batch_size=self.cfg.training.feature_batch_size)
        return {"fanogan": -score.double().numpy()}

    def maps(self, x: np.ndarray) -> np.ndarray:
        """``x (N, C, H, W)`` -> ``(N, H, W)`` float32, higher = more atypical."""
        return self.scoring_network.residual_map(to_tensor(x)).mean(1).numpy()
