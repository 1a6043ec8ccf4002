"""Denoising score matching over noise levels (MSMA Eq. 2, Song & Ermon 2019)."""

from __future__ import annotations

from typing import Callable

import torch

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
