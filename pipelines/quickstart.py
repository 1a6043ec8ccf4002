"""``neuro-ood quickstart``: the main job on a built-in default, with no user data.

Synthetic cohort -> train MSMA with ``configs/msma_quick.yaml`` and the simple baseline
(``configs/simple_quick.yaml``, seconds) -> evaluate both by age group, side by side -> a
``neuro-ood report`` of the scans no run trained on (held-out inliers and the younger age groups);
with ``baselines``, f-AnoGAN and the ResNet classifier are trained at CPU size too and evaluated
(and reported) side by side with MSMA on the same held-out inliers and age groups.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

from rich.console import Console

from neuro_ood.config import load_config
from neuro_ood.pipelines.evaluate import evaluate
from neuro_ood.pipelines.report import report
from neuro_ood.pipelines.synth import synth
from neuro_ood.pipelines.train import train

QUICKSTART_COHORT = {"inliers": 120, "ages": (1, 2, 4, 6), "per_age": 20, "seed": 0}
BASELINE_CONFIGS = ("simple_quick", "fanogan_quick", "resnet_quick")
#: Baselines trained beside the main config also without ``baselines`` (they cost seconds).
ALWAYS_CONFIGS = ("simple_quick",)
#: Override sections applied to the baselines too, so that every run holds out the same subjects
#: and sees the same slices.
SHARED_SECTIONS = ("dataset", "data", "preprocessing")
#: Thumbnails in the quickstart's report (each costs an anomaly map); `neuro-ood report` shows every flagged scan.
REPORT_THUMBNAILS = 36


def quickstart(out: str | Path, config: str = "msma_quick", overrides: Sequence[str] = (),
               console: Console | None = None, cohort: dict[str, Any] | None = None,
               baselines: bool = False) -> dict[str, Any]:
    """Run the whole job into ``out`` (``out/cohort``, ``out/run[-<baseline>]``, ``out/cache``,
    ``out/report``); return the metrics, with ``report`` the path of ``report.html``."""
    started = time.perf_counter()
    console = console or Console(stderr=True)
    out = Path(out)
    data_dir = out / "cohort"
    if not (data_dir / "participants.tsv").is_file():
        synth(data_dir, console=console, **{**QUICKSTART_COHORT, **(cohort or {})})
    runs = [out / "run"]
    configs = list(dict.fromkeys([config, *(BASELINE_CONFIGS if baselines else ALWAYS_CONFIGS)]))
    shared = [o for o in overrides if o.split("=", 1)[0].strip().split(".")[0] in SHARED_SECTIONS]
    for name in configs:
        cfg = load_config(name, overrides if name == config else shared)
        run = out / "run" if name == config else out / f"run-{cfg.method}"
        summary = train(cfg, data_dir, run, cache_dir=out / "cache", console=console)
        console.print(f"{cfg.method}: trained on {summary.n_train_items} scans ({summary.n_train_slices} slices), "
                      f"{summary.n_heldout_items} held out, {summary.steps} steps, {summary.seconds:.0f} s")
        if run not in runs:
            runs.append(run)
    metrics = evaluate(runs, data_dir, cache_dir=out / "cache", console=console)
    summary = report([data_dir], runs, out / "report", cache_dir=out / "cache", console=console, skip_trained=True,
                     maps="none", max_thumbnails=REPORT_THUMBNAILS)
    metrics["report"] = str(summary.html)
    metrics["seconds"] = time.perf_counter() - started
    return metrics
