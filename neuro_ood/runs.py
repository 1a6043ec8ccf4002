"""Run directories: everything needed to score with a trained detector, in safe formats.

    RUN/config.yaml          resolved experiment config
    RUN/preprocessing.json   preprocessing config and its fingerprint
    RUN/split.json           train / held-out inlier subjects
    RUN/model.safetensors    network weights (score network or Glow); RUN/model.json their metadata
    RUN/train_state.pt       optimiser state and step (torch.load(weights_only=True))
    RUN/scorers.*            fitted auxiliary scorers (safetensors + JSON)
    RUN/reference.json       held-out inlier scan scores and flag thresholds
    RUN/metrics.json         evaluation results

Weights made with other preprocessing than the config in use are refused.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from neuro_ood.backbones.glow_variants import build_glow_variant
from neuro_ood.baselines.classifier import build_resnet
from neuro_ood.baselines.fanogan import FAnoGAN
from neuro_ood.backbones.ncsn import NoiseConditionalScoreNet, geometric_sigmas
from neuro_ood.config import ExperimentConfig, ModelConfig, config_from_dict, read_config_dict
from neuro_ood.errors import ConfigError, RunError
from neuro_ood.io import atomic_write, read_json, write_json, write_yaml
from neuro_ood.preprocessing.presets import preprocessing_fingerprint
from neuro_ood.training import TrainState


# Config sections that define a network's architecture, stored beside its weights.
NETWORK_SECTIONS = ("model", "resnet", "fanogan")


def build_score_network(cfg: ModelConfig, in_channels: int, spatial_dims: int = 2) -> NoiseConditionalScoreNet:
    return NoiseConditionalScoreNet(spatial_dims=spatial_dims, in_channels=in_channels, backbone=cfg.backbone,
                                    channels=cfg.channels, strides=cfg.strides, num_res_units=cfg.num_res_units,
                                    sigma_min=cfg.sigma_min, sigma_max=cfg.sigma_max)


def build_glow(cfg: ModelConfig, in_channels: int, image_size: Sequence[int] | None = None) -> torch.nn.Module:
    """The Glow of ``cfg.variant`` (multiscale, local, fc); ``image_size`` (H, W) is needed by ``fc``."""
    try:
        return build_glow_variant(cfg.variant, in_channels, tuple(image_size) if image_size else None,
                                  n_scales=cfg.n_scales, steps_per_scale=cfg.steps_per_scale, hidden=cfg.hidden,
                                  lu=cfg.lu, learned_prior=cfg.learned_prior, patch=cfg.patch)
    except ValueError as err:
        raise ConfigError(f"model: {err}") from None


def build_network(cfg: ExperimentConfig, in_channels: int, spatial_dims: int = 2,
                  image_size: Sequence[int] | None = None) -> torch.nn.Module:
    """The network of ``cfg.method``: score network (msma), a Glow variant (glow), f-AnoGAN's
    generator + critic + encoder (fanogan) or a ResNet classifier (resnet)."""
    if cfg.method == "msma":
        return build_score_network(cfg.model, in_channels, spatial_dims)
    if cfg.method == "glow":
        return build_glow(cfg.model, in_channels, image_size)
    if cfg.method == "fanogan":
        f = cfg.fanogan
        return FAnoGAN(in_channels, tuple(image_size), f.latent_dim, f.width, f.kappa)
    if cfg.method == "resnet":
        r = cfg.resnet
        try:
            return build_resnet(r.depth, in_channels, 2, spatial_dims, r.widen, r.head_hidden)
        except ValueError as err:
            raise ConfigError(f"resnet: {err}") from None
    raise ConfigError(f"unknown method {cfg.method!r}; use msma, glow, fanogan or resnet")


def sigmas_of(cfg: ModelConfig) -> torch.Tensor:
    return geometric_sigmas(cfg.sigma_max, cfg.sigma_min, cfg.num_sigmas)


class RunDir:
    """A run directory on disk; methods read and write its parts atomically."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def file(self, name: str) -> Path:
        return self.path / name

    def _read_json(self, name: str, what: str) -> Any:
        path = self._require(name, what)
        try:
            return read_json(path)
        except ValueError as err:
            raise RunError(f"{path}: not valid JSON ({err}); the run directory is damaged") from None

    def _require(self, name: str, what: str) -> Path:
        path = self.file(name)
        if not path.is_file():
            raise RunError(f"{self.path}: no {name} ({what}); is this a trained run directory?")
        return path

    # -- config ------------------------------------------------------------------------------
    def save_config(self, cfg: ExperimentConfig) -> None:
        write_yaml(self.file("config.yaml"), cfg.to_dict())
        write_json(self.file("preprocessing.json"), {
            "fingerprint": preprocessing_fingerprint(cfg.preprocessing),
            "preprocessing": cfg.to_dict()["preprocessing"]})

    def load_config(self) -> ExperimentConfig:
        return config_from_dict(read_config_dict(self._require("config.yaml", "the run's config")))

    # -- split / reference / metrics -----------------------------------------------------------
    def save_split(self, train: list[str], heldout: list[str]) -> None:
        write_json(self.file("split.json"), {"train": train, "heldout": heldout})

    def load_split(self) -> dict[str, list[str]]:
        return self._read_json("split.json", "the subject split")

    def save_reference(self, reference: dict[str, Any]) -> None:
        write_json(self.file("reference.json"), reference)

    def load_reference(self) -> dict[str, Any]:
        reference = self._read_json("reference.json", "the held-out inlier reference")
        missing = {"tpr", "items", "subjects", "scorers"} - set(reference if isinstance(reference, dict) else {})
        if missing:
            raise RunError(f"{self.file('reference.json')}: incomplete reference (no {', '.join(sorted(missing))}); "
                           "it was written by another neuro-ood version or damaged — train the run again")
        return reference

    def save_metrics(self, metrics: dict[str, Any]) -> None:
        write_json(self.file("metrics.json"), metrics)

    # -- model ------------------------------------------------------------------------------
    def save_model(self, model: torch.nn.Module, cfg: ExperimentConfig, in_channels: int, step: int,
                   name: str = "model", spatial_dims: int = 2, image_size: Sequence[int] | None = None) -> None:
        """``RUN/<name>.safetensors`` and ``RUN/<name>.json`` (method, architecture, step, fingerprint)."""
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        with atomic_write(self.file(f"{name}.safetensors")) as tmp:
            save_file(state, str(tmp))
        sections = cfg.to_dict()
        write_json(self.file(f"{name}.json"), {
            "method": cfg.method, "preprocessing_fingerprint": preprocessing_fingerprint(cfg.preprocessing),
            **{key: sections[key] for key in NETWORK_SECTIONS}, "in_channels": in_channels,
            "spatial_dims": spatial_dims, "image_size": list(image_size) if image_size else None, "step": step})

    def load_model(self, cfg: ExperimentConfig, device: torch.device | str = "cpu",
                   name: str = "model") -> torch.nn.Module:
        """The trained network; refused if it was made with other preprocessing than ``cfg``'s."""
        meta = self._read_json(f"{name}.json", "the network's metadata")
        missing = {"method", "preprocessing_fingerprint", "in_channels", "spatial_dims"} - set(meta)
        if missing:
            raise RunError(f"{self.file(name + '.json')}: incomplete network metadata (no {', '.join(sorted(missing))}); "
                           "it was written by another neuro-ood version or damaged — train the run again")
        expected = preprocessing_fingerprint(cfg.preprocessing)
        if meta["preprocessing_fingerprint"] != expected:
            raise RunError(
                f"{self.path}: the checkpoint was made with other preprocessing (fingerprint "
                f"{meta['preprocessing_fingerprint']}, this config gives {expected}); "
                "score with the run's own preprocessing settings or train a new run")
        network_cfg = config_from_dict({"method": meta["method"],
                                        **{key: meta[key] for key in NETWORK_SECTIONS if key in meta}})
        model = build_network(network_cfg, meta["in_channels"], meta["spatial_dims"], meta.get("image_size"))
        weights_path = self._require(f"{name}.safetensors", "the network's weights")
        try:
            model.load_state_dict(load_file(str(weights_path)))
        except (RuntimeError, OSError, SafetensorError) as err:
            raise RunError(f"{weights_path}: unreadable or mismatched weights ({str(err).splitlines()[0]})") from None
        return model.to(device).eval()

    def save_train_state(self, state: TrainState) -> None:
        with atomic_write(self.file("train_state.pt")) as tmp:
            torch.save({"step": state.step, "optimizer": state.optimizer}, tmp)

    def load_train_state(self) -> TrainState | None:
        path = self.file("train_state.pt")
        if not path.is_file():
            return None
        try:
            saved = torch.load(path, weights_only=True, map_location="cpu")
            return TrainState(step=int(saved["step"]), optimizer=saved["optimizer"])
        except (RuntimeError, EOFError, KeyError, TypeError, pickle.UnpicklingError) as err:
            raise RunError(f"{path}: unreadable training state ({str(err).splitlines()[0]}); "
                           "delete it to restart training from scratch") from None
