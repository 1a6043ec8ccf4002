"""Run directories: what a trained run holds, in safe formats, and how its detector is reopened.

    RUN/config.yaml          resolved experiment config
    RUN/preprocessing.json   preprocessing config and its fingerprint
    RUN/split.json           train / held-out inlier subjects
    RUN/model.safetensors    network weights  } written by the detector
    RUN/model.json           their metadata   } (see neuro_ood.detectors.base)
    RUN/train_state.pt       training state   }
    RUN/scorers.*            fitted auxiliary scorers (MSMA; safetensors + JSON)
    RUN/reference.json       held-out inlier scan scores and flag thresholds
    RUN/metrics.json         evaluation results

A detector made with other preprocessing than the config in use is refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from neuro_ood.config import ExperimentConfig, config_from_dict, read_config_dict
from neuro_ood.detectors import Detector, load_detector
from neuro_ood.detectors.base import read_meta
from neuro_ood.devices import resolve_device
from neuro_ood.errors import RunError
from neuro_ood.io import read_json, write_json, write_yaml
from neuro_ood.preprocessing.presets import preprocessing_fingerprint


class RunDir:
    """A run directory on disk; methods read and write its parts atomically."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def file(self, name: str) -> Path:
        return self.path / name

    def _require(self, name: str, what: str) -> Path:
        path = self.file(name)
        if not path.is_file():
            raise RunError(f"{self.path}: no {name} ({what}); is this a trained run directory?")
        return path

    def _read_json(self, name: str, what: str) -> Any:
        path = self._require(name, what)
        try:
            return read_json(path)
        except ValueError as err:
            raise RunError(f"{path}: not valid JSON ({err}); the run directory is damaged") from None

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

    # -- detector ----------------------------------------------------------------------------
    def trained_steps(self) -> int:
        """Steps the run's checkpoint reached (0 without one)."""
        return int(read_meta(self.path).get("step", 0)) if self.file("model.json").is_file() else 0

    def load_detector(self, cfg: ExperimentConfig) -> Detector:
        """The run's fitted detector, on ``cfg``'s device; refused if it was made with other
        preprocessing than ``cfg``'s."""
        meta = read_meta(self.path)
        found = meta.get("extra", {}).get("preprocessing_fingerprint", meta.get("preprocessing_fingerprint"))
        expected = preprocessing_fingerprint(cfg.preprocessing)
        if found != expected:
            raise RunError(f"{self.path}: the checkpoint was made with other preprocessing (fingerprint {found}, "
                           f"this config gives {expected}); score with the run's own preprocessing settings or "
                           "train a new run")
        return load_detector(self.path, resolve_device(cfg.training.device))
