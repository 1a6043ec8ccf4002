"""How a network runs: optional bfloat16 autocast, channels-last memory layout and ``torch.compile``
around the unchanged network — when it scores (``score.precision``, ``score.channels_last``,
``score.compile``) and, for the forward pass of MSMA's training, ``training.precision``.

The default (``fp32``, contiguous NCHW) hands the network back as it is, so default scores are
bit-for-bit those of the plain network. The options affect the network's forward pass only: the
score norms' reduction and the auxiliary scorers stay in float32/float64.
"""

from __future__ import annotations

import torch
from torch import nn

PRECISIONS = ("fp32", "bf16")


class InferenceNetwork(nn.Module):
    """``network`` with its forward run under ``torch.autocast(bfloat16)`` (``precision="bf16"``),
    on channels-last inputs and/or compiled by ``torch.compile`` (inductor: fuses normalisation and
    activations, picks memory layouts, folds the weights in as constants, so it serves a network
    whose weights no longer change; the first call of each input shape compiles, tens of seconds
    on a CPU, and needs a C++ compiler there); outputs come back float32 and contiguous,
    same shapes as the network's (e.g. ``(B, C, H, W)`` scores for ``x (B, C, H, W)``, ``sigma (B,)``)."""

    def __init__(self, network: nn.Module, precision: str = "fp32", channels_last: bool = False,
                 compile: bool = False):
        super().__init__()
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        self.network = network
        self.precision = precision
        self.channels_last = channels_last
        # kept out of the module tree: the compiled wrapper shares the network's parameters.
        # Inductor's freezing folds the weights in as constants (convolution weights pre-packed
        # for oneDNN: 1.2x on CPU): a compiled network must not be trained further.
        self._run = [torch.compile(network, options={"freezing": True}) if compile else network]

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.channels_last and x.dim() in (4, 5):
            x = x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
        if self.precision == "bf16":
            with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16):
                out = self._run[0](x, *args, **kwargs)
        else:
            out = self._run[0](x, *args, **kwargs)
        return out.float().contiguous()


def inference_network(network: nn.Module, precision: str = "fp32", channels_last: bool = False,
                      compile: bool = False) -> nn.Module:
    """``network`` itself for fp32, without channels-last or compilation; otherwise an
    :class:`InferenceNetwork` around it."""
    if precision == "fp32" and not channels_last and not compile:
        return network
    return InferenceNetwork(network, precision, channels_last, compile).eval()
