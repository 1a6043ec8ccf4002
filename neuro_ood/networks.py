"""The network factory: a config's architecture sections -> an untrained network.

Every method's network is built here from the sections named in :data:`NETWORK_SECTIONS` plus the
input's channels, spatial dimensions and (where the architecture needs it) image size, so a
checkpoint that stores those values can always be rebuilt before its weights are loaded.
"""

from __future__ import annotations

from typing import Sequence

import torch

from neuro_ood.backbones.fanogan import FAnoGAN
from neuro_ood.backbones.glow_variants import build_glow_variant
from neuro_ood.backbones.ncsn import NoiseConditionalScoreNet
from neuro_ood.backbones.resnet import build_resnet
from neuro_ood.config import ExperimentConfig, ModelConfig
from neuro_ood.errors import ConfigError

#: Config sections that define a network's architecture, stored beside its weights.
NETWORK_SECTIONS = ("model", "resnet", "fanogan")


def build_score_network(cfg: ModelConfig, in_channels: int, spatial_dims: int = 2) -> NoiseConditionalScoreNet:
    """s_θ(x, σ) for ``(B, in_channels, *spatial)`` inputs, with the config's L noise levels as a buffer."""
    return NoiseConditionalScoreNet(spatial_dims=spatial_dims, in_channels=in_channels, backbone=cfg.backbone,
                                    channels=cfg.channels, strides=cfg.strides, num_res_units=cfg.num_res_units,
                                    sigma_min=cfg.sigma_min, sigma_max=cfg.sigma_max, num_sigmas=cfg.num_sigmas)


def build_glow(cfg: ModelConfig, in_channels: int, image_size: Sequence[int] | None = None) -> torch.nn.Module:
    """The Glow of ``cfg.variant`` (multiscale, local, fc); ``image_size`` (H, W) is needed by ``fc``."""
    try:
        return build_glow_variant(cfg.variant, in_channels, tuple(image_size) if image_size else None,
                                  n_scales=cfg.n_scales, steps_per_scale=cfg.steps_per_scale, hidden=cfg.hidden,
                                  lu=cfg.lu, learned_prior=cfg.learned_prior, patch=cfg.patch)
    except ValueError as err:
        raise ConfigError(f"model: {err}") from None


def build_network(cfg: ExperimentConfig, in_channels: int, spatial_dims: int = 2,
                  image_size: Sequence[int] | None = None) -> torch.nn.Module:
    """The network of ``cfg.method``: score network (msma), a Glow variant (glow), f-AnoGAN's
    generator + critic + encoder (fanogan) or a ResNet classifier (resnet)."""
    if cfg.method == "msma":
        return build_score_network(cfg.model, in_channels, spatial_dims)
    if cfg.method == "glow":
        return build_glow(cfg.model, in_channels, image_size)
    if cfg.method == "fanogan":
        f = cfg.fanogan
        return FAnoGAN(in_channels, tuple(image_size), f.latent_dim, f.width, f.kappa)
    if cfg.method == "resnet":
        r = cfg.resnet
        try:
            return build_resnet(r.depth, in_channels, 2, spatial_dims, r.widen, r.head_hidden)
        except ValueError as err:
            raise ConfigError(f"resnet: {err}") from None
    raise ConfigError(f"unknown method {cfg.method!r}; use msma, glow, fanogan or resnet")
