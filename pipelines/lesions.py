"""``neuro-ood evaluate --group-by lesion``: where the maps point, against lesion masks.

For each whole-volume run that localises, every lesion scan's anomaly map is compared voxel by
voxel with its mask (brought onto the model's box through the scan's world coordinates,
:func:`~neuro_ood.preprocessing.inverse.scan_to_box_grid`), inside the foreground of the
preprocessed volume (:func:`~neuro_ood.localisation.brain_region`: the brain when registration
applied the template's brain mask, the whole head of an unregistered whole-head scan). The
intensity-thresholding baseline (the image itself, bright and dark) is scored on the same voxels
in the same run. Metrics: voxel AUROC, AUPRC and best Dice, pooled over
all lesion scans (one global threshold) and averaged over scans (:mod:`neuro_ood.localisation`).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from neuro_ood.data.nifti import load_volume
from neuro_ood.localisation import (brain_region, intensity_baseline_maps, mean_of_scans, pooled_voxel_metrics,
                                    voxel_metrics)
from neuro_ood.preprocessing.inverse import scan_to_box_grid

LESION_GROUP = "lesion"


def box_mask(mask_path, item) -> np.ndarray:
    """The lesion mask file of ``item``'s scan on the item's model box: bool ``(X, Y, Z)``."""
    data, affine = load_volume(mask_path)
    return scan_to_box_grid(data > 0.5, affine, item.slices.shape[2:], item.box_to_scan, order=0) > 0.5


def _summary(maps: Sequence[np.ndarray], masks: Sequence[np.ndarray], regions: Sequence[np.ndarray]) -> dict[str, Any]:
    per_scan = [voxel_metrics(m, k, r) for m, k, r in zip(maps, masks, regions)]
    return {"pooled": pooled_voxel_metrics(maps, masks, regions), "per_scan": mean_of_scans(per_scan),
            "n_scans": len(per_scan)}


def localisation_metrics(detector, items: Sequence, scans: dict, foreground: float = 0.1) -> dict[str, Any] | None:
    """Voxel-level metrics of ``detector``'s maps and of intensity thresholding on the lesion
    ``items`` (whole volumes) whose scans (``scans``: item key -> :class:`~neuro_ood.data.cohort.Scan`)
    have a mask; None when no such item exists or the detector does not localise volumes.

    Returns ``{"map": summary, "intensity_bright": summary, "intensity_dark": summary}`` and, for
    a map with separable parts (:meth:`~neuro_ood.detectors.base.Detector.maps_with_components`),
    ``"components": {part: summary}``; each summary ``{"pooled", "per_scan", "n_scans"}``."""
    with_mask = [item for item in items if item.group == LESION_GROUP and item.box_to_scan is not None
                 and getattr(scans.get(item.key), "lesion_mask", None) is not None]
    if not with_mask or not detector.localises:
        return None
    maps, masks, regions, bright, dark, parts = [], [], [], [], [], {}
    for item in with_mask:
        volume = item.slices[0, 0]
        region = brain_region(volume, foreground)
        with torch.inference_mode():
            heat, components = detector.maps_with_components(item.slices)
            maps.append(heat[0])
            for part, part_heat in components.items():
                parts.setdefault(part, []).append(part_heat[0])
        masks.append(box_mask(scans[item.key].lesion_mask, item))
        regions.append(region)
        baseline = intensity_baseline_maps(volume, region)
        bright.append(baseline["bright"])
        dark.append(baseline["dark"])
    located = {"map": _summary(maps, masks, regions), "intensity_bright": _summary(bright, masks, regions),
               "intensity_dark": _summary(dark, masks, regions)}
    if parts:
        located["components"] = {part: _summary(heats, masks, regions) for part, heats in parts.items()}
    return located
