"""Dataset adapters: what a cohort's units are, which are inliers, and how they are grouped.

An adapter turns a data folder into :class:`Source` objects (one per scan or case), preprocesses a
source into named arrays (cached), and cuts the arrays into :class:`Item` objects — the units that
get one score each:

- ``abcd`` (T1 presets): a source is a T1 scan, an item is that scan (its three slices, or with
  ``t1_volume`` its whole volume) grouped by age in whole years; inliers are scans aged within
  ``data.inlier_ages``.
- ``brats`` (BRATS preset): a source is a case (four modalities + optional segmentation), an item is
  one axial slice grouped as ``tumour`` (at least ``min_tumour_voxels`` tumour voxels) / ``no tumour``
  (none at all); inliers are the tumour-free slices; slices with a few tumour voxels get no group.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from neuro_ood.config import ExperimentConfig
from neuro_ood.data.brats import BratsCase, find_brats_case, find_brats_cases
from neuro_ood.data.cohort import Scan, age_group, load_cohort
from neuro_ood.errors import ConfigError
from neuro_ood.preprocessing.brats import NO_TUMOUR, TUMOUR, BratsSlicePreprocessor, tumour_group
from neuro_ood.preprocessing.presets import T1SlicePreprocessor, T1VolumePreprocessor, preprocessing_fingerprint


@dataclass
class Source:
    """A thing to preprocess: ``paths`` are the files whose content keys the cache."""

    subject: str
    label: str
    paths: list[Path]
    payload: Any


@dataclass
class Item:
    """One scored unit. ``slices``: ``(S, C, H, W)`` float32 in [0, 1] (a volume preset: one volume
    ``(1, C, X, Y, Z)``); ``group``: its evaluation group; ``acquisition``: the scan's
    acquisition-level properties ``(F,)`` where the preset gives them; ``box_to_scan``: (4, 4) the
    volume's voxel -> the scan's world mm (volume presets)."""

    key: str
    subject: str
    label: str
    group: str | None
    slices: np.ndarray
    acquisition: np.ndarray | None = None
    box_to_scan: np.ndarray | None = None


class T1AgeCohort:
    """ABCD / EBDS style cohorts of T1 scans with ages; see the module docstring."""

    presets, group_by, unit = ("t1", "t1_volume"), "age", "scan"

    def __init__(self, cfg: ExperimentConfig):
        self.cfg = cfg
        self.fingerprint = preprocessing_fingerprint(cfg.preprocessing)
        volume = cfg.preprocessing.preset == "t1_volume"
        self.preprocess_scan = (T1VolumePreprocessor if volume else T1SlicePreprocessor)(cfg.preprocessing)
        self.cached_arrays = ("slices", "acquisition", "box_to_scan") if volume else ("slices", "acquisition")

    def sources(self, data_dir: str | Path) -> list[Source]:
        return [self._source(scan) for scan in load_cohort(data_dir, self.cfg.data)]

    def sources_from_paths(self, paths: Sequence[str | Path]) -> list[Source]:
        return [self._source(Scan(subject=Path(p).name, path=Path(p))) for p in paths]

    @staticmethod
    def _source(scan: Scan) -> Source:
        return Source(subject=scan.subject, label=str(scan.path), paths=[scan.path], payload=scan)

    def has_inliers(self, source: Source) -> bool:
        low, high = self.cfg.data.inlier_ages
        age = source.payload.age_years
        return age is not None and low <= age <= high and not source.payload.lesion

    def preprocess(self, source: Source) -> dict[str, np.ndarray]:
        return self.preprocess_scan.arrays(source.payload.path)

    def items(self, source: Source, arrays: dict[str, np.ndarray]) -> list[Item]:
        scan: Scan = source.payload
        # A scan with a lesion is evaluated as its own group, whatever its age.
        group = "lesion" if scan.lesion else age_group(scan.age_years) if scan.age_years is not None else None
        return [Item(key=scan.key, subject=scan.subject, label=source.label, group=group, slices=arrays["slices"],
                     acquisition=arrays.get("acquisition"), box_to_scan=arrays.get("box_to_scan"))]

    def is_inlier(self, item: Item) -> bool:
        return True  # every item of an inlier source is an inlier scan


class BratsTumourCohort:
    """BraTS cases: slices without any tumour voxel are inliers, slices with at least
    ``preprocessing.min_tumour_voxels`` are outliers; slices in between get no group."""

    presets, group_by, unit = ("brats",), "tumour", "slice"
    inlier_group, outlier_group = NO_TUMOUR, TUMOUR

    def __init__(self, cfg: ExperimentConfig):
        self.cfg = cfg
        self.fingerprint = preprocessing_fingerprint(cfg.preprocessing)
        self.preprocess_case = BratsSlicePreprocessor(cfg.preprocessing)

    def sources(self, data_dir: str | Path) -> list[Source]:
        return [self._source(case) for case in find_brats_cases(data_dir)]

    def sources_from_paths(self, paths: Sequence[str | Path]) -> list[Source]:
        return [self._source(find_brats_case(p)) for p in paths]

    @staticmethod
    def _source(case: BratsCase) -> Source:
        files = [*case.modalities.values(), *([case.seg] if case.seg else [])]
        return Source(subject=case.case_id, label=case.case_id, paths=files, payload=case)

    def has_inliers(self, source: Source) -> bool:
        return True

    def preprocess(self, source: Source) -> dict[str, np.ndarray]:
        slices, tumour_voxels = self.preprocess_case(source.payload)
        return {"slices": slices, "tumour_voxels": tumour_voxels,
                "segmented": np.array([source.payload.seg is not None])}

    def items(self, source: Source, arrays: dict[str, np.ndarray]) -> list[Item]:
        """One item per slice, grouped by :func:`tumour_group`: ``no tumour`` (no tumour voxel at all),
        ``tumour`` (at least ``min_tumour_voxels``) or none (1 to ``min_tumour_voxels - 1`` voxels: never
        an inlier, too small to evaluate). A case without segmentation (e.g. BraTS validation data)
        gets no group either, so its slices are neither trained on as tumour-free nor evaluated."""
        segmented = bool(arrays["segmented"][0])
        minimum = self.cfg.preprocessing.min_tumour_voxels
        return [Item(key=f"{source.subject}:{i}", subject=source.subject, label=f"{source.label} slice {i}",
                     group=tumour_group(int(voxels), minimum) if segmented else None,
                     slices=arrays["slices"][i:i + 1])
                for i, voxels in enumerate(arrays["tumour_voxels"])]

    def is_inlier(self, item: Item) -> bool:
        return item.group == self.inlier_group


ADAPTERS = {"abcd": T1AgeCohort, "brats": BratsTumourCohort}


def dataset_adapter(cfg: ExperimentConfig):
    """The adapter of ``cfg.dataset``; its preprocessing preset must match the config's."""
    if cfg.dataset not in ADAPTERS:
        raise ConfigError(f"unknown dataset {cfg.dataset!r}; choose one of {', '.join(ADAPTERS)}")
    adapter = ADAPTERS[cfg.dataset]
    if cfg.preprocessing.preset not in adapter.presets:
        raise ConfigError(f"dataset {cfg.dataset!r} needs preprocessing.preset {' or '.join(map(repr, adapter.presets))}, "
                          f"the config has {cfg.preprocessing.preset!r}")
    return adapter(cfg)

