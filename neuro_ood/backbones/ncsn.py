"""Noise-conditional score network s_θ(x, σ) (Song & Ermon 2019) on MONAI U-Nets, 2-D or 3-D.

The network knows nothing of MRI: it maps images ``(B, C, *spatial)`` and noise levels ``(B,)``
to scores of the same shape as the images. Three conditioning schemes, chosen by ``backbone``:

- ``unet``: MONAI ``UNet`` with log σ appended as a constant input channel (cheap, but its
  instance normalisation removes that constant, so σ reaches it only through border effects).
- ``cond_unet``: :class:`~neuro_ood.backbones.cond_unet.SigmaConditionedUNet`, the same
  ``UNet`` with every instance normalisation conditioned on log σ (the paper's conditional
  instance normalisation; about the ``unet``'s cost).
- ``diffusion_unet``: MONAI ``DiffusionModelUNet`` with σ as its sinusoidal time embedding
  (every block conditioned too; about 10× the CPU cost of ``cond_unet`` at the same widths).

Both divide the raw output by σ (Song & Ermon 2020), so that σ·s_θ — the quantity the loss and
the score norms use — is O(1) at every level. The network carries its L noise levels as the
``sigmas`` buffer, so they travel with its weights and are read back from a checkpoint.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from monai.networks.nets import DiffusionModelUNet, UNet
from torch import nn

from neuro_ood.backbones.cond_unet import SigmaConditionedUNet


def geometric_sigmas(sigma_max: float = 1.0, sigma_min: float = 0.01, num: int = 10) -> torch.Tensor:
    """``(L,)`` noise levels, geometric from ``sigma_max`` down to ``sigma_min`` (both included)."""
    return torch.logspace(math.log10(sigma_max), math.log10(sigma_min), num, dtype=torch.float32)


class NoiseConditionalScoreNet(nn.Module):
    """s_θ(x, σ): ``x (B, C, *spatial)``, ``sigma (B,)`` -> ``(B, C, *spatial)``.

    Inputs whose spatial sizes are not multiples of the network's total stride are padded
    (replicate) and the output cropped back, so 90×110 slices or odd volumes need no resizing.
    ``sigmas`` (buffer, ``(L,)``): the noise levels it is trained and scored at, geometric from
    ``sigma_max`` to ``sigma_min``.
    """

    def __init__(self, spatial_dims: int = 2, in_channels: int = 1, backbone: str = "unet",
                 channels: Sequence[int] = (32, 64, 128, 256), strides: Sequence[int] = (2, 2, 2),
                 num_res_units: int = 1, sigma_min: float = 0.01, sigma_max: float = 1.0, num_sigmas: int = 10):
        super().__init__()
        self.spatial_dims = spatial_dims
        self.backbone = backbone
        self.log_sigma_range = (math.log(sigma_min), math.log(sigma_max))
        self.register_buffer("sigmas", geometric_sigmas(sigma_max, sigma_min, num_sigmas))
        if backbone == "unet":
            self.net = UNet(spatial_dims=spatial_dims, in_channels=in_channels + 1, out_channels=in_channels,
                            channels=tuple(channels), strides=tuple(strides), num_res_units=num_res_units,
                            act="ELU", norm="INSTANCE")
            self.multiple = math.prod(strides)
        elif backbone == "cond_unet":
            self.net = SigmaConditionedUNet(spatial_dims, in_channels, in_channels, channels=channels,
                                            strides=strides, num_res_units=num_res_units)
            self.multiple = math.prod(strides)
        elif backbone == "diffusion_unet":
            groups = math.gcd(*channels) if len(channels) > 1 else channels[0]
            self.net = DiffusionModelUNet(spatial_dims=spatial_dims, in_channels=in_channels,
                                          out_channels=in_channels, channels=tuple(channels),
                                          attention_levels=(False,) * len(channels), num_res_blocks=num_res_units,
                                          norm_num_groups=min(32, groups))
            self.multiple = 2 ** (len(channels) - 1)
        else:
            raise ValueError(f"unknown score-network backbone {backbone!r}; use 'unet', 'cond_unet' or 'diffusion_unet'")

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Checkpoints written before the levels travelled with the weights keep the constructed ones.
        state_dict.setdefault(prefix + "sigmas", self.sigmas)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _condition(self, sigma: torch.Tensor) -> torch.Tensor:
        """log σ mapped to [0, 1] over the trained range (0 at σ_min, 1 at σ_max)."""
        low, high = self.log_sigma_range
        return (torch.log(sigma) - low) / max(high - low, 1e-8)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        spatial = x.shape[2:]
        pad = []
        for size in reversed(spatial):
            extra = (-size) % self.multiple
            pad += [extra // 2, extra - extra // 2]
        h = F.pad(x, pad, mode="replicate") if any(pad) else x
        cond = self._condition(sigma.to(x.dtype))
        if self.backbone == "unet":
            level = cond.view(-1, 1, *([1] * self.spatial_dims)).expand(-1, 1, *h.shape[2:])
            out = self.net(torch.cat([h, level], dim=1))
        elif self.backbone == "cond_unet":
            out = self.net(h, torch.log(sigma.to(x.dtype)))
        else:
            out = self.net(h, timesteps=cond * 999.0)
        if any(pad):
            crop = [slice(None), slice(None)] + [slice(pad[2 * i], pad[2 * i] + s)
                                                 for i, s in enumerate(reversed(spatial))][::-1]
            out = out[tuple(crop)]
        return out / sigma.view(-1, *([1] * (x.dim() - 1)))
