"""Per-image features of trained networks: multiscale score norms (MSMA), per-scale Glow
log-likelihoods with the anomaly metrics built from them, and the ResNet classifier baseline's
logit-based scores (Hendrycks & Gimpel 2017; MSMA A.2; Schirrmeister et al. 2020, S9). Every score
here is HIGHER = MORE INLIER-LIKE.

f-AnoGAN's anomaly score and residual map (Schlegl et al. 2019) are methods of the model,
:meth:`~neuro_ood.backbones.fanogan.FAnoGAN.score` and
:meth:`~neuro_ood.backbones.fanogan.FAnoGAN.residual_map`."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from neuro_ood.backbones.glow import bits_per_dim
from neuro_ood.backbones.glow_inputs import center_bins, dequantize, to_glow_input
from neuro_ood.config import VOXEL_FEATURES   # per-voxel features of a normative voxel model


def scaled_scores(model: nn.Module, x: torch.Tensor | np.ndarray, sigmas: torch.Tensor, batch_size: int):
    """Yield ``(batch (b, C, *spatial), σ_i s_θ(batch, σ_i) (b, L, C, *spatial))`` over ``x`` on the
    model's device; all L levels of a batch go through the network in one pass (the batch is
    repeated L times, image-major)."""
    model.eval()
    device = next(model.parameters()).device
    x = torch.as_tensor(x, dtype=torch.float32)
    sigmas = torch.as_tensor(sigmas, dtype=torch.float32, device=device)
    levels = len(sigmas)
    step = max(1, batch_size // levels)
    for start in range(0, len(x), step):
        batch = x[start:start + step].to(device)
        sigma = sigmas.repeat(len(batch))                            # (b*L,)
        scaled = model(batch.repeat_interleave(levels, dim=0), sigma) * sigma.view(-1, *([1] * (batch.dim() - 1)))
        yield batch, scaled.view(len(batch), levels, *batch.shape[1:])


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
    levels = len(sigmas)
    norms, maps = [], []
    for _, scaled in scaled_scores(model, x, sigmas, batch_size):
        norms.append(scaled.flatten(2).norm(dim=2).cpu().double())
        if return_maps:
            maps.append(scaled.norm(dim=2).cpu())
    norms = torch.cat(norms).numpy() if norms else np.zeros((0, levels))
    if return_maps:
        return norms, torch.cat(maps).numpy()
    return norms


#: Per-slice MSMA features (``msma.features``), see :func:`score_features`.
SCORE_FEATURES = ("norms", "band_means", "band_rms")


def score_feature_size(kinds, levels: int, channels: int, bands: int) -> int:
    """Length of a :func:`score_features` row."""
    return sum(levels if kind == "norms" else levels * channels * bands for kind in kinds)


@torch.no_grad()
def score_features(model: nn.Module, x: torch.Tensor | np.ndarray, sigmas: torch.Tensor,
                   kinds=("norms",), bands: int = 8, band_range=(0.1, 1.0), batch_size: int = 64) -> np.ndarray:
    """Per-image features of the scaled scores σ_i s_θ(x, σ_i), concatenated in the order of ``kinds``.

    - ``norms``: ``(L,)`` ‖σ_i s_θ‖₂ over the image (:func:`score_norms`; the paper's feature);
    - ``band_means``: ``(L, C, bands)`` the signed mean of σ_i s_θ over the voxels of channel c
      whose intensity x_c lies in each of ``bands`` equal-width bands of ``band_range`` (the last
      band includes its upper edge; voxels outside the range are in no band; an empty band gives 0);
    - ``band_rms``: ``(L, C, bands)`` the root-mean-square of σ_i s_θ over the same voxels.

    The global norm averages where the score is large with where it is not; the band statistics
    keep, per tissue-like intensity class, which way and how strongly the model would move it.
    ``x`` ``(N, C, *spatial)`` in the preprocessing's [0, 1] scale -> float64 ``(N, F)``,
    F = :func:`score_feature_size`.
    """
    x = torch.as_tensor(x, dtype=torch.float32)
    levels, channels = len(sigmas), (x.shape[1] if x.dim() > 1 else 1)
    rows = [features_of_scaled(batch, scaled, kinds, bands, band_range).cpu().double()
            for batch, scaled in scaled_scores(model, x, sigmas, batch_size)]
    if not rows:
        _check_kinds(kinds)
        return np.zeros((0, score_feature_size(kinds, levels, channels, bands)))
    return torch.cat(rows).numpy()


def _check_kinds(kinds) -> None:
    unknown = [k for k in kinds if k not in SCORE_FEATURES]
    if unknown:
        raise ValueError(f"unknown score feature(s) {unknown}; use {', '.join(SCORE_FEATURES)}")


def features_of_scaled(batch: torch.Tensor, scaled: torch.Tensor, kinds=("norms",), bands: int = 8,
                       band_range=(0.1, 1.0)) -> torch.Tensor:
    """:func:`score_features` of one batch from its scaled scores: ``batch (b, C, *spatial)``,
    ``scaled (b, L, C, *spatial)`` -> ``(b, F)`` float32."""
    _check_kinds(kinds)
    edges = torch.linspace(float(band_range[0]), float(band_range[1]), bands + 1, device=batch.device)
    band = torch.bucketize(batch.contiguous(), edges, right=True) - 1   # (b, C, *spatial)
    band[batch == edges[-1]] = bands - 1
    in_band = torch.stack([band == k for k in range(bands)], dim=2).float()   # (b, C, bands, *spatial)
    count = in_band.flatten(3).sum(3).unsqueeze(1)                            # (b, 1, C, bands)
    masks = in_band.unsqueeze(1)                                               # (b, 1, C, bands, *spatial)
    parts = []
    for kind in kinds:
        if kind == "norms":
            parts.append(scaled.flatten(2).norm(dim=2))
        elif kind == "band_means":
            total = (scaled.unsqueeze(3) * masks).flatten(4).sum(4)            # (b, L, C, bands)
            parts.append((total / count.clamp(min=1)).flatten(1))
        else:
            total = (scaled.unsqueeze(3).square() * masks).flatten(4).sum(4)
            parts.append((total / count.clamp(min=1)).sqrt().flatten(1))
    return torch.cat(parts, dim=1).float()


def local_score_features(scaled: torch.Tensor, patch: int = 3) -> torch.Tensor:
    """Per-voxel features of the scaled scores for a voxel-level density model (as in MSMA's 3-D
    follow-up): for each level i, ``½ log(mean over a patch³ neighbourhood of Σ_c (σ_i s_θ)² + 1e-8)``,
    the log local RMS of the score. ``scaled (b, L, C, *spatial)`` -> ``(b, L, *spatial)`` float32."""
    energy = scaled.float().square().sum(dim=2)                                # (b, L, *spatial)
    if patch > 1:
        pool = torch.nn.functional.avg_pool3d if energy.dim() == 5 else torch.nn.functional.avg_pool2d
        energy = pool(energy, patch, stride=1, padding=patch // 2, count_include_pad=False)
    return 0.5 * torch.log(energy + 1e-8)




@torch.no_grad()
def denoising_residuals(model: nn.Module, x: torch.Tensor | np.ndarray, sigmas: torch.Tensor, draws: int = 2,
                        seed: int = 0, batch_size: int = 8) -> np.ndarray:
    """Tweedie denoising residuals: with x̃ = x + σ z (z ~ N(0, I), ``draws`` draws from a generator
    seeded with ``seed`` for each image, so an image's result does not depend on its batch), the denoised estimate
    x̂ = x̃ + σ² s_θ(x̃, σ) minus ``x``, averaged over the draws — where the model would put the
    image back, and how far that is from the image, at each level of ``sigmas``.

    ``x (N, C, *spatial)`` -> float32 ``(N, len(sigmas), C, *spatial)`` in intensity units;
    ``batch_size`` noisy inputs go through the network per pass."""
    model.eval()
    device = next(model.parameters()).device
    x = torch.as_tensor(x, dtype=torch.float32)
    sigmas = torch.as_tensor(sigmas, dtype=torch.float32)
    generator = torch.Generator()
    jobs = [(level, draw) for level in range(len(sigmas)) for draw in range(draws)]
    out = torch.zeros((len(x), len(sigmas), *x.shape[1:]))
    for index in range(len(x)):
        image = x[index:index + 1]
        noise = torch.randn((len(jobs), *image.shape[1:]), generator=generator.manual_seed(seed))
        for start in range(0, len(jobs), max(1, batch_size)):
            part = jobs[start:start + max(1, batch_size)]
            sigma = sigmas[[level for level, _ in part]]
            sigma_b = sigma.view(-1, *([1] * (image.dim() - 1)))
            noisy = image + sigma_b * noise[start:start + len(part)]
            score = model(noisy.to(device), sigma.to(device)).float().cpu()
            residual = noisy + sigma_b ** 2 * score - image
            for (level, _), value in zip(part, residual):
                out[index, level] += value / draws
    return out.numpy()


def voxel_feature_maps(model: nn.Module, x: torch.Tensor | np.ndarray, sigmas: torch.Tensor, kinds=VOXEL_FEATURES,
                       draws: int = 2, seed: int = 0, batch_size: int = 8) -> np.ndarray:
    """Per-voxel features of ``x (N, C, *spatial)`` for a normative voxel model, concatenated in the
    order of ``kinds``: ``image`` (the C channels themselves) and ``residual``
    (:func:`denoising_residuals` at each of ``sigmas``, L × C maps). -> float32 ``(N, F, *spatial)``."""
    unknown = [k for k in kinds if k not in VOXEL_FEATURES]
    if unknown or not kinds:
        raise ValueError(f"unknown or no voxel feature(s) {list(kinds)}; use {', '.join(VOXEL_FEATURES)}")
    x = np.asarray(x, dtype=np.float32)
    parts = []
    for kind in kinds:
        if kind == "image":
            parts.append(x)
        else:
            residual = denoising_residuals(model, x, sigmas, draws, seed, batch_size)
            parts.append(residual.reshape(len(x), -1, *x.shape[2:]))
    return np.concatenate(parts, axis=1)


NONFINITE_LOGLIK = -3e6
"""Value given to non-finite log-likelihoods before any difference is taken (S4.5), in nats."""


@torch.no_grad()
def glow_log_likelihoods(model: nn.Module, images01: torch.Tensor | np.ndarray, batch_size: int = 64,
                         n_bins: int = 256) -> np.ndarray:
    """Noise-free per-scale log-likelihoods of a Glow, the features of its anomaly metrics (S4.5).

    Each image is quantised and shifted (:func:`~neuro_ood.backbones.glow_inputs.to_glow_input`) and moved to the
    centre of its bins (:func:`~neuro_ood.backbones.glow_inputs.center_bins`) instead of being dequantised with
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


@torch.no_grad()
def glow_bits_per_dim(model: nn.Module, images01: torch.Tensor, batch_size: int = 64, n_bins: int = 256,
                      generator: torch.Generator | None = None) -> float:
    """Mean bits per dimension of ``images01 (N, C, H, W)`` in [0, 1] with one sample of uniform
    dequantisation noise per image (as reported in S7.1); eval mode, no gradients. Non-finite
    log-likelihoods are not replaced, so the result can be ``inf``."""
    model.eval()
    device = next(model.parameters()).device
    images01 = torch.as_tensor(images01, dtype=torch.float32)
    n_dims = int(images01[0].numel())
    total = 0.0
    for start in range(0, len(images01), batch_size):
        x = dequantize(to_glow_input(images01[start:start + batch_size], n_bins), n_bins, generator)
        total += bits_per_dim(model(x.to(device)).log_px, n_dims, n_bins).double().sum().item()
    return total / len(images01)


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


#: Keys of :func:`classifier_scores`; all three are "higher = more inlier-like".
SCORE_KEYS = ("msp", "outlier_logit", "p_in")


def _probabilities(logits: torch.Tensor | np.ndarray) -> torch.Tensor:
    logits = torch.as_tensor(logits).detach().double().cpu()
    if logits.ndim != 2:
        raise ValueError(f"logits must be (B, K), got shape {tuple(logits.shape)}")
    return torch.softmax(logits, dim=1)


def msp_score(logits: torch.Tensor | np.ndarray) -> np.ndarray:
    """Maximum softmax probability (Hendrycks & Gimpel 2017), for groups the classifier never saw.

    ``logits (B, K) -> (B,)`` float64 in [1/K, 1]; higher = more inlier-like (a confident
    prediction of any training class).
    """
    return _probabilities(logits).max(dim=1).values.numpy()


def seen_outlier_score(logits: torch.Tensor | np.ndarray, outlier_class: int = 1, kind: str = "probability"
                       ) -> np.ndarray:
    """Score of the outlier group the classifier was trained on (MSMA A.2): its class output alone.

    The paper reports the 1-year-old metrics "using the logits corresponding to the outlier class
    only in lieu of taking the max across both classes". Its Keras model ends in a softmax, so the
    outputs it read are the softmax probabilities; the default here is therefore
    ``−p(outlier | x)``. With two classes this ranks exactly like p(in | x) (S9). ``kind="logit"``
    gives ``−logit_outlier`` instead (the pre-softmax output; only logit differences are
    constrained by the cross-entropy, so this is the noisier reading).

    ``logits (B, K) -> (B,)`` float64; higher = more inlier-like (a larger outlier output ranks a
    sample as more outlying).
    """
    if kind == "probability":
        return -_probabilities(logits)[:, outlier_class].numpy()
    if kind == "logit":
        logits = torch.as_tensor(logits).detach().double().cpu()
        if logits.ndim != 2:
            raise ValueError(f"logits must be (B, K), got shape {tuple(logits.shape)}")
        return -logits[:, outlier_class].numpy()
    raise ValueError(f"kind must be 'probability' or 'logit', got {kind!r}")


def in_distribution_probability(logits: torch.Tensor | np.ndarray, in_class: int = 0) -> np.ndarray:
    """p(in-distribution | x), the anomaly metric of the discriminative baseline (Schirrmeister et
    al. 2020, S9). ``logits (B, K) -> (B,)`` float64 in [0, 1]; higher = more inlier-like."""
    return _probabilities(logits)[:, in_class].numpy()


def score_rule(seen: bool) -> str:
    """The one place holding MSMA A.2's rule for which :func:`classifier_scores` key to report.

    For the outlier group the classifier was trained on (``seen=True``, the 1-year-olds) the paper
    uses the outlier class's output alone: ``"outlier_logit"`` (:func:`seen_outlier_score`). For
    groups it never saw it follows Hendrycks & Gimpel and uses the maximum softmax probability:
    ``"msp"`` (:func:`msp_score`). The S9 variant uses ``"p_in"`` for every group.
    """
    return "outlier_logit" if seen else "msp"


@torch.no_grad()
def classifier_logits(model: nn.Module, images01: torch.Tensor | np.ndarray, batch_size: int = 64) -> torch.Tensor:
    """Logits ``(N, K)`` (CPU, float32) of ``images01 (N, C, H, W)`` in [0, 1], in eval mode without
    gradients; the model's train/eval mode is restored afterwards."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    images01 = torch.as_tensor(images01, dtype=torch.float32)
    rows = [model(images01[start:start + batch_size].to(device)).float().cpu()
            for start in range(0, len(images01), batch_size)]
    model.train(was_training)
    if not rows:
        return torch.zeros(0, getattr(model, "num_classes", 2))
    return torch.cat(rows)


def classifier_scores(model: nn.Module, images01: torch.Tensor | np.ndarray, batch_size: int = 64,
                      seen_group: bool | None = None, in_class: int = 0, outlier_class: int = 1,
                      outlier_kind: str = "probability") -> dict[str, np.ndarray]:
    """All classifier scores of ``images01 (N, C, H, W)`` in [0, 1]; each ``(N,)`` float64,
    HIGHER = MORE INLIER-LIKE.

    Returns
    -------
    dict
        ``"msp"`` (:func:`msp_score`), ``"outlier_logit"`` (:func:`seen_outlier_score` with
        ``outlier_kind``) and ``"p_in"`` (:func:`in_distribution_probability`). With ``seen_group``
        given, also ``"score"``: the entry :func:`score_rule` picks for a group the classifier was
        (``True``) or was not (``False``) trained on.
    """
    logits = classifier_logits(model, images01, batch_size)
    scores = {
        "msp": msp_score(logits),
        "outlier_logit": seen_outlier_score(logits, outlier_class, outlier_kind),
        "p_in": in_distribution_probability(logits, in_class),
    }
    if seen_group is not None:
        scores["score"] = scores[score_rule(bool(seen_group))]
    return scores
