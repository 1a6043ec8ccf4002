"""``neuro-ood quickstart``: the main job on a built-in default, with no user data.

Synthetic cohort -> train MSMA with ``configs/msma_quick.yaml`` -> evaluate by age group; with
``baselines``, f-AnoGAN and the ResNet classifier are trained at CPU size too and evaluated side by
side with MSMA on the same held-out inliers and age groups.
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
BASELINE_CONFIGS = ("fanogan_quick", "resnet_quick")


def quickstart(out: str | Path, config: str = "msma_quick", overrides: Sequence[str] = (),
               console: Console | None = None, cohort: dict[str, Any] | None = None,
               baselines: bool = False) -> dict[str, Any]:
    """Run the whole job into ``out`` (``out/cohort``, ``out/run[-<baseline>]``, ``out/cache``); return metrics."""
    started = time.perf_counter()
    console = console or Console(stderr=True)
    out = Path(out)
    data_dir = out / "cohort"
    if not (data_dir / "participants.tsv").is_file():
        synth(data_dir, console=console, **{**QUICKSTART_COHORT, **(cohort or {})})
    runs = [out / "run"]
    configs = [config] + (list(BASELINE_CONFIGS) if baselines else [])
    for name in configs:
        cfg = load_config(name, overrides if name == config else ())
        run = out / "run" if name == config else out / f"run-{cfg.method}"
        summary = train(cfg, data_dir, run, cache_dir=out / "cache", console=console)
        console.print(f"{cfg.method}: trained on {summary.n_train_items} scans ({summary.n_train_slices} slices), "
                      f"{summary.n_heldout_items} held out, {summary.steps} steps, {summary.seconds:.0f} s")
        if run not in runs:
            runs.append(run)
    metrics = evaluate(runs if baselines else runs[0], data_dir, cache_dir=out / "cache", console=console)
    metrics["seconds"] = time.perf_counter() - started
    return metrics
