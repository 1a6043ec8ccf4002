"""The one training loop every method uses, in the spirit of ``score_sde_pytorch``'s ``get_step_fn``.

A method supplies a *step function* (one optimisation step on one batch, see
:mod:`neuro_ood.trainer.steps`) and a *sampler* (draws that batch); :func:`train_loop` owns
everything around them: where to resume, seeding, learning-rate warm-up, the EMA of the weights,
progress reports and checkpoints. In distributed training (:mod:`neuro_ood.trainer.distributed`)
the sampler and the generator stay as they are on every process (each draws the global batch),
the step functions compute their process's share of it, and ``optimize`` averages the gradients.

Seeding: a run that starts or resumes at step ``s`` draws its batches and noise from one CPU
``torch.Generator`` seeded with ``seed + s``, so a resumed run is reproducible too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from neuro_ood.trainer.distributed import average_gradients


@dataclass
class TrainState:
    """What a resumed run needs besides the weights.

    Attributes
    ----------
    step : optimisation steps done, over all stages of a method.
    optimizers : ``{name: optimizer.state_dict()}``.
    ema : ``AveragedModel.state_dict()`` of the EMA weights, or None.
    counters : named integers a step function counts (e.g. ``skipped`` Glow batches).
    """

    step: int = 0
    optimizers: dict[str, dict] = field(default_factory=dict)
    ema: dict | None = None
    counters: dict[str, int] = field(default_factory=dict)


@dataclass
class StepResult:
    """One step's training loss (a float in the method's unit) and whether its update was skipped."""

    loss: float
    skipped: bool = False


# (batch, generator) -> StepResult; the batch is what the sampler drew.
StepFn = Callable[[dict[str, torch.Tensor], torch.Generator], StepResult]
# generator -> batch of tensors
Sampler = Callable[[torch.Generator], dict[str, torch.Tensor]]
# (step reached, loss) after every step
OnStep = Callable[[int, float], None]
# the state after a checkpoint-worthy step
OnCheckpoint = Callable[[TrainState], None]


def optimization_manager(grad_clip: float | None = None) -> Callable[[torch.optim.Optimizer, torch.Tensor], bool]:
    """``optimize(optimizer, loss) -> bool``: zero the grads, backpropagate ``loss``, clip the
    gradient norm of the optimizer's parameters to ``grad_clip`` (if set), and step — unless a
    gradient is non-finite, in which case the step is skipped and ``False`` returned. In
    distributed training the gradients are averaged over the processes after ``backward()``
    (:func:`~neuro_ood.trainer.distributed.average_gradients`), so every process clips, checks and
    steps on the same numbers."""

    def optimize(optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> bool:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        average_gradients(params)
        grads = [p.grad for p in params if p.grad is not None]
        if grad_clip is not None and grad_clip > 0:
            norm = nn.utils.clip_grad_norm_(params, grad_clip)
            finite = bool(torch.isfinite(norm))
        else:
            finite = all(bool(torch.isfinite(g).all()) for g in grads)
        if not finite:
            optimizer.zero_grad(set_to_none=True)
            return False
        optimizer.step()
        return True

    return optimize


def ema_model(model: nn.Module, decay: float | None) -> AveragedModel | None:
    """An EMA copy of ``model`` (parameters and buffers, ``W ← d·W + (1 − d)·W_model``), or None
    without ``decay``. Build it after any data-dependent initialisation of ``model``."""
    if decay is None:
        return None
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def sample_rows(pools: Mapping[str, torch.Tensor], batch_size: int, draws: int = 1,
                labels: torch.Tensor | None = None) -> Sampler:
    """A sampler of ``min(batch_size, N)`` paired rows, with replacement, from pools ``(N, ...)`` that
    share their row order (e.g. images ``x`` and labels ``y``).

    With ``labels (N,)`` the rows are class-balanced: each class gets ``B // K`` slots (the first
    ``B % K`` classes one more), so a small outlier group is drawn as often as the inliers. With
    ``draws > 1`` every tensor gets a leading axis of ``draws`` independent batches (f-AnoGAN's
    critic steps). Pools drawn independently (e.g. an outlier set) get a sampler of their own,
    combined with :func:`merge_samplers`.
    """
    pools = dict(pools)
    lengths = {len(t) for t in pools.values()}
    if len(lengths) != 1:
        raise ValueError(f"sample_rows pairs rows across pools, which must have one length; got {sorted(lengths)}")
    n = lengths.pop()
    size = min(batch_size, n)

    def indices(generator: torch.Generator) -> torch.Tensor:
        if labels is None:
            return torch.randint(n, (size,), generator=generator)
        classes = torch.unique(labels)
        parts = []
        for i, cls in enumerate(classes.tolist()):
            members = torch.nonzero(labels == cls).flatten()
            count = size // len(classes) + (1 if i < size % len(classes) else 0)
            parts.append(members[torch.randint(len(members), (count,), generator=generator)])
        index = torch.cat(parts)
        return index[torch.randperm(len(index), generator=generator)]

    def draw_once(generator: torch.Generator) -> dict[str, torch.Tensor]:
        index = indices(generator)
        return {name: pool[index] for name, pool in pools.items()}

    def sample(generator: torch.Generator) -> dict[str, torch.Tensor]:
        if draws == 1:
            return draw_once(generator)
        batches = [draw_once(generator) for _ in range(draws)]
        return {name: torch.stack([b[name] for b in batches]) for name in batches[0]}

    return sample


def merge_samplers(*samplers: Sampler) -> Sampler:
    """One sampler drawing from each of ``samplers`` in turn (independent rows) and merging the batches."""

    def sample(generator: torch.Generator) -> dict[str, torch.Tensor]:
        batch: dict[str, torch.Tensor] = {}
        for sampler in samplers:
            batch.update(sampler(generator))
        return batch

    return sample


def train_loop(step_fn: StepFn, sample: Sampler, optimizers: Mapping[str, torch.optim.Optimizer], until: int, *,
               seed: int = 0, state: TrainState | None = None, ema: AveragedModel | None = None,
               ema_of: nn.Module | None = None, warmup_steps: int = 0, checkpoint_every: int = 1000,
               on_step: OnStep | None = None, on_checkpoint: OnCheckpoint | None = None) -> TrainState:
    """Run ``step_fn`` on sampled batches from ``state.step`` up to step ``until``.

    Parameters
    ----------
    step_fn, sample : one step on one batch, and the batch sampler (see the module docstring).
    optimizers : the step function's optimisers by name, built with the configured learning rates;
        their states are restored from ``state.optimizers`` (names missing there start fresh; the
        configured rates stay) and stored at checkpoints.
    until : the step count to reach (several calls on one state run a method's stages in turn).
    ema, ema_of : an EMA of the network ``ema_of`` (:func:`ema_model`), updated after every
        step that was not skipped and restored from / stored in ``state.ema``.
    warmup_steps : the learning rate of every parameter group rises linearly,
        ``lr · min(1, (step + 1) / warmup_steps)``; 0 disables it.
    checkpoint_every : ``on_checkpoint(state)`` is called every this many steps and at ``until``.
    on_step : ``(step reached, loss)`` after every step.

    Returns
    -------
    TrainState : the state at ``until``, optimiser and EMA states included.
    """
    state = state or TrainState()
    for name, optimizer in optimizers.items():
        configured = [group["lr"] for group in optimizer.param_groups]
        if state.optimizers.get(name) is not None:
            optimizer.load_state_dict(state.optimizers[name])
        for group, lr in zip(optimizer.param_groups, configured):  # the config's rate, also on resume
            group["initial_lr"] = group["lr"] = lr
    if ema is not None and state.ema is not None:
        ema.load_state_dict(state.ema)

    def snapshot() -> None:
        state.optimizers.update({name: opt.state_dict() for name, opt in optimizers.items()})
        if ema is not None:
            state.ema = ema.state_dict()

    generator = torch.Generator().manual_seed(seed + state.step)
    start = state.step
    for step in range(start, until):
        if warmup_steps > 0:
            factor = min(1.0, (step + 1) / warmup_steps)
            for optimizer in optimizers.values():
                for group in optimizer.param_groups:
                    group["lr"] = group["initial_lr"] * factor
        result = step_fn(sample(generator), generator)
        if result.skipped:
            state.counters["skipped"] = state.counters.get("skipped", 0) + 1
        elif ema is not None:
            ema.update_parameters(ema_of)
        state.step += 1
        if on_step is not None:
            on_step(state.step, result.loss)
        if on_checkpoint is not None and (state.step % checkpoint_every == 0 or state.step == until):
            snapshot()
            on_checkpoint(state)
    snapshot()
    return state
