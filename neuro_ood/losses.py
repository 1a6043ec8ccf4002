"""Training losses: denoising score matching over noise levels (MSMA Eq. 2, Song & Ermon 2019),
Glow's maximum-likelihood and outlier losses (Schirrmeister et al., NeurIPS 2020) and f-AnoGAN's
WGAN-GP and izif encoder losses (Schlegl et al. 2019; Gulrajani et al. 2017).

Glow's input transforms (quantisation, dequantisation, bin centres) are in
:mod:`neuro_ood.backbones.glow_inputs`."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from neuro_ood.backbones.fanogan import izif_residuals
from neuro_ood.backbones.glow import bits_per_dim

ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def dsm_loss(score_fn: ScoreFn, x: torch.Tensor, sigmas: torch.Tensor,
             generator: torch.Generator | None = None, rows: slice | None = None,
             batch_size: int | None = None) -> torch.Tensor:
    """Noise-conditional denoising score-matching loss with λ(σ) = σ².

    Each example draws a level σ_i uniformly from ``sigmas`` and noise z ~ N(0, I); with
    x̃ = x + σ_i z the target score is ∇ log q(x̃|x) = −z/σ_i, so

        ½ λ(σ_i) ‖s_θ(x̃, σ_i) + z/σ_i‖² = ½ ‖σ_i s_θ(x̃, σ_i) + z‖²,

    summed over the input dimensions and averaged over the batch.

    Parameters
    ----------
    score_fn : callable ``(x (B, C, *spatial), sigma (B,)) -> (B, C, *spatial)``.
    x : clean inputs ``(B, C, *spatial)``.
    sigmas : ``(L,)`` noise levels.
    rows, batch_size : in distributed training ``x`` holds rows ``rows`` of a global batch of
        ``batch_size``; the levels and the noise are drawn for the whole batch and these rows kept,
        so each example gets what a single process would give it.
    """
    n = x.shape[0] if batch_size is None else batch_size
    index = torch.randint(len(sigmas), (n,), generator=generator, device="cpu")
    noise = torch.randn((n, *x.shape[1:]), generator=generator, device="cpu")
    if rows is not None:
        index, noise = index[rows], noise[rows]
    sigma = sigmas.to(x.device)[index.to(x.device)]
    noise = noise.to(x.device, x.dtype)
    sigma_b = sigma.view(-1, *([1] * (x.dim() - 1)))
    score = score_fn(x + sigma_b * noise, sigma)
    return 0.5 * (sigma_b * score + noise).pow(2).flatten(1).sum(dim=1).mean()


def glow_nll_bits(log_px: torch.Tensor, n_dims: int, n_bins: int = 256) -> torch.Tensor:
    """Glow's training loss: mean negative log-likelihood in bits per dimension of discretised data.

    Parameters
    ----------
    log_px : Tensor
        ``(B,)`` continuous log-density of the dequantised inputs, in nats (``GlowOutput.log_px``).
    n_dims : int
        ``C · H · W`` of one input.

    Returns
    -------
    Tensor
        Scalar, bits per dimension averaged over the batch (see
        :func:`neuro_ood.backbones.glow.bits_per_dim`).
    """
    return bits_per_dim(log_px, n_dims, n_bins).mean()


def outlier_loss(log_p_in: torch.Tensor, log_p_general: torch.Tensor, temperature: float = 1000.0,
                 weight: float = 6000.0) -> tuple[torch.Tensor, int]:
    """Outlier loss of Eq. S1 on a batch ``x_g`` of general-domain (outlier) images, with the S4.3 safeguard.

    ``L_o = −λ · log σ((log p_g(x_g) − log p_in(x_g)) / T)``, computed as ``−λ · logsigmoid(·)``
    and averaged over the examples kept; it is the binary cross-entropy (target "general") of the
    logit ``(log p_in − log p_g) / T``, so it pushes ``log p_in(x_g)`` below ``log p_g(x_g)``.

    Safeguard (S4.3): examples whose ``log_p_in`` is not finite (−inf, +inf or NaN) are dropped, as
    are examples whose ``log_p_general`` is not finite (the term would be infinite). If more than 75 %
    of the batch would be dropped (``4 · n_used < B``), the batch is to be skipped: the loss is then
    a zero that is still part of the graph of ``log_p_in`` (its backward pass gives zero gradients)
    and ``n_used = 0``. Exactly 75 % dropped is kept. Note that gradients through a model output
    that was −inf may still be NaN upstream; :func:`neuro_ood.trainer.steps.glow_step_fn` therefore
    recomputes the forward pass on the kept examples.

    Parameters
    ----------
    log_p_in : Tensor
        ``(B,)`` log p_in(x_g) under the model being trained, in nats (with grad).
    log_p_general : Tensor
        ``(B,)`` log p_g(x_g) under the frozen general-domain model, in nats (no grad needed;
        it is detached here).
    temperature : float
        ``T`` (1000 in the paper, for log-likelihoods in nats of 3×32×32 images).
    weight : float
        ``λ`` (6000 in the paper).

    Returns
    -------
    loss : Tensor
        Scalar, in the units of ``λ`` × nats (the paper adds it to a per-image NLL in nats).
    n_used : int
        Number of examples that entered the mean; 0 means "skip this batch".
    """
    log_p_general = log_p_general.detach().to(log_p_in.dtype)
    finite = torch.isfinite(log_p_in.detach()) & torch.isfinite(log_p_general)
    n_used = int(finite.sum())
    if 4 * n_used < len(log_p_in) or n_used == 0:
        return torch.where(finite, log_p_in, torch.zeros_like(log_p_in)).sum() * 0.0, 0
    logit = (log_p_general[finite] - log_p_in[finite]) / temperature
    return -weight * F.logsigmoid(logit).mean(), n_used


def margin_outlier_loss(log_p_in_inliers: torch.Tensor, log_p_in_outliers: torch.Tensor, margin: float,
                        detach_inliers: bool = True) -> torch.Tensor:
    """Outlier Exposure margin loss for likelihood models (Hendrycks et al., ICLR 2019; S7.5).

    ``mean_i max(0, margin + log p(x_out,i) − log p(x_in,i))`` over the pairs ``i < min(B_in, B_out)``
    (the first examples of each batch are paired): outliers are pushed to at least ``margin`` below
    the paired inlier's log-likelihood, and pairs already that far apart contribute nothing.

    Units: the function is unit-agnostic, but all three quantities must share one unit. Hendrycks et
    al. (and the paper's comparison code) use total log-likelihoods in nats with ``margin = C·H·W``
    (the number of dimensions), i.e. one nat per dimension; :func:`neuro_ood.trainer.steps.glow_step_fn`
    passes nats per dimension (``log_px / n_dims``) with ``margin = 1.0`` — the same loss divided by
    ``n_dims``.

    Parameters
    ----------
    log_p_in_inliers : Tensor
        ``(B_in,)`` log-likelihoods of inliers under the model being trained.
    log_p_in_outliers : Tensor
        ``(B_out,)`` log-likelihoods of outliers under the same model.
    margin : float
        Required gap, in the same unit.
    detach_inliers : bool
        Stop the gradient through the inlier term (as in the paper's code: the inliers are trained
        by the maximum-likelihood loss only, the margin loss moves the outliers).

    Returns
    -------
    Tensor
        Scalar, in the unit of the inputs.
    """
    n = min(len(log_p_in_inliers), len(log_p_in_outliers))
    inliers = log_p_in_inliers[:n]
    if detach_inliers:
        inliers = inliers.detach()
    return F.relu(margin + log_p_in_outliers[:n] - inliers).mean()


def gradient_penalty(critic: nn.Module, real: torch.Tensor, fake: torch.Tensor,
                     generator: torch.Generator | None = None, rows: slice | None = None,
                     batch_size: int | None = None) -> torch.Tensor:
    """WGAN-GP penalty ``E[(‖∇_x̂ D(x̂)‖₂ − 1)²]`` (Gulrajani et al. 2017), a scalar with graph.

    Parameters
    ----------
    critic : nn.Module
        ``x (B, C, H, W) -> (B,)``.
    real, fake : Tensor
        ``(B, C, H, W)`` real and generated images (both detached here).
    generator : torch.Generator, optional
        Random source (CPU) of the interpolation weights ``ε ~ U[0, 1]``, one per example;
        ``x̂ = ε·real + (1 − ε)·fake``.
    rows, batch_size : rows ``rows`` of a global batch of ``batch_size`` (distributed training,
        see :func:`dsm_loss`): ε is drawn for the whole batch and these rows kept.

    Returns
    -------
    Tensor
        ``()``; computed with ``create_graph=True`` so that it can be backpropagated to the critic's
        parameters. The norm is ``sqrt(Σ g² + 1e-12)`` to keep its gradient finite at g = 0.
    """
    eps = torch.rand(len(real) if batch_size is None else batch_size, *([1] * (real.dim() - 1)), generator=generator)
    eps = (eps if rows is None else eps[rows]).to(real.device, real.dtype)
    x_hat = (eps * real.detach() + (1.0 - eps) * fake.detach()).requires_grad_(True)
    (grad,) = torch.autograd.grad(critic(x_hat).sum(), x_hat, create_graph=True)
    norm = torch.sqrt(grad.flatten(1).pow(2).sum(1) + 1e-12)
    return (norm - 1.0).pow(2).mean()


def izif_loss(x: torch.Tensor, encoder: nn.Module, generator: nn.Module, critic: nn.Module,
              kappa: float = 1.0) -> torch.Tensor:
    """izif training loss ``MSE(x, G(E(x))) + κ · MSE(f_D(x), f_D(G(E(x))))``, a scalar with graph.

    The batch mean of :meth:`neuro_ood.backbones.fanogan.FAnoGAN.score`'s per-image sum: κ weighs the
    FEATURE residual, the image residual has weight 1 (:func:`~neuro_ood.backbones.fanogan.izif_residuals`).
    Modules are used in whatever mode they are in.

    Parameters
    ----------
    x : Tensor
        ``(B, C, H, W)`` images in [0, 1].
    kappa : float
        Weight of the critic-feature residual (1 in f-AnoGAN).
    """
    residual_image, residual_features = izif_residuals(x, encoder, generator, critic)
    return (residual_image + kappa * residual_features).mean()


def wgan_critic_loss(critic: nn.Module, real: torch.Tensor, fake: torch.Tensor, gp_weight: float,
                     generator: torch.Generator | None = None, rows: slice | None = None,
                     batch_size: int | None = None) -> torch.Tensor:
    """WGAN-GP critic loss ``mean D(fake) − mean D(real) + gp_weight · gradient_penalty``, a scalar with graph.

    Parameters
    ----------
    critic : nn.Module
        ``x (B, C, H, W) -> (B,)``.
    real, fake : Tensor
        ``(B, C, H, W)`` real and generated images; ``fake`` is normally generated without gradients.
    gp_weight : float
        Weight of :func:`gradient_penalty` (10 in WGAN-GP and f-AnoGAN).
    generator : torch.Generator, optional
        Random source (CPU) of the penalty's interpolation weights.
    rows, batch_size : passed to :func:`gradient_penalty` (distributed training).

    Returns
    -------
    Tensor
        ``()``, minimised over the critic's parameters.
    """
    return critic(fake).mean() - critic(real).mean() + gp_weight * gradient_penalty(critic, real, fake, generator,
                                                                           rows, batch_size)


def wgan_generator_loss(critic: nn.Module, fake: torch.Tensor) -> torch.Tensor:
    """WGAN generator loss ``−mean D(fake)`` for generated images ``fake (B, C, H, W)``; ``()`` with
    graph, minimised over the generator's parameters (the critic's are normally frozen)."""
    return -critic(fake).mean()
