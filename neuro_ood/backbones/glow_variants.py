"""Model-bias variants of Glow (Schirrmeister et al., NeurIPS 2020, supplement S2), same interface.

:class:`LocalPatchGlow` (S2.1): one single-scale Glow applied to independent ``patch``×``patch``
patches, log p(x) = sum over patches. :class:`FullyConnectedGlow` (S2.2): the multi-scale structure
with fully-connected flow steps inside each scale. :func:`build_glow_variant` builds any of
``"multiscale"``, ``"local"``, ``"fc"``. They show that Glow likelihoods are dominated by local,
low-level statistics.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from neuro_ood.backbones.glow import ActNorm, AffineCoupling, Glow, GlowOutput


class LocalPatchGlow(nn.Module):
    """Glow restricted to non-overlapping ``patch × patch`` patches (supplement S2.1).

    What it is for: S2.1 / Sec. 2 of the paper show that Glow likelihoods are dominated by local,
    low-level statistics. This model can only see ``patch × patch`` neighbourhoods: the image is
    treated as a set of independent patches, each scored by ONE shared single-scale Glow (squeeze
    and ``steps`` flow steps, no split: ``Glow(n_scales=1)``), and ``log p(x)`` is the sum of the
    patch log-likelihoods. If it reaches likelihood rankings (e.g. in-distribution vs. outlier)
    similar to the full multi-scale Glow, those rankings come from local statistics.

    Interface as :class:`Glow`, with ``n_scales = 1``: :meth:`forward` returns a :class:`GlowOutput`
    whose ``(B, 1)`` terms are sums over the ``P = (H / patch) · (W / patch)`` patches, and whose
    single latent ``(B, 4C, H/2, W/2)`` holds each patch's ``(4C, patch/2, patch/2)`` latent at the
    patch's place, so it is spatially aligned like the latent of a one-scale :class:`Glow`.

    Parameters
    ----------
    in_channels : int
        Channels ``C`` of the input.
    patch : int
        Side of the square patches, even; ``H`` and ``W`` must be multiples of it (8 in the paper,
        for 32×32 images = 16 patches).
    steps : int
        Flow steps of the single scale (32 = one scale of the full Glow).
    hidden : int
        Width of the coupling networks.
    lu : bool
        LU-parametrised 1×1 convolutions.
    learned_prior : bool
        Learned per-channel prior for the (only, "top") latent; see :class:`Glow`.
    """

    def __init__(self, in_channels: int = 3, patch: int = 8, steps: int = 32, hidden: int = 512, lu: bool = True,
                 learned_prior: bool = False):
        super().__init__()
        if patch < 2 or patch % 2:
            raise ValueError(f"patch must be an even number >= 2 (one squeeze), got {patch}")
        self.in_channels = in_channels
        self.patch = patch
        self.n_scales = 1
        self.learned_prior = learned_prior
        self.glow = Glow(in_channels, n_scales=1, steps_per_scale=steps, hidden=hidden, lu=lu,
                         learned_prior=learned_prior)

    def padded_size(self, h: int, w: int, n_scales: int | None = None) -> tuple[int, int]:
        """Smallest ``(H, W) >= (h, w)`` with both divisible by ``patch`` (``n_scales`` is ignored;
        accepted so that ``model.padded_size(h, w, n_scales)`` works for every variant)."""
        p = self.patch
        return -(-h // p) * p, -(-w // p) * p

    def _check_size(self, h: int, w: int) -> None:
        if h % self.patch or w % self.patch:
            ph, pw = self.padded_size(h, w)
            raise ValueError(f"LocalPatchGlow with {self.patch}×{self.patch} patches needs H and W divisible by "
                             f"{self.patch}; got {h}×{w} (pad to {ph}×{pw})")

    def latent_shapes(self, h: int, w: int) -> list[tuple[int, int, int]]:
        """``[(4C, h/2, w/2)]``: the shape of the one latent for inputs of spatial size ``h × w``."""
        self._check_size(h, w)
        return [(4 * self.in_channels, h // 2, w // 2)]

    @staticmethod
    def to_patches(x: torch.Tensor, side: int) -> torch.Tensor:
        """``x (B, C, H, W)`` -> ``(B · nH · nW, C, side, side)``, patches in row-major order per image
        (``nH = H / side``, ``nW = W / side``); a reshape/permute, no copy loops."""
        b, c, h, w = x.shape
        nh, nw = h // side, w // side
        return (x.reshape(b, c, nh, side, nw, side).permute(0, 2, 4, 1, 3, 5)
                .reshape(b * nh * nw, c, side, side))

    @staticmethod
    def from_patches(patches: torch.Tensor, b: int, nh: int, nw: int) -> torch.Tensor:
        """Inverse of :meth:`to_patches`: ``(b · nh · nw, C, s, s)`` -> ``(b, C, nh · s, nw · s)``."""
        _, c, s, _ = patches.shape
        return patches.reshape(b, nh, nw, c, s, s).permute(0, 3, 1, 4, 2, 5).reshape(b, c, nh * s, nw * s)

    def forward(self, x: torch.Tensor) -> GlowOutput:
        """``x (B, C, H, W)`` -> :class:`GlowOutput` with ``(B, 1)`` terms summed over the patches.

        ``latents[0]`` is ``(B, 4C, H/2, W/2)``; ``log_prior``, ``logdet`` and ``log_likelihood`` are
        ``(B, 1)``, in nats.
        """
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected input (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        b, _, h, w = x.shape
        self._check_size(h, w)
        nh, nw = h // self.patch, w // self.patch
        out = self.glow(self.to_patches(x, self.patch))
        log_prior = out.log_prior.reshape(b, nh * nw).sum(1, keepdim=True)
        logdet = out.logdet.reshape(b, nh * nw).sum(1, keepdim=True)
        latent = self.from_patches(out.latents[0], b, nh, nw)
        return GlowOutput(latents=[latent], log_prior=log_prior, logdet=logdet, log_likelihood=log_prior + logdet)

    def inverse(self, latents: list[torch.Tensor]) -> torch.Tensor:
        """Reconstruct ``x (B, C, H, W)`` from ``[z (B, 4C, H/2, W/2)]`` of :meth:`forward`."""
        if len(latents) != 1:
            raise ValueError(f"expected 1 latent, got {len(latents)}")
        z = latents[0]
        b, _, h2, w2 = z.shape
        half = self.patch // 2
        if h2 % half or w2 % half:
            raise ValueError(f"latent {tuple(z.shape)} does not tile into {half}×{half} patch latents")
        nh, nw = h2 // half, w2 // half
        patches = self.glow.inverse([self.to_patches(z, half)])
        return self.from_patches(patches, b, nh, nw)

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 1.0, *, size: tuple[int, int],
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw ``(n, C, H, W)`` samples with ``size = (H, W)``: independent patch samples tiled together."""
        self._check_size(*size)
        nh, nw = size[0] // self.patch, size[1] // self.patch
        patches = self.glow.sample(n * nh * nw, temperature, size=(self.patch, self.patch), generator=generator)
        return self.from_patches(patches, n, nh, nw)


class DenseActNorm(ActNorm):
    """ActNorm on vectors: ``y = (x + bias) · exp(log_scale)`` with one ``(bias, log_scale)`` per feature.

    ``x (B, D)``. Data-dependent initialisation on the first forward call: zero mean and unit
    variance per feature over that batch (with a batch of one example only the mean is set). A
    subclass of :class:`ActNorm`, so :class:`~neuro_ood.detectors.glow.GlowDetector` initialises it on
    its initialisation batch.
    """

    def __init__(self, features: int, eps: float = 1e-6):
        super().__init__(features, eps)
        self.bias = nn.Parameter(torch.zeros(1, features))
        self.log_scale = nn.Parameter(torch.zeros(1, features))

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        """Set the parameters from the batch ``x (B, D)``: zero mean, unit variance per feature."""
        self.bias.copy_(-x.mean(0, keepdim=True))
        if x.shape[0] > 1:
            self.log_scale.copy_(-torch.log(x.std(0, keepdim=True, unbiased=False) + self.eps))
        self.initialized.fill_(True)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x (B, D)`` -> ``(y (B, D), logdet (B,))``."""
        if not bool(self.initialized):
            self.initialize(x)
        y = (x + self.bias) * torch.exp(self.log_scale)
        return y, self.log_scale.sum().expand(x.shape[0])


def random_orthogonal(n: int) -> torch.Tensor:
    """Haar-distributed random orthogonal ``(n, n)`` float64 matrix: the Q factor (positive diagonal R)
    of a Gaussian matrix.

    Computed by CholeskyQR2 (two passes of ``Q ← A R⁻¹`` with ``R = chol(AᵀA)``), matrix products that
    are several times faster than Householder QR on CPU for ``n`` in the thousands; falls back to
    Householder QR should the Cholesky factorisation fail. Uses the global torch RNG.
    """
    a = torch.randn(n, n, dtype=torch.float64)
    try:
        q = a
        for _ in range(2):
            r = torch.linalg.cholesky(q.T @ q, upper=True)
            q = torch.linalg.solve_triangular(r, q, upper=True, left=False)
        return q
    except RuntimeError:
        q, r = torch.linalg.qr(a)
        return q * torch.sign(torch.diagonal(r))


class FixedOrthogonalProjection(nn.Module):
    """Fixed (untrained) random orthogonal projection ``y = W x`` of vectors ``x (B, D)``.

    ``W (D, D)`` (:func:`random_orthogonal`, rounded to the default dtype) is a buffer: saved in the
    state dict, never updated by an optimiser — the fully-connected counterpart of Glow's 1×1
    convolution, kept at its random initial state (S2.2). ``log|det W|``, 0 for an exactly orthogonal
    matrix, is stored as the buffer ``log_abs_det`` for the stored, rounded ``W = Q + Δ``:
    ``log|det(I + QᵀΔ)| = tr(QᵀΔ) + O(‖Δ‖²)``, computed in float64 (O(D²) instead of an O(D³)
    determinant; the neglected term is below 1e-10 for ``D`` in the thousands in float32).
    """

    def __init__(self, features: int):
        super().__init__()
        dtype = torch.get_default_dtype()
        q = random_orthogonal(features)
        weight = q.to(dtype)
        self.register_buffer("weight", weight)
        self.register_buffer("log_abs_det", (q * (weight.double() - q)).sum().to(dtype))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x (B, D)`` -> ``(y (B, D), logdet (B,))``."""
        return x @ self.weight.T, self.log_abs_det.expand(x.shape[0])

    def inverse(self, y: torch.Tensor, refinements: int = 2) -> torch.Tensor:
        """``y (B, D)`` -> ``x (B, D)``.

        ``x₀ = y W`` (``W⁻¹ ≈ Wᵀ``) followed by ``refinements`` steps of iterative refinement
        ``x ← x + (y − x Wᵀ) W``, each squaring the relative error ``‖I − WᵀW‖`` left by rounding
        ``W``: exact to working precision at O(B·D²) instead of a D×D solve.
        """
        x = y @ self.weight
        for _ in range(refinements):
            x = x + (y - x @ self.weight.T) @ self.weight
        return x


class DenseAffineCoupling(AffineCoupling):
    """Fully-connected affine coupling on ``x (B, D)``: the first ``D // 2`` features ``x_a`` pass and
    ``y_b = (x_b + shift(x_a)) · scale(x_a)``, as :class:`AffineCoupling` does with channels.

    ``(shift, h) = NN(x_a)`` with NN = linear(D/2 → hidden) → ReLU → zero-initialised
    linear(hidden → 2 · (D − D/2)), and ``scale = sigmoid(h + 2)``.
    """

    def __init__(self, features: int, hidden: int = 512):
        super().__init__(features, hidden)

    @staticmethod
    def coupling_net(n_in: int, hidden: int, n_out: int) -> nn.Sequential:
        return nn.Sequential(nn.Linear(n_in, hidden), nn.ReLU(), nn.Linear(hidden, n_out))


class DenseFlowStep(nn.Module):
    """One fully-connected Glow step on ``(B, C, H, W)``: flatten to ``D = C·H·W`` →
    :class:`DenseActNorm` → :class:`FixedOrthogonalProjection` → :class:`DenseAffineCoupling` → reshape.

    Parameters
    ----------
    shape : tuple of int
        ``(C, H, W)`` of the representation the step works on (fixed: the layers are sized by ``D``).
    hidden : int
        Width of the coupling network.
    """

    def __init__(self, shape: tuple[int, int, int], hidden: int = 512):
        super().__init__()
        self.shape = tuple(int(s) for s in shape)
        features = math.prod(self.shape)
        self.layers = nn.ModuleList([DenseActNorm(features), FixedOrthogonalProjection(features),
                                     DenseAffineCoupling(features, hidden)])

    def _check(self, x: torch.Tensor) -> None:
        if tuple(x.shape[1:]) != self.shape:
            raise ValueError(f"fully-connected flow step built for (B, {', '.join(map(str, self.shape))}), "
                             f"got {tuple(x.shape)}")

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x (B, C, H, W)`` -> ``(y (B, C, H, W), logdet (B,))``, the sum over the three layers."""
        self._check(x)
        h = x.reshape(x.shape[0], -1)
        logdet = x.new_zeros(x.shape[0])
        for layer in self.layers:
            h, ld = layer(h)
            logdet = logdet + ld
        return h.reshape(x.shape), logdet

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        """``y (B, C, H, W)`` -> ``x (B, C, H, W)``."""
        self._check(y)
        h = y.reshape(y.shape[0], -1)
        for layer in reversed(self.layers):
            h = layer.inverse(h)
        return h.reshape(y.shape)


def _pair(size: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


class FullyConnectedGlow(Glow):
    """Multi-scale Glow whose flow steps are fully connected within each scale (supplement S2.2).

    What it is for: a model with a different bias from the convolutional Glow (no locality, no
    weight sharing across positions), to check how much the likelihood behaviour of Glow (Sec. 2 of
    the paper: likelihoods dominated by local low-level statistics, rankings reproduced by
    :class:`LocalPatchGlow`) depends on its convolutional architecture.

    Keeps the multi-scale structure of :class:`Glow` (squeeze at the start of each scale, split of
    half the channels after every scale but the last, the same priors and the same per-scale
    ``log_prior`` / ``logdet`` / ``log_likelihood`` accounting) but every step is a
    :class:`DenseFlowStep` on the flattened scale representation: ActNorm over ``D`` features, a
    fixed random orthogonal ``D × D`` projection (a buffer, not trained) and a fully-connected affine
    coupling. At scale ``i`` the representation is ``(C · 2^(i+2), H / 2^(i+1), W / 2^(i+1))``, so
    ``D_i = C · H · W / 2^i`` (3072, 1536, 768 for 3×32×32 inputs). The layers are sized by ``D_i``,
    so the model only accepts inputs of size ``image_size``.

    Parameters
    ----------
    in_channels : int
        Channels ``C`` of the input.
    image_size : int or (int, int)
        ``(H, W)`` of the inputs, divisible by ``2 ** n_scales``.
    n_scales : int
        Number of scales.
    steps_per_scale : int
        Flow steps per scale (8 in the paper instead of Glow's 32).
    hidden : int
        Width of the coupling networks (512 in the paper).
    learned_prior : bool
        Learned priors as in :class:`Glow` (a zero-initialised 3×3 convolution of the kept half for
        split latents, per-channel for the last latent).
    """

    def __init__(self, in_channels: int = 3, image_size: int | tuple[int, int] = (32, 32), n_scales: int = 3,
                 steps_per_scale: int = 8, hidden: int = 512, learned_prior: bool = False):
        h, w = _pair(image_size)
        if n_scales < 1:
            raise ValueError(f"need n_scales >= 1, got {n_scales}")
        m = 2 ** n_scales
        if h % m or w % m or h < 1 or w < 1:
            ph, pw = Glow.padded_size(max(h, 1), max(w, 1), n_scales)
            raise ValueError(f"FullyConnectedGlow with {n_scales} scales needs image_size divisible by {m}; "
                             f"got {h}×{w} (pad to {ph}×{pw})")

        def step_factory(i: int, channels: int) -> nn.Module:
            return DenseFlowStep((channels, h >> (i + 1), w >> (i + 1)), hidden)

        super().__init__(in_channels, n_scales, steps_per_scale, hidden, lu=True, learned_prior=learned_prior,
                         step_factory=step_factory)
        self.image_size = (h, w)

    def _check_size(self, h: int, w: int) -> None:
        super()._check_size(h, w)
        if (h, w) != self.image_size:
            raise ValueError(f"FullyConnectedGlow was built for {self.image_size[0]}×{self.image_size[1]} "
                             f"inputs, got {h}×{w}")

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 1.0, *, size: tuple[int, int] | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw ``(n, C, H, W)`` samples; ``size`` defaults to (and must equal) ``image_size``."""
        return super().sample(n, temperature, size=self.image_size if size is None else tuple(size),
                              generator=generator)


GLOW_VARIANTS = ("multiscale", "local", "fc")
"""Names accepted by :func:`build_glow_variant`."""


def build_glow_variant(variant: str, in_channels: int, image_size: int | tuple[int, int] | None = None,
                       n_scales: int = 3, steps_per_scale: int = 32, hidden: int = 512, lu: bool = True,
                       learned_prior: bool = False, patch: int = 8) -> nn.Module:
    """Build one of the Glow model-bias variants of Schirrmeister et al. (2020), supplement S2.

    All three map ``x (B, C, H, W)`` to a :class:`GlowOutput` (``latents``, ``log_prior``,
    ``logdet``, ``log_likelihood`` of shape ``(B, model.n_scales)``, ``.log_px``), have ``inverse``
    and ``n_scales`` and contain :class:`ActNorm` layers for data-dependent initialisation, so they
    train with :func:`neuro_ood.trainer.steps.glow_step_fn` and are scored with
    :func:`neuro_ood.features.glow_log_likelihoods` unchanged. S2's point: likelihoods are dominated
    by local low-level statistics — the local-patch Glow reaches likelihood rankings similar to the
    full Glow's.

    Parameters
    ----------
    variant : str
        ``"multiscale"``: the standard convolutional multi-scale :class:`Glow` (S1.1), the reference.
        ``"local"``: :class:`LocalPatchGlow` (S2.1), one single-scale Glow shared by independent
        ``patch × patch`` patches; ``n_scales`` and ``image_size`` are not used and
        ``steps_per_scale`` is its number of steps.
        ``"fc"``: :class:`FullyConnectedGlow` (S2.2), multi-scale with fully-connected steps within
        scales; needs ``image_size``; ``lu`` is not used (its projections are fixed).
    in_channels : int
        Channels ``C`` of the input.
    image_size : int or (int, int), optional
        ``(H, W)`` of the inputs; required for ``"fc"``.
    n_scales, steps_per_scale, hidden, lu, learned_prior :
        As in :class:`Glow`.
    patch : int
        Patch side of ``"local"``.

    Returns
    -------
    nn.Module
        The untrained model (ActNorm layers not yet initialised).

    Raises
    ------
    ValueError
        For an unknown ``variant``, or ``"fc"`` without ``image_size``.
    """
    key = variant.strip().lower() if isinstance(variant, str) else variant
    if key == "multiscale":
        return Glow(in_channels, n_scales=n_scales, steps_per_scale=steps_per_scale, hidden=hidden, lu=lu,
                    learned_prior=learned_prior)
    if key == "local":
        return LocalPatchGlow(in_channels, patch=patch, steps=steps_per_scale, hidden=hidden, lu=lu,
                              learned_prior=learned_prior)
    if key == "fc":
        if image_size is None:
            raise ValueError("the 'fc' Glow variant needs image_size=(H, W): its layers are sized per scale")
        return FullyConnectedGlow(in_channels, image_size=image_size, n_scales=n_scales,
                                  steps_per_scale=steps_per_scale, hidden=hidden, learned_prior=learned_prior)
    raise ValueError(f"unknown Glow variant {variant!r}; expected one of {', '.join(map(repr, GLOW_VARIANTS))}")
