"""Multi-scale Glow (Kingma & Dhariwal 2018) with a log-likelihood split into per-scale terms.

The network knows nothing of MRI: it maps images ``(B, C, H, W)`` to a list of per-scale latents
and returns, per scale, the Gaussian log-density of that scale's latent and the log-determinants
of that scale's layers, following Schirrmeister et al. (NeurIPS 2020), Eq. (3) and supplement S1.

Architecture (supplement S1.1): ``n_scales`` scales, each = squeeze (space-to-depth 2×2),
``steps_per_scale`` flow steps (ActNorm → invertible 1×1 convolution → affine coupling), and,
except for the last scale, a split that sets half of the channels aside as that scale's latent.
For ``3×32×32`` inputs and 3 scales the flow outputs before the splits are ``12×16×16``,
``24×8×8`` and ``48×4×4``, and the latents ``6×16×16``, ``12×8×8`` and ``48×4×4``.

Priors: by default every latent is scored under an independent standard normal (S1.3). With
``learned_prior=True`` the split-off half ``z_i`` is scored under ``N(μ, σ²)`` with ``(μ, log σ)``
from a zero-initialised 3×3 convolution of the kept half (Glow's learned conditional prior), and the
last latent under a per-channel ``N(μ, σ²)`` with learned, zero-initialised ``μ`` and ``log σ`` —
what Glow's "learn_top" convolution of an all-zero input amounts to, without edge effects.

The model-bias variants of supplement S2 (local patches, fully connected) are in
:mod:`neuro_ood.backbones.glow_variants`.

Units: all log-densities are in nats, for the continuous input ``x``; :func:`bits_per_dim` turns
them into bits per dimension of discretised data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

_LOG_2PI = math.log(2.0 * math.pi)


def bits_per_dim(log_px: torch.Tensor, n_dims: int, n_bins: int = 256) -> torch.Tensor:
    """Bits per dimension of discretised data from the continuous log-density ``log_px``.

    Convention (Glow, Theis et al. 2016): data with ``n_bins`` levels per dimension are scaled to
    ``[-0.5, 0.5)`` with bin width ``1 / n_bins`` (and dequantised with uniform noise in a bin);
    the probability of a bin is approximately ``p(x) · n_bins^(-n_dims)``, so

    ``bpd = (−log p(x) + n_dims · log n_bins) / (n_dims · log 2)``.

    Parameters
    ----------
    log_px : Tensor
        ``(B,)`` (or any shape) continuous log-density of the scaled input, in nats.
    n_dims : int
        Number of dimensions of one input, ``C · H · W``.
    n_bins : int
        Number of quantisation levels per dimension (256 for 8-bit data).

    Returns
    -------
    Tensor
        Same shape as ``log_px``, in bits per dimension.
    """
    return (-log_px + n_dims * math.log(n_bins)) / (n_dims * math.log(2.0))


def _gaussian_log_density(z: torch.Tensor, mean: torch.Tensor | None = None,
                          log_scale: torch.Tensor | None = None) -> torch.Tensor:
    """``(B,)`` log N(z; mean, exp(log_scale)²) summed over all but the batch dimension, in nats."""
    if mean is None:
        log_p = -0.5 * (z ** 2 + _LOG_2PI)
    else:
        log_p = -0.5 * (((z - mean) * torch.exp(-log_scale)) ** 2 + 2.0 * log_scale + _LOG_2PI)
    return log_p.flatten(1).sum(1)


class ActNorm(nn.Module):
    """Per-channel affine map ``y = (x + bias) · exp(log_scale)`` on ``(B, C, H, W)``.

    Data-dependent initialisation: on the first forward call, ``bias`` and ``log_scale`` are set so
    that that batch's output has zero mean and unit variance per channel. The ``initialized``
    buffer is part of the state dict, so a loaded model is not re-initialised.
    """

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.log_scale = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.register_buffer("initialized", torch.tensor(False))

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        """Set the parameters from the batch ``x (B, C, H, W)``: zero mean, unit variance per channel."""
        mean = x.mean(dim=(0, 2, 3), keepdim=True)
        std = x.std(dim=(0, 2, 3), keepdim=True, unbiased=False)
        self.bias.copy_(-mean)
        self.log_scale.copy_(-torch.log(std + self.eps))
        self.initialized.fill_(True)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x (B, C, H, W)`` -> ``(y (B, C, H, W), logdet (B,))``."""
        if not bool(self.initialized):
            self.initialize(x)
        y = (x + self.bias) * torch.exp(self.log_scale)
        logdet = x.shape[2] * x.shape[3] * self.log_scale.sum()
        return y, logdet.expand(x.shape[0])

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        """``y (B, C, H, W)`` -> ``x (B, C, H, W)``."""
        return y * torch.exp(-self.log_scale) - self.bias


class InvConv1x1(nn.Module):
    """Invertible 1×1 convolution ``y = W x`` per pixel, ``W (C, C)`` initialised as a random rotation.

    With ``lu=True``, ``W = P · L · (U + diag(sign(s) · exp(log|s|)))`` with the permutation ``P``
    and ``sign(s)`` fixed, ``L`` unit lower-triangular, ``U`` strictly upper-triangular and
    ``log|s|`` learned, so that ``log|det W| = Σ log|s|``. Otherwise ``W`` is a free matrix and
    ``log|det W|`` comes from ``slogdet``.
    """

    def __init__(self, channels: int, lu: bool = True):
        super().__init__()
        self.lu = lu
        weight = torch.linalg.qr(torch.randn(channels, channels, dtype=torch.float64))[0]
        if lu:
            perm, lower, upper = torch.linalg.lu(weight)
            diag = torch.diagonal(upper)
            dtype = torch.get_default_dtype()
            self.register_buffer("perm", perm.to(dtype))
            self.register_buffer("sign_s", torch.sign(diag).to(dtype))
            self.register_buffer("lower_mask", torch.tril(torch.ones(channels, channels, dtype=dtype), -1))
            self.register_buffer("eye", torch.eye(channels, dtype=dtype))
            self.lower = nn.Parameter(torch.tril(lower, -1).to(dtype))
            self.upper = nn.Parameter(torch.triu(upper, 1).to(dtype))
            self.log_s = nn.Parameter(torch.log(torch.abs(diag)).to(dtype))
        else:
            self.weight = nn.Parameter(weight.to(torch.get_default_dtype()))

    def matrix(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(W (C, C), log|det W| ())``."""
        if not self.lu:
            return self.weight, torch.linalg.slogdet(self.weight)[1]
        lower = self.lower * self.lower_mask + self.eye
        upper = self.upper * self.lower_mask.T + torch.diag(self.sign_s * torch.exp(self.log_s))
        return self.perm @ lower @ upper, self.log_s.sum()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x (B, C, H, W)`` -> ``(y (B, C, H, W), logdet (B,))``."""
        weight, log_det = self.matrix()
        y = F.conv2d(x, weight[:, :, None, None])
        return y, (x.shape[2] * x.shape[3] * log_det).expand(x.shape[0])

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        """``y (B, C, H, W)`` -> ``x (B, C, H, W)``."""
        weight, _ = self.matrix()
        return F.conv2d(y, torch.linalg.inv(weight)[:, :, None, None])


class AffineCoupling(nn.Module):
    """Affine coupling on ``(B, C, H, W)``: the first ``C // 2`` channels ``x_a`` pass unchanged and
    condition ``y_b = (x_b + shift(x_a)) · scale(x_a)`` on the others.

    ``(shift, h) = NN(x_a)`` with NN = conv3×3 → ReLU → conv1×1 → ReLU → zero-initialised conv3×3,
    and ``scale = sigmoid(h + 2)`` (as in the public Glow code; bounded in (0, 1), ≈ 0.88 at
    initialisation, which keeps early training stable).
    """

    def __init__(self, channels: int, hidden: int = 512):
        super().__init__()
        if channels < 2:
            raise ValueError(f"affine coupling needs at least 2 channels, got {channels}")
        self.n_pass = channels // 2
        self.n_change = channels - self.n_pass
        self.net = self.coupling_net(self.n_pass, hidden, 2 * self.n_change)
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    @staticmethod
    def coupling_net(n_in: int, hidden: int, n_out: int) -> nn.Sequential:
        """conv3×3 → ReLU → conv1×1 → ReLU → conv3×3 (the last one is zero-initialised)."""
        return nn.Sequential(nn.Conv2d(n_in, hidden, 3, padding=1), nn.ReLU(), nn.Conv2d(hidden, hidden, 1), nn.ReLU(),
                             nn.Conv2d(hidden, n_out, 3, padding=1))

    def _shift_log_scale(self, x_a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.net(x_a)
        return h[:, :self.n_change], F.logsigmoid(h[:, self.n_change:] + 2.0)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x (B, C, H, W)`` -> ``(y (B, C, H, W), logdet (B,))``."""
        x_a, x_b = x[:, :self.n_pass], x[:, self.n_pass:]
        shift, log_scale = self._shift_log_scale(x_a)
        y_b = (x_b + shift) * torch.exp(log_scale)
        return torch.cat([x_a, y_b], 1), log_scale.flatten(1).sum(1)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        """``y (B, C, H, W)`` -> ``x (B, C, H, W)``."""
        y_a, y_b = y[:, :self.n_pass], y[:, self.n_pass:]
        shift, log_scale = self._shift_log_scale(y_a)
        return torch.cat([y_a, y_b * torch.exp(-log_scale) - shift], 1)


class Squeeze(nn.Module):
    """Space-to-depth 2×2: ``(B, C, H, W)`` -> ``(B, 4C, H/2, W/2)``; volume-preserving (logdet 0)."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x (B, C, H, W)`` with even ``H, W`` -> ``(y (B, 4C, H/2, W/2), logdet (B,) of zeros)``."""
        b, c, h, w = x.shape
        y = x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, 4 * c, h // 2, w // 2)
        return y, x.new_zeros(b)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        """``y (B, 4C, H, W)`` -> ``x (B, C, 2H, 2W)``."""
        b, c4, h, w = y.shape
        c = c4 // 4
        return y.reshape(b, c, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c, 2 * h, 2 * w)


class FlowStep(nn.Module):
    """One Glow step on ``(B, C, H, W)``: ActNorm → InvConv1x1 → AffineCoupling."""

    def __init__(self, channels: int, hidden: int = 512, lu: bool = True):
        super().__init__()
        self.layers = nn.ModuleList([ActNorm(channels), InvConv1x1(channels, lu=lu),
                                     AffineCoupling(channels, hidden)])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x (B, C, H, W)`` -> ``(y (B, C, H, W), logdet (B,))``, the sum over the three layers."""
        logdet = x.new_zeros(x.shape[0])
        for layer in self.layers:
            x, ld = layer(x)
            logdet = logdet + ld
        return x, logdet

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        """``y (B, C, H, W)`` -> ``x (B, C, H, W)``."""
        for layer in reversed(self.layers):
            y = layer.inverse(y)
        return y


@dataclass
class GlowOutput:
    """Result of :meth:`Glow.forward` for a batch of ``B`` inputs, per scale ``i = 0 … n_scales − 1``.

    Attributes
    ----------
    latents : list of Tensor
        ``z_i``: ``(B, C_i, H_i, W_i)`` per scale, finest first; the last one is the whole output
        of the last scale.
    log_prior : Tensor
        ``(B, n_scales)`` log-density of each ``z_i`` under its prior, in nats.
    logdet : Tensor
        ``(B, n_scales)`` sum of the log|det J| of scale ``i``'s layers (its squeeze, flow steps and
        split), in nats.
    log_likelihood : Tensor
        ``(B, n_scales)`` = ``log_prior + logdet``; ``log_likelihood.sum(1)`` is log p(x) of the
        continuous input, in nats.
    """

    latents: list[torch.Tensor]
    log_prior: torch.Tensor
    logdet: torch.Tensor
    log_likelihood: torch.Tensor

    @property
    def log_px(self) -> torch.Tensor:
        """``(B,)`` log p(x) of the continuous input, in nats."""
        return self.log_likelihood.sum(1)


class Glow(nn.Module):
    """Multi-scale Glow: ``x (B, in_channels, H, W)`` -> :class:`GlowOutput`.

    ``H`` and ``W`` must be multiples of ``2 ** n_scales`` (see :meth:`padded_size`; padding is
    the caller's job). Scale ``i`` (0-based) works on ``(B, in_channels · 2^(i+2), H / 2^(i+1),
    W / 2^(i+1))`` and sets half of those channels aside as ``z_i``, except the last scale, whose
    whole output ``(B, in_channels · 2^(n_scales+1), H / 2^n_scales, W / 2^n_scales)`` is the last
    latent. Inputs are conventionally scaled to ``[-0.5, 0.5)`` and dequantised (see
    :func:`bits_per_dim`).

    Parameters
    ----------
    in_channels : int
        Channels ``C`` of the input.
    n_scales : int
        Number of scales ``L``.
    steps_per_scale : int
        Flow steps ``K`` per scale.
    hidden : int
        Width of the coupling networks.
    lu : bool
        LU-parametrised 1×1 convolutions.
    learned_prior : bool
        Learned conditional priors for split latents and a learned per-channel prior for the last
        latent instead of independent standard normals (see the module docstring).
    step_factory : callable, optional
        ``(scale index i, channels C_i') -> nn.Module``: builds one flow step of scale ``i``, a module
        mapping ``(B, C_i', H_i, W_i) -> (y (B, C_i', H_i, W_i), logdet (B,))`` with an ``inverse``.
        Default: :class:`FlowStep` ``(C_i', hidden, lu)``. Used by :class:`FullyConnectedGlow`.
    """

    def __init__(self, in_channels: int = 3, n_scales: int = 3, steps_per_scale: int = 32, hidden: int = 512,
                 lu: bool = True, learned_prior: bool = False, *,
                 step_factory: Callable[[int, int], nn.Module] | None = None):
        super().__init__()
        if n_scales < 1 or steps_per_scale < 1:
            raise ValueError(f"need n_scales >= 1 and steps_per_scale >= 1, got {n_scales}, {steps_per_scale}")
        self.in_channels = in_channels
        self.n_scales = n_scales
        self.learned_prior = learned_prior
        self.squeeze = Squeeze()
        self.scales = nn.ModuleList()
        self.split_priors = nn.ModuleList()
        self.kept_channels: list[int] = []
        self.latent_channels: list[int] = []
        if step_factory is None:
            def step_factory(i: int, channels: int) -> nn.Module:
                return FlowStep(channels, hidden, lu)
        channels = in_channels
        for i in range(n_scales):
            channels *= 4
            self.scales.append(nn.ModuleList([step_factory(i, channels) for _ in range(steps_per_scale)]))
            if i < n_scales - 1:
                kept = channels // 2
                self.kept_channels.append(kept)
                self.latent_channels.append(channels - kept)
                if learned_prior:
                    conv = nn.Conv2d(kept, 2 * (channels - kept), 3, padding=1)
                    nn.init.zeros_(conv.weight)
                    nn.init.zeros_(conv.bias)
                    self.split_priors.append(conv)
                channels = kept
            else:
                self.latent_channels.append(channels)
        if learned_prior:
            self.top_mean = nn.Parameter(torch.zeros(1, channels, 1, 1))
            self.top_log_scale = nn.Parameter(torch.zeros(1, channels, 1, 1))

    @staticmethod
    def padded_size(h: int, w: int, n_scales: int) -> tuple[int, int]:
        """Smallest ``(H, W) >= (h, w)`` with both divisible by ``2 ** n_scales``."""
        m = 2 ** n_scales
        return -(-h // m) * m, -(-w // m) * m

    def latent_shapes(self, h: int, w: int) -> list[tuple[int, int, int]]:
        """``(C_i, H_i, W_i)`` of each latent for inputs of spatial size ``h × w``."""
        self._check_size(h, w)
        return [(c, h >> (i + 1), w >> (i + 1)) for i, c in enumerate(self.latent_channels)]

    def _check_size(self, h: int, w: int) -> None:
        m = 2 ** self.n_scales
        if h % m or w % m:
            ph, pw = self.padded_size(h, w, self.n_scales)
            raise ValueError(f"Glow with {self.n_scales} scales needs H and W divisible by {m}; got {h}×{w} "
                             f"(pad to {ph}×{pw}, e.g. with Glow.padded_size)")

    def _prior(self, i: int, kept: torch.Tensor | None, like: torch.Tensor
               ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Mean and log-scale of ``z_i``'s prior, broadcastable to ``like``; ``(None, None)`` = N(0, I)."""
        if not self.learned_prior:
            return None, None
        if i == self.n_scales - 1:
            return self.top_mean.expand_as(like), self.top_log_scale.expand_as(like)
        h = self.split_priors[i](kept)
        c = like.shape[1]
        return h[:, :c], h[:, c:]

    def forward(self, x: torch.Tensor) -> GlowOutput:
        """``x (B, in_channels, H, W)`` -> :class:`GlowOutput` with per-scale terms in nats."""
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected input (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        self._check_size(x.shape[2], x.shape[3])
        latents, log_priors, logdets = [], [], []
        h = x
        for i, steps in enumerate(self.scales):
            h, logdet = self.squeeze(h)
            for step in steps:
                h, ld = step(h)
                logdet = logdet + ld
            if i < self.n_scales - 1:
                kept, z = h[:, :self.kept_channels[i]], h[:, self.kept_channels[i]:]
            else:
                kept, z = None, h
            log_priors.append(_gaussian_log_density(z, *self._prior(i, kept, z)))
            latents.append(z)
            logdets.append(logdet)
            h = kept
        log_prior = torch.stack(log_priors, 1)
        logdet = torch.stack(logdets, 1)
        return GlowOutput(latents=latents, log_prior=log_prior, logdet=logdet, log_likelihood=log_prior + logdet)

    def _inverse_scale(self, i: int, h: torch.Tensor) -> torch.Tensor:
        """Undo scale ``i``'s flow steps and squeeze: ``(B, C_i', H_i, W_i)`` -> its input."""
        for step in reversed(self.scales[i]):
            h = step.inverse(h)
        return self.squeeze.inverse(h)

    def inverse(self, latents: list[torch.Tensor]) -> torch.Tensor:
        """Reconstruct ``x (B, in_channels, H, W)`` from the list of latents of :meth:`forward`."""
        if len(latents) != self.n_scales:
            raise ValueError(f"expected {self.n_scales} latents, got {len(latents)}")
        h = self._inverse_scale(self.n_scales - 1, latents[-1])
        for i in reversed(range(self.n_scales - 1)):
            h = self._inverse_scale(i, torch.cat([h, latents[i]], 1))
        return h

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 1.0, *, size: tuple[int, int],
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw ``(n, in_channels, H, W)`` samples with ``size = (H, W)``; each latent comes from its
        prior with the standard deviation multiplied by ``temperature``."""
        shapes = self.latent_shapes(*size)
        ref = next(self.parameters())

        def draw(i: int, kept: torch.Tensor | None) -> torch.Tensor:
            eps = torch.randn((n, *shapes[i]), generator=generator, dtype=ref.dtype, device=ref.device)
            mean, log_scale = self._prior(i, kept, eps)
            if mean is None:
                return temperature * eps
            return mean + temperature * torch.exp(log_scale) * eps

        h = self._inverse_scale(self.n_scales - 1, draw(self.n_scales - 1, None))
        for i in reversed(range(self.n_scales - 1)):
            h = self._inverse_scale(i, torch.cat([h, draw(i, h)], 1))
        return h
