"""``neuro-ood quickstart``: the main job on a built-in default, with no user data.

Synthetic cohort -> train MSMA with ``configs/msma_quick.yaml`` -> evaluate by age group.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

from rich.console import Console

from neuro_ood.config import load_config
from neuro_ood.pipelines.evaluate import evaluate
from neuro_ood.pipelines.synth import synth
from neuro_ood.pipelines.train import train

QUICKSTART_COHORT = {"inliers": 120, "ages": (1, 2, 4, 6), "per_age": 20, "seed": 0}


def quickstart(out: str | Path, config: str = "msma_quick", overrides: Sequence[str] = (),
               console: Console | None = None, cohort: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run the whole MSMA job into ``out`` (``out/cohort``, ``out/run``, ``out/cache``); return metrics."""
    started = time.perf_counter()
    console = console or Console(stderr=True)
    out = Path(out)
    cohort_args = {**QUICKSTART_COHORT, **(cohort or {})}
    data_dir = out / "cohort"
    if not (data_dir / "participants.tsv").is_file():
        synth(data_dir, console=console, **cohort_args)
    cfg = load_config(config, overrides)
    summary = train(cfg, data_dir, out / "run", cache_dir=out / "cache", console=console)
    console.print(f"trained on {summary.n_train_items} scans ({summary.n_train_slices} slices), "
                  f"{summary.n_heldout_items} held out, {summary.steps} steps, final loss {summary.final_loss:.1f}")
    metrics = evaluate(out / "run", data_dir, cache_dir=out / "cache", console=console)
    metrics["seconds"] = time.perf_counter() - started
    return metrics
