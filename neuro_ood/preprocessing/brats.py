"""The ``brats`` preset: a BraTS case in, a stack of 4-channel axial slices and tumour voxel counts out.

The four modalities are stacked as channels ``(C, X, Y, Z)`` and the segmentation rides along as a
second key through one MONAI dictionary pipeline that mirrors :func:`volume_transforms` step for
step: reorient to RAS (both) -> resample to ``spacing_mm`` (image bilinear, segmentation nearest
neighbour, on the same grid) -> optional N4 (image) -> one foreground box computed on the image and
cropped from both -> channel-wise percentile scaling to [0, 1] (image). Every axial slice whose
brain fraction reaches ``min_brain_fraction`` is kept and fitted to ``slice_size``.

Each slice comes with its number of tumour voxels (segmentation label > 0, at ``spacing_mm``), and
:func:`tumour_group` turns that count into the slice's group: slices with NO tumour voxel are the
inliers (trained on, reference, evaluated as ``no tumour``); slices with at least
``min_tumour_voxels`` are the outliers evaluated as ``tumour``; slices with 1 to
``min_tumour_voxels - 1`` tumour voxels get no group: they hold tumour, so they are never inliers,
but too little to count as a tumour slice, so they are neither trained on, nor in the reference,
nor evaluated.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import torch
from monai.transforms import (Compose, CropForegroundd, Lambdad, Orientationd,
                              ScaleIntensityRangePercentilesd, Spacingd)

from neuro_ood.config import PreprocessingConfig
from neuro_ood.data.brats import MODALITIES, BratsCase
from neuro_ood.data.nifti import load_volume
from neuro_ood.errors import ConfigError, ScanError
from neuro_ood.preprocessing.presets import preprocessing_fingerprint, slice_fit, to_metatensor
from neuro_ood.preprocessing.transforms import N4BiasFieldCorrection, RelativeThreshold

IMAGE, SEG = "image", "seg"
NO_TUMOUR, TUMOUR = "no tumour", "tumour"


def tumour_group(tumour_voxels: int, min_tumour_voxels: int) -> str | None:
    """A slice's group from its tumour voxel count: ``"no tumour"`` for 0, ``"tumour"`` for at least
    ``min_tumour_voxels``, ``None`` (excluded everywhere) for anything in between."""
    if tumour_voxels <= 0:
        return NO_TUMOUR
    return TUMOUR if tumour_voxels >= min_tumour_voxels else None


def brats_volume_transforms(cfg: PreprocessingConfig) -> Compose:
    """Dictionary chain for ``{"image": (C, X, Y, Z), "seg": (1, X, Y, Z)}`` MetaTensors.

    The image steps equal ``volume_transforms(cfg, channel_wise=True)``; the segmentation (optional
    key) gets the same orientation, the same target grid (nearest neighbour, labels kept) and the
    same crop box, so that voxel ``[..., x, y, z]`` of both outputs is the same point in space.
    """
    low, high = cfg.intensity_percentiles
    keys = [IMAGE, SEG]
    steps = [Orientationd(keys, axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S")),
                          allow_missing_keys=True),
             Spacingd(keys, pixdim=cfg.spacing_mm, mode=("bilinear", "nearest"), dtype=np.float32,
                      allow_missing_keys=True)]
    if cfg.n4:
        steps.append(Lambdad(IMAGE, func=N4BiasFieldCorrection(shrink=cfg.n4_shrink, iterations=cfg.n4_iterations)))
    steps += [
        CropForegroundd(keys, source_key=IMAGE, select_fn=RelativeThreshold(cfg.foreground_fraction), margin=1,
                        allow_smaller=True, allow_missing_keys=True),
        ScaleIntensityRangePercentilesd(IMAGE, low, high, b_min=0.0, b_max=1.0, clip=True, channel_wise=True),
    ]
    return Compose(steps)


def load_segmentation(path, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Label volume ``(X, Y, Z)`` float32 of non-negative integers (0 background) and its affine.

    An all-background segmentation is valid (a case without visible tumour), unlike a constant image.
    """
    try:
        labels, affine = load_volume(path)
    except ScanError as err:
        if not err.reason.startswith("constant image"):
            raise
        image = nib.load(str(path))
        labels = np.asarray(image.dataobj, dtype=np.float32).reshape(image.shape[:3])
        affine = np.asarray(image.affine, dtype=np.float64)
    if labels.shape != tuple(shape):
        raise ScanError(path, f"segmentation of shape {labels.shape} does not match the images' {tuple(shape)}")
    if labels.min() < 0 or not np.array_equal(labels, np.round(labels)):
        raise ScanError(path, "segmentation holds negative or non-integer labels; expected 0 (background) to 4")
    return labels, affine


class BratsSlicePreprocessor:
    """A :class:`BratsCase` -> (slices float32 ``(N, C, H, W)`` in [0, 1], tumour voxels int64 ``(N,)``).

    ``C = len(cfg.modalities)`` channels in that order, each scaled to [0, 1] on its own;
    ``(H, W) = slice_size``. ``N`` is the number of axial (RAS Z) slices, inferior to superior, whose
    brain fraction (voxels with any channel > 0, over the cropped slice's area) is at least
    ``min_brain_fraction``. ``tumour_voxels[i]``: the number of segmentation voxels (at
    ``spacing_mm``) with a label > 0 in slice ``i``; all 0 for a case without segmentation (whose
    slices the dataset adapter leaves ungrouped). A count, not a flag: any tumour voxel keeps a
    slice out of the inliers, while ``min_tumour_voxels`` only decides whether it is evaluated as a
    tumour slice (:func:`tumour_group`).
    """

    def __init__(self, cfg: PreprocessingConfig):
        if cfg.preset != "brats":
            raise ConfigError(f"BratsSlicePreprocessor needs preprocessing.preset 'brats', got {cfg.preset!r}")
        unknown = [m for m in cfg.modalities if m not in MODALITIES]
        if unknown or not cfg.modalities or len(set(cfg.modalities)) != len(cfg.modalities):
            raise ConfigError(f"preprocessing.modalities must be distinct names among {', '.join(MODALITIES)}, "
                              f"got {cfg.modalities!r}")
        self.cfg = cfg
        self.volume = brats_volume_transforms(cfg)
        self.fit = slice_fit(cfg)

    @property
    def fingerprint(self) -> str:
        return preprocessing_fingerprint(self.cfg)

    def load(self, case: BratsCase) -> dict:
        """``{"image": (C, X, Y, Z)[, "seg": (1, X, Y, Z)]}`` MetaTensors in the files' voxel order."""
        volumes, affine, first = [], None, None
        for name in self.cfg.modalities:
            data, this_affine = load_volume(case.modalities[name])
            if first is None:
                first, affine, shape = name, this_affine, data.shape
            elif data.shape != shape:
                raise ScanError(case.modalities[name], f"case {case.case_id}: {name} has shape {data.shape} "
                                                       f"but {first} has shape {shape}")
            elif not np.allclose(this_affine, affine, atol=1e-3):
                raise ScanError(case.modalities[name], f"case {case.case_id}: {name} and {first} have different "
                                                       "affines (not co-registered on one voxel grid)")
            volumes.append(data)
        sample = {IMAGE: to_metatensor(np.stack(volumes), affine)}
        if case.seg is not None:
            labels, seg_affine = load_segmentation(case.seg, shape)
            if not np.allclose(seg_affine, affine, atol=1e-3):
                raise ScanError(case.seg, f"case {case.case_id}: segmentation and {first} have different affines")
            sample[SEG] = to_metatensor(labels, affine)
        return sample

    def __call__(self, case: BratsCase) -> tuple[np.ndarray, np.ndarray]:
        try:
            out = self.volume(self.load(case))
        except (RuntimeError, ValueError) as err:  # MONAI wraps a failing transform in RuntimeError
            raise ScanError(case.case_id, f"preprocessing failed ({str(err).splitlines()[0]})") from None
        image = torch.as_tensor(out[IMAGE])                                  # (C, X, Y, Z)
        brain = (image > 0).any(dim=0).float().mean(dim=(0, 1))              # (Z,)
        keep = torch.nonzero(brain >= self.cfg.min_brain_fraction).flatten()
        if len(keep) == 0:
            raise ScanError(case.case_id, f"no axial slice has a brain fraction ≥ {self.cfg.min_brain_fraction} "
                                          f"(largest {float(brain.max()):.3f})")
        if SEG in out:
            per_slice = (torch.as_tensor(out[SEG])[0] > 0).sum(dim=(0, 1))    # (Z,)
            tumour_voxels = per_slice[keep].numpy().astype(np.int64)
        else:
            tumour_voxels = np.zeros(len(keep), dtype=np.int64)
        slices = image[..., keep].permute(3, 0, 1, 2)                        # (N, C, X, Y)
        fitted = self.fit(slices.flatten(0, 1))  # slices as channels: same geometry for all
        fitted = torch.as_tensor(fitted).reshape(len(keep), image.shape[0], *self.cfg.slice_size)
        return fitted.numpy().astype(np.float32), tumour_voxels
