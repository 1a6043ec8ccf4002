"""Training loops on tensors of images: a noise-conditional score network (MSMA) and a Glow with
an optional outlier loss (Schirrmeister et al., NeurIPS 2020)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from neuro_ood.backbones.glow import ActNorm, bits_per_dim
from neuro_ood.losses import (dequantize, dsm_loss, glow_nll_bits, margin_outlier_loss, outlier_loss,
                              to_glow_input)


@dataclass
class TrainState:
    """What a resumed run needs besides the weights: the step reached and the optimiser state."""

    step: int = 0
    optimizer: dict | None = None


def report_step(state: TrainState, steps: int, loss: float, snapshot: Callable[[], None],
                on_step: Callable[[int, float], None] | None, on_checkpoint: Callable[[TrainState], None] | None,
                checkpoint_every: int) -> None:
    """Bookkeeping after an optimiser step: advance ``state.step``, report ``loss`` to ``on_step``, and
    every ``checkpoint_every`` steps and at the last one store the optimiser state(s) in ``state``
    with ``snapshot()`` and hand the state to ``on_checkpoint``."""
    state.step += 1
    if on_step is not None:
        on_step(state.step, loss)
    if on_checkpoint is not None and (state.step % checkpoint_every == 0 or state.step == steps):
        snapshot()
        on_checkpoint(state)


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def train_score_network(model: nn.Module, images: torch.Tensor, sigmas: torch.Tensor, steps: int,
                        batch_size: int = 32, lr: float = 1e-3, seed: int = 2019,
                        state: TrainState | None = None,
                        on_step: Callable[[int, float], None] | None = None,
                        on_checkpoint: Callable[[TrainState], None] | None = None,
                        checkpoint_every: int = 1000) -> TrainState:
    """Adam on the DSM loss (λ(σ) = σ²) for ``steps`` steps in all, resuming from ``state``.

    Parameters
    ----------
    images : inlier training images ``(N, C, *spatial)``, intensities in [0, 1].
    sigmas : ``(L,)`` noise levels.
    on_step : called with (step, loss) after every step (progress display).
    on_checkpoint : called with the state every ``checkpoint_every`` steps and at the end.
    """
    state = state or TrainState()
    device = next(model.parameters()).device
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    if state.optimizer is not None:
        optimizer.load_state_dict(state.optimizer)
    # Batches and noise come from (seed, step reached): a resumed run is reproducible too.
    generator = torch.Generator().manual_seed(seed + state.step)
    images = torch.as_tensor(images, dtype=torch.float32)
    sigmas = torch.as_tensor(sigmas, dtype=torch.float32)
    model.train()
    for step in range(state.step, steps):
        index = torch.randint(len(images), (min(batch_size, len(images)),), generator=generator)
        loss = dsm_loss(model, images[index].to(device), sigmas, generator=generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        report_step(state, steps, loss.item(), lambda: setattr(state, "optimizer", optimizer.state_dict()),
                    on_step, on_checkpoint, checkpoint_every)
    state.optimizer = optimizer.state_dict()
    model.eval()
    return state


@dataclass
class GlowTrainState(TrainState):
    """:class:`TrainState` plus ``skipped``: batches whose optimiser step was skipped (S4.3 safeguard
    or non-finite gradients) by :func:`train_glow`, carried over when this state is resumed."""

    skipped: int = 0


def _augment(x: torch.Tensor, generator: torch.Generator, augment: tuple[str, ...], max_shift: int
             ) -> torch.Tensor:
    """Random translations by up to ``max_shift`` pixels (reflection padding) and horizontal flips.

    Parameters
    ----------
    x : ``(B, C, H, W)`` images; each example gets its own shift and flip.
    augment : any of ``"translate"``, ``"flip"``.
    """
    unknown = set(augment) - {"translate", "flip"}
    if unknown:
        raise ValueError(f"unknown augmentations {sorted(unknown)}; expected 'translate' and/or 'flip'")
    b, c, h, w = x.shape
    if "translate" in augment and max_shift > 0:
        padded = F.pad(x, (max_shift,) * 4, mode="reflect")
        dy = torch.randint(2 * max_shift + 1, (b,), generator=generator).to(x.device)
        dx = torch.randint(2 * max_shift + 1, (b,), generator=generator).to(x.device)
        rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
        cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
        batch = torch.arange(b, device=x.device)[:, None, None, None]
        channel = torch.arange(c, device=x.device)[None, :, None, None]
        x = padded[batch, channel, rows, cols]
    if "flip" in augment:
        flip = (torch.rand(b, generator=generator) < 0.5).to(x.device).view(-1, 1, 1, 1)
        x = torch.where(flip, x.flip(-1), x)
    return x


def _finite_log_px(model: nn.Module, x: torch.Tensor, log_p_general: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``log p(x) (B,)`` with grad, recomputed on the examples that came out finite (S4.3).

    Backpropagating through a masked −inf output can still give NaN gradients, so when some but at
    most 75 % of the examples are non-finite (in ``log p`` or in ``log_p_general (B,)``), the forward
    pass is redone on the others and ``log_p_general`` is cut to match. Otherwise the outputs are
    returned as they are (all finite, or a batch the outlier loss will skip).
    """
    log_px = model(x).log_px
    finite = torch.isfinite(log_px.detach())
    if log_p_general is not None:
        finite &= torch.isfinite(log_p_general)
    n_finite = int(finite.sum())
    if n_finite == len(x) or 4 * n_finite < len(x) or n_finite == 0:
        return log_px, log_p_general
    del log_px
    return model(x[finite]).log_px, None if log_p_general is None else log_p_general[finite]


def train_glow(model: nn.Module, images01: torch.Tensor, steps: int, batch_size: int = 64, lr: float = 5e-4,
               weight_decay: float = 5e-5, seed: int = 0, state: TrainState | None = None,
               on_step: Callable[[int, float], None] | None = None,
               on_checkpoint: Callable[[TrainState], None] | None = None, checkpoint_every: int = 1000,
               augment: tuple[str, ...] = ("translate", "flip"), max_shift: int = 2, n_bins: int = 256,
               warmup_steps: int = 0, outliers01: torch.Tensor | None = None,
               outlier_temperature: float = 1000.0, outlier_weight: float = 6000.0,
               general_model: nn.Module | None = None, outlier_loss_kind: str = "ratio",
               margin: float = 1.0, init_batch_size: int = 512) -> GlowTrainState:
    """Maximum-likelihood training of a Glow (S4.1), optionally with an outlier loss (S4.4, S7.5).

    Adamax with weight decay for ``steps`` steps in all, resuming from ``state``. Each step draws a
    batch, augments it (per-example translations by up to ``max_shift`` pixels with reflection
    padding if ``"translate" in augment``, horizontal flips if ``"flip" in augment``), quantises and
    scales it to ``[-0.5, 0.5 − 1/n_bins]`` and adds uniform dequantisation noise. The loss is the
    negative log-likelihood in bits per dimension (:func:`~neuro_ood.losses.glow_nll_bits`). With
    ``warmup_steps > 0`` the learning rate rises linearly, ``lr · min(1, (step + 1) / warmup_steps)``.

    ActNorm data-dependent initialisation: if any ActNorm of ``model`` is still uninitialised (a fresh
    model; not a pretrained or resumed one), one forward pass without gradients on
    ``min(N, init_batch_size)`` dequantised training images sets them before the optimiser is built.

    Outlier loss, with ``outliers01`` (general-domain images, e.g. Tiny Images) given: an outlier batch
    of the same size is drawn, augmented and dequantised like the inliers, and

    - ``outlier_loss_kind="ratio"`` (Eq. S1): :func:`~neuro_ood.losses.outlier_loss` with
      log p_g(x_g) from the frozen ``general_model`` (required; evaluated without gradients on the same
      x_g) and log p_in(x_g) from ``model``;
    - ``outlier_loss_kind="margin"`` (Outlier Exposure, S7.5):
      :func:`~neuro_ood.losses.margin_outlier_loss` on log-likelihoods in nats per dimension of the
      inlier and outlier batches, with ``margin`` in nats per dimension (1.0 = the paper's and
      Hendrycks et al.'s margin of ``n_dims`` nats per image).

    Both are added on the paper's scale relative to the NLL: the paper sums the per-image NLL in nats
    and the outlier loss, so here the outlier loss is divided by ``n_dims · ln 2`` to sit beside the
    NLL in bits per dimension (the total is the paper's objective divided by ``n_dims · ln 2``).
    Outlier examples with non-finite log-likelihoods are dropped and the forward pass redone without
    them; if more than 75 % of the outlier batch would be dropped, or any gradient is non-finite, the
    optimiser step is skipped and counted in ``state.skipped`` (S4.3).

    Parameters
    ----------
    model : nn.Module
        ``x (B, C, H, W) -> GlowOutput`` (:class:`neuro_ood.backbones.glow.Glow`).
    images01 : Tensor
        Inlier training images ``(N, C, H, W)``, intensities in [0, 1].
    steps : int
        Total number of steps (batches), counting those of the run being resumed and skipped ones.
    state : TrainState, optional
        Where to resume (step and optimiser state); a plain :class:`TrainState` starts
        ``skipped`` at 0.
    outliers01 : Tensor, optional
        General-domain images ``(M, C, H, W)`` in [0, 1] for the outlier loss.
    outlier_temperature, outlier_weight : float
        ``T`` and ``λ`` of Eq. S1 (1000 and 6000 in the paper).
    general_model : nn.Module, optional
        Trained general-domain Glow (ActNorm initialised), needed for ``outlier_loss_kind="ratio"``;
        it is put in eval mode and not updated.
    margin : float
        Margin of ``outlier_loss_kind="margin"``, in nats per dimension.
    init_batch_size : int
        Images in the ActNorm initialisation batch.
    on_step : callable, optional
        Called with (step, loss) after every step; the loss is the total in bits per dimension.
    on_checkpoint : callable, optional
        Called with the state every ``checkpoint_every`` steps and at the end.

    Returns
    -------
    GlowTrainState
        Step reached, optimiser state and number of skipped steps. Batches and noise come from a
        generator seeded with ``seed + state.step``.
    """
    if outlier_loss_kind not in ("ratio", "margin"):
        raise ValueError(f"outlier_loss_kind must be 'ratio' or 'margin', got {outlier_loss_kind!r}")
    if outliers01 is not None and outlier_loss_kind == "ratio" and general_model is None:
        raise ValueError("the ratio outlier loss (Eq. S1) needs general_model, the frozen general-domain Glow")
    if not isinstance(state, GlowTrainState):
        state = GlowTrainState() if state is None else GlowTrainState(step=state.step, optimizer=state.optimizer)
    augment = tuple(augment)
    device = next(model.parameters()).device
    images = to_glow_input(torch.as_tensor(images01, dtype=torch.float32), n_bins)
    n_dims = int(images[0].numel())
    outliers = None
    if outliers01 is not None:
        outliers = to_glow_input(torch.as_tensor(outliers01, dtype=torch.float32), n_bins)
        if general_model is not None and outlier_loss_kind == "ratio":
            general_model.eval()
            general_device = next(general_model.parameters()).device

    model.train()
    if any(isinstance(m, ActNorm) and not bool(m.initialized) for m in model.modules()):
        init_generator = torch.Generator().manual_seed(seed)
        index = torch.randperm(len(images), generator=init_generator)[:min(len(images), init_batch_size)]
        with torch.no_grad():
            model(dequantize(images[index], n_bins, init_generator).to(device))

    optimizer = torch.optim.Adamax(model.parameters(), lr=lr, weight_decay=weight_decay)
    if state.optimizer is not None:
        optimizer.load_state_dict(state.optimizer)
    generator = torch.Generator().manual_seed(seed + state.step)

    def draw(pool: torch.Tensor) -> torch.Tensor:
        index = torch.randint(len(pool), (min(batch_size, len(pool)),), generator=generator)
        return dequantize(_augment(pool[index], generator, augment, max_shift), n_bins, generator).to(device)

    for step in range(state.step, steps):
        factor = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
        for group in optimizer.param_groups:
            group["lr"] = lr * factor
        log_px = model(draw(images)).log_px
        loss = glow_nll_bits(log_px, n_dims, n_bins)
        skip = False
        if outliers is not None:
            x_g = draw(outliers)
            if outlier_loss_kind == "ratio":
                with torch.no_grad():
                    log_p_general = general_model(x_g.to(general_device)).log_px.to(device)
                log_p_in, log_p_general = _finite_log_px(model, x_g, log_p_general)
                extra, n_used = outlier_loss(log_p_in, log_p_general, outlier_temperature, outlier_weight)
            else:
                log_p_out, _ = _finite_log_px(model, x_g)
                finite = torch.isfinite(log_p_out.detach())
                n_used = int(finite.sum()) if 4 * int(finite.sum()) >= len(x_g) else 0
                extra = (margin_outlier_loss(log_px / n_dims, log_p_out[finite] / n_dims, margin) * n_dims
                         if n_used else log_p_out.new_zeros(()))
            skip = n_used == 0
            loss = loss + extra / (n_dims * math.log(2.0))
        optimizer.zero_grad(set_to_none=True)
        if not skip:
            loss.backward()
            skip = not all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        if skip:
            state.skipped += 1
            optimizer.zero_grad(set_to_none=True)
        else:
            optimizer.step()
        report_step(state, steps, loss.item(), lambda: setattr(state, "optimizer", optimizer.state_dict()),
                    on_step, on_checkpoint, checkpoint_every)
    state.optimizer = optimizer.state_dict()
    model.eval()
    return state


@torch.no_grad()
def glow_bits_per_dim(model: nn.Module, images01: torch.Tensor, batch_size: int = 64, n_bins: int = 256,
                      generator: torch.Generator | None = None) -> float:
    """Mean bits per dimension of ``images01 (N, C, H, W)`` in [0, 1] with one sample of uniform
    dequantisation noise per image (as reported in S7.1); eval mode, no gradients. Non-finite
    log-likelihoods are not replaced, so the result can be ``inf``."""
    model.eval()
    device = next(model.parameters()).device
    images01 = torch.as_tensor(images01, dtype=torch.float32)
    n_dims = int(images01[0].numel())
    total = 0.0
    for start in range(0, len(images01), batch_size):
        x = dequantize(to_glow_input(images01[start:start + batch_size], n_bins), n_bins, generator)
        total += bits_per_dim(model(x.to(device)).log_px, n_dims, n_bins).double().sum().item()
    return total / len(images01)
