"""f-AnoGAN networks (Schlegl et al., Medical Image Analysis 2019): WGAN-GP generator and critic,
the izif encoder and the :class:`FAnoGAN` container holding all three.

The module knows nothing of MRI: images are ``(B, C, H, W)`` tensors with intensities in [0, 1].
Losses live in :mod:`neuro_ood.losses` (:func:`~neuro_ood.losses.gradient_penalty`,
:func:`~neuro_ood.losses.izif_loss`, the WGAN-GP critic and generator losses), the step functions
in :mod:`neuro_ood.trainer.steps` (:func:`~neuro_ood.trainer.steps.wgan_gp_step_fn`,
:func:`~neuro_ood.trainer.steps.izif_step_fn`) and the two training stages in
:class:`neuro_ood.detectors.fanogan.FAnoGANDetector`. The per-image anomaly score and the residual
map are :meth:`FAnoGAN.score` and :meth:`FAnoGAN.residual_map`.

Latent prior and encoder range: z ~ U[−1, 1]^d (:func:`sample_latent`) and the encoder ends in
``tanh``, so E(x) always lies in the prior's support — the ``_unif`` + ``tanh_fc`` configuration of
the original code (``tSchlegl/f-AnoGAN``), which also offers an unbounded encoder with a normal prior.

Image sizes: any ``(H, W)``. The :class:`Generator` works at a padded size (both sides multiples of
``2**n_up``) and centre-crops its output to exactly ``(H, W)``; :class:`Critic` and
:class:`Encoder` use stride-2 convolutions (size ``s -> floor(s / 2)``) and a linear layer sized at
construction, so they accept exactly the ``image_size`` they were built for.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
from torch import nn


def _pair(image_size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(image_size, int):
        return image_size, image_size
    h, w = (int(s) for s in image_size)
    return h, w


def _n_resample(image_size: tuple[int, int], max_steps: int = 4, min_size: int = 4) -> int:
    """Largest ``n <= max_steps`` with ``min(H, W) / 2**n >= min_size`` (0 for tiny images)."""
    n = 0
    while n < max_steps and min(image_size) / 2 ** (n + 1) >= min_size:
        n += 1
    return n


def _widths(width: int, n: int) -> list[int]:
    """Channels ``width · min(8, 2**i)`` for ``i = 0..n`` (fine to coarse)."""
    return [width * min(8, 2 ** i) for i in range(n + 1)]


def sample_latent(n: int, latent_dim: int, generator: torch.Generator | None = None,
                  device: torch.device | str | None = None) -> torch.Tensor:
    """``(n, latent_dim)`` draws from the latent prior U[−1, 1]^d (drawn on the CPU, then moved)."""
    z = torch.rand(n, latent_dim, generator=generator) * 2.0 - 1.0
    return z.to(device) if device is not None else z


class Generator(nn.Module):
    """G: ``z (B, latent_dim) -> images (B, out_channels, H, W)`` in (0, 1) (sigmoid output).

    DCGAN-style: a linear layer to ``(width·min(8, 2**n_up), h0, w0)`` with ``h0 = ceil(H / 2**n_up)``,
    then ``n_up`` blocks of batch norm, ReLU, nearest ×2 upsampling and a 3×3 convolution (channels
    halving down to ``width``), then batch norm, ReLU, a 3×3 convolution to ``out_channels`` and a
    sigmoid. The result, of size ``(h0·2**n_up, w0·2**n_up)``, is centre-cropped to ``(H, W)``.

    Parameters
    ----------
    latent_dim : int
        Dimension of z (128 in f-AnoGAN).
    out_channels : int
        Image channels C.
    image_size : int or (int, int)
        Output ``(H, W)``; any sizes, odd ones included.
    width : int
        Channels of the finest level (``DIM`` = 64 in f-AnoGAN).
    n_up : int, optional
        Number of ×2 upsamplings; by default the largest ``<= 4`` leaving ``min(H, W) / 2**n_up >= 4``.
    """

    def __init__(self, latent_dim: int = 128, out_channels: int = 1, image_size: int | Sequence[int] = 64,
                 width: int = 64, n_up: int | None = None):
        super().__init__()
        self.latent_dim = latent_dim
        self.image_size = _pair(image_size)
        self.n_up = _n_resample(self.image_size) if n_up is None else int(n_up)
        scale = 2 ** self.n_up
        self.base_size = tuple(math.ceil(s / scale) for s in self.image_size)
        self.padded_size = tuple(s * scale for s in self.base_size)
        channels = _widths(width, self.n_up)[::-1]  # coarse to fine
        self.input = nn.Linear(latent_dim, channels[0] * self.base_size[0] * self.base_size[1])
        blocks: list[nn.Module] = []
        for c_in, c_out in zip(channels[:-1], channels[1:]):
            blocks += [nn.BatchNorm2d(c_in), nn.ReLU(), nn.Upsample(scale_factor=2, mode="nearest"),
                       nn.Conv2d(c_in, c_out, 3, padding=1)]
        blocks += [nn.BatchNorm2d(channels[-1]), nn.ReLU(), nn.Conv2d(channels[-1], out_channels, 3, padding=1)]
        self.body = nn.Sequential(*blocks)
        self._channels0 = channels[0]

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """``z (B, latent_dim)`` -> ``(B, C, H, W)`` in (0, 1)."""
        h = self.input(z).view(len(z), self._channels0, *self.base_size)
        out = torch.sigmoid(self.body(h))
        top = (self.padded_size[0] - self.image_size[0]) // 2
        left = (self.padded_size[1] - self.image_size[1]) // 2
        return out[:, :, top:top + self.image_size[0], left:left + self.image_size[1]]


class _ConvTrunk(nn.Module):
    """``(B, C, H, W) -> (B, F)``: 3×3 convolution, then ``n_down`` blocks of a 4×4 stride-2
    convolution, layer norm over (C, H, W) (``GroupNorm(1, ·)``, per-example as WGAN-GP requires)
    and LeakyReLU(0.2); flattened. Channels double from ``width`` up to ``8 · width``."""

    def __init__(self, in_channels: int, image_size: tuple[int, int], width: int, n_down: int):
        super().__init__()
        self.image_size = image_size
        channels = _widths(width, n_down)
        layers: list[nn.Module] = [nn.Conv2d(in_channels, channels[0], 3, padding=1), nn.LeakyReLU(0.2)]
        size = list(image_size)
        for c_in, c_out in zip(channels[:-1], channels[1:]):
            layers += [nn.Conv2d(c_in, c_out, 4, stride=2, padding=1), nn.GroupNorm(1, c_out), nn.LeakyReLU(0.2)]
            size = [s // 2 for s in size]
        self.body = nn.Sequential(*layers)
        self.out_features = channels[-1] * size[0] * size[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != self.image_size:
            raise ValueError(f"expected images of size {self.image_size}, got {tuple(x.shape[-2:])}")
        return self.body(x).flatten(1)


class Critic(nn.Module):
    """WGAN-GP critic D: ``x (B, C, H, W) -> (B,)``, no batch norm (layer norm, per example).

    :meth:`features` is the flattened output of the last convolutional block, ``f_D`` of
    f-AnoGAN (the input of the final linear layer); :meth:`forward` applies that linear layer.

    Parameters
    ----------
    in_channels : int
        Image channels C.
    image_size : int or (int, int)
        ``(H, W)`` of the inputs (exactly).
    width : int
        Channels of the first convolution; doubled at each of the ``n_down`` stride-2 blocks up to
        ``8 · width``.
    n_down : int, optional
        Number of stride-2 blocks; by default as :class:`Generator`'s ``n_up``.
    """

    def __init__(self, in_channels: int = 1, image_size: int | Sequence[int] = 64, width: int = 64,
                 n_down: int | None = None):
        super().__init__()
        self.image_size = _pair(image_size)
        n_down = _n_resample(self.image_size) if n_down is None else int(n_down)
        self.trunk = _ConvTrunk(in_channels, self.image_size, width, n_down)
        self.feature_dim = self.trunk.out_features
        self.output = nn.Linear(self.feature_dim, 1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``x (B, C, H, W)`` -> ``f_D(x) (B, feature_dim)``, the penultimate layer."""
        return self.trunk(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x (B, C, H, W)`` -> critic values ``(B,)``."""
        return self.output(self.features(x)).squeeze(-1)


class Encoder(nn.Module):
    """izif encoder E: ``x (B, C, H, W) -> z (B, latent_dim)`` in (−1, 1).

    Same convolutional trunk as :class:`Critic` (separate weights), a linear layer to
    ``latent_dim`` and ``tanh``, which maps the encoding into the support of the latent prior
    U[−1, 1]^d used to train the generator (:func:`sample_latent`).
    """

    def __init__(self, in_channels: int = 1, image_size: int | Sequence[int] = 64, latent_dim: int = 128,
                 width: int = 64, n_down: int | None = None):
        super().__init__()
        self.image_size = _pair(image_size)
        self.latent_dim = latent_dim
        n_down = _n_resample(self.image_size) if n_down is None else int(n_down)
        self.trunk = _ConvTrunk(in_channels, self.image_size, width, n_down)
        self.output = nn.Linear(self.trunk.out_features, latent_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x (B, C, H, W)`` -> ``z (B, latent_dim)`` in (−1, 1)."""
        return torch.tanh(self.output(self.trunk(x)))


def izif_residuals(x: torch.Tensor, encoder: nn.Module, generator: nn.Module, critic: nn.Module
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(residual_image (B,), residual_features (B,))`` of the izif mapping x -> G(E(x)).

    ``residual_image`` is the mean over the C·H·W pixels of ``(x − G(E(x)))²``, ``residual_features``
    the mean over the critic's feature dimensions of ``(f_D(x) − f_D(G(E(x))))²``
    (:meth:`Critic.features`), for ``x (B, C, H, W)``. With graph; the modules are used in whatever
    mode they are in.
    """
    recon = generator(encoder(x))
    residual_image = (x - recon).pow(2).flatten(1).mean(1)
    residual_features = (critic.features(x) - critic.features(recon)).pow(2).flatten(1).mean(1)
    return residual_image, residual_features


@contextmanager
def _eval_mode(*modules: nn.Module) -> Iterator[None]:
    """Put ``modules`` in eval mode, restoring each one's previous mode afterwards."""
    modes = [[(m, m.training) for m in module.modules()] for module in modules]
    for module in modules:
        module.eval()
    try:
        yield
    finally:
        for entries in modes:
            for m, training in entries:
                m.train(training)


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


class FAnoGAN(nn.Module):
    """Generator, critic and izif encoder in one module, so one state dict (plain tensors,
    safetensors-friendly) holds a trained f-AnoGAN.

    :meth:`residuals` gives the two izif residuals with graph; :meth:`score` and
    :meth:`residual_map` evaluate without gradients, with the networks temporarily in eval mode.

    Parameters
    ----------
    in_channels : int
        Image channels C.
    image_size : int or (int, int)
        ``(H, W)``.
    latent_dim : int
        Dimension of z (128 in f-AnoGAN).
    width : int
        Base width of the three networks (64 in f-AnoGAN).
    kappa : float
        Default weight of the feature residual in :meth:`score`.
    """

    def __init__(self, in_channels: int = 1, image_size: int | Sequence[int] = 64, latent_dim: int = 128,
                 width: int = 64, kappa: float = 1.0):
        super().__init__()
        self.in_channels, self.image_size = in_channels, _pair(image_size)
        self.latent_dim, self.width, self.kappa = latent_dim, width, kappa
        self.generator = Generator(latent_dim, in_channels, self.image_size, width)
        self.critic = Critic(in_channels, self.image_size, width)
        self.encoder = Encoder(in_channels, self.image_size, latent_dim, width)

    def residuals(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:func:`izif_residuals` of ``x (B, C, H, W)`` with this model's encoder, generator and
        critic: ``(residual_image (B,), residual_features (B,))``, with graph, in the current mode."""
        return izif_residuals(x, self.encoder, self.generator, self.critic)

    @torch.no_grad()
    def score(self, x: torch.Tensor, kappa: float | None = None, batch_size: int = 256) -> torch.Tensor:
        """f-AnoGAN anomaly score of ``x (B, C, H, W)`` in batches -> ``(B,)`` (CPU), higher = more anomalous.

        ``residual_image + κ · residual_features`` (:meth:`residuals`), κ = ``kappa`` or the model's
        default (1 in f-AnoGAN). κ weighs the FEATURE residual, the image residual has weight 1 (a
        public fork had the two weights swapped). Without gradients, the networks temporarily in eval
        mode (batch-norm running statistics).
        """
        kappa = self.kappa if kappa is None else kappa
        if len(x) == 0:
            return torch.zeros(0)
        device = _device(self)
        rows = []
        with _eval_mode(self.encoder, self.generator, self.critic):
            for i in range(0, len(x), batch_size):
                residual_image, residual_features = self.residuals(x[i:i + batch_size].to(device))
                rows.append((residual_image + kappa * residual_features).cpu())
        return torch.cat(rows)

    @torch.no_grad()
    def residual_map(self, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """Per-pixel squared residual ``(x − G(E(x)))²`` of ``x (B, C, H, W)`` in batches -> ``(B, C, H, W)``
        (CPU); without gradients, encoder and generator temporarily in eval mode."""
        if len(x) == 0:
            return torch.zeros(x.shape)
        device = _device(self)
        rows = []
        with _eval_mode(self.encoder, self.generator):
            for i in range(0, len(x), batch_size):
                batch = x[i:i + batch_size].to(device)
                rows.append((batch - self.generator(self.encoder(batch))).pow(2).cpu())
        return torch.cat(rows)
