"""Between a scan's own grid and the model's box: maps back onto the scan, masks onto the box.

The ``t1_volume`` preset keeps ``box_to_scan`` (4, 4): box voxel indices -> the scan's RAS world
mm (through the template registration where there is one). Both directions resample by world
coordinates with nibabel, so a map written with the scan's affine overlays the original in
FSLeyes, ITK-SNAP or 3D Slicer whatever axis order (RAS, LPS, ...) the file was stored in.
"""

from __future__ import annotations

from typing import Sequence

import nibabel as nib
import numpy as np
from nibabel.processing import resample_from_to


def box_to_scan_grid(box_map: np.ndarray, box_to_scan: np.ndarray, scan_shape: Sequence[int],
                     scan_affine: np.ndarray, order: int = 1) -> np.ndarray:
    """A map on the box ``(X, Y, Z)`` resampled onto the scan's grid ``scan_shape`` (3-D) with
    the scan's voxel -> world ``scan_affine``; ``order`` 1 (trilinear) for maps, 0 for labels.
    Scan voxels outside the box get 0. Returns float32 ``scan_shape``."""
    image = nib.Nifti1Image(np.asarray(box_map, dtype=np.float32), np.asarray(box_to_scan, dtype=np.float64))
    out = resample_from_to(image, (tuple(int(s) for s in scan_shape[:3]), np.asarray(scan_affine, np.float64)),
                           order=order, mode="constant", cval=0.0)
    return np.asarray(out.dataobj, dtype=np.float32)


def scan_to_box_grid(scan_array: np.ndarray, scan_affine: np.ndarray, box_shape: Sequence[int],
                     box_to_scan: np.ndarray, order: int = 0) -> np.ndarray:
    """An array on the scan's grid (e.g. a lesion mask) resampled onto the box ``box_shape``
    (nearest neighbour by default). Returns float32 ``box_shape``; box voxels outside the scan get 0."""
    image = nib.Nifti1Image(np.asarray(scan_array, dtype=np.float32), np.asarray(scan_affine, dtype=np.float64))
    out = resample_from_to(image, (tuple(int(s) for s in box_shape), np.asarray(box_to_scan, np.float64)),
                           order=order, mode="constant", cval=0.0)
    return np.asarray(out.dataobj, dtype=np.float32)
