"""``neuro-ood synth``: write a synthetic BIDS cohort (MNI152-based T1 scans with an age model, optionally
lesion subjects with their masks as a BIDS derivative)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from rich.console import Console

from neuro_ood.data.synthetic import write_synthetic_cohort


def synth(out: str | Path, inliers: int, ages: Sequence[float], per_age: int, seed: int = 0,
          resolution_mm: float = 2.0, console: Console | None = None, lesions: int = 0,
          lesion_polarity: str = "mixed") -> Path:
    """Write ``inliers`` subjects aged 9–11, ``per_age`` subjects at each of ``ages`` and ``lesions``
    subjects aged 9–11 with synthetic lesions (``lesion_polarity``: hyper, hypo or mixed) to ``out``."""
    console = console or Console(stderr=True)
    with console.status(f"writing {inliers + per_age * len(ages) + lesions} synthetic scans to {out}"):
        return write_synthetic_cohort(out, n_inliers=inliers, ages=ages, per_age=per_age, seed=seed,
                                      resolution_mm=resolution_mm, n_lesion=lesions, lesion_polarity=lesion_polarity)
