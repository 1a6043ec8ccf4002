"""Preprocessing presets: a scan file in, a stack of 2-D slices or one whole volume out.

``t1`` (ABCD / EBDS): reorient to RAS -> resample to ``spacing_mm`` -> optional N4 -> crop to
the head -> percentile intensity scaling to [0, 1] -> axial slices at ``slice_offsets`` ->
``slice_size`` by padding/cropping (``pad``) or interpolation (``resize``).

``t1_volume`` (3-D MSMA): the same chain up to the scaling, then the head centred in a
``volume_size`` box by padding/cropping. The box's affine (box voxel -> the scan's world mm) is
kept, so that a map on the box goes back onto the scan's own grid
(:mod:`neuro_ood.preprocessing.inverse`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import (Compose, CropForeground, Orientation, Resize, ResizeWithPadOrCrop,
                              ScaleIntensityRangePercentiles, Spacing)

from neuro_ood.config import PreprocessingConfig
from neuro_ood.data.nifti import load_volume
from neuro_ood.errors import ConfigError, ScanError
from neuro_ood.preprocessing.acquisition import acquisition_features
from neuro_ood.preprocessing.registration import TemplateRegistration, WhiteMatterScaling
from neuro_ood.preprocessing.transforms import AxialSlices, N4BiasFieldCorrection, RelativeThreshold

# Bump a preset's version when its code changes its output, so that old checkpoints and caches are
# refused. Per preset, so that a change to one does not invalidate the other's runs.
# brats 2: per-slice tumour voxel counts instead of tumour flags (slices with 1..min_tumour_voxels-1
# tumour voxels used to be tumour-free inliers).
PREPROCESSING_VERSION = 1
PRESET_VERSIONS = {"t1": 1, "t1_volume": 1, "brats": 2}


# Options added after runs were made: left out of the fingerprint at these values, so that runs made
# before they existed keep their fingerprint (and still load and score as before).
LATER_OPTIONS = {"registration": "none", "min_registration_quality": 0.35, "standardise": "percentile"}
#: Options of one preset only: left out of the other presets' fingerprints.
PRESET_ONLY = {"volume_size": "t1_volume"}


def preprocessing_fingerprint(cfg: PreprocessingConfig) -> str:
    """Short hash of everything that shapes the preprocessed tensors (config + the preset's code version)."""
    version = PRESET_VERSIONS.get(cfg.preset, PREPROCESSING_VERSION)
    fields = {key: value for key, value in dataclasses.asdict(cfg).items()
              if not (key in LATER_OPTIONS and value == LATER_OPTIONS[key])
              and PRESET_ONLY.get(key, cfg.preset) == cfg.preset}
    payload = json.dumps({"version": version, **fields}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def template_resolution(cfg: PreprocessingConfig) -> int:
    """The MNI152 grid (mm) a registered scan lands on: the working spacing (isotropic, whole mm)."""
    return int(round(cfg.spacing_mm[0]))


def volume_transforms(cfg: PreprocessingConfig, channel_wise: bool = False) -> Compose:
    """MONAI chain for a ``(C, X, Y, Z)`` MetaTensor: RAS, spacing, [template registration and
    brain mask], N4, head crop, [0, 1] scaling (percentiles, or white-matter scaling)."""
    low, high = cfg.intensity_percentiles
    registered = cfg.registration == "mni152"
    steps = [Orientation(axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
             Spacing(pixdim=cfg.spacing_mm, mode="bilinear", dtype=np.float32)]
    if registered:
        steps.append(TemplateRegistration(template_resolution(cfg), cfg.min_registration_quality))
    if cfg.n4:
        steps.append(N4BiasFieldCorrection(shrink=cfg.n4_shrink, iterations=cfg.n4_iterations,
                                           mask="nonzero" if registered else "otsu"))
    if cfg.standardise == "white_matter":
        steps.append(WhiteMatterScaling(template_resolution(cfg)))
    # The volume preset's box must hold the brain, not the field of view: smooth away noise specks.
    smooth = 1.0 if cfg.preset == "t1_volume" else 0.0
    steps.append(CropForeground(select_fn=RelativeThreshold(cfg.foreground_fraction, smooth), margin=2,
                                allow_smaller=True) if smooth else
                 CropForeground(select_fn=RelativeThreshold(cfg.foreground_fraction), margin=1, allow_smaller=True))
    if cfg.standardise == "percentile":
        steps.append(ScaleIntensityRangePercentiles(low, high, b_min=0.0, b_max=1.0, clip=True,
                                                    channel_wise=channel_wise))
    return Compose(steps)


def slice_fit(cfg: PreprocessingConfig):
    if cfg.slice_fit == "pad":
        return ResizeWithPadOrCrop(cfg.slice_size)
    if cfg.slice_fit == "resize":
        return Resize(cfg.slice_size, mode="bilinear")
    raise ConfigError(f"preprocessing.slice_fit must be 'pad' or 'resize', got {cfg.slice_fit!r}")


def to_metatensor(data: np.ndarray, affine: np.ndarray) -> MetaTensor:
    """``(X, Y, Z)`` or ``(C, X, Y, Z)`` array + (4, 4) affine -> channel-first MetaTensor."""
    array = data[None] if data.ndim == 3 else data
    return MetaTensor(torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)),
                      affine=torch.from_numpy(affine))


class _T1Chain:
    """Load a T1w file and run :func:`volume_transforms`: the part both T1 presets share."""

    preset = "t1"

    def __init__(self, cfg: PreprocessingConfig):
        if cfg.preset != self.preset:
            raise ConfigError(f"{type(self).__name__} needs preprocessing.preset {self.preset!r}, got {cfg.preset!r}")
        self.cfg = cfg
        self.volume = volume_transforms(cfg)

    @property
    def fingerprint(self) -> str:
        return preprocessing_fingerprint(self.cfg)

    def _chain(self, path: str | Path) -> tuple[torch.Tensor, dict[str, np.ndarray], dict]:
        """The ``(1, X, Y, Z)`` preprocessed volume, the arrays every T1 preset keeps, and its meta."""
        data, affine = load_volume(path)
        try:
            volume = self.volume(to_metatensor(data, affine))
        except (RuntimeError, ValueError) as err:  # MONAI wraps a failing transform in RuntimeError
            raise ScanError(path, f"preprocessing failed ({_reason(err)})") from None
        meta = volume.meta if isinstance(volume, MetaTensor) else {}
        arrays = {"acquisition": acquisition_features(data, affine, meta.get("registration_quality", 0.0),
                                                      meta.get("outside_brain_fraction", 0.0),
                                                      self.cfg.foreground_fraction)}
        if "template_to_scan" in meta:
            arrays["template_to_scan"] = np.asarray(meta["template_to_scan"], dtype=np.float64)
        return volume, arrays, meta


class T1SlicePreprocessor(_T1Chain):
    """A T1w NIfTI file -> float32 slices ``(S, 1, H, W)`` in [0, 1], ``(H, W) = slice_size``."""

    def __init__(self, cfg: PreprocessingConfig):
        super().__init__(cfg)
        self.slices = AxialSlices(cfg.slice_offsets)
        self.fit = slice_fit(cfg)

    def __call__(self, path: str | Path) -> np.ndarray:
        """The slices ``(S, 1, H, W)`` of the scan at ``path``."""
        return self.arrays(path)["slices"]

    def arrays(self, path: str | Path) -> dict[str, np.ndarray]:
        """``slices (S, 1, H, W)``, ``acquisition (F,)`` (see
        :mod:`neuro_ood.preprocessing.acquisition`) and, with registration, ``template_to_scan``
        (4, 4): RAS world mm on the template -> the scan's world mm."""
        volume, arrays, _ = self._chain(path)
        try:
            slices = self.slices(volume)
        except ValueError as err:
            raise ScanError(path, str(err)) from None
        fitted = self.fit(torch.as_tensor(slices).flatten(0, 1))  # slices as channels: same geometry
        out = torch.as_tensor(fitted).reshape(len(slices), -1, *self.cfg.slice_size)
        return {"slices": out.numpy().astype(np.float32), **arrays}


class T1VolumePreprocessor(_T1Chain):
    """A T1w NIfTI file -> one float32 volume ``(1, 1, X, Y, Z)`` in [0, 1] (RAS, ``spacing_mm``),
    ``(X, Y, Z) = volume_size``, the head centred by padding/cropping."""

    preset = "t1_volume"

    def __init__(self, cfg: PreprocessingConfig):
        super().__init__(cfg)
        self.fit = ResizeWithPadOrCrop(cfg.volume_size)

    def __call__(self, path: str | Path) -> np.ndarray:
        """The volume ``(1, 1, X, Y, Z)`` of the scan at ``path``."""
        return self.arrays(path)["slices"]

    def arrays(self, path: str | Path) -> dict[str, np.ndarray]:
        """``slices (1, 1, X, Y, Z)`` (the volume, under the name every preset's items use),
        ``box_to_scan (4, 4)``: box voxel indices -> the scan's RAS world mm, ``acquisition (F,)``
        and, with registration, ``template_to_scan``."""
        volume, arrays, _ = self._chain(path)
        boxed = self.fit(volume)
        box_affine = np.asarray(boxed.affine, dtype=np.float64)  # box voxel -> world (template world if registered)
        to_scan = arrays["template_to_scan"] @ box_affine if "template_to_scan" in arrays else box_affine
        return {"slices": torch.as_tensor(boxed).numpy().astype(np.float32)[None],
                "box_to_scan": to_scan, **arrays}


def _reason(err: Exception) -> str:
    """The innermost message of a (MONAI-wrapped) transform error, on one line."""
    while err.__cause__ is not None:
        err = err.__cause__
    return str(err).splitlines()[0] if str(err) else type(err).__name__
