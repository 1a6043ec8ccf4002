"""``neuro-ood report``: a cohort scored by one or more runs, as a report a researcher reads, a
statistician loads and a reviewer can reproduce.

    DIR/report.html      one self-contained page (figures and thumbnails inline, no network)
    DIR/report.json      everything the page shows, machine-readable
    DIR/scores.csv       one row per scan (BraTS: per slice); scores.json describes each column
    DIR/maps/<run>/      anomaly maps as NIfTI (+ PNG montage) where the method localises
    DIR/.cache/<run fingerprint>/<content sha256>.json              per-scan scores (what a restart reuses)
    DIR/.cache/<run fingerprint>/planes/<sha256>_<item>.safetensors  mid-planes of scan and map (thumbnails)

A scan's verdict is :class:`~neuro_ood.pipelines.score.Normative`'s, the same code as ``neuro-ood
score``. Scores are cached per scan under the run's fingerprint (a hash of its config, weights,
scorers and reference) and the file content's SHA-256 (the preprocessing cache's key), so a killed
report started again scores only the scans it had not finished. Paths are shown relative to the
cohort; nothing of a NIfTI header but the image is read.
"""

from __future__ import annotations

import csv
import datetime
import fnmatch
import hashlib
import io
import math
import os
import re
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Sequence

import numpy as np
import torch
from rich.console import Console
from rich.progress import TimeRemainingColumn
from sklearn.metrics import roc_curve

import neuro_ood
from neuro_ood.config import ExperimentConfig
from neuro_ood.errors import CohortError, ConfigError
from neuro_ood.io import load_arrays, read_json, save_arrays, write_json, write_text
from neuro_ood.metrics import ood_metrics
from neuro_ood.preprocessing.cache import PreprocessedCache, content_digest, default_cache_dir
from neuro_ood.pipelines import report_html, shards
from neuro_ood.pipelines.common import PreprocessStream, preprocess_source, progress_bar, save_item_maps, score_items
from neuro_ood.pipelines.datasets import Item, Source, dataset_adapter
from neuro_ood.pipelines.evaluate import _labels
from neuro_ood.pipelines.reference import reference_scores
from neuro_ood.pipelines.rundir import RunDir
from neuro_ood.pipelines.domain import load_domain_model, site_verdicts
from neuro_ood.pipelines.score import Normative, ScanResult, sources_of_paths
from neuro_ood.pipelines.shards import Shard


@dataclass
class Merged:
    """What a merge of shards hands :func:`report`: the shards' folders, the runs' fingerprints and the
    cohort's identity they agree on, and their failed scans as ``{(path, run label): reason}``."""

    dirs: list[Path]
    runs: dict[str, str]
    cohort: dict[str, Any]
    failed: dict[tuple[str, str], str]

#: Files of a run that decide its scores; their hash names the run's cache folder.
RUN_FILES = ("config.yaml", "preprocessing.json", "model.json", "model.safetensors", "scorers.json",
             "scorers.safetensors", "reference.json")
CACHE_VERSION = 1
MAPS_CHOICES = ("flagged", "all", "none")
#: Most scans scored per network call group (fewer when the next scan is not preprocessed yet); each
#: one's cache entry is written as soon as its group is done.
CHUNK = 8
ENTITY = re.compile(r"(?:^|[_/])(sub|ses)-([A-Za-z0-9]+)")


def run_fingerprint(run: RunDir) -> str:
    """Short SHA-256 over the run files that decide its scores (:data:`RUN_FILES`)."""
    digest = hashlib.sha256()
    for name in RUN_FILES:
        path = run.file(name)
        if path.is_file():
            digest.update(name.encode() + b"\0")
            with open(path, "rb") as handle:
                while block := handle.read(1 << 20):
                    digest.update(block)
            digest.update(b"\0")
    return digest.hexdigest()[:16]


# -- the cohort -----------------------------------------------------------------------------------

@dataclass
class Cohort:
    """What was given as COHORT: ``kind`` bids / table / brats / files; paths are shown relative to ``root``."""

    kind: str
    root: Path
    name: str
    sources: list[Source]
    failures: list[tuple[str, str]]

    def relative(self, path: str | Path) -> str:
        path = Path(os.path.abspath(path))
        root = Path(os.path.abspath(self.root))
        return path.relative_to(root).as_posix() if path.is_relative_to(root) else path.name

    def display(self, source: Source) -> str:
        if len(source.paths) == 1:
            return self.relative(source.paths[0])
        return self.relative(os.path.commonpath([os.path.abspath(p.parent) for p in source.paths]))

    def scrub(self, text: str) -> str:
        """``text`` with the cohort's absolute location taken out (error messages name paths)."""
        for prefix in sorted({os.path.abspath(self.root), str(self.root)}, key=len, reverse=True):
            if prefix not in ("", "."):
                text = text.replace(prefix.rstrip(os.sep) + os.sep, "")
        return text


def open_cohort(adapter, inputs: Sequence[str | Path]) -> Cohort:
    """A BIDS tree (or a folder of BraTS cases), a CSV/TSV table, or a list of files / case folders."""
    inputs = [Path(p) for p in inputs]
    if not inputs:
        raise CohortError("no cohort given: name a BIDS folder, a CSV/TSV table, or scan files")
    first = inputs[0]
    if len(inputs) == 1 and not first.exists():
        raise CohortError(f"{first}: no such folder, table or scan")
    if len(inputs) == 1 and (first.is_dir() or first.suffix.lower() in (".csv", ".tsv")):
        kind = "table" if first.is_file() else ("brats" if "brats" in adapter.presets else "bids")
        root = first.parent if kind == "table" else first
        return Cohort(kind, root, first.name, adapter.sources(first), [])
    sources, failures = sources_of_paths(adapter, inputs)
    root = Path(os.path.commonpath([os.path.abspath(p.parent) for p in inputs]))
    cohort = Cohort("files", root, root.name or str(root), sources, [])
    cohort.failures = [(cohort.relative(p), cohort.scrub(reason)) for p, reason in failures]
    return cohort


def path_entities(path: str) -> dict[str, str]:
    """BIDS ``sub``/``ses`` entities of a relative path, as ``{"sub": "sub-01", ...}`` (the last wins)."""
    return {key: f"{key}-{value}" for key, value in ENTITY.findall(path)}


# -- per-scan cache -------------------------------------------------------------------------------

class ScanCache:
    """``DIR/.cache/<run fingerprint>/``: one JSON per scan content holding the detector's raw
    scores per item, and the thumbnails' mid-planes; every file written atomically."""

    def __init__(self, out: Path, fingerprint: str):
        self.root = out / ".cache" / fingerprint

    def entry_path(self, digest: str) -> Path:
        return self.root / f"{digest}.json"

    def load(self, digest: str) -> dict[str, Any] | None:
        path = self.entry_path(digest)
        if not path.is_file():
            return None
        try:
            entry = read_json(path)
        except (ValueError, OSError):
            return None
        ok = isinstance(entry, dict) and entry.get("version") == CACHE_VERSION and isinstance(entry.get("scores"), list)
        return entry if ok else None

    def save(self, digest: str, entry: dict[str, Any]) -> None:
        write_json(self.entry_path(digest), entry)

    def planes_path(self, digest: str, index: int) -> Path:
        return self.root / "planes" / f"{digest}_{index}.safetensors"


def _entry(arrays: dict[str, np.ndarray], item_scores: list[dict[str, float]]) -> dict[str, Any]:
    return {"version": CACHE_VERSION, "n_slices": int(len(arrays["slices"])),
            "arrays": {name: np.asarray(v).tolist() for name, v in arrays.items() if name != "slices"},
            "scores": item_scores}


def _cached_items(adapter, source: Source, entry: dict[str, Any]) -> list[Item]:
    """The source's items rebuilt from a cache entry (its small arrays; slices left empty), so that
    groups and keys follow the cohort's current tables."""
    arrays = {name: np.asarray(value) for name, value in entry["arrays"].items()}
    arrays["slices"] = np.zeros((int(entry["n_slices"]), 0), dtype=np.float32)
    return adapter.items(source, arrays)


# -- runs -----------------------------------------------------------------------------------------

@dataclass
class ReportRun:
    label: str
    run: RunDir
    cfg: ExperimentConfig
    adapter: Any
    detector: Any
    reference: dict[str, Any]
    split: dict[str, list[str]]
    fingerprint: str
    normative: Normative
    cache: ScanCache
    entries: dict[str, dict[str, Any]] = field(default_factory=dict)
    scored: int = 0
    reused: int = 0

    @property
    def localises(self) -> bool:
        return bool(self.detector.localises)

    def summary(self) -> dict[str, Any]:
        return {"label": self.label, "path": str(self.run.path), "method": self.cfg.method,
                "config_name": self.cfg.name, "dataset": self.cfg.dataset, "config": self.cfg.to_dict(),
                "preprocessing_fingerprint": self.adapter.fingerprint, "fingerprint": self.fingerprint,
                "training_subjects": len(self.split.get("train", [])),
                "heldout_subjects": len(self.split.get("heldout", [])),
                "reference_size": len(self.reference["items"]), "tpr": self.normative.tpr,
                "primary": self.normative.primary, "scorers": list(self.normative.scores),
                "thresholds": dict(self.normative.thresholds), "steps": self.run.trained_steps(),
                "localises": self.localises, "seen_groups": list(self.detector.seen_groups),
                "scored": self.scored, "reused": self.reused}


def load_runs(run_dirs: Sequence[str | Path], out: Path) -> list[ReportRun]:
    if not run_dirs:
        raise ConfigError("no run given: pass --run RUN (repeat it to compare runs side by side)")
    loaded = []
    for path in run_dirs:
        run = RunDir(path)
        cfg = run.load_config()
        loaded.append((run, cfg))
    datasets = {cfg.dataset for _, cfg in loaded}
    if len(datasets) > 1:
        raise ConfigError(f"the runs are of different datasets ({', '.join(sorted(datasets))})")
    labels = _labels([SimpleNamespace(cfg=cfg) for _, cfg in loaded])
    runs = []
    for label, (run, cfg) in zip(labels, loaded):
        detector = run.load_detector(cfg)
        reference = run.load_reference()
        fingerprint = run_fingerprint(run)
        runs.append(ReportRun(label=label, run=run, cfg=cfg, adapter=dataset_adapter(cfg), detector=detector,
                              reference=reference, split=run.load_split(), fingerprint=fingerprint,
                              normative=Normative.of_run(detector, reference, cfg), cache=ScanCache(out, fingerprint)))
    return runs


# -- the report -----------------------------------------------------------------------------------

@dataclass
class ReportSummary:
    out: Path
    html: Path
    unit: str
    n_scans: int
    n_flagged: int
    failures: list[dict[str, Any]]
    runs: dict[str, dict[str, int]]
    seconds: float


@dataclass
class _Row:
    """One scan (an item) of the report, with each run's item and verdict."""

    id: str
    path: str
    source: Source
    digest: str
    subject: str
    session: str | None
    age_years: float | None
    group: str | None
    key: str
    outlier_group: bool
    items: dict[str, tuple[int, Item]] = field(default_factory=dict)
    raw: dict[str, dict[str, float]] = field(default_factory=dict)
    results: dict[str, ScanResult] = field(default_factory=dict)
    maps: dict[str, list[str]] = field(default_factory=dict)


def _finite(value: Any) -> Any:
    """JSON-safe: non-finite floats become None, recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def report(cohort_inputs: Sequence[str | Path], run_dirs: Sequence[str | Path], out: str | Path,
           cache_dir: str | Path | None = None, console: Console | None = None, workers: int | None = None,
           maps: str = "flagged", sample: int = 12, show: Sequence[str] = (), skip_trained: bool = False,
           max_thumbnails: int = report_html.MAX_THUMBNAILS, stop_after: int | None = None,
           shard: Shard | None = None, merged: "Merged | None" = None) -> ReportSummary:
    """Score every scan of the cohort with every run (reusing ``out``'s per-scan cache) and write
    the report files into ``out``.

    ``maps``: anomaly maps as NIfTI for the scans a localising run flags (``flagged``), for every
    scan (``all``) or none; ``sample``: unflagged scans shown as thumbnails beside the flagged ones;
    ``show``: glob patterns (or substrings) of relative paths always shown; ``skip_trained``: leave
    out the subjects a run trained on; ``stop_after`` (tests): raise ``KeyboardInterrupt`` once
    that many scans were scored, as a kill would stop it; ``workers``: how scans are preprocessed
    ahead of the network (:class:`~neuro_ood.pipelines.common.PreprocessStream`).

    ``shard``: score only that share of the cohort (:mod:`neuro_ood.pipelines.shards`), write no
    thumbnails, and finish with the shard's manifest. ``merged`` (:mod:`neuro_ood.pipelines.merge`):
    every scan's result is already in ``out``'s cache or failed in a shard; nothing is scored.
    """
    started = time.perf_counter()
    console = console or Console(stderr=True)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; name a folder for the report")
    if maps not in MAPS_CHOICES:
        raise ConfigError(f"--maps {maps!r}: choose one of {', '.join(MAPS_CHOICES)}")
    if workers is not None and workers < 0:
        raise ConfigError(f"--workers {workers}: needs 0 or more")
    runs = load_runs(run_dirs, out)
    first = runs[0]
    cohort = open_cohort(first.adapter, cohort_inputs)
    keys = [cohort.display(source) for source in cohort.sources]
    cohort_id = {"identity": shards.identity([*keys, *(f"failed:{p}" for p, _ in cohort.failures)]),
                 "n_inputs": len(cohort.sources) + len(cohort.failures)}
    settings = {"maps": maps, "skip_trained": skip_trained}
    fingerprints = {run.label: run.fingerprint for run in runs}
    previous = shards.read_manifest(out)
    if previous is not None and (shard is None or previous["shard"] != vars(shard)):
        raise ConfigError(f"--out {out} holds shard {previous['shard']['index']}/{previous['shard']['count']}'s "
                          "results; give each shard (and the merged report) its own folder")
    if merged is not None and (merged.cohort != cohort_id or merged.runs != fingerprints):
        raise ConfigError("the cohort or a run changed since the shards were scored; score the shards again")
    if shard is not None:
        max_thumbnails, sample, show = 0, 0, ()  # thumbnails are chosen over the whole cohort, at the merge
        cohort.sources = [cohort.sources[i] for i in shards.share(keys, shard)]
    failures: dict[str, dict[str, Any]] = {}

    def fail(path: str, label: str, reason: str) -> None:
        entry = failures.setdefault(path, {"path": path, "runs": [], "reason": cohort.scrub(reason)})
        if label not in entry["runs"]:
            entry["runs"].append(label)
        if cohort.scrub(reason) not in entry["reason"]:
            entry["reason"] += f"; {cohort.scrub(reason)}"

    every = [r.label for r in runs]
    for path, reason in cohort.failures:
        for label in every:
            fail(path, label, reason)
    trained = set().union(*(set(r.split.get("train", [])) for r in runs)) if skip_trained else set()
    valid: list[tuple[Source, str]] = []
    for source in cohort.sources:
        display = cohort.display(source)
        subject = path_entities(display).get("sub", source.subject) if cohort.kind == "files" else source.subject
        if subject in trained:
            continue
        try:
            valid.append((source, content_digest(source.paths)))
            continue
        except FileNotFoundError:
            reason = "file not found"
        except IsADirectoryError:
            reason = "a folder, not a scan file"
        except OSError as err:
            reason = f"cannot read ({err.strerror or err})"
        for label in every:
            fail(display, label, reason)

    scored_now = 0
    quiet = Console(quiet=True)
    with progress_bar(console, TimeRemainingColumn()) as progress:
        for run in runs:
            missing = []
            for source, digest in valid:
                entry = run.cache.load(digest)
                if entry is not None and len(_cached_items(run.adapter, source, entry)) == len(entry["scores"]):
                    run.entries[digest] = entry
                    run.reused += 1
                elif merged is not None:
                    display = cohort.display(source)
                    if (display, run.label) not in merged.failed:
                        raise CohortError(f"{display}: no result in the shards for {run.label} "
                                          "(a shard's cache was removed?); score its shard again")
                    fail(display, run.label, merged.failed[display, run.label])
                else:
                    missing.append((source, digest))
            task = progress.add_task(f"preprocess + score ({run.label})", total=len(missing))
            digests = {id(source): digest for source, digest in missing}
            pending: list[tuple[Source, dict[str, np.ndarray]]] = []

            def flush() -> None:
                nonlocal scored_now
                if not pending:
                    return
                per_source = [run.adapter.items(source, arrays) for source, arrays in pending]
                flat = [item for items in per_source for item in items]
                # maps made by the scoring passes: those due now are written now, not made again later
                heats: dict[int, np.ndarray] = {}
                keep_maps = run.localises and (maps == "all" or run.detector.maps_with_scores)
                on_maps = (lambda index, heat, _parts: heats.__setitem__(index, heat)) if keep_maps else None
                scores = score_items(run.detector, flat, console=quiet, on_maps=on_maps) if flat else {}
                position = 0
                for (source, arrays), items in zip(pending, per_source):
                    item_scores = [{name: float(values[position + k]) for name, values in scores.items()}
                                   for k in range(len(items))]
                    entry = _entry(arrays, item_scores)
                    if heats:
                        _maps_with_scores(run, out, maps, cohort.display(source), source, digests[id(source)],
                                          entry, items, item_scores, [heats[position + k] for k in range(len(items))])
                    position += len(items)
                    run.cache.save(digests[id(source)], entry)
                    run.entries[digests[id(source)]] = entry
                    run.scored += 1
                    scored_now += 1
                progress.advance(task, len(pending))
                pending.clear()
                if stop_after is not None and scored_now >= stop_after:
                    raise KeyboardInterrupt

            stream = PreprocessStream(run.cfg, run.adapter, [s for s, _ in missing], cache_dir, workers)
            try:
                for source, arrays, reason in stream:
                    if reason is not None:
                        fail(cohort.display(source), run.label, reason)
                        progress.advance(task)
                        continue
                    pending.append((source, arrays))
                    # score as soon as the network would otherwise wait for preprocessing
                    if (len(pending) >= CHUNK or not stream.next_is_ready()
                            or (stop_after is not None and scored_now + len(pending) >= stop_after)):
                        flush()
                flush()
            finally:
                stream.close()

        rows = _rows(cohort, runs, valid)
        for run in runs:
            members = [row for row in rows if run.label in row.raw]
            if not members:
                continue
            names = list(members[0].raw[run.label])
            raw = {name: np.array([row.raw[run.label][name] for row in members], dtype=np.float64) for name in names}
            viewed = run.detector.group_view(raw, None)
            results = run.normative.judge_all([row.path for row in members], viewed)
            sites = site_verdicts(load_domain_model(run.run.path), run.reference,
                                  [row.items[run.label][1] for row in members])
            for row, result, site in zip(members, results, sites):
                result.site = site
                row.results[run.label] = result

        report_dict = _report_dict(cohort, runs, rows, list(failures.values()), cohort_inputs, run_dirs, out,
                                   maps, sample, show, skip_trained, workers)
        selected, omitted = select_thumbnails(report_dict["scans"], sample, show, max_thumbnails)
        planes = _maps_and_planes(runs, rows, {s["id"] for s in selected}, out, maps, cache_dir, progress, console)
    for scan, row in zip(report_dict["scans"], rows):
        scan["maps"] = {label: files for label, files in row.maps.items()}
    thumbnails, over_budget = embed_thumbnails([s["id"] for s in selected], planes, runs)
    shown = set(thumbnails)
    for scan in report_dict["scans"]:
        scan["thumbnail"] = scan["id"] in shown
    report_dict["thumbnails"] = {"shown": len(shown), "order": [i for i in (s["id"] for s in selected) if i in shown],
                                 "cap": max_thumbnails, "sample": sample,
                                 "omitted": [s["id"] for s in omitted] + over_budget}
    report_dict["seconds"] = round(time.perf_counter() - started, 2)
    if merged is not None:
        report_dict["merged_from"] = [str(d) for d in merged.dirs]
    if shard is not None:
        report_dict["shard"] = vars(shard)
    report_dict = _finite(report_dict)
    figures = _figures(report_dict, runs)
    _write_outputs(out, report_dict, figures, thumbnails)
    if shard is not None:
        shards.write_manifest(out, {
            "shard": vars(shard), "runs": fingerprints, "cohort": cohort_id, "settings": settings,
            "keys": [cohort.display(source) for source in cohort.sources], "failed": report_dict["failed"],
            "inputs": [os.path.abspath(p) for p in cohort_inputs], "run_dirs": [os.path.abspath(p) for p in run_dirs]})
    n_flagged = sum(any(r["flagged"] for r in s["results"].values()) for s in report_dict["scans"])
    return ReportSummary(out=out, html=out / "report.html", unit=first.adapter.unit, n_scans=len(rows),
                         n_flagged=n_flagged,
                         failures=report_dict["failed"],
                         runs={r.label: {"scored": r.scored, "reused": r.reused} for r in runs},
                         seconds=time.perf_counter() - started)


def _rows(cohort: Cohort, runs: Sequence[ReportRun], valid: Sequence[tuple[Source, str]]) -> list[_Row]:
    """One row per item scored by at least one run, in cohort order."""
    rows: dict[tuple[str, str], _Row] = {}
    for source, digest in valid:
        display = cohort.display(source)
        entities = path_entities(display)
        payload = source.payload
        for run in runs:
            entry = run.entries.get(digest)
            if entry is None:
                continue
            items = _cached_items(run.adapter, source, entry)
            for index, item in enumerate(items):
                rowkey = (display, item.key)
                row = rows.get(rowkey)
                if row is None:
                    subject, session = item.subject, getattr(payload, "session", None)
                    key = item.key
                    if cohort.kind == "files":
                        subject = entities.get("sub", subject)
                        session = entities.get("ses", session)
                        if run.adapter.unit == "scan":
                            key = f"{subject}/{session}" if session else subject
                    age = getattr(payload, "age_years", None)
                    outlier = item.group is not None and not (run.adapter.has_inliers(source)
                                                              and run.adapter.is_inlier(item))
                    row = _Row(id=f"s{len(rows) + 1}", path=display + item.label[len(source.label):], source=source,
                               digest=digest, subject=subject, session=session,
                               age_years=None if age is None else float(age), group=item.group, key=key,
                               outlier_group=outlier)
                    rows[rowkey] = row
                row.items[run.label] = (index, item)
                row.raw[run.label] = entry["scores"][index]
    return list(rows.values())


def _report_dict(cohort: Cohort, runs: Sequence[ReportRun], rows: Sequence[_Row], failed: list[dict[str, Any]],
                 cohort_inputs, run_dirs, out, maps, sample, show, skip_trained, workers) -> dict[str, Any]:
    roles = {run.label: (set(run.split.get("train", [])), set(run.reference["items"])) for run in runs}
    scans = []
    for row in rows:
        per_run = []
        for run in runs:
            train, ref = roles[run.label]
            per_run.append("train" if row.subject in train else "reference" if row.key in ref else "")
        role = "train" if "train" in per_run else "reference" if "reference" in per_run else ""
        scans.append({"id": row.id, "path": row.path, "subject": row.subject, "session": row.session,
                      "age_years": row.age_years, "group": row.group, "role": role,
                      "results": {label: {**result.to_dict(), "path": row.path} for label, result in row.results.items()},
                      "thumbnail": False, "maps": {}})
    metrics, roc = {}, {}
    for run in runs:
        metrics[run.label], roc[run.label] = _group_metrics(run, rows, roles[run.label])
    command = ["neuro-ood", "report", *map(str, cohort_inputs)]
    for path in run_dirs:
        command += ["--run", str(path)]
    command += ["--out", str(out)]
    if maps != "flagged":
        command += ["--maps", maps]
    if sample != 12:
        command += ["--sample", str(sample)]
    for pattern in show:
        command += ["--show", pattern]
    if skip_trained:
        command.append("--skip-trained")
    if workers is not None:
        command += ["--workers", str(workers)]
    first = runs[0]
    return {
        "neuro_ood_version": neuro_ood.__version__,
        "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": shlex.join(command),
        "cohort": {"name": cohort.name, "kind": cohort.kind, "n_inputs": len(cohort.sources) + len(cohort.failures)},
        "dataset": first.cfg.dataset, "unit": first.adapter.unit, "group_by": first.adapter.group_by,
        "inlier_ages": list(first.cfg.data.inlier_ages) if first.adapter.group_by == "age" else None,
        "runs": [run.summary() for run in runs],
        "resume": {run.label: {"scored": run.scored, "reused": run.reused} for run in runs},
        "scans": scans,
        "failed": failed,
        "metrics": metrics,
        "roc": roc,
        "reference": {run.label: {name: [float(v) for v in values] for name, values in run.normative.scores.items()}
                      for run in runs},
    }


def _group_metrics(run: ReportRun, rows: Sequence[_Row], roles) -> tuple[dict[str, Any], dict[str, Any]]:
    """``evaluate``'s metrics for this cohort: the run's held-out reference (inliers, positive)
    against each group of known outliers among the scans it neither trained on nor holds."""
    train, ref = roles
    members: dict[str, list[_Row]] = {}
    for row in rows:
        if run.label in row.raw and row.outlier_group and row.subject not in train and row.key not in ref:
            members.setdefault(row.group, []).append(row)
    groups, curves = {}, {}
    inliers_all = reference_scores(run.reference)
    for group in sorted(members, key=report_html.group_sort_key):
        names = list(members[group][0].raw[run.label])
        raw = {name: np.array([r.raw[run.label][name] for r in members[group]], dtype=np.float64) for name in names}
        values = run.detector.group_view(raw, group)
        inliers = run.detector.group_view(inliers_all, group)
        try:
            scorers = {name: ood_metrics(inliers[name], values[name]) for name in values}
        except ValueError:  # non-finite scores: left out of the metrics, still in the table
            continue
        groups[group] = {"n": len(members[group]), "scorers": scorers}
        for name in values:
            y = np.concatenate([np.ones(len(inliers[name])), np.zeros(len(values[name]))])
            fpr, tpr, _ = roc_curve(y, np.concatenate([inliers[name], values[name]]))
            curves.setdefault(name, {})[group] = {"fpr": [round(float(v), 5) for v in fpr],
                                                  "tpr": [round(float(v), 5) for v in tpr]}
    return {"inliers": {"n": len(run.reference["items"])}, "groups": groups}, curves


def select_thumbnails(scans: Sequence[dict[str, Any]], sample: int, show: Sequence[str],
                      cap: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Scans to show as thumbnails, and the flagged ones left out: those matching ``show`` (always),
    then the flagged (most atypical first) up to ``cap`` in all, then ``sample`` others spread evenly
    over the range of the first run's primary score (within the cap)."""
    def flagged(scan):
        return any(r["flagged"] for r in scan["results"].values())

    def atypicality(scan):
        return min((r["percentiles"][r["primary"]], r["scores"][r["primary"]] if r["scores"][r["primary"]] is not None
                    else -math.inf) for r in scan["results"].values())

    def wanted(scan):
        return any(fnmatch.fnmatch(scan["path"], p) or p in scan["path"] for p in show)

    shown = [s for s in scans if show and wanted(s)]
    ids = {s["id"] for s in shown}
    flagged_scans = sorted((s for s in scans if flagged(s) and s["id"] not in ids), key=atypicality)
    room = max(0, cap - len(shown))
    chosen, omitted = flagged_scans[:room], flagged_scans[room:]
    others = [s for s in scans if not flagged(s) and s["id"] not in ids and s["results"]]
    room = max(0, min(sample, cap - len(shown) - len(chosen)))
    if others and room:
        others.sort(key=atypicality)
        picks = sorted(set(np.linspace(0, len(others) - 1, min(room, len(others))).round().astype(int)))
        chosen += [others[i] for i in picks]
    return shown + chosen, omitted


def _maps_dir(out: Path, run: ReportRun) -> Path:
    return out / "maps" / re.sub(r"[^A-Za-z0-9_.-]", "_", run.label)


def _save_planes(plane_file: Path, slices: np.ndarray, heat: np.ndarray | None) -> None:
    """A thumbnail's mid-planes of ``slices (S, C, *spatial)``'s first channel and of its map."""
    stored = {f"image{k}": p for k, p in enumerate(report_html.mid_planes(slices[:, 0]))}
    if heat is not None:
        stored.update({f"map{k}": p for k, p in enumerate(report_html.mid_planes(heat))})
    save_arrays(plane_file, {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in stored.items()})


def _save_nifti_maps(run: ReportRun, out: Path, path: str, item: Item, heat: np.ndarray) -> list[str]:
    """The item's NIfTI map under ``out/maps/<run>/``, named after its path in the cohort; the
    files relative to ``out``."""
    name = path.replace("/", "_").replace(" ", "_")
    files = save_item_maps(_maps_dir(out, run), name, item, heat, run.cfg.preprocessing.spacing_mm, png=False)
    return [f.relative_to(out).as_posix() for f in files]


def _maps_with_scores(run: ReportRun, out: Path, maps: str, display: str, source: Source, digest: str,
                      entry: dict[str, Any], items: Sequence[Item], item_scores: Sequence[dict[str, float]],
                      heats: Sequence[np.ndarray]) -> None:
    """Right after scoring, with the maps of the scoring passes: the NIfTI maps due (every item's
    with ``maps="all"``, a flagged one's with ``"flagged"``, recorded in ``entry``) and a flagged
    item's thumbnail planes, so that :func:`_maps_and_planes` makes no map again for them."""
    for index, (item, values, heat) in enumerate(zip(items, item_scores, heats)):
        viewed = run.detector.group_view({name: np.array([value]) for name, value in values.items()}, None)
        path = display + item.label[len(source.label):]
        flagged = run.normative.judge(path, {name: v[0] for name, v in viewed.items()}).flagged
        if flagged:
            _save_planes(run.cache.planes_path(digest, index), item.slices, heat)
        if maps == "all" or (maps == "flagged" and flagged):
            entry.setdefault("maps", {})[str(index)] = _save_nifti_maps(run, out, path, item, heat)


def _maps_and_planes(runs: Sequence[ReportRun], rows: Sequence[_Row], selected: set[str], out: Path, maps: str,
                     cache_dir, progress, console) -> dict[str, dict[str, dict[str, np.ndarray]]]:
    """Write the NIfTI anomaly maps that are due, and return the thumbnails' mid-planes as
    ``{scan id: {run label: {"image": ..., "map": ...}}}`` (cached under the run's fingerprint)."""
    planes: dict[str, dict[str, dict[str, np.ndarray]]] = {}
    cache_root = Path(cache_dir or default_cache_dir())
    localising = [run for run in runs if run.localises]
    plain = [] if localising else runs[:1]
    for run in [*localising, *plain]:
        need_nifti = {row.id for row in rows if run.label in row.results and run.localises
                      and (maps == "all" or (maps == "flagged" and row.results[run.label].flagged))}
        todo = [row for row in rows if run.label in row.results and (row.id in selected or row.id in need_nifti)]
        task = progress.add_task(f"maps ({run.label})" if run.localises else "thumbnails", total=len(todo))
        preprocessed_cache = PreprocessedCache(cache_root, run.adapter.fingerprint)
        arrays_of: dict[str, list[Item]] = {}
        for row in todo:
            index, _ = row.items[run.label]
            entry = run.entries[row.digest]
            plane_file = run.cache.planes_path(row.digest, index)
            done = [f for f in entry.get("maps", {}).get(str(index), []) if (out / f).is_file()]
            want_nifti = row.id in need_nifti and not done
            want_planes = row.id in selected and not plane_file.is_file()
            if want_nifti or want_planes:
                if row.digest not in arrays_of:
                    arrays, reason = preprocess_source(run.adapter, preprocessed_cache, row.source)
                    if reason is not None:  # the scan changed or vanished since it was scored
                        progress.advance(task)
                        continue
                    arrays_of = {row.digest: run.adapter.items(row.source, arrays)}
                slices = arrays_of[row.digest][index].slices
                with torch.inference_mode():
                    heat = run.detector.maps(slices) if run.localises else None
                if want_planes:
                    _save_planes(plane_file, slices, heat)
                if want_nifti and heat is not None:
                    done = _save_nifti_maps(run, out, row.path, arrays_of[row.digest][index], heat)
                    entry.setdefault("maps", {})[str(index)] = done
                    run.cache.save(row.digest, entry)
            if done:
                row.maps[run.label] = done
            if row.id in selected and plane_file.is_file():
                stored = load_arrays(plane_file)
                planes.setdefault(row.id, {})[run.label] = {
                    "image": [stored[k] for k in sorted(stored) if k.startswith("image")],
                    "map": [stored[k] for k in sorted(stored) if k.startswith("map")] or None}
            progress.advance(task)
    return planes


def embed_thumbnails(order: Sequence[str], planes: dict[str, dict[str, dict[str, Any]]], runs: Sequence[ReportRun],
                     budget: int = report_html.THUMBNAIL_BUDGET) -> tuple[dict[str, list[tuple[str, bytes]]], list[str]]:
    """PNG thumbnails per scan id in ``order`` until ``budget`` bytes (base64) are used; the map
    overlay of each run is scaled to the 99th percentile of that run's maps shown here."""
    vmax = {}
    for run in runs:
        values = [m for scan in planes.values() if run.label in scan and scan[run.label]["map"]
                  for m in scan[run.label]["map"]]
        vmax[run.label] = float(np.percentile(np.concatenate([v.ravel() for v in values]), 99)) if values else 1.0
    thumbnails, used, left_out = {}, 0, []
    for scan_id in order:
        if scan_id not in planes:
            continue
        images = []
        for label, entry in planes[scan_id].items():
            caption = f"{label}: anomaly map" if entry["map"] else "mid-plane"
            images.append((caption, report_html.thumbnail_png(entry["image"], entry["map"], vmax[label] or 1.0)))
        size = sum(len(png) * 4 // 3 + 64 for _, png in images)
        if used + size > budget:
            left_out.append(scan_id)
            continue
        used += size
        thumbnails[scan_id] = images
    return thumbnails, left_out


def _figures(report_dict: dict[str, Any], runs: Sequence[ReportRun]) -> dict[str, bytes]:
    figures = {}
    for run in report_dict["runs"]:
        label = run["label"]
        figures[f"dist:{label}"] = report_html.distribution_figure(
            label, run["scorers"], report_dict["reference"][label], run["thresholds"], report_dict["scans"],
            report_dict["group_by"])
        if report_dict["metrics"][label]["groups"]:
            figures[f"roc:{label}"] = report_html.roc_figure(label, report_dict["roc"][label],
                                                             report_dict["metrics"][label])
    return figures


# -- outputs --------------------------------------------------------------------------------------

def score_columns(report_dict: dict[str, Any]) -> list[tuple[str, str, str]]:
    """``(column, description, units)`` of ``scores.csv``, in order."""
    unit = report_dict["unit"]
    columns = [("path", f"the {unit}'s file relative to the cohort", ""),
               ("subject", "subject (BIDS sub entity or the table's subject column)", ""),
               ("session", "session (BIDS ses entity), empty if none", ""),
               ("age_years", "age from the cohort's tables, empty if unknown", "years"),
               ("group", f"evaluation group ({report_dict['group_by']}), empty if unknown", ""),
               ("role", "train: a run trained on this subject; reference: in a run's held-out reference", "")]
    for run in report_dict["runs"]:
        label = run["label"]
        for scorer in run["scorers"]:
            base = f"{label}.{scorer}"
            columns += [(f"{base}.score", f"{run['method']} {scorer} score; higher = more typical", "arbitrary"),
                        (f"{base}.percentile", f"percentage of {label}'s held-out reference scoring at or below it",
                         "percent"),
                        (f"{base}.flag", f"true if below {label}'s {scorer} threshold "
                                         f"{run['thresholds'][scorer]!r} ({100 * run['tpr']:.0f}% TPR)", "")]
        columns.append((f"{label}.flagged", f"{label}'s verdict: the flag of its primary score {run['primary']}", ""))
        columns += [(f"{label}.site_percentile", f"domain shift: percentage of {label}'s held-out reference whose "
                                                  "acquisition is at or below this scan's typicality; empty without "
                                                  "a site model", "percent"),
                    (f"{label}.site_shift", f"true if the scan's acquisition is unlike {label}'s training site", "")]
    return columns


def scores_csv(report_dict: dict[str, Any]) -> str:
    """``scores.csv``: one row per scan; booleans as true/false, unknown values empty."""
    def cell(value):
        if value is None:
            return ""
        if isinstance(value, bool):
            return "true" if value else "false"
        return repr(value) if isinstance(value, float) else str(value)

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([name for name, _, _ in score_columns(report_dict)])
    for scan in report_dict["scans"]:
        row = [scan["path"], scan["subject"], scan["session"], scan["age_years"], scan["group"], scan["role"]]
        for run in report_dict["runs"]:
            result = scan["results"].get(run["label"])
            for scorer in run["scorers"]:
                row += ([result["scores"][scorer], result["percentiles"][scorer], result["flags"][scorer]]
                        if result else [None, None, None])
            row.append(result["flagged"] if result else None)
            site = result.get("site") if result else None
            row += [site["site_percentile"], site["site_shift"]] if site else [None, None]
        writer.writerow([cell(v) for v in row])
    return buffer.getvalue()


def _write_outputs(out: Path, report_dict: dict[str, Any], figures: dict[str, bytes],
                   thumbnails: dict[str, list[tuple[str, bytes]]]) -> None:
    write_text(out / "scores.csv", scores_csv(report_dict))
    write_json(out / "scores.json", {name: {"Description": description, **({"Units": units} if units else {})}
                                     for name, description, units in score_columns(report_dict)})
    write_json(out / "report.json", report_dict)
    write_text(out / "report.html", report_html.render_html(report_dict, figures, thumbnails))
