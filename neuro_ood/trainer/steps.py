"""Step functions: one optimisation step of each method on one sampled batch.

Each ``*_step_fn`` returns a :data:`~neuro_ood.trainer.loop.StepFn` ``(batch, generator) ->
StepResult`` for :func:`~neuro_ood.trainer.loop.train_loop`. The loss is a small pure function in
:mod:`neuro_ood.losses`; ``optimize`` (:func:`~neuro_ood.trainer.loop.optimization_manager`) does
backward, gradient clipping and the optimiser step. Batches are CPU tensors; a step moves them to
its network's device. Random draws inside a step (noise levels, dequantisation, latents) come
from the loop's CPU generator.

In distributed training (:mod:`neuro_ood.trainer.distributed`) every process receives the same
global batch, draws the random numbers for all of its rows, and runs the network on its own share
(``shard``, by default the process group's :func:`~neuro_ood.trainer.distributed.current`); in a
single process the share is the whole batch.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from neuro_ood.backbones.fanogan import sample_latent
from neuro_ood.backbones.glow_inputs import dequantize
from neuro_ood.losses import (dsm_loss, glow_nll_bits, izif_loss, margin_outlier_loss, outlier_loss,
                              wgan_critic_loss, wgan_generator_loss)
from neuro_ood.trainer.distributed import Shard, any_rank, current
from neuro_ood.trainer.loop import StepFn, StepResult

Optimize = Callable[[torch.optim.Optimizer, torch.Tensor], bool]


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def dsm_step_fn(model: nn.Module, optimizer: torch.optim.Optimizer, sigmas: torch.Tensor,
                optimize: Optimize, shard: Shard | None = None) -> StepFn:
    """Denoising score matching (λ(σ) = σ², :func:`~neuro_ood.losses.dsm_loss`) on ``batch["x"]``
    ``(B, C, *spatial)`` in [0, 1], one random level of ``sigmas (L,)`` per example."""
    device = _device(model)
    sigmas = torch.as_tensor(sigmas, dtype=torch.float32)
    shard = shard or current()

    def step(batch: dict[str, torch.Tensor], generator: torch.Generator) -> StepResult:
        model.train()
        x = batch["x"]
        if shard.active:
            rows = shard.rows(len(x))
            loss = dsm_loss(model, x[rows].to(device), sigmas, generator=generator, rows=rows, batch_size=len(x))
        else:
            loss = dsm_loss(model, x.to(device), sigmas, generator=generator)
        return StepResult(loss.item(), skipped=not optimize(optimizer, loss))

    return step


def classifier_step_fn(model: nn.Module, optimizer: torch.optim.Optimizer, optimize: Optimize,
                       shard: Shard | None = None) -> StepFn:
    """Cross-entropy of ``model(batch["x"]) (B, K)`` against ``batch["y"] (B,)`` integer classes."""
    device = _device(model)
    shard = shard or current()

    def step(batch: dict[str, torch.Tensor], generator: torch.Generator) -> StepResult:
        model.train()
        x, y = shard.take(batch["x"]), shard.take(batch["y"])
        loss = F.cross_entropy(model(x.to(device)), y.to(device))
        return StepResult(loss.item(), skipped=not optimize(optimizer, loss))

    return step


def augment_images(x: torch.Tensor, generator: torch.Generator, augment: tuple[str, ...], max_shift: int
                   ) -> torch.Tensor:
    """Random translations by up to ``max_shift`` pixels (reflection padding) and horizontal flips.

    ``x (B, C, H, W)``; each example gets its own shift and flip. ``augment``: any of
    ``"translate"``, ``"flip"``.
    """
    b, c, h, w = x.shape
    if "translate" in augment and max_shift > 0:
        padded = F.pad(x, (max_shift,) * 4, mode="reflect")
        dy = torch.randint(2 * max_shift + 1, (b,), generator=generator).to(x.device)
        dx = torch.randint(2 * max_shift + 1, (b,), generator=generator).to(x.device)
        rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
        cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
        batch = torch.arange(b, device=x.device)[:, None, None, None]
        channel = torch.arange(c, device=x.device)[None, :, None, None]
        x = padded[batch, channel, rows, cols]
    if "flip" in augment:
        flip = (torch.rand(b, generator=generator) < 0.5).to(x.device).view(-1, 1, 1, 1)
        x = torch.where(flip, x.flip(-1), x)
    return x


def _finite_log_px(model: nn.Module, x: torch.Tensor, log_p_general: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``log p(x) (B,)`` with grad, recomputed on the examples that came out finite (S4.3).

    Backpropagating through a masked −inf output can still give NaN gradients, so when some but at
    most 75 % of the examples are non-finite (in ``log p`` or in ``log_p_general (B,)``), the forward
    pass is redone on the others and ``log_p_general`` is cut to match. Otherwise the outputs are
    returned as they are (all finite, or a batch the outlier loss will skip).
    """
    log_px = model(x).log_px
    finite = torch.isfinite(log_px.detach())
    if log_p_general is not None:
        finite &= torch.isfinite(log_p_general)
    n_finite = int(finite.sum())
    if n_finite == len(x) or 4 * n_finite < len(x) or n_finite == 0:
        return log_px, log_p_general
    del log_px
    return model(x[finite]).log_px, None if log_p_general is None else log_p_general[finite]


def glow_step_fn(model: nn.Module, optimizer: torch.optim.Optimizer, optimize: Optimize, *,
                 augment: tuple[str, ...] = ("translate", "flip"), max_shift: int = 2, n_bins: int = 256,
                 outlier_loss_kind: str | None = None, general_model: nn.Module | None = None,
                 outlier_temperature: float = 1000.0, outlier_weight: float = 6000.0,
                 margin: float = 1.0, shard: Shard | None = None) -> StepFn:
    """Maximum likelihood of a Glow (S4.1), optionally with an outlier loss (S4.4, S7.5).

    ``batch["x"] (B, C, H, W)`` are inliers already quantised by
    :func:`~neuro_ood.backbones.glow_inputs.to_glow_input`; they are augmented, dequantised with
    uniform noise, and the loss is the NLL in bits per dimension
    (:func:`~neuro_ood.losses.glow_nll_bits`).

    With ``outlier_loss_kind`` and ``batch["outliers"]`` (general-domain images, same convention):

    - ``"ratio"`` (Eq. S1): :func:`~neuro_ood.losses.outlier_loss` with log p_g(x_g) from the
      frozen ``general_model`` (evaluated without gradients) and log p_in(x_g) from ``model``;
    - ``"margin"`` (Outlier Exposure, S7.5): :func:`~neuro_ood.losses.margin_outlier_loss` on
      log-likelihoods in nats per dimension, ``margin`` in nats per dimension.

    The outlier term is divided by ``n_dims · ln 2`` to sit beside the NLL in bits per dimension
    (the total is the paper's objective divided by ``n_dims · ln 2``). Outlier examples with
    non-finite log-likelihoods are dropped; if more than 75 % of them would be, or a gradient is
    non-finite, the step is skipped (S4.3).
    """
    if outlier_loss_kind not in (None, "ratio", "margin"):
        raise ValueError(f"outlier_loss_kind must be 'ratio' or 'margin', got {outlier_loss_kind!r}")
    if outlier_loss_kind == "ratio" and general_model is None:
        raise ValueError("the ratio outlier loss (Eq. S1) needs general_model, the frozen general-domain Glow")
    device = _device(model)
    if general_model is not None:
        general_model.eval()
        general_device = _device(general_model)
    augment = tuple(augment)
    shard = shard or current()

    def prepare(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The whole batch augmented and dequantised, this process's rows of it on the device."""
        return shard.take(dequantize(augment_images(x, generator, augment, max_shift), n_bins, generator)).to(device)

    def step(batch: dict[str, torch.Tensor], generator: torch.Generator) -> StepResult:
        model.train()
        x = prepare(batch["x"], generator)
        n_dims = int(x[0].numel())
        log_px = model(x).log_px
        loss = glow_nll_bits(log_px, n_dims, n_bins)
        if outlier_loss_kind is not None and "outliers" in batch:
            x_g = prepare(batch["outliers"], generator)
            if outlier_loss_kind == "ratio":
                with torch.no_grad():
                    log_p_general = general_model(x_g.to(general_device)).log_px.to(device)
                log_p_in, log_p_general = _finite_log_px(model, x_g, log_p_general)
                extra, n_used = outlier_loss(log_p_in, log_p_general, outlier_temperature, outlier_weight)
            else:
                log_p_out, _ = _finite_log_px(model, x_g)
                finite = torch.isfinite(log_p_out.detach())
                n_used = int(finite.sum()) if 4 * int(finite.sum()) >= len(x_g) else 0
                extra = (margin_outlier_loss(log_px / n_dims, log_p_out[finite] / n_dims, margin) * n_dims
                         if n_used else log_p_out.new_zeros(()))
            loss = loss + extra / (n_dims * math.log(2.0))
            if any_rank(n_used == 0):  # every process skips together
                optimizer.zero_grad(set_to_none=True)
                return StepResult(loss.item(), skipped=True)
        return StepResult(loss.item(), skipped=not optimize(optimizer, loss))

    return step


def wgan_gp_step_fn(generator_net: nn.Module, critic: nn.Module, generator_optimizer: torch.optim.Optimizer,
                    critic_optimizer: torch.optim.Optimizer, optimize: Optimize, gp_weight: float = 10.0,
                    shard: Shard | None = None) -> StepFn:
    """One generator step of WGAN-GP (f-AnoGAN stage 1), preceded by one critic step per real batch.

    ``batch["x"] (n_critic, B, C, H, W)``: a real batch for each critic step, which minimises
    :func:`~neuro_ood.losses.wgan_critic_loss`; then the generator minimises
    :func:`~neuro_ood.losses.wgan_generator_loss` with the critic's parameters frozen. Latents come
    from U[−1, 1]^d. The reported loss is the last critic loss.
    """
    device = _device(generator_net)
    critic_params = [p for p in critic.parameters() if p.requires_grad]
    shard = shard or current()

    def latents(b: int, generator: torch.Generator) -> torch.Tensor:
        """Latents for a global batch of ``b``; this process's rows on the device."""
        return shard.take(sample_latent(b, generator_net.latent_dim, generator)).to(device)

    def step(batch: dict[str, torch.Tensor], generator: torch.Generator) -> StepResult:
        generator_net.train()
        critic.train()
        reals = batch["x"]
        b = reals.shape[1]
        skipped = False
        rows = shard.rows(b) if shard.active else None
        for real in reals:
            real = shard.take(real).to(device)
            with torch.no_grad():
                fake = generator_net(latents(b, generator))
            d_loss = wgan_critic_loss(critic, real, fake, gp_weight, generator,
                                      rows=rows, batch_size=b if shard.active else None)
            skipped |= not optimize(critic_optimizer, d_loss)
        for p in critic_params:
            p.requires_grad_(False)
        try:
            fake = generator_net(latents(b, generator))
            skipped |= not optimize(generator_optimizer, wgan_generator_loss(critic, fake))
        finally:
            for p in critic_params:
                p.requires_grad_(True)
        return StepResult(d_loss.item(), skipped=skipped)

    return step


def izif_step_fn(encoder: nn.Module, generator_net: nn.Module, critic: nn.Module, optimizer: torch.optim.Optimizer,
                 optimize: Optimize, kappa: float = 1.0, shard: Shard | None = None) -> StepFn:
    """One step of the izif encoder (f-AnoGAN stage 2) on :func:`~neuro_ood.losses.izif_loss` of
    ``batch["x"] (B, C, H, W)``; the caller keeps the generator and critic frozen (eval mode, no
    gradients) for the stage."""
    device = _device(encoder)
    shard = shard or current()

    def step(batch: dict[str, torch.Tensor], generator: torch.Generator) -> StepResult:
        encoder.train()
        loss = izif_loss(shard.take(batch["x"]).to(device), encoder, generator_net, critic, kappa)
        return StepResult(loss.item(), skipped=not optimize(optimizer, loss))

    return step
