"""Acquisition-level properties of a scan: what a site, scanner or upstream pipeline leaves in it.

These describe how a scan was *acquired and stored* rather than the anatomy: the shape of the head's
intensity histogram, the background (noise level, exact zeros left by skull stripping or
defacing), the field of view, the voxel size and, with template registration, how well the scan
matches the template and how much of its foreground lies outside the template brain (skull,
neck). A model of the training cohort's vectors (see ``pipelines/domain.py``) says how far a new
scan sits from the training site(s), beside its anomaly score.
"""

from __future__ import annotations

import numpy as np

#: Names of the entries of :func:`acquisition_features`, in order.
ACQUISITION_FEATURES = (
    "head_q05", "head_q25", "head_q50", "head_q75", "head_q95",   # head intensity quantiles / its 99.5th pct
    "background_noise",       # std of the background / the head's 99.5th percentile
    "zero_fraction",          # voxels exactly 0 (skull-stripped, defaced or masked files)
    "head_fraction",          # voxels in the head foreground
    "fov_lr_mm", "fov_ap_mm", "fov_si_mm",                        # field of view in RAS order
    "voxel_mm3",
    "registration_quality",   # 0 without registration
    "outside_brain_fraction",  # head foreground outside the template brain (0 without registration)
)


def acquisition_features(volume: np.ndarray, affine: np.ndarray, registration_quality: float = 0.0,
                         outside_brain_fraction: float = 0.0, foreground_fraction: float = 0.1) -> np.ndarray:
    """``volume (X, Y, Z)`` as loaded with its (4, 4) ``affine`` -> float64 ``(F,)`` named by
    :data:`ACQUISITION_FEATURES`. The head foreground is every voxel above ``foreground_fraction``
    × the 99th percentile (as the preprocessing's foreground crop)."""
    volume = np.asarray(volume, dtype=np.float64)
    low = volume.min()
    shifted = volume - low if low < 0 else volume
    head = shifted > foreground_fraction * np.percentile(shifted, 99)
    values = shifted[head]
    scale = float(np.percentile(values, 99.5)) or 1.0
    quantiles = np.percentile(values, [5, 25, 50, 75, 95]) / scale
    background = shifted[~head]
    noise = float(background.std()) / scale if background.size else 0.0
    zooms = np.linalg.norm(np.asarray(affine)[:3, :3], axis=0)
    # field of view along the RAS axes: the voxel axis closest to each world axis
    axis_of = np.abs(np.asarray(affine)[:3, :3]).argmax(axis=1)
    fov = [volume.shape[a] * zooms[a] for a in axis_of]
    return np.array([*quantiles, noise, float((volume == 0).mean()), float(head.mean()), *fov,
                     float(np.prod(zooms)), float(registration_quality), float(outside_brain_fraction)],
                    dtype=np.float64)
