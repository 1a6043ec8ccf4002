"""Training loop of a noise-conditional score network on a tensor of images."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from neuro_ood.losses import dsm_loss


@dataclass
class TrainState:
    """What a resumed run needs besides the weights: the step reached and the optimiser state."""

    step: int = 0
    optimizer: dict | None = None


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
        state.step = step + 1
        if on_step is not None:
            on_step(state.step, loss.item())
        if on_checkpoint is not None and (state.step % checkpoint_every == 0 or state.step == steps):
            state.optimizer = optimizer.state_dict()
            on_checkpoint(state)
    state.optimizer = optimizer.state_dict()
    model.eval()
    return state
