"""Training losses: denoising score matching over noise levels (MSMA Eq. 2, Song & Ermon 2019)
and Glow's maximum-likelihood and outlier losses (Schirrmeister et al., NeurIPS 2020)."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from neuro_ood.backbones.glow import bits_per_dim

ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def dsm_loss(score_fn: ScoreFn, x: torch.Tensor, sigmas: torch.Tensor,
             generator: torch.Generator | None = None) -> torch.Tensor:
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
    """
    index = torch.randint(len(sigmas), (x.shape[0],), generator=generator, device="cpu").to(x.device)
    sigma = sigmas.to(x.device)[index]
    noise = torch.randn(x.shape, generator=generator, device="cpu").to(x.device, x.dtype)
    sigma_b = sigma.view(-1, *([1] * (x.dim() - 1)))
    score = score_fn(x + sigma_b * noise, sigma)
    return 0.5 * (sigma_b * score + noise).pow(2).flatten(1).sum(dim=1).mean()


def to_glow_input(x01: torch.Tensor, n_bins: int = 256) -> torch.Tensor:
    """Quantise images in [0, 1] to ``n_bins`` levels and shift them to ``[-0.5, 0.5 − 1/n_bins]``.

    Level ``k = min(⌊x · n_bins⌋, n_bins − 1)`` maps to ``k / n_bins − 0.5`` (S4.1). For 8-bit data
    stored as ``k / 255`` and ``n_bins = 256`` this recovers ``k`` exactly; for fewer bins it equals
    Glow's ``⌊k / 2^(8 − n_bits)⌋``.

    Parameters
    ----------
    x01 : Tensor
        Images ``(B, C, H, W)`` (any shape), intensities in [0, 1]; values outside are clipped.
    n_bins : int
        Quantisation levels per dimension.

    Returns
    -------
    Tensor
        Same shape, on the grid ``{k / n_bins − 0.5 : k = 0 … n_bins − 1}``.
    """
    levels = torch.clamp(torch.floor(x01.clamp(0.0, 1.0) * n_bins), max=n_bins - 1)
    return levels / n_bins - 0.5


def dequantize(x: torch.Tensor, n_bins: int = 256, generator: torch.Generator | None = None) -> torch.Tensor:
    """Uniform dequantisation for training: ``x + u``, ``u ~ U[0, 1/n_bins)`` per dimension.

    Parameters
    ----------
    x : Tensor
        Quantised inputs from :func:`to_glow_input`, any shape; the result stays inside each
        input's bin ``[x, x + 1/n_bins)``.
    generator : torch.Generator, optional
        CPU generator for the noise (the noise is drawn on the CPU, then moved to ``x``'s device).
    """
    noise = torch.rand(x.shape, generator=generator, device="cpu").to(x.device, x.dtype)
    return x + noise / n_bins


def center_bins(x: torch.Tensor, n_bins: int = 256) -> torch.Tensor:
    """Noise-free evaluation input (S4.5): ``x + 1 / (2 n_bins)``, the centre of each bin."""
    return x + 0.5 / n_bins


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
    that was −inf may still be NaN upstream; :func:`neuro_ood.training.train_glow` therefore
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
    (the number of dimensions), i.e. one nat per dimension; :func:`neuro_ood.training.train_glow`
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
