"""BraTS cases on disk: one folder per case holding four co-registered MR modalities and a segmentation.

Three namings are recognised, case-insensitively (``.nii`` or ``.nii.gz``):

- BraTS 2020/2021: ``<case>_t1``, ``<case>_t1ce``, ``<case>_t2``, ``<case>_flair``, ``<case>_seg``;
- BraTS 2023: ``<case>-t1n``, ``<case>-t1c``, ``<case>-t2w``, ``<case>-t2f``, ``<case>-seg``;
- bare names inside a case folder: ``t1n``, ``t1c``, ``t2w``, ``t2f`` (or ``t1``, ``t1ce``, ``t2``,
  ``flair``, ``seg``), the case id then being the folder's name.

Modalities get the canonical names t1, t1ce, t2, flair (t1n -> t1, t1c -> t1ce, t2w -> t2,
t2f -> flair). A name is matched on its whole last ``_``/``-`` separated token, so ``t1`` is never
taken for ``t1ce`` or ``t1c``. When no standard segmentation exists, the one other NIfTI file whose
name contains ``seg`` (e.g. ``segmentation_model_output.nii.gz``) is taken as the segmentation.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from neuro_ood.data.nifti import is_nifti_name
from neuro_ood.errors import CohortError

MODALITIES = ("t1", "t1ce", "t2", "flair")

# Last name token (lower case) -> canonical modality, or "seg".
ALIASES = {
    "t1": "t1", "t1n": "t1",
    "t1ce": "t1ce", "t1c": "t1ce",
    "t2": "t2", "t2w": "t2",
    "flair": "flair", "t2f": "flair",
    "seg": "seg",
}


@dataclass
class BratsCase:
    """One BraTS case: ``modalities`` maps t1, t1ce, t2, flair to files; ``seg`` may be absent."""

    case_id: str
    modalities: dict[str, Path]
    seg: Path | None = None


def _stem(path: Path) -> str:
    name = path.name
    return name[: -len(".nii.gz")] if name.lower().endswith(".nii.gz") else name[: -len(".nii")]


def _classify(path: Path) -> tuple[str, str] | None:
    """``(canonical name or "seg", case prefix)`` for a recognised file name, else None."""
    if path.name.startswith(".") or not path.is_file() or not is_nifti_name(path):
        return None
    stem = _stem(path)
    token = re.split(r"[_-]", stem)[-1]
    prefix = stem[: -len(token) - 1] if len(stem) > len(token) else ""
    kind = ALIASES.get(token.lower())
    return (kind, prefix) if kind else None


def _nifti_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith(".") and p.is_file() and is_nifti_name(p))


def _is_case_folder(folder: Path) -> bool:
    return any((c := _classify(p)) is not None and c[0] in MODALITIES for p in _nifti_files(folder))


def find_brats_case(folder: str | Path) -> BratsCase:
    """Read one case folder.

    Raises
    ------
    CohortError
        The folder does not exist, lacks one or more of the four modalities (named in the
        message), holds two files for one modality or segmentation, or mixes files of several cases.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CohortError(f"BraTS case folder {folder} does not exist or is not a folder")
    found: dict[str, Path] = {}
    prefixes: set[str] = set()
    for path in _nifti_files(folder):
        classified = _classify(path)
        if classified is None:
            continue
        kind, prefix = classified
        if kind in found:
            raise CohortError(f"BraTS case {folder}: two files for {kind}: {found[kind].name} and {path.name}")
        found[kind] = path
        if kind in MODALITIES:
            prefixes.add(prefix)
    missing = [m for m in MODALITIES if m not in found]
    if missing:
        present = ", ".join(f"{m}={found[m].name}" for m in MODALITIES if m in found) or "none"
        raise CohortError(f"BraTS case {folder}: missing modalit{'y' if len(missing) == 1 else 'ies'} "
                          f"{', '.join(missing)} (found: {present}); expected <case>_t1/_t1ce/_t2/_flair, "
                          "<case>-t1n/-t1c/-t2w/-t2f or t1n/t1c/t2w/t2f .nii[.gz]")
    if len(prefixes) > 1:
        raise CohortError(f"BraTS case {folder}: modality files of several cases "
                          f"({', '.join(sorted(repr(p) for p in prefixes))})")
    seg = found.get("seg")
    if seg is None:
        taken = set(found.values())
        candidates = [p for p in _nifti_files(folder) if p not in taken and "seg" in p.name.lower()]
        if len(candidates) > 1:
            raise CohortError(f"BraTS case {folder}: several candidate segmentations "
                              f"({', '.join(p.name for p in candidates)})")
        seg = candidates[0] if candidates else None
    prefix = prefixes.pop()
    return BratsCase(case_id=prefix or folder.name, modalities={m: found[m] for m in MODALITIES}, seg=seg)


def find_brats_cases(root: str | Path) -> list[BratsCase]:
    """All cases under ``root``: ``root`` itself a case folder, or a folder of case folders.

    Sub-folders without any modality file are skipped; an incomplete case folder is an error.
    Cases are sorted by case id.
    """
    root = Path(root)
    if not root.is_dir():
        raise CohortError(f"BraTS root {root} does not exist or is not a folder")
    if _is_case_folder(root):
        return [find_brats_case(root)]
    cases = [find_brats_case(sub) for sub in sorted(root.iterdir())
             if sub.is_dir() and not sub.name.startswith(".") and _is_case_folder(sub)]
    if not cases:
        raise CohortError(f"no BraTS case under {root}: neither it nor its sub-folders hold "
                          "t1/t1ce/t2/flair (or t1n/t1c/t2w/t2f) NIfTI files")
    ids = [c.case_id for c in cases]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise CohortError(f"BraTS root {root}: case id(s) {', '.join(duplicates)} occur in several folders")
    return sorted(cases, key=lambda c: c.case_id)
