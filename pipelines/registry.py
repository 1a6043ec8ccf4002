"""Method name -> method class, for the pipelines that train, load and score runs."""

from __future__ import annotations

from neuro_ood.config import ExperimentConfig
from neuro_ood.errors import ConfigError
from neuro_ood.pipelines.baselines import FAnoGANMethod, ResNetMethod
from neuro_ood.pipelines.methods import GlowMethod, MSMAMethod

METHODS = {"msma": MSMAMethod, "glow": GlowMethod, "fanogan": FAnoGANMethod, "resnet": ResNetMethod}


def method_class(cfg: ExperimentConfig):
    if cfg.method not in METHODS:
        raise ConfigError(f"unknown method {cfg.method!r}; choose one of {', '.join(METHODS)}")
    return METHODS[cfg.method]
