"""Fourier amplitude/phase mixing: does a likelihood follow the amplitude or the phase spectrum?

Schirrmeister et al., "Understanding anomaly detection with deep invertible networks through
hierarchies of distributions and features" (NeurIPS 2020), supplement S3: mixed images are built
in Fourier space from one image's amplitudes and another image's phases and inverted back to the
image domain. The phases carry most of the spatial layout (the "semantic" content: a mixed image
looks like its phase source), the amplitudes mostly the low-level statistics (smoothness,
contrast, texture energy). The Spearman rank correlation of the likelihoods of the mixed images
with those of the amplitude sources and of the phase sources then tells which of the two the
model's likelihood follows. For a CIFAR10 Glow the paper reports > 0.8 with the amplitude
sources and < 0.05 with the phase sources: the likelihood is dominated by low-level features.

Nothing here knows about a particular model or modality: ``log_likelihood_fn`` is any callable
from a batch of images ``(N, C, H, W)`` to ``(N,)`` scores.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from scipy.stats import spearmanr

__all__ = ["FourierMixResult", "amplitude_phase_pairs", "fourier_likelihood_analysis",
           "mix_amplitude_phase"]

_RANGE_TOL = 1e-6


def _as_images(images, name: str) -> np.ndarray:
    """``images`` as float64 ``(N, C, H, W)``, finite and within [0, 1]."""
    arr = np.asarray(images, dtype=np.float64)
    if arr.ndim != 4:
        raise ValueError(f"{name} must have shape (N, C, H, W); got shape {arr.shape}.")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains {int(np.sum(~np.isfinite(arr)))} non-finite value(s).")
    if arr.size and (arr.min() < -_RANGE_TOL or arr.max() > 1.0 + _RANGE_TOL):
        raise ValueError(f"{name} must lie in [0, 1]; got values in "
                         f"[{arr.min():.4g}, {arr.max():.4g}].")
    return arr


def _mix_unclipped(amplitude_images: np.ndarray, phase_images: np.ndarray) -> np.ndarray:
    """Amplitude/phase mix without the final clipping, float64.

    Parameters
    ----------
    amplitude_images, phase_images : ndarray of shape (N, C, H, W)

    Returns
    -------
    ndarray of shape (N, C, H, W), float64
        ``real(ifft2(|fft2(a)| * exp(i * angle(fft2(p)))))`` per image and channel. Since
        ``|F_a|`` is even and ``angle(F_p)`` odd in frequency for real inputs, the inverse is
        real up to rounding; its FFT amplitude is exactly ``|F_a|`` and its phase
        ``angle(F_p)`` wherever both are non-zero.
    """
    amplitude = np.abs(np.fft.fft2(amplitude_images, axes=(-2, -1)))
    phase = np.angle(np.fft.fft2(phase_images, axes=(-2, -1)))
    return np.fft.ifft2(amplitude * np.exp(1j * phase), axes=(-2, -1)).real


def mix_amplitude_phase(amplitude_images, phase_images) -> np.ndarray:
    """Images with the Fourier amplitudes of one set and the Fourier phases of another.

    Per image and channel: 2-D FFT over the last two axes (:func:`numpy.fft.fft2`), the modulus
    of the amplitude image's spectrum combined with the angle of the phase image's spectrum,
    inverse FFT, real part, clipped to [0, 1].

    The clipping is needed because the mix is *not* guaranteed to stay in range: an amplitude
    spectrum recombined with foreign phases can interfere constructively where the source images
    never did, so values slightly below 0 or above 1 occur (the DC term, hence the mean
    intensity, comes from the amplitude image and is preserved; the extremes are not). Clipping
    keeps the mixed images valid inputs for a model trained on [0, 1] data, at the price of a
    small change of the amplitude spectrum where it bites.

    Parameters
    ----------
    amplitude_images : array-like of shape (N, C, H, W)
        Float images in [0, 1] that supply the amplitude spectra.
    phase_images : array-like of shape (N, C, H, W)
        Float images in [0, 1] that supply the phase spectra; same shape.

    Returns
    -------
    ndarray of shape (N, C, H, W), float32
        The mixed images, in [0, 1]. Mixing an image with itself returns it (up to rounding).
    """
    amp = _as_images(amplitude_images, "amplitude_images")
    pha = _as_images(phase_images, "phase_images")
    if amp.shape != pha.shape:
        raise ValueError(f"amplitude_images {amp.shape} and phase_images {pha.shape} must have "
                         "the same shape.")
    return np.clip(_mix_unclipped(amp, pha), 0.0, 1.0).astype(np.float32)


def amplitude_phase_pairs(n_images: int, seed) -> tuple[np.ndarray, np.ndarray]:
    """A seeded random pairing of images into (amplitude source, phase source).

    ``amp_index`` is a random permutation of ``range(n_images)`` and ``phase_index`` another
    one with ``phase_index[i] != amp_index[i]`` for every ``i`` when ``n_images > 1`` (drawn
    uniformly among such pairings by rejection, about e tries on average). Every image is used
    exactly once as an amplitude source and once as a phase source, never with itself.

    Parameters
    ----------
    n_images : int
        Number of images N (>= 1). With N == 1 the only pairing is the image with itself.
    seed : int, array of ints, or numpy.random.SeedSequence
        Anything :func:`numpy.random.default_rng` accepts; the same seed gives the same pairs.

    Returns
    -------
    amp_index : ndarray of shape (N,), int64
    phase_index : ndarray of shape (N,), int64
    """
    n = int(n_images)
    if n != n_images or n < 1:
        raise ValueError(f"n_images must be a positive integer; got {n_images!r}.")
    rng = np.random.default_rng(seed)
    amp_index = rng.permutation(n).astype(np.int64)
    if n == 1:
        return amp_index, amp_index.copy()
    while True:
        derangement = rng.permutation(n)
        if not np.any(derangement == np.arange(n)):
            break
    return amp_index, amp_index[derangement].astype(np.int64)


@dataclass
class FourierMixResult:
    """Outcome of :func:`fourier_likelihood_analysis`.

    Attributes
    ----------
    spearman_amplitude : float
        Spearman correlation of ``loglik_mixed`` with ``loglik_amplitude`` (NaN if either is
        constant).
    spearman_phase : float
        Spearman correlation of ``loglik_mixed`` with ``loglik_phase`` (NaN if either is
        constant).
    n : int
        Number of mixed images N.
    loglik_mixed : ndarray of shape (N,), float64
        Log-likelihood of mixed image ``i``.
    loglik_amplitude : ndarray of shape (N,), float64
        Log-likelihood of the original image that supplied the amplitudes of mixed image ``i``.
    loglik_phase : ndarray of shape (N,), float64
        Log-likelihood of the original image that supplied the phases of mixed image ``i``.
    amp_index : ndarray of shape (N,), int64
        Index into the input images of the amplitude source of mixed image ``i``.
    phase_index : ndarray of shape (N,), int64
        Index into the input images of the phase source of mixed image ``i``.
    """

    spearman_amplitude: float
    spearman_phase: float
    n: int
    loglik_mixed: np.ndarray
    loglik_amplitude: np.ndarray
    loglik_phase: np.ndarray
    amp_index: np.ndarray
    phase_index: np.ndarray


def _score(log_likelihood_fn: Callable, images: np.ndarray, batch_size: int | None,
           what: str) -> np.ndarray:
    """``log_likelihood_fn`` over ``images`` (N, C, H, W) in batches, as finite float64 (N,)."""
    n = len(images)
    step = n if batch_size is None else int(batch_size)
    if step < 1:
        raise ValueError(f"batch_size must be a positive integer or None; got {batch_size!r}.")
    parts = []
    for start in range(0, n, step):
        batch = images[start:start + step]
        out = log_likelihood_fn(batch)
        if hasattr(out, "detach"):           # a torch tensor, possibly on an accelerator
            out = out.detach().cpu().numpy()
        out = np.asarray(out, dtype=np.float64)
        if out.shape != (len(batch),):
            raise ValueError(f"log_likelihood_fn must return shape ({len(batch)},) for a batch "
                             f"of {len(batch)} {what} images; got shape {out.shape}.")
        parts.append(out)
    scores = np.concatenate(parts)
    if not np.all(np.isfinite(scores)):
        raise ValueError(f"log_likelihood_fn returned {int(np.sum(~np.isfinite(scores)))} "
                         f"non-finite value(s) for the {what} images.")
    return scores


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    if np.all(a == a[0]) or np.all(b == b[0]):
        return float("nan")                  # rank correlation undefined for constant input
    return float(spearmanr(a, b)[0])


def fourier_likelihood_analysis(images, log_likelihood_fn: Callable[[np.ndarray], np.ndarray],
                                seed=0, *, batch_size: int | None = None) -> FourierMixResult:
    """Do the likelihoods of amplitude/phase-mixed images follow the amplitude or the phase?

    Pairs the images among themselves (:func:`amplitude_phase_pairs`), builds one mixed image
    per pair (:func:`mix_amplitude_phase`), scores the originals and the mixed images with
    ``log_likelihood_fn`` and computes :func:`scipy.stats.spearmanr` of the mixed images'
    scores against those of their amplitude sources and of their phase sources.

    Parameters
    ----------
    images : array-like of shape (N, C, H, W)
        Float images in [0, 1], N >= 3.
    log_likelihood_fn : callable
        ``log_likelihood_fn(batch) -> (B,)``: the score of each image of a float32 numpy batch
        ``(B, C, H, W)`` in [0, 1] (in practice a model's total log-likelihood; any map to the
        preprocessing the model expects belongs inside it). May return a numpy array, a list or
        a torch tensor; the values must be finite.
    seed : int, array of ints, or numpy.random.SeedSequence, default 0
        Seed of the pairing.
    batch_size : int or None, keyword-only, default None
        Images per call of ``log_likelihood_fn``; None scores each set in one call.

    Returns
    -------
    FourierMixResult
        The two Spearman correlations, N, the three aligned (N,) score arrays and the pairing.
    """
    arr = _as_images(images, "images")
    n = len(arr)
    if n < 3:
        raise ValueError(f"fourier_likelihood_analysis needs at least 3 images for a rank "
                         f"correlation; got {n}.")
    amp_index, phase_index = amplitude_phase_pairs(n, seed)
    mixed = mix_amplitude_phase(arr[amp_index], arr[phase_index])
    loglik_original = _score(log_likelihood_fn, arr.astype(np.float32), batch_size, "original")
    loglik_mixed = _score(log_likelihood_fn, mixed, batch_size, "mixed")
    loglik_amplitude = loglik_original[amp_index]
    loglik_phase = loglik_original[phase_index]
    return FourierMixResult(
        spearman_amplitude=_spearman(loglik_mixed, loglik_amplitude),
        spearman_phase=_spearman(loglik_mixed, loglik_phase),
        n=n,
        loglik_mixed=loglik_mixed,
        loglik_amplitude=loglik_amplitude,
        loglik_phase=loglik_phase,
        amp_index=amp_index,
        phase_index=phase_index,
    )
