"""Glow's input convention (Schirrmeister et al., NeurIPS 2020, S4.1 and S4.5): images in [0, 1]
quantised to ``n_bins`` levels and scaled to ``[−0.5, 0.5 − 1/n_bins]``, uniform dequantisation
noise for training and bin centres for noise-free evaluation."""

from __future__ import annotations

import torch


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
