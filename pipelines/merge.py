"""``neuro-ood merge``: one report from the shards of ``neuro-ood report --shard I/N``.

The shards' manifests (:mod:`neuro_ood.pipelines.shards`) must name the same runs (fingerprints),
the same cohort (identity) and the same settings, and together be shards 1..N, each once. Their
per-scan results (``.cache/``) and NIfTI maps (``maps/``) are copied into the merged folder, and
:func:`~neuro_ood.pipelines.report.report` assembles the report from them without scoring a scan:
the same ``report.html``, ``report.json``, ``scores.csv`` and maps as one unsharded report, with
the thumbnails chosen over the whole cohort.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Sequence

from rich.console import Console

from neuro_ood.errors import ConfigError
from neuro_ood.io import atomic_write
from neuro_ood.pipelines.report import Merged, ReportSummary, report
from neuro_ood.pipelines.shards import check_shards, read_manifest


def _copy_tree(source: Path, target: Path) -> None:
    """Copy the files under ``source`` to the same places under ``target`` (atomically, each)."""
    if not source.is_dir():
        return
    for path in source.rglob("*"):
        if path.is_file() and not path.name.endswith(".tmp"):
            destination = target / path.relative_to(source)
            if destination.is_file() and destination.stat().st_size == path.stat().st_size:
                continue
            with atomic_write(destination) as tmp:
                shutil.copyfile(path, tmp)


def merge(shard_dirs: Sequence[str | Path], out: str | Path, cache_dir: str | Path | None = None,
          console: Console | None = None, sample: int = 12, show: Sequence[str] = ()) -> ReportSummary:
    """Assemble the report of shards ``shard_dirs`` (folders of ``report --shard``) into ``out``."""
    if not shard_dirs:
        raise ConfigError("no shard given: name the --out folders of `neuro-ood report --shard I/N`")
    out = Path(out)
    manifests = {}
    for directory in map(Path, shard_dirs):
        if not directory.is_dir():
            raise ConfigError(f"{directory}: no such shard folder")
        manifest = read_manifest(directory)
        if manifest is None:
            raise ConfigError(f"{directory}: no shard.json, so not a finished shard of `neuro-ood report --shard I/N` "
                              "(still running, or killed: run it again)")
        if directory.resolve() in {d.resolve() for d in manifests}:
            raise ConfigError(f"{directory} given twice")
        manifests[directory] = manifest
    if any(out.resolve() == d.resolve() for d in manifests):
        raise ConfigError(f"--out {out} is one of the shards; name a new folder for the merged report")
    check_shards(manifests)
    failed = {(entry["path"], label): entry["reason"] for manifest in manifests.values()
              for entry in manifest["failed"] for label in entry["runs"]}
    for directory in manifests:
        _copy_tree(directory / ".cache", out / ".cache")
        _copy_tree(directory / "maps", out / "maps")
    first = next(iter(manifests.values()))
    missing = [p for p in (*first["inputs"], *first["run_dirs"]) if not os.path.exists(p)]
    if missing:
        raise ConfigError(f"{missing[0]}: named by the shards' manifest but not found here; merge where the "
                          "cohort and runs are at the paths the shards used")
    merged = Merged(dirs=list(manifests), runs=first["runs"], cohort=first["cohort"], failed=failed)
    settings = first["settings"]
    return report(first["inputs"], first["run_dirs"], out, cache_dir=cache_dir, console=console,
                  maps=settings["maps"], skip_trained=settings["skip_trained"], sample=sample, show=show,
                  merged=merged)
