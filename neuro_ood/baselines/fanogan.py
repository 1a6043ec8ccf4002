"""f-AnoGAN (Schlegl et al., Medical Image Analysis 2019): a WGAN-GP, an izif encoder and its score.

The module knows nothing of MRI: images are ``(B, C, H, W)`` tensors with intensities in [0, 1].
Training has two stages, as in the original code (``tSchlegl/f-AnoGAN``):

1. :func:`train_wgan_gp` — a Wasserstein GAN with gradient penalty (weight 10, 5 critic steps per
   generator step, Adam 2e-4 with betas (0.5, 0.999), latent dimension 128);
2. :func:`train_izif_encoder` — the image→z→image encoder with generator G and critic D frozen,
   trained on ``MSE(x, G(E(x))) + κ · MSE(f_D(x), f_D(G(E(x))))`` with κ = 1, where ``f_D`` are the
   critic's penultimate-layer features (:meth:`Critic.features`).

The anomaly score (:func:`anomaly_score`) is the same weighted sum per image, higher = more anomalous.

Latent prior and encoder range: z ~ U[−1, 1]^d (:func:`sample_latent`) and the encoder ends in
``tanh``, so E(x) always lies in the prior's support — the ``_unif`` + ``tanh_fc`` configuration of
the original code, which also offers an unbounded encoder with a normal prior.

Image sizes: any ``(H, W)``. The :class:`Generator` works at a padded size (both sides multiples of
``2**n_up``) and centre-crops its output to exactly ``(H, W)``; :class:`Critic` and
:class:`Encoder` use stride-2 convolutions (size ``s -> floor(s / 2)``) and a linear layer sized at
construction, so they accept exactly the ``image_size`` they were built for.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from neuro_ood.training import TrainState, report_step


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


def gradient_penalty(critic: nn.Module, real: torch.Tensor, fake: torch.Tensor,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """WGAN-GP penalty ``E[(‖∇_x̂ D(x̂)‖₂ − 1)²]`` (Gulrajani et al. 2017), a scalar with graph.

    Parameters
    ----------
    critic : nn.Module
        ``x (B, C, H, W) -> (B,)``.
    real, fake : Tensor
        ``(B, C, H, W)`` real and generated images (both detached here).
    generator : torch.Generator, optional
        Random source (CPU) of the interpolation weights ``ε ~ U[0, 1]``, one per example;
        ``x̂ = ε·real + (1 − ε)·fake``.

    Returns
    -------
    Tensor
        ``()``; computed with ``create_graph=True`` so that it can be backpropagated to the critic's
        parameters. The norm is ``sqrt(Σ g² + 1e-12)`` to keep its gradient finite at g = 0.
    """
    eps = torch.rand(len(real), *([1] * (real.dim() - 1)), generator=generator).to(real.device, real.dtype)
    x_hat = (eps * real.detach() + (1.0 - eps) * fake.detach()).requires_grad_(True)
    (grad,) = torch.autograd.grad(critic(x_hat).sum(), x_hat, create_graph=True)
    norm = torch.sqrt(grad.flatten(1).pow(2).sum(1) + 1e-12)
    return (norm - 1.0).pow(2).mean()


def _residuals(x: torch.Tensor, encoder: nn.Module, generator: nn.Module, critic: nn.Module
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(residual_image (B,), residual_features (B,))`` of the izif mapping x -> G(E(x))."""
    recon = generator(encoder(x))
    residual_image = (x - recon).pow(2).flatten(1).mean(1)
    residual_features = (critic.features(x) - critic.features(recon)).pow(2).flatten(1).mean(1)
    return residual_image, residual_features


def izif_loss(x: torch.Tensor, encoder: nn.Module, generator: nn.Module, critic: nn.Module,
              kappa: float = 1.0) -> torch.Tensor:
    """izif training loss ``MSE(x, G(E(x))) + κ · MSE(f_D(x), f_D(G(E(x))))``, a scalar with graph.

    The batch mean of :func:`anomaly_score`'s per-image sum: κ weighs the FEATURE residual, the
    image residual has weight 1. Modules are used in whatever mode they are in.

    Parameters
    ----------
    x : Tensor
        ``(B, C, H, W)`` images in [0, 1].
    kappa : float
        Weight of the critic-feature residual (1 in f-AnoGAN).
    """
    residual_image, residual_features = _residuals(x, encoder, generator, critic)
    return (residual_image + kappa * residual_features).mean()


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


@torch.no_grad()
def anomaly_score(x: torch.Tensor, encoder: nn.Module, generator: nn.Module, critic: nn.Module,
                  kappa: float = 1.0) -> torch.Tensor:
    """f-AnoGAN anomaly score per image, HIGHER = MORE ANOMALOUS.

    ``score = residual_image + κ · residual_features`` with

    - ``residual_image = mean over C·H·W pixels of (x − G(E(x)))²`` (weight 1);
    - ``residual_features = mean over feature dims of (f_D(x) − f_D(G(E(x))))²`` (weight κ),
      ``f_D`` = :meth:`Critic.features`.

    κ weighs the FEATURE residual (a public fork had the two weights swapped). Evaluated without
    gradients with the three networks temporarily in eval mode (batch-norm running statistics).

    Parameters
    ----------
    x : Tensor
        ``(B, C, H, W)`` images in [0, 1].
    kappa : float
        Weight of the feature residual (1 in f-AnoGAN).

    Returns
    -------
    Tensor
        ``(B,)`` scores.
    """
    with _eval_mode(encoder, generator, critic):
        residual_image, residual_features = _residuals(x, encoder, generator, critic)
    return residual_image + kappa * residual_features


@torch.no_grad()
def residual_map(x: torch.Tensor, encoder: nn.Module, generator: nn.Module) -> torch.Tensor:
    """Per-pixel squared residual ``(x − G(E(x)))²``, ``(B, C, H, W)``, for anomaly maps.

    Without gradients, encoder and generator temporarily in eval mode.
    """
    with _eval_mode(encoder, generator):
        return (x - generator(encoder(x))).pow(2)


@dataclass
class GanTrainState:
    """Where :func:`train_wgan_gp` stands: generator steps done and both optimiser states.

    :attr:`optimizer` packs both into one dict (``{"generator": ..., "critic": ...}``), so a
    checkpointer that saves ``TrainState(step, optimizer)`` can store this state too; a
    :class:`~neuro_ood.training.TrainState` holding such a dict resumes :func:`train_wgan_gp`.
    """

    step: int = 0
    generator_optimizer: dict | None = None
    critic_optimizer: dict | None = None

    @property
    def optimizer(self) -> dict | None:
        if self.generator_optimizer is None and self.critic_optimizer is None:
            return None
        return {"generator": self.generator_optimizer, "critic": self.critic_optimizer}

    @classmethod
    def from_train_state(cls, state: TrainState | GanTrainState | None) -> GanTrainState:
        if state is None:
            return cls()
        if isinstance(state, GanTrainState):
            return state
        packed = state.optimizer or {}
        if packed and not {"generator", "critic"} >= set(packed):
            raise ValueError("a TrainState resuming train_wgan_gp needs optimizer={'generator': ..., 'critic': ...}")
        return cls(step=state.step, generator_optimizer=packed.get("generator"),
                   critic_optimizer=packed.get("critic"))


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def train_wgan_gp(generator: Generator, critic: nn.Module, images01: torch.Tensor, steps: int,
                  batch_size: int = 64, lr: float = 2e-4, betas: tuple[float, float] = (0.5, 0.999),
                  n_critic: int = 5, gp_weight: float = 10.0, seed: int = 0,
                  state: GanTrainState | TrainState | None = None,
                  on_step: Callable[[int, float], None] | None = None,
                  on_checkpoint: Callable[[GanTrainState], None] | None = None,
                  checkpoint_every: int = 1000) -> GanTrainState:
    """WGAN-GP training (f-AnoGAN stage 1) for ``steps`` generator steps in all, resuming from ``state``.

    Each generator step is preceded by ``n_critic`` critic steps on
    ``mean D(G(z)) − mean D(x) + gp_weight · gradient_penalty``; the generator step minimises
    ``−mean D(G(z))`` with the critic's parameters not requiring gradients. Latents come from
    U[−1, 1]^d (:func:`sample_latent`); batches, latents and interpolation weights from a
    ``torch.Generator`` seeded with ``seed + state.step``. Both networks are left in eval mode.

    Parameters
    ----------
    generator : Generator
        Needs a ``latent_dim`` attribute.
    critic : nn.Module
        ``x (B, C, H, W) -> (B,)``, on the generator's device.
    images01 : Tensor
        Training images ``(N, C, H, W)`` in [0, 1].
    steps : int
        Total generator steps, counting those of the run being resumed.
    state : GanTrainState or TrainState, optional
        Where to resume; a plain TrainState must hold the packed optimiser dict of
        :attr:`GanTrainState.optimizer`.
    on_step : callable, optional
        Called with (step, critic loss of the step's last critic update) after every generator step.
    on_checkpoint : callable, optional
        Called with the state every ``checkpoint_every`` steps and at the end.

    Returns
    -------
    GanTrainState
        Steps reached and both optimiser states.
    """
    state = GanTrainState.from_train_state(state)
    device = _device(generator)
    images = torch.as_tensor(images01, dtype=torch.float32)
    opt_g = torch.optim.Adam(generator.parameters(), lr=lr, betas=betas)
    opt_d = torch.optim.Adam(critic.parameters(), lr=lr, betas=betas)
    if state.generator_optimizer is not None:
        opt_g.load_state_dict(state.generator_optimizer)
    if state.critic_optimizer is not None:
        opt_d.load_state_dict(state.critic_optimizer)
    rng = torch.Generator().manual_seed(seed + state.step)
    b = min(batch_size, len(images))
    critic_params = [p for p in critic.parameters() if p.requires_grad]
    generator.train()
    critic.train()

    def snapshot() -> None:
        state.generator_optimizer, state.critic_optimizer = opt_g.state_dict(), opt_d.state_dict()

    for step in range(state.step, steps):
        for _ in range(n_critic):
            real = images[torch.randint(len(images), (b,), generator=rng)].to(device)
            with torch.no_grad():
                fake = generator(sample_latent(b, generator.latent_dim, rng, device))
            d_loss = (critic(fake).mean() - critic(real).mean()
                      + gp_weight * gradient_penalty(critic, real, fake, rng))
            opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            opt_d.step()
        for p in critic_params:
            p.requires_grad_(False)
        try:
            g_loss = -critic(generator(sample_latent(b, generator.latent_dim, rng, device))).mean()
            opt_g.zero_grad(set_to_none=True)
            g_loss.backward()
            opt_g.step()
        finally:
            for p in critic_params:
                p.requires_grad_(True)
        report_step(state, steps, d_loss.item(), snapshot, on_step, on_checkpoint, checkpoint_every)
    snapshot()
    generator.eval()
    critic.eval()
    return state


def train_izif_encoder(encoder: nn.Module, generator: nn.Module, critic: nn.Module, images01: torch.Tensor,
                       steps: int, batch_size: int = 64, lr: float = 2e-4,
                       betas: tuple[float, float] = (0.5, 0.999), kappa: float = 1.0, seed: int = 0,
                       state: TrainState | None = None,
                       on_step: Callable[[int, float], None] | None = None,
                       on_checkpoint: Callable[[TrainState], None] | None = None,
                       checkpoint_every: int = 1000) -> TrainState:
    """izif encoder training (f-AnoGAN stage 2) for ``steps`` steps in all, resuming from ``state``.

    Adam on :func:`izif_loss` (``MSE(x, G(E(x))) + κ · MSE(f_D(x), f_D(G(E(x))))``) over the encoder's
    parameters only. The generator and critic are frozen for the run — eval mode and
    ``requires_grad=False`` — and their modes and flags restored afterwards (also on error).
    Batches come from a ``torch.Generator`` seeded with ``seed + state.step``. The encoder is left in
    eval mode.

    Parameters
    ----------
    images01 : Tensor
        Training (inlier) images ``(N, C, H, W)`` in [0, 1].
    kappa : float
        Weight of the critic-feature residual.
    on_step : callable, optional
        Called with (step, loss) after every step.
    on_checkpoint : callable, optional
        Called with the state every ``checkpoint_every`` steps and at the end.
    """
    state = state or TrainState()
    device = _device(encoder)
    images = torch.as_tensor(images01, dtype=torch.float32)
    optimizer = torch.optim.Adam(encoder.parameters(), lr=lr, betas=betas)
    if state.optimizer is not None:
        optimizer.load_state_dict(state.optimizer)
    rng = torch.Generator().manual_seed(seed + state.step)
    b = min(batch_size, len(images))
    frozen = [(p, p.requires_grad) for net in (generator, critic) for p in net.parameters()]
    with _eval_mode(generator, critic):
        for p, _ in frozen:
            p.requires_grad_(False)
        try:
            encoder.train()
            for step in range(state.step, steps):
                x = images[torch.randint(len(images), (b,), generator=rng)].to(device)
                loss = izif_loss(x, encoder, generator, critic, kappa)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                report_step(state, steps, loss.item(), lambda: setattr(state, "optimizer", optimizer.state_dict()),
                            on_step, on_checkpoint, checkpoint_every)
        finally:
            for p, flag in frozen:
                p.requires_grad_(flag)
    state.optimizer = optimizer.state_dict()
    encoder.eval()
    return state


class FAnoGAN(nn.Module):
    """Generator, critic and izif encoder in one module, so one state dict (plain tensors,
    safetensors-friendly) holds a trained f-AnoGAN.

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

    def score(self, x: torch.Tensor, kappa: float | None = None, batch_size: int = 256) -> torch.Tensor:
        """:func:`anomaly_score` of ``x (B, C, H, W)`` in batches -> ``(B,)``, higher = more anomalous."""
        kappa = self.kappa if kappa is None else kappa
        if len(x) == 0:
            return torch.zeros(0)
        device = _device(self)
        return torch.cat([anomaly_score(x[i:i + batch_size].to(device), self.encoder, self.generator,
                                        self.critic, kappa).cpu()
                          for i in range(0, len(x), batch_size)])

    def residual_map(self, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """:func:`residual_map` of ``x (B, C, H, W)`` in batches -> ``(B, C, H, W)``."""
        if len(x) == 0:
            return torch.zeros(x.shape)
        device = _device(self)
        return torch.cat([residual_map(x[i:i + batch_size].to(device), self.encoder, self.generator).cpu()
                          for i in range(0, len(x), batch_size)])
