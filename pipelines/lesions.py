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


class LesionMaps:
    """Voxel-level metrics of a localising detector's maps of lesion scans, and of intensity
    thresholding on the same voxels. Used as the ``on_maps`` callback of
    :func:`~neuro_ood.pipelines.common.score_sources`: each lesion item (a whole volume) whose scan
    (``scans``: item key -> :class:`~neuro_ood.data.cohort.Scan`) has a mask is compared with it
    as it is scored, so the maps come from the scoring passes; :meth:`metrics` sums up."""

    def __init__(self, scans: dict, foreground: float = 0.1):
        self.scans, self.foreground = scans, foreground
        self.maps: list[np.ndarray] = []
        self.masks: list[np.ndarray] = []
        self.regions: list[np.ndarray] = []
        self.bright: list[np.ndarray] = []
        self.dark: list[np.ndarray] = []
        self.parts: dict[str, list[np.ndarray]] = {}

    def __call__(self, item, heat: np.ndarray, parts: dict[str, np.ndarray]) -> None:
        mask_path = getattr(self.scans.get(item.key), "lesion_mask", None)
        if item.group != LESION_GROUP or item.box_to_scan is None or mask_path is None:
            return
        volume = item.slices[0, 0]
        region = brain_region(volume, self.foreground)
        baseline = intensity_baseline_maps(volume, region)
        self.maps.append(heat[0])
        self.masks.append(box_mask(mask_path, item))
        self.regions.append(region)
        self.bright.append(baseline["bright"])
        self.dark.append(baseline["dark"])
        for part, part_heat in parts.items():
            self.parts.setdefault(part, []).append(part_heat[0])

    def metrics(self) -> dict[str, Any] | None:
        """``{"map": summary, "intensity_bright": summary, "intensity_dark": summary}`` and, for a
        map with separable parts (:meth:`~neuro_ood.detectors.base.Detector.maps_with_components`),
        ``"components": {part: summary}``; each summary ``{"pooled", "per_scan", "n_scans"}``.
        None when no scored item had a mask."""
        if not self.maps:
            return None
        located = {"map": _summary(self.maps, self.masks, self.regions),
                   "intensity_bright": _summary(self.bright, self.masks, self.regions),
                   "intensity_dark": _summary(self.dark, self.masks, self.regions)}
        if self.parts:
            located["components"] = {part: _summary(heats, self.masks, self.regions)
                                     for part, heats in self.parts.items()}
        return located
