"""Multiscale score norms: the MSMA feature vector of each image."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


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
