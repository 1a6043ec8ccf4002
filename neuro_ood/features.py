"""Per-image features of the backbones: multiscale score norms (MSMA) and per-scale Glow
log-likelihoods with the anomaly metrics built from them."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from neuro_ood.losses import center_bins, to_glow_input


@torch.no_grad()
def score_norms(model: nn.Module, x: torch.Tensor | np.ndarray, sigmas: torch.Tensor,
                batch_size: int = 64, return_maps: bool = False):
    """‖σ_i s_θ(x, σ_i)‖₂ over the input dimensions, for every image and every level.

    All L levels of a batch go through the network in one pass (the batch is repeated L times).

    Parameters
    ----------
    x : images ``(N, C, *spatial)`` (2-D slices or 3-D volumes alike).
    sigmas : ``(L,)`` noise levels.

    Returns
    -------
    norms : float64 array ``(N, L)``.
    maps : float32 array ``(N, L, *spatial)``, only with ``return_maps``: the per-voxel norm of
        σ_i s_θ over channels, the voxel-level view of the same quantity.
    """
    model.eval()
    device = next(model.parameters()).device
    x = torch.as_tensor(x, dtype=torch.float32)
    sigmas = torch.as_tensor(sigmas, dtype=torch.float32, device=device)
    levels = len(sigmas)
    norms, maps = [], []
    for start in range(0, len(x), max(1, batch_size // levels)):
        batch = x[start:start + max(1, batch_size // levels)].to(device)
        repeated = batch.repeat_interleave(levels, dim=0)          # (b*L, C, ...): image-major
        sigma = sigmas.repeat(len(batch))                            # (b*L,)
        scaled = model(repeated, sigma) * sigma.view(-1, *([1] * (batch.dim() - 1)))
        norms.append(scaled.flatten(1).norm(dim=1).view(len(batch), levels).cpu().double())
        if return_maps:
            maps.append(scaled.norm(dim=1).view(len(batch), levels, *batch.shape[2:]).cpu())
    norms = torch.cat(norms).numpy() if norms else np.zeros((0, levels))
    if return_maps:
        return norms, torch.cat(maps).numpy()
    return norms


NONFINITE_LOGLIK = -3e6
"""Value given to non-finite log-likelihoods before any difference is taken (S4.5), in nats."""


@torch.no_grad()
def glow_log_likelihoods(model: nn.Module, images01: torch.Tensor | np.ndarray, batch_size: int = 64,
                         n_bins: int = 256) -> np.ndarray:
    """Noise-free per-scale log-likelihoods of a Glow, the features of its anomaly metrics (S4.5).

    Each image is quantised and shifted (:func:`~neuro_ood.losses.to_glow_input`) and moved to the
    centre of its bins (:func:`~neuro_ood.losses.center_bins`) instead of being dequantised with
    noise; the model runs in eval mode without gradients. Non-finite terms (expected from models
    trained with the outlier loss) become :data:`NONFINITE_LOGLIK`.

    Parameters
    ----------
    model : nn.Module
        ``x (B, C, H, W) -> GlowOutput`` (:class:`neuro_ood.backbones.glow.Glow`).
    images01 : array or Tensor
        ``(N, C, H, W)``, intensities in [0, 1].

    Returns
    -------
    np.ndarray
        float64 ``(N, n_scales)``: per-scale log-likelihood terms in nats (continuous density of the
        scaled input, no ``n_dims · log n_bins`` term), finest scale first; the sum over a row is
        log p(x).
    """
    model.eval()
    device = next(model.parameters()).device
    images01 = torch.as_tensor(images01, dtype=torch.float32)
    rows = []
    for start in range(0, len(images01), batch_size):
        x = center_bins(to_glow_input(images01[start:start + batch_size], n_bins), n_bins)
        rows.append(model(x.to(device)).log_likelihood.double().cpu())
    if not rows:
        return np.zeros((0, getattr(model, "n_scales", 0)))
    loglik = torch.cat(rows).numpy()
    return np.where(np.isfinite(loglik), loglik, NONFINITE_LOGLIK)


def glow_anomaly_scores(loglik_in_model: np.ndarray, loglik_general_model: np.ndarray | None = None
                        ) -> dict[str, np.ndarray]:
    """The Glow anomaly metrics of Schirrmeister et al. (2020) from per-scale log-likelihoods.

    All scores are "higher = more inlier-like". Non-finite entries are set to
    :data:`NONFINITE_LOGLIK` first (S4.5).

    Parameters
    ----------
    loglik_in_model : np.ndarray
        ``(N, S)`` per-scale log-likelihoods in nats under the in-distribution model
        (:func:`glow_log_likelihoods`).
    loglik_general_model : np.ndarray, optional
        ``(N, S')`` the same under the general-domain model, for the same images.

    Returns
    -------
    dict of str to np.ndarray
        Each ``(N,)`` float64, in nats: ``raw`` = log p_in(x) (sum over scales); ``last_scale`` = the
        last (coarsest) scale's term, the 4×4 contribution for 32×32 inputs with 3 scales; with a
        general model also ``diff`` = log p_in(x) − log p_g(x), the log-likelihood ratio.
    """
    def clean(a: np.ndarray) -> np.ndarray:
        a = np.asarray(a, dtype=np.float64)
        return np.where(np.isfinite(a), a, NONFINITE_LOGLIK)

    loglik_in_model = clean(loglik_in_model)
    scores = {"raw": loglik_in_model.sum(axis=1), "last_scale": loglik_in_model[:, -1].copy()}
    if loglik_general_model is not None:
        scores["diff"] = scores["raw"] - clean(loglik_general_model).sum(axis=1)
    return scores
