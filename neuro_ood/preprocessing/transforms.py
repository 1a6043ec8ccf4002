"""MONAI-style transforms that MONAI itself does not ship: N4, a robust foreground test, axial slicing.

Each is a small callable class on channel-first arrays, ``(C, X, Y, Z)`` for volumes in RAS
voxel order (X: left->right, Y: posterior->anterior, Z: inferior->superior).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Transform

from neuro_ood.lazy import LazyModule

sitk = LazyModule("SimpleITK")  # N4 only


class N4BiasFieldCorrection(Transform):
    """N4 bias-field correction (SimpleITK) of each channel of a ``(C, X, Y, Z)`` volume.

    The field is estimated on a copy shrunk by ``shrink`` (≈2 s per 2 mm volume with 2×) inside
    an Otsu head mask (``mask="otsu"``) or the nonzero voxels (``"nonzero"``: a brain-masked
    volume), then divided out of the full-resolution image. Voxel spacing is read from
    a MetaTensor's affine so the B-spline control grid has physical units.
    """

    def __init__(self, shrink: int = 2, iterations: Sequence[int] = (50, 50, 30), mask: str = "otsu"):
        if mask not in ("otsu", "nonzero"):
            raise ValueError(f"N4 mask must be 'otsu' or 'nonzero', got {mask!r}")
        self.shrink = int(shrink)
        self.iterations = [int(i) for i in iterations]
        self.mask = mask

    def _correct(self, volume: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
        image = sitk.GetImageFromArray(np.ascontiguousarray(volume.transpose(2, 1, 0), dtype=np.float32))
        image.SetSpacing([float(s) for s in spacing])
        mask = sitk.OtsuThreshold(image, 0, 1, 200) if self.mask == "otsu" else sitk.Cast(image > 0, sitk.sitkUInt8)
        small = sitk.Shrink(image, [self.shrink] * 3) if self.shrink > 1 else image
        small_mask = sitk.Shrink(mask, [self.shrink] * 3) if self.shrink > 1 else mask
        corrector = sitk.N4BiasFieldCorrectionImageFilter()
        corrector.SetMaximumNumberOfIterations(self.iterations)
        corrector.Execute(small, small_mask)
        log_field = corrector.GetLogBiasFieldAsImage(image)
        corrected = image / sitk.Exp(log_field)
        return sitk.GetArrayFromImage(corrected).transpose(2, 1, 0)

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        spacing = img.pixdim.tolist() if isinstance(img, MetaTensor) else [1.0, 1.0, 1.0]
        array = img.detach().cpu().numpy()
        corrected = np.stack([self._correct(np.clip(c, 0, None), spacing) for c in array])
        out = torch.as_tensor(corrected, dtype=img.dtype)
        return MetaTensor(out, meta=img.meta) if isinstance(img, MetaTensor) else out


class RelativeThreshold:
    """Foreground test for ``CropForeground``: voxels above ``fraction`` × the 99th percentile.

    Robust to the absolute intensity scale of each scanner. With ``smooth_voxels`` > 0 the test
    runs on a Gaussian-smoothed copy (σ in voxels), so that isolated bright noise voxels in the
    background do not stretch the box to the whole field of view.
    """

    def __init__(self, fraction: float = 0.1, smooth_voxels: float = 0.0):
        self.fraction = float(fraction)
        self.smooth_voxels = float(smooth_voxels)

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        budget = 1_000_000
        if self.smooth_voxels > 0:
            from monai.transforms import GaussianSmooth

            img = GaussianSmooth(self.smooth_voxels)(torch.as_tensor(img, dtype=torch.float32))
            budget = 125_000  # a smooth image's percentile needs few samples; quantile sorts them all
        reference = torch.quantile(img.float().flatten()[:: max(1, img.numel() // budget)], 0.99)
        return img > self.fraction * reference


class AxialSlices(Transform):
    """``(C, X, Y, Z)`` RAS volume -> ``(S, C, X, Y)`` axial slices at ``offsets`` from the middle.

    The middle is that of the volume's Z extent; after a foreground crop it is the centre of the
    brain's inferior-superior extent. Offsets are in voxels; an offset outside the volume is an error.
    """

    def __init__(self, offsets: Sequence[int] = (-2, 0, 2)):
        self.offsets = [int(o) for o in offsets]

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        depth = img.shape[-1]
        indices = [depth // 2 + o for o in self.offsets]
        if min(indices) < 0 or max(indices) >= depth:
            raise ValueError(f"slice offsets {self.offsets} fall outside a foreground of {depth} axial slices")
        return torch.stack([torch.as_tensor(img[..., i]) for i in indices])
