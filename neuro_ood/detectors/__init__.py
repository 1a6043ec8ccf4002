"""Detectors: every method behind one contract (see :mod:`neuro_ood.detectors.base`).

``build_detector(cfg)`` makes an untrained detector of ``cfg.method``; ``load_detector(directory)``
restores a fitted one of whatever method the directory holds.
"""

from __future__ import annotations

from pathlib import Path

import torch

from neuro_ood.config import ExperimentConfig
from neuro_ood.detectors.base import Detector, Progress, read_meta
from neuro_ood.detectors.fanogan import FAnoGANDetector
from neuro_ood.detectors.glow import GlowDetector
from neuro_ood.detectors.msma import MSMADetector
from neuro_ood.detectors.resnet import ResNetDetector
from neuro_ood.detectors.simple import SimpleDetector
from neuro_ood.errors import ConfigError, RunError

DETECTORS: dict[str, type[Detector]] = {d.method: d for d in (MSMADetector, GlowDetector, FAnoGANDetector,
                                                               ResNetDetector, SimpleDetector)}

__all__ = ["DETECTORS", "Detector", "FAnoGANDetector", "GlowDetector", "MSMADetector", "Progress",
           "ResNetDetector", "SimpleDetector", "build_detector", "detector_class", "load_detector"]


def detector_class(method: str) -> type[Detector]:
    if method not in DETECTORS:
        raise ConfigError(f"unknown method {method!r}; choose one of {', '.join(DETECTORS)}")
    return DETECTORS[method]


def build_detector(cfg: ExperimentConfig, device: torch.device | str | None = None) -> Detector:
    """An untrained detector of ``cfg.method``, built from its config."""
    return detector_class(cfg.method)(cfg, device)


def load_detector(directory: str | Path, device: torch.device | str | None = None) -> Detector:
    """The fitted detector saved in ``directory``, of whatever method it holds."""
    method = read_meta(directory)["method"]
    if method not in DETECTORS:
        raise RunError(f"{directory}: unknown method {method!r} in its network metadata")
    return DETECTORS[method].load(directory, device)
