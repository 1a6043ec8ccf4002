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
    """Collects the maps of the lesion ``items`` (whole volumes) whose scans (``scans``: item key
    -> :class:`~neuro_ood.data.cohort.Scan`) have a mask, as a :func:`~neuro_ood.pipelines.common.score_items`
    ``on_maps`` callback, so the maps come from the scoring passes; :meth:`metrics` then compares
    them with the masks."""

    def __init__(self, items: Sequence, scans: dict, foreground: float = 0.1):
        self.items, self.scans, self.foreground = items, scans, foreground
        self.wanted = {index for index, item in enumerate(items)
                       if item.group == LESION_GROUP and item.box_to_scan is not None
                       and getattr(scans.get(item.key), "lesion_mask", None) is not None}
        self.heat: dict[int, np.ndarray] = {}
        self.parts: dict[int, dict[str, np.ndarray]] = {}

    def __call__(self, index: int, heat: np.ndarray, parts: dict[str, np.ndarray]) -> None:
        if index in self.wanted:
            self.heat[index] = heat[0]
            self.parts[index] = {part: part_heat[0] for part, part_heat in parts.items()}

    def metrics(self) -> dict[str, Any] | None:
        """Voxel-level metrics of the collected maps and of intensity thresholding; None when no
        item has a mask. Returns ``{"map": summary, "intensity_bright": summary, "intensity_dark":
        summary}`` and, for a map with separable parts
        (:meth:`~neuro_ood.detectors.base.Detector.maps_with_components`), ``"components": {part:
        summary}``; each summary ``{"pooled", "per_scan", "n_scans"}``."""
        if not self.heat:
            return None
        maps, masks, regions, bright, dark, parts = [], [], [], [], [], {}
        for index in sorted(self.heat):
            item = self.items[index]
            volume = item.slices[0, 0]
            region = brain_region(volume, self.foreground)
            maps.append(self.heat[index])
            for part, part_heat in self.parts[index].items():
                parts.setdefault(part, []).append(part_heat)
            masks.append(box_mask(self.scans[item.key].lesion_mask, item))
            regions.append(region)
            baseline = intensity_baseline_maps(volume, region)
            bright.append(baseline["bright"])
            dark.append(baseline["dark"])
        located = {"map": _summary(maps, masks, regions), "intensity_bright": _summary(bright, masks, regions),
                   "intensity_dark": _summary(dark, masks, regions)}
        if parts:
            located["components"] = {part: _summary(heats, masks, regions) for part, heats in parts.items()}
        return located
