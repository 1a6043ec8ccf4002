"""Data-parallel training over processes started by ``torchrun`` (``torch.distributed``).

``torchrun --nproc-per-node N -m neuro_ood.cli train ...`` starts N copies of the command with
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` set; :func:`launch`
joins them into one process group (``nccl`` when the config's device is a GPU, ``gloo`` on the
CPU). Without those variables nothing here does anything: :func:`current` is rank 0 of 1 and every
helper is the identity, so a plain run behaves exactly as before.

How a step is split (the *global* batch is the config's ``training.batch_size``):

- every rank holds the same seeded CPU generator (:func:`~neuro_ood.trainer.loop.train_loop`),
  draws the same global batch and the same random numbers for it (noise levels, noise,
  augmentations, latents) — exactly what a single process draws — and keeps the contiguous block
  of rows :meth:`Shard.rows` gives it for the network's forward and backward pass. The union of
  the ranks' rows is the single-process batch, row for row, and the generator's state after a step
  does not depend on the number of processes, so a checkpoint resumes with any number of them;
- gradients are averaged over the ranks (:func:`average_gradients`, one all-reduce per step and
  dtype) before clipping and the optimiser step; per-rank losses are means over equal shares, so
  the average gradient is the gradient of the global mean loss. The learning rate is the
  config's — nothing is scaled by the number of processes;
- rank 0 alone writes checkpoints and the run directory; the other ranks leave after the last
  training step (:class:`WorkerDone`, after a barrier) and rank 0 goes on alone to the features,
  the auxiliary scorers and the reference.

The networks are not wrapped in ``DistributedDataParallel``: f-AnoGAN trains three sub-networks
with separate optimisers and a double-backward gradient penalty, and Glow recomputes a forward
pass on its finite examples, neither of which DDP's reducer supports; one explicit all-reduce of
the gradients after ``backward()`` serves every method alike (without DDP's overlap of
communication and backward). BatchNorm (the ResNet baseline) normalises with each rank's share of
the batch, and the running statistics that are saved are rank 0's — what DDP does without
``SyncBatchNorm``.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from neuro_ood.errors import ConfigError

#: torchrun's variables; a process group is set up only when all are present.
ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
#: Seconds a rank waits at a collective (rank 0 preprocesses the cohort while the others wait).
TIMEOUT_ENV = "NEURO_OOD_DIST_TIMEOUT"


class WorkerDone(Exception):
    """Raised on ranks other than 0 once training is over; :func:`launch` ends the process quietly."""


@dataclass(frozen=True)
class Shard:
    """This process's share of every global batch: rank ``rank`` of ``world`` processes."""

    rank: int = 0
    world: int = 1

    @property
    def active(self) -> bool:
        return self.world > 1

    def rows(self, n: int) -> slice:
        """The contiguous rows of a global batch of ``n`` this rank computes; ``n`` must split evenly."""
        if self.world == 1:
            return slice(None)
        if n % self.world:
            raise ConfigError(f"a batch of {n} rows does not split over {self.world} processes; "
                              f"set training.batch_size to a multiple of {self.world} (no larger than the "
                              "number of training rows)")
        size = n // self.world
        return slice(self.rank * size, (self.rank + 1) * size)

    def take(self, tensor: torch.Tensor, axis: int = 0) -> torch.Tensor:
        """This rank's rows of ``tensor`` along ``axis`` (the whole tensor in a single process)."""
        if self.world == 1:
            return tensor
        index = [slice(None)] * tensor.dim()
        index[axis] = self.rows(tensor.shape[axis])
        return tensor[tuple(index)]


def env_requested() -> bool:
    """Whether torchrun (or a launcher setting the same variables) started this process."""
    return all(os.environ.get(name) for name in ENV_VARS)


def current() -> Shard:
    """This process's shard: from the initialised process group, else rank 0 of 1."""
    if dist.is_available() and dist.is_initialized():
        return Shard(dist.get_rank(), dist.get_world_size())
    return Shard()


def is_main() -> bool:
    """Rank 0 (or a single process): the one that writes files and shows progress."""
    return current().rank == 0


def barrier() -> None:
    if current().active:
        dist.barrier()


def backend_for(device: torch.device | str) -> str:
    """``nccl`` for CUDA devices, ``gloo`` otherwise."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def rank_device(device: torch.device | str) -> torch.device:
    """The device of this rank: with several processes, a CUDA device becomes ``cuda:LOCAL_RANK``."""
    device = torch.device(device)
    if current().active and device.type == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return device


@contextmanager
def launch(device: torch.device | str = "cpu") -> Iterator[Shard]:
    """Join torchrun's process group for the block (and leave it after), if the environment asks
    for one; ``device`` (the resolved ``training.device``) picks the backend. A :class:`WorkerDone`
    raised in the block ends it quietly. Nested or already-initialised groups are left alone."""
    owned = False
    if env_requested() and dist.is_available() and not dist.is_initialized():
        device = torch.device(device)
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group(backend_for(device),
                                timeout=timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, 4 * 3600))))
        owned = True
    try:
        yield current()
    except WorkerDone:
        pass
    finally:
        if owned:
            dist.destroy_process_group()


@contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first (e.g. filling the preprocessing cache), the others after it."""
    shard = current()
    if shard.active and shard.rank != 0:
        dist.barrier()
    yield
    if shard.active and shard.rank == 0:
        dist.barrier()


def _collective_device(tensors: Iterable[torch.Tensor] = ()) -> torch.device:
    for tensor in tensors:
        return tensor.device
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def check_batch(batch_size: int) -> None:
    """Refuse a global batch that does not split over the processes, before any work."""
    current().rows(batch_size)


def broadcast_module(module: nn.Module | None) -> None:
    """Parameters and buffers of ``module`` set to rank 0's (a no-op in a single process)."""
    if module is None or not current().active:
        return
    for tensor in [*module.parameters(), *module.buffers()]:
        dist.broadcast(tensor.data, src=0)


def average_gradients(params: list[nn.Parameter]) -> None:
    """Replace each gradient by its mean over the ranks (in place; a no-op in a single process).

    A parameter that has a gradient on some rank only counts zero on the others; one without a
    gradient on every rank keeps none (an optimiser then leaves it alone, as in a single process).
    """
    shard = current()
    if not shard.active or not params:
        return
    device = _collective_device(p for p in params)
    present = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=device)
    dist.all_reduce(present)
    used = [p for p, n in zip(params, present.tolist()) if n]
    by_dtype: dict[tuple[torch.dtype, torch.device], list[nn.Parameter]] = {}
    for p in used:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        by_dtype.setdefault((p.grad.dtype, p.grad.device), []).append(p)
    for group in by_dtype.values():
        flat = torch.cat([p.grad.reshape(-1) for p in group])
        dist.all_reduce(flat)
        flat /= shard.world
        offset = 0
        for p in group:
            n = p.grad.numel()
            p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
            offset += n


def mean_over_ranks(value: float, device: torch.device | None = None) -> float:
    """``value`` averaged over the ranks (the reported loss of a step)."""
    if not current().active:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device or _collective_device())
    dist.all_reduce(tensor)
    return float(tensor.item()) / current().world


def any_rank(flag: bool, device: torch.device | None = None) -> bool:
    """Whether ``flag`` holds on any rank (a step skipped on one rank is skipped on all)."""
    if not current().active:
        return flag
    tensor = torch.tensor([int(flag)], dtype=torch.int32, device=device or _collective_device())
    dist.all_reduce(tensor)
    return bool(tensor.item())


def leave_unless_main() -> None:
    """End training on the ranks other than 0: all wait at a barrier, then those raise :class:`WorkerDone`."""
    shard = current()
    if not shard.active:
        return
    dist.barrier()
    if shard.rank != 0:
        raise WorkerDone
