"""Steps shared by the pipelines: preprocess sources into items, score items with a detector, show
a detector's progress on the console."""

from __future__ import annotations

import multiprocessing
from collections import deque
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from neuro_ood.errors import CohortError, ScanError
from neuro_ood.preprocessing.cache import PreprocessedCache, default_cache_dir
from neuro_ood.pipelines.datasets import Item, Source, dataset_adapter

@contextmanager
def progress_bar(console: Console | None, *extra_columns) -> Iterator[Progress]:
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    with Progress(*columns, *extra_columns, console=console or Console(stderr=True),
                  disable=console is not None and console.quiet) as progress:
        yield progress


class ConsoleProgress:
    """A detector's ``progress(stage, done, total, loss)`` callback drawn as rich progress bars, one
    per stage (with the training loss where the stage has one); use as a context manager."""

    def __init__(self, console: Console | None):
        self.console = console
        self.tasks: dict[str, int] = {}

    def __enter__(self) -> "ConsoleProgress":
        self._bars = progress_bar(self.console, TextColumn("{task.fields[loss]}"))
        self.progress = self._bars.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._bars.__exit__(*exc)

    def __call__(self, stage: str, done: int, total: int, loss: float) -> None:
        shown = "" if loss != loss else f"loss {loss:.3g}"  # NaN: a stage without a loss
        if stage not in self.tasks:
            self.tasks[stage] = self.progress.add_task(stage, total=total, loss=shown)
        self.progress.update(self.tasks[stage], completed=done, total=total, loss=shown)


@dataclass
class PreparedItems:
    """Items of the sources that preprocessed cleanly, and ``(label, reason)`` of those that failed."""

    items: list[Item] = field(default_factory=list)
    failures: list[tuple[str, str]] = field(default_factory=list)


def prepare_items(adapter, sources: Sequence[Source], cache_dir: str | Path | None = None,
                  console: Console | None = None, description: str = "preprocessing") -> PreparedItems:
    """Preprocess each source through the on-disk cache (``cache_dir``, default
    :func:`default_cache_dir`) and cut it into items; a bad source is recorded and the rest go on."""
    cache = PreprocessedCache(cache_dir or default_cache_dir(), adapter.fingerprint)
    prepared = PreparedItems()
    with progress_bar(console) as progress:
        for source in progress.track(sources, description=description):
            arrays, reason = preprocess_source(adapter, cache, source)
            if reason is not None:
                prepared.failures.append((source.label, reason))
            else:
                prepared.items.extend(adapter.items(source, arrays))
    return prepared


def preprocess_source(adapter, cache: PreprocessedCache, source: Source) -> tuple[dict[str, np.ndarray] | None, str | None]:
    """``(arrays, None)`` of one source through ``cache``, or ``(None, reason)`` when it cannot be used."""
    try:
        return cache.get_or_compute(source.paths, lambda: adapter.preprocess(source),
                                    getattr(adapter, "cached_arrays", ())), None
    except (ScanError, CohortError) as err:
        return None, err.reason if isinstance(err, ScanError) else str(err)
    except FileNotFoundError:
        return None, "file not found"
    except IsADirectoryError:
        return None, "a folder, not a scan file"
    except OSError as err:
        return None, f"cannot read ({err.strerror or err})"


_WORKER: dict[str, Any] = {}


def _init_worker(cfg, cache_root: str) -> None:
    import signal

    import torch

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the main process, which ends the pool
    torch.set_num_threads(1)
    adapter = dataset_adapter(cfg)
    _WORKER.update(adapter=adapter, cache=PreprocessedCache(cache_root, adapter.fingerprint))


def _preprocess_in_worker(source: Source):
    return preprocess_source(_WORKER["adapter"], _WORKER["cache"], source)


def default_workers(cfg) -> int:
    """How scans are preprocessed by default (:class:`PreprocessStream`'s ``workers``): ahead in a
    background thread (1) for slice models, where preprocessing takes longer than the network
    (2-D ``score`` end to end 1.36x faster on 2 cores, benchmarks/scoring.py); in turn (0) for
    whole-volume models, where the network and its voxel search keep both cores busy and a
    preprocessing thread beside them only slows them (``report`` of 34 volumes on 2 cores: scoring
    62-66 s in turn, 179 s beside the thread, 87-106 s with that thread's torch limited to one
    thread, which in turn takes the 2-D gain away)."""
    return 0 if cfg.preprocessing.preset == "t1_volume" else 1


class PreprocessStream:
    """``(source, arrays, reason)`` per source of ``sources``, in order, when iterated, through the
    preprocessing cache of ``cfg``'s ``adapter``.

    With ``workers`` >= 1 each source is preprocessed before the consumer asks for it (up to
    ``ahead`` sources per worker in flight), so that preprocessing overlaps what the consumer does
    meanwhile (the network): ``workers`` = 1 in one background thread (file reading, resampling and
    torch release the GIL for their heavy parts), more in that many processes (each starts by
    importing the libraries, a few seconds: worth it for large cohorts). ``workers`` = 0: in the
    consumer's thread, in turn with it. ``None``: :func:`default_workers`. :meth:`close` (or
    leaving the iteration) ends the workers.
    """

    def __init__(self, cfg, adapter, sources: Sequence[Source], cache_dir: str | Path | None,
                 workers: int | None = None, ahead: int = 2):
        workers = default_workers(cfg) if workers is None else workers
        self.sources, self.workers, self.ahead = list(sources), max(0, workers), max(1, ahead)
        cache_root = Path(cache_dir or default_cache_dir())
        self._queue: deque = deque()
        self._pool = None
        if self.workers == 0:
            cache = PreprocessedCache(cache_root, adapter.fingerprint)
            self._compute = lambda source: preprocess_source(adapter, cache, source)
        elif self.workers == 1:
            cache = PreprocessedCache(cache_root, adapter.fingerprint)
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="neuro-ood-preprocess")
            self._submit = lambda source: self._pool.submit(preprocess_source, adapter, cache, source)
        else:
            self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_init_worker, initargs=(cfg, str(cache_root)))
            self._submit = lambda source: self._pool.submit(_preprocess_in_worker, source)

    def __iter__(self) -> Iterator[tuple[Source, dict[str, np.ndarray] | None, str | None]]:
        if self._pool is None:
            for source in self.sources:
                yield (source, *self._compute(source))
            return
        try:
            for source in self.sources:
                self._queue.append((source, self._submit(source)))
                if len(self._queue) >= self.ahead * self.workers:
                    yield self._next()
            while self._queue:
                yield self._next()
        finally:
            self.close()

    def _next(self) -> tuple[Source, dict[str, np.ndarray] | None, str | None]:
        source, future = self._queue.popleft()
        return (source, *future.result())

    def next_is_ready(self) -> bool:
        """Whether the next source is preprocessed already (so taking it costs no wait). Always
        true in turn (``workers`` = 0), where nothing runs meanwhile."""
        return self._pool is None or not self._queue or self._queue[0][1].done()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)


def batched(fn: Callable[[np.ndarray], dict[str, np.ndarray]], images: np.ndarray, chunk: int = 64,
            console: Console | None = None, description: str = "scoring") -> dict[str, np.ndarray]:
    """``fn`` over ``images (N, C, H, W)`` in chunks of ``chunk`` with a progress bar; its outputs
    (each with N rows in all) concatenated."""
    parts: list[dict[str, np.ndarray]] = []
    with progress_bar(console) as progress:
        task = progress.add_task(description, total=len(images))
        for start in range(0, len(images), chunk):
            parts.append(fn(images[start:start + chunk]))
            progress.advance(task, min(chunk, len(images) - start))
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]} if parts else {}


MapsCallback = Callable[[int, np.ndarray, dict], None]


class _MapsByItem:
    """Collects chunks of slice maps and hands each item's maps to ``on_maps(index, heat, parts)``
    as soon as all its slices are in: ``heat (S_item, *spatial)``, ``parts {name: (S_item, *spatial)}``."""

    def __init__(self, slice_counts: Sequence[int], on_maps: MapsCallback):
        self.counts, self.on_maps, self.next = list(slice_counts), on_maps, 0
        self.heat: list[np.ndarray] = []
        self.parts: dict[str, list[np.ndarray]] = {}

    def add(self, heat: np.ndarray, parts: dict[str, np.ndarray]) -> None:
        self.heat.append(heat)
        for name, values in parts.items():
            self.parts.setdefault(name, []).append(values)
        held = np.concatenate(self.heat)
        held_parts = {name: np.concatenate(values) for name, values in self.parts.items()}
        while self.next < len(self.counts) and len(held) >= self.counts[self.next]:
            n = self.counts[self.next]
            self.on_maps(self.next, held[:n], {name: values[:n] for name, values in held_parts.items()})
            held, held_parts = held[n:], {name: values[n:] for name, values in held_parts.items()}
            self.next += 1
        self.heat, self.parts = [held], {name: [values] for name, values in held_parts.items()}


def score_items(detector, items: Sequence[Item], chunk: int | None = None, console: Console | None = None,
                description: str = "scoring", slices: dict | None = None, on_maps: MapsCallback | None = None,
                components: bool = False) -> dict[str, np.ndarray]:
    """Each of the detector's scores per item: the mean of the item's slice scores.

    The slices of all ``items`` go to the detector together, ``chunk`` at a time (default: the
    run's ``score.batch_slices``), under ``torch.inference_mode()``.

    Slice scores are log-densities or negative distances (higher = more typical); for a density
    their mean is the average per-slice log-likelihood with slices taken as independent, which
    ranks items like the sum while staying on the per-slice scale. Pass a dict as ``slices`` to
    also get the slice scores themselves: it receives ``{name: (S_total,)}`` in item order.

    With ``on_maps`` (a localising detector), the maps come from the same network passes as the
    scores (:meth:`~neuro_ood.detectors.base.Detector.score_and_maps`, with ``components`` the
    parts of the map too): ``on_maps(index, heat (S_item, *spatial), parts)`` is called for each
    item, in order, once its slices are scored, so only about a chunk's maps are held at a time.
    """
    import torch

    if not items:
        return {}
    chunk = chunk or detector.cfg.score.batch_slices
    fn = detector.score_samples
    if on_maps is not None:
        collected = _MapsByItem([len(item.slices) for item in items], on_maps)

        def fn(part: np.ndarray) -> dict[str, np.ndarray]:
            scores, heat, parts = detector.score_and_maps(part, components)
            collected.add(heat, parts)
            return scores
    with torch.inference_mode():
        slice_scores = batched(fn, np.concatenate([item.slices for item in items]), chunk, console, description)
    if slices is not None:
        slices.update(slice_scores)
    bounds = np.cumsum([len(item.slices) for item in items])[:-1]
    return {name: np.array([s.mean() for s in np.split(values, bounds)]) for name, values in slice_scores.items()}


@dataclass
class ScoredItems:
    """What :func:`score_sources` gives: the kept items in source order, their slices dropped once
    scored (``slices`` of shape ``(S, 0)`` keep the count); per item each score ``{name: (N,)}``;
    per slice ``{name: (S_total,)}`` in item order; ``(label, reason)`` of the sources that failed."""

    items: list[Item] = field(default_factory=list)
    scores: dict[str, np.ndarray] = field(default_factory=dict)
    slice_scores: dict[str, np.ndarray] = field(default_factory=dict)
    failures: list[tuple[str, str]] = field(default_factory=list)


ItemMapsCallback = Callable[[Item, np.ndarray, dict], None]


def score_sources(detector, cfg, adapter, sources: Sequence[Source], cache_dir: str | Path | None = None,
                  console: Console | None = None, description: str = "preprocess + score",
                  workers: int | None = None,
                  keep: Callable[[Item], bool] | None = None, on_maps: ItemMapsCallback | None = None,
                  components: bool = False) -> ScoredItems:
    """Preprocess ``sources`` and score their items (those ``keep`` accepts) with ``detector``,
    streaming: a :class:`PreprocessStream` of ``workers`` runs ahead, and the network takes what is
    ready, at most ``cfg.score.batch_slices`` slices a call (:func:`score_items`), so memory holds
    about a chunk of items, not the cohort. With ``on_maps``, ``on_maps(item, heat (S, *spatial),
    parts)`` is called for each kept item with its maps from the scoring passes, while its slices
    are still there."""
    out = ScoredItems()
    pending: list[Item] = []
    scores: list[dict[str, np.ndarray]] = []
    slice_scores: list[dict[str, np.ndarray]] = []
    quiet = Console(quiet=True)

    def score_pending() -> None:
        chunk_slices: dict[str, np.ndarray] = {}
        callback = None if on_maps is None else (lambda index, heat, parts: on_maps(pending[index], heat, parts))
        scores.append(score_items(detector, pending, console=quiet, slices=chunk_slices, on_maps=callback,
                                  components=components))
        slice_scores.append(chunk_slices)
        out.items.extend(Item(**{**vars(item), "slices": np.empty((len(item.slices), 0), np.float32)})
                         for item in pending)
        pending.clear()

    with progress_bar(console) as progress:
        task = progress.add_task(description, total=len(sources))
        stream = PreprocessStream(cfg, adapter, sources, cache_dir, workers)
        try:
            for source, arrays, reason in stream:
                if reason is not None:
                    out.failures.append((source.label, reason))
                else:
                    pending.extend(item for item in adapter.items(source, arrays) if keep is None or keep(item))
                # score as soon as the network would otherwise wait for preprocessing
                if pending and (sum(len(item.slices) for item in pending) >= cfg.score.batch_slices
                                or not stream.next_is_ready()):
                    score_pending()
                progress.advance(task)
            if pending:
                score_pending()
        finally:
            stream.close()
    if scores:
        out.scores = {name: np.concatenate([part[name] for part in scores]) for name in scores[0]}
        out.slice_scores = {name: np.concatenate([part[name] for part in slice_scores]) for name in slice_scores[0]}
    return out


def save_item_maps(out_dir: Path, name: str, item: Item, heat: np.ndarray, spacing_mm: Sequence[float],
                   png: bool = True, unit: str = "") -> list[Path]:
    """One item's anomaly map files: for a whole volume (``item.box_to_scan`` set) the map on the
    scan's own grid, on the model's box and as three planes (:func:`~neuro_ood.report.save_volume_maps`);
    for slices the slice maps (:func:`~neuro_ood.report.save_anomaly_maps`). ``heat``: the detector's
    ``maps`` of ``item.slices``; ``unit``: what its values measure (the detector's ``map_unit``)."""
    from neuro_ood.data.nifti import scan_geometry
    from neuro_ood.report import save_anomaly_maps, save_volume_maps

    if item.box_to_scan is None:
        return save_anomaly_maps(out_dir, name, item.slices, heat, spacing_mm, png=png)
    shape, affine = scan_geometry(item.label)
    return save_volume_maps(out_dir, name, item.slices[0, 0], heat[0], item.box_to_scan, shape, affine,
                            spacing_mm, png=png, unit=unit)
