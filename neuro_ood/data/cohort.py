"""Cohorts as studies distribute them: BIDS-like trees or tables of paths and ages.

A BIDS tree holds ``sub-*/[ses-*/]anat/*_T1w.nii[.gz]``; ages may sit in ``participants.tsv``,
``sub-*_sessions.tsv`` or ``*_scans.tsv`` (the most specific wins), each with an optional JSON
sidecar whose ``Units`` says years, months, weeks or days. ABCD's ``interview_age`` is in months.
A table (CSV/TSV) names one scan per row with columns ``path`` and an age column, and optionally
``participant_id``/``subject``.

Lesions. A scan has a lesion when the table (``participants.tsv`` in a BIDS tree, the table itself
otherwise) has a ``lesion`` column whose value is not one of ``LESION_ABSENT`` (``""``, ``n/a``,
``none``, ``0``, ``no``; case-insensitive), or when a lesion mask lies in a BIDS derivative:
``derivatives/*/sub-X/[ses-Y/]anat/<the T1w's entities>_label-lesion_mask.nii[.gz]``, also named
``_desc-lesion_mask`` or ``_label-lesion_dseg`` (first match, pipelines in name order). Scans with a
lesion are never inliers: they are not normative.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence


from neuro_ood.config import DataConfig
from neuro_ood.data.nifti import is_nifti_name
from neuro_ood.errors import CohortError
from neuro_ood.lazy import LazyModule

pd = LazyModule("pandas")  # tables are read by train, evaluate and report, not by score

YEARS_PER_UNIT = {"years": 1.0, "year": 1.0, "y": 1.0, "months": 1 / 12, "month": 1 / 12, "m": 1 / 12,
                  "weeks": 7 / 365.25, "week": 7 / 365.25, "w": 7 / 365.25,
                  "days": 1 / 365.25, "day": 1 / 365.25, "d": 1 / 365.25}
MONTH_COLUMNS = {"interview_age", "age_months", "age_in_months"}
PATH_COLUMNS = ("path", "filename", "file", "image", "t1", "t1w")
SUBJECT_COLUMNS = ("participant_id", "subject", "subject_id", "src_subject_id")
LESION_COLUMN = "lesion"
LESION_ABSENT = {"", "n/a", "none", "0", "no"}
LESION_MASK_SUFFIXES = ("_label-lesion_mask", "_desc-lesion_mask", "_label-lesion_dseg")


@dataclass(frozen=True)
class Scan:
    """One image of a cohort. ``age_years`` is None when the cohort gives no age for it;
    ``lesion_mask`` is the path of its lesion mask, if any; ``lesion_label`` the table's ``lesion``
    value when it marks a lesion (e.g. ``hyper``), else None."""

    subject: str
    path: Path
    age_years: float | None = None
    session: str | None = None
    lesion_mask: Path | None = None
    lesion_label: str | None = None

    @property
    def key(self) -> str:
        return f"{self.subject}/{self.session}" if self.session else self.subject

    @property
    def lesion(self) -> bool:
        """Whether the cohort marks a lesion in this scan (table column or mask file)."""
        return self.lesion_label is not None or self.lesion_mask is not None


def _read_tsv(path: Path) -> pd.DataFrame:
    sep = "," if path.suffix.lower() == ".csv" else "\t"
    try:
        return pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False)
    except Exception as err:
        raise CohortError(f"{path}: cannot read table ({err})") from None


def _unit_factor(table: Path, column: str, cfg: DataConfig) -> float:
    unit = cfg.age_unit.lower()
    if unit == "auto":
        sidecar = table.with_suffix(".json")
        unit = "months" if column.lower() in MONTH_COLUMNS else "years"
        if sidecar.is_file():
            try:
                meta = json.loads(sidecar.read_text())
                unit = str(meta.get(column, {}).get("Units", unit)).lower()
            except (json.JSONDecodeError, AttributeError):
                raise CohortError(f"{sidecar}: not a valid JSON sidecar") from None
    if unit not in YEARS_PER_UNIT:
        raise CohortError(f"{table}: age unit {unit!r} of column {column!r} is not one of years/months/weeks/days")
    return YEARS_PER_UNIT[unit]


def _ages(table: Path, key_column: str, cfg: DataConfig) -> dict[str, float]:
    """Map the table's ``key_column`` values to ages in years (rows without an age are left out)."""
    if not table.is_file():
        return {}
    frame = _read_tsv(table)
    column = next((c for c in cfg.age_column if c in frame.columns), None)
    if column is None or key_column not in frame.columns:
        return {}
    factor = _unit_factor(table, column, cfg)
    ages = pd.to_numeric(frame[column], errors="coerce") * factor
    return {str(k): float(a) for k, a in zip(frame[key_column], ages) if pd.notna(a)}


def _lesion_label(value) -> str | None:
    value = str(value).strip()
    return None if value.lower() in LESION_ABSENT else value


def _lesion_labels(table: Path, key_column: str) -> dict[str, str]:
    """Map ``key_column`` values to their ``lesion`` value, for rows that mark a lesion."""
    if not table.is_file():
        return {}
    frame = _read_tsv(table)
    if LESION_COLUMN not in frame.columns or key_column not in frame.columns:
        return {}
    labels = {str(k): _lesion_label(v) for k, v in zip(frame[key_column], frame[LESION_COLUMN])}
    return {k: v for k, v in labels.items() if v is not None}


def _lesion_mask(pipelines: Sequence[Path], image: Path, subject: str, session: str | None,
                 suffix: str) -> Path | None:
    """The first ``<pipeline>/sub-X/[ses-Y/]anat/<entities><mask suffix>.nii[.gz]`` of ``image``."""
    entities = image.name.split(f"_{suffix}.nii")[0]
    rel = Path(subject, session, "anat") if session else Path(subject, "anat")
    for pipeline in pipelines:
        for mask_suffix in LESION_MASK_SUFFIXES:
            for ext in (".nii.gz", ".nii"):
                path = pipeline / rel / f"{entities}{mask_suffix}{ext}"
                if path.is_file():
                    return path
    return None


def _entity(name: str, entity: str) -> str | None:
    match = re.search(rf"(?:^|_){entity}-([A-Za-z0-9]+)", name)
    return f"{entity}-{match.group(1)}" if match else None


def read_bids_cohort(root: str | Path, cfg: DataConfig, suffix: str = "T1w") -> list[Scan]:
    """All ``*_<suffix>.nii[.gz]`` images of a BIDS tree with their ages in years."""
    root = Path(root)
    paths = sorted(p for pattern in (f"sub-*/anat/*_{suffix}.nii*", f"sub-*/ses-*/anat/*_{suffix}.nii*")
                   for p in root.glob(pattern) if is_nifti_name(p))
    if not paths:
        raise CohortError(f"{root}: no sub-*/[ses-*/]anat/*_{suffix}.nii[.gz] images found")
    participant_ages = _ages(root / "participants.tsv", "participant_id", cfg)
    lesion_labels = _lesion_labels(root / "participants.tsv", "participant_id")
    pipelines = sorted(p for p in (root / "derivatives").glob("*") if p.is_dir())
    scans = []
    for path in paths:
        subject = _entity(path.name, "sub") or path.parts[len(root.parts)]
        session = _entity(path.name, "ses")
        subject_dir = root / subject
        age = participant_ages.get(subject)
        if session:
            age = _ages(subject_dir / f"{subject}_sessions.tsv", "session_id", cfg).get(session, age)
        prefix = f"{subject}_{session}" if session else subject
        scan_ages = _ages(path.parent.parent / f"{prefix}_scans.tsv", "filename", cfg)
        age = scan_ages.get(f"anat/{path.name}", scan_ages.get(path.name, age))
        scans.append(Scan(subject=subject, path=path, age_years=age, session=session,
                          lesion_mask=_lesion_mask(pipelines, path, subject, session, suffix),
                          lesion_label=lesion_labels.get(subject)))
    return scans


def read_table_cohort(table: str | Path, cfg: DataConfig) -> list[Scan]:
    """Scans listed in a CSV/TSV; relative paths are taken relative to the table's folder."""
    table = Path(table)
    frame = _read_tsv(table)
    path_column = next((c for c in PATH_COLUMNS if c in frame.columns), None)
    if path_column is None:
        raise CohortError(f"{table}: no path column (one of {', '.join(PATH_COLUMNS)})")
    age_column = next((c for c in cfg.age_column if c in frame.columns), None)
    factor = _unit_factor(table, age_column, cfg) if age_column else 1.0
    subject_column = next((c for c in SUBJECT_COLUMNS if c in frame.columns), None)
    scans = []
    for _, row in frame.iterrows():
        path = Path(row[path_column])
        path = path if path.is_absolute() else table.parent / path
        subject = row[subject_column] if subject_column else (_entity(path.name, "sub") or path.name.split(".")[0])
        age = pd.to_numeric(row[age_column], errors="coerce") if age_column else float("nan")
        lesion = _lesion_label(row[LESION_COLUMN]) if LESION_COLUMN in frame.columns else None
        scans.append(Scan(subject=str(subject), path=path,
                          age_years=float(age) * factor if pd.notna(age) else None,
                          session=_entity(path.name, "ses"), lesion_label=lesion))
    if not scans:
        raise CohortError(f"{table}: no rows")
    return scans


def load_cohort(source: str | Path, cfg: DataConfig) -> list[Scan]:
    """A BIDS folder or a CSV/TSV table of scans."""
    source = Path(source)
    if source.is_dir():
        return read_bids_cohort(source, cfg)
    if source.is_file() and source.suffix.lower() in (".csv", ".tsv"):
        return read_table_cohort(source, cfg)
    raise CohortError(f"{source}: not a BIDS folder or a .csv/.tsv table of scans")


def select_inliers(scans: Sequence[Scan], cfg: DataConfig) -> list[Scan]:
    """Scans without a lesion whose age lies in ``cfg.inlier_ages`` (inclusive, years)."""
    low, high = cfg.inlier_ages
    return [s for s in scans if s.age_years is not None and low <= s.age_years <= high and not s.lesion]


def split_subjects(scans: Sequence[Scan], heldout_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Subject-level split so that no subject's scans (or slices) land on both sides."""
    subjects = sorted({s.subject for s in scans})
    if len(subjects) < 2:
        raise CohortError(f"need at least 2 inlier subjects to split, found {len(subjects)}")
    from sklearn.model_selection import train_test_split

    train, heldout = train_test_split(subjects, test_size=heldout_fraction, random_state=seed)
    return sorted(train), sorted(heldout)


def age_group(age_years: float) -> str:
    """Group label of an age: the nearest whole year (EBDS visits at 1, 2, 4, 6 years)."""
    return str(int(math.floor(age_years + 0.5)))  # half years round up (round() would go to even)
