"""Voxel-level localisation metrics for anomaly maps against lesion masks.

Brain-MRI anomaly segmentation is judged (Baur et al. 2021; Meissen et al. 2021, "Challenging
current semi-supervised anomaly segmentation methods for brain MRI") by, over the evaluated voxels:

* ``auroc``: area under the voxel ROC curve, lesion voxels positive (0.5 = chance, 1 = perfect);
* ``auprc``: average precision (sklearn's step-wise area under the precision-recall curve);
* ``best_dice``: the best possible Dice, ``max over thresholds t of 2 P R / (P + R)`` for the
  segmentation ``map >= t`` (P precision, R recall), with ``best_threshold`` the ``t`` that gives it.

Conventions: a HIGHER map value means MORE atypical; non-zero mask voxels are lesion; an optional
``region`` (usually the brain mask) restricts evaluation to its non-zero voxels. All metrics lie in
[0, 1]. :func:`voxel_metrics` scores one scan, :func:`pooled_voxel_metrics` all voxels of a set of
scans together (one global threshold, as in Meissen et al.), :func:`mean_of_scans` averages
per-scan values. :func:`intensity_baseline_maps` is the intensity-thresholding baseline of
Meissen et al., which beats several deep detectors.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

METRICS = ("auroc", "auprc", "best_dice")
DEFAULT_MAX_VOXELS = 10_000_000  # exact pooled metrics up to here (sklearn sorts ~60 bytes/voxel)
DEFAULT_BINS = 4096
_QUANTILE_SAMPLE = 1_000_000  # map values drawn (over all scans) to place quantile bin edges


def _flat(anomaly_map, mask, region=None) -> tuple[np.ndarray, np.ndarray]:
    """Map values (float64) and lesion labels (bool) of the evaluated voxels, both ``(N,)``."""
    values, labels = np.asarray(anomaly_map), np.asarray(mask)
    if values.shape != labels.shape:
        raise ValueError(f"anomaly_map {values.shape} and mask {labels.shape} differ in shape.")
    if region is None:
        values, labels = values.ravel(), labels.ravel()
    else:
        region = np.asarray(region)
        if region.shape != values.shape:
            raise ValueError(f"region {region.shape} and anomaly_map {values.shape} differ in shape.")
        region = region != 0
        values, labels = values[region], labels[region]
    values = values.astype(np.float64, copy=False)
    if not np.all(np.isfinite(values)):
        raise ValueError(f"anomaly_map has {int(np.sum(~np.isfinite(values)))} non-finite value(s) "
                         "among the evaluated voxels.")
    return values, labels != 0


def _curve_metrics(labels: np.ndarray, values: np.ndarray, weights: np.ndarray | None = None) -> dict:
    """AUROC, AP, best Dice and its threshold from ``(N,)`` labels/values (optional counts)."""
    out = dict.fromkeys(("auroc", "auprc", "best_dice", "best_threshold"), float("nan"))
    if weights is None:
        n_lesion, n_total = float(np.count_nonzero(labels)), float(labels.size)
    else:
        n_lesion, n_total = float(np.sum(weights[labels])), float(np.sum(weights))
    if n_lesion == 0:
        return out
    if n_lesion < n_total:  # ROC needs both classes
        out["auroc"] = float(roc_auc_score(labels, values, sample_weight=weights))
    out["auprc"] = float(average_precision_score(labels, values, sample_weight=weights))
    precision, recall, thresholds = precision_recall_curve(labels, values, sample_weight=weights)
    precision, recall = precision[:-1], recall[:-1]  # the final (P=1, R=0) point has no threshold
    total = precision + recall
    dice = np.divide(2 * precision * recall, total, out=np.zeros_like(total), where=total > 0)
    best = int(np.argmax(dice))
    out["best_dice"], out["best_threshold"] = float(dice[best]), float(thresholds[best])
    return out


def voxel_metrics(anomaly_map, mask, region=None) -> dict:
    """Voxel-level localisation metrics of one scan.

    Parameters
    ----------
    anomaly_map : array-like of float, shape (X, Y, Z)
        Anomaly map, higher = more atypical (any unit; only the ranking and thresholds matter).
        Must be finite inside ``region``.
    mask : array-like of bool or {0, 1}, shape (X, Y, Z)
        Lesion mask; non-zero voxels are lesion (positives).
    region : array-like of bool, shape (X, Y, Z), optional
        Voxels evaluated (usually the brain mask); all voxels when omitted.

    Returns
    -------
    dict
        ``auroc``, ``auprc``, ``best_dice`` (floats in [0, 1]), ``best_threshold`` (map units: the
        best segmentation is ``anomaly_map >= best_threshold``), ``n_voxels`` and ``n_lesion`` (ints:
        evaluated voxels and lesion voxels among them). A scan without lesion voxels in ``region``
        has NaN metrics and threshold (not an exception); one whose evaluated voxels are all lesion
        has a NaN ``auroc`` (the ROC needs both classes).
    """
    values, labels = _flat(anomaly_map, mask, region)
    if values.size == 0:
        raise ValueError("region selects no voxels.")
    return {**_curve_metrics(labels, values), "n_voxels": int(values.size),
            "n_lesion": int(np.count_nonzero(labels))}


def _bin_edges(samples: np.ndarray, lo: float, hi: float, n_bins: int, binning: str) -> np.ndarray:
    """Increasing bin edges ``(B + 1,)`` spanning ``[lo, hi]`` (one edge when the map is constant)."""
    n_quantile = {"quantile": n_bins, "range": 0, "mixed": n_bins // 2}[binning]
    edges = [np.linspace(lo, hi, n_bins - n_quantile + 1)] if n_quantile < n_bins else []
    if n_quantile:
        quantiles = np.quantile(samples, np.linspace(0.0, 1.0, n_quantile + 1))
        quantiles[0], quantiles[-1] = lo, hi
        edges.append(quantiles)
    return np.unique(np.concatenate(edges))


def _bin_index(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Bin ``k`` holds ``edges[k] <= v < edges[k + 1]`` (the last bin is closed); shape ``(N,)``."""
    index = np.searchsorted(edges, values, side="right") - 1
    return np.clip(index, 0, max(edges.size - 2, 0))


def pooled_voxel_metrics(maps: Sequence, masks: Sequence, regions: Sequence | None = None,
                         max_voxels: int = DEFAULT_MAX_VOXELS, n_bins: int = DEFAULT_BINS,
                         binning: str = "mixed", seed: int = 0) -> dict:
    """Voxel-level localisation metrics over all evaluated voxels of many scans together.

    One global threshold serves every scan (best Dice as in Meissen et al. 2021). Up to
    ``max_voxels`` evaluated voxels the metrics are exact (sklearn on the concatenated voxels);
    above it they come from per-bin counts of lesion and non-lesion voxels over ``n_bins`` shared
    bins of the map values, each bin scored at its lower edge (sklearn with the counts as sample
    weights), so the ROC, PR and Dice curves are exact up to the binning (voxels sharing a bin
    count as tied). That path makes two passes over the scans and holds one scan and the ``(B,)``
    counts at a time. ``best_threshold`` is then a bin edge, and ``map >= best_threshold``
    reproduces the binned ``best_dice`` exactly.

    Parameters
    ----------
    maps : sequence of array-like of float, each shape (X_i, Y_i, Z_i)
        Anomaly maps, higher = more atypical, in one shared unit. Read twice when binned.
    masks : sequence of array-like of bool or {0, 1}, shapes as ``maps``
        Lesion masks (non-zero = lesion).
    regions : sequence of array-like of bool, shapes as ``maps``, optional
        Evaluated voxels per scan (the brain); all voxels when omitted.
    max_voxels : int
        Voxel budget of the exact computation; ``0`` always bins.
    n_bins : int
        Number of shared bins when binning (about: coinciding edges merge, e.g. at tied values).
    binning : {"mixed", "quantile", "range"}
        Edges at quantiles of the pooled map values (estimated from a random sample of up to
        1e6 voxels, with the exact minimum and maximum), evenly spaced over their range, or
        (``"mixed"``, the default) the union of ``n_bins // 2`` of each: quantile edges keep
        outliers from squeezing the bulk into a few bins, range edges keep the sparse high tail,
        where lesions and hence AP and Dice live, finely resolved.
    seed : int
        Seed of the quantile sample.

    Returns
    -------
    dict
        As :func:`voxel_metrics` (``n_voxels``/``n_lesion`` summed over scans), plus ``n_scans``
        and ``binned`` (whether the histogram path was used).
    """
    maps, masks = list(maps), list(masks)
    regions = [None] * len(maps) if regions is None else list(regions)
    if not maps or not len(maps) == len(masks) == len(regions):
        raise ValueError(f"need as many maps, masks and regions (at least one); got {len(maps)}, "
                         f"{len(masks)}, {len(regions)}.")
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}.")
    if binning not in ("mixed", "quantile", "range"):
        raise ValueError(f"binning must be 'mixed', 'quantile' or 'range', got {binning!r}.")
    rng = np.random.default_rng(seed)
    per_scan_sample = -(-_QUANTILE_SAMPLE // len(maps))
    kept, samples = [], []
    n_voxels = n_lesion = 0
    lo, hi = np.inf, -np.inf
    for anomaly_map, mask, region in zip(maps, masks, regions):  # pass 1: sizes, range, sample
        values, labels = _flat(anomaly_map, mask, region)
        n_voxels += values.size
        n_lesion += int(np.count_nonzero(labels))
        if values.size == 0:
            continue
        lo, hi = min(lo, float(values.min())), max(hi, float(values.max()))
        if n_voxels <= max_voxels:
            kept.append((values, labels))
        else:
            kept = []
        if binning != "range":
            take = values if values.size <= per_scan_sample else \
                values[rng.integers(0, values.size, per_scan_sample)]
            samples.append(take.astype(np.float32))
    if n_voxels == 0:
        raise ValueError("the regions select no voxels.")
    counts = {"n_voxels": int(n_voxels), "n_lesion": int(n_lesion), "n_scans": len(maps)}
    if n_voxels <= max_voxels:
        labels = np.concatenate([k[1] for k in kept])
        values = np.concatenate([k[0] for k in kept])
        return {**_curve_metrics(labels, values), **counts, "binned": False}
    edges = _bin_edges(np.concatenate(samples) if samples else np.array([lo]), lo, hi, n_bins, binning)
    n_bins_used = max(edges.size - 1, 1)
    lesion_counts = np.zeros(n_bins_used, dtype=np.int64)
    other_counts = np.zeros(n_bins_used, dtype=np.int64)
    for anomaly_map, mask, region in zip(maps, masks, regions):  # pass 2: per-bin counts
        values, labels = _flat(anomaly_map, mask, region)
        index = _bin_index(values, edges)
        lesion_counts += np.bincount(index[labels], minlength=n_bins_used)
        other_counts += np.bincount(index[~labels], minlength=n_bins_used)
    scores = np.concatenate([edges[:n_bins_used], edges[:n_bins_used]])
    labels = np.concatenate([np.ones(n_bins_used, dtype=bool), np.zeros(n_bins_used, dtype=bool)])
    weights = np.concatenate([lesion_counts, other_counts]).astype(np.float64)
    used = weights > 0
    return {**_curve_metrics(labels[used], scores[used], weights[used]), **counts, "binned": True}


def mean_of_scans(per_scan: list[dict]) -> dict:
    """Mean and standard deviation of per-scan metrics over the scans with lesions.

    Parameters
    ----------
    per_scan : list of dict
        :func:`voxel_metrics` results (at least the keys of ``METRICS``; ``n_lesion`` when present
        selects the scans with lesions).

    Returns
    -------
    dict
        For each of ``auroc``, ``auprc``, ``best_dice``: ``{"mean", "sd", "n"}`` over the scans
        with lesions whose value is finite (NaNs skipped; ``sd`` is the sample standard deviation,
        ``ddof=1``, NaN below two scans; ``mean`` NaN with none); plus ``n_scans`` (all scans) and
        ``n_with_lesion``.
    """
    with_lesion = [m for m in per_scan if m.get("n_lesion", 1) > 0]
    out: dict = {"n_scans": len(per_scan), "n_with_lesion": len(with_lesion)}
    for key in METRICS:
        values = np.array([m[key] for m in with_lesion], dtype=np.float64)
        values = values[np.isfinite(values)]
        out[key] = {"mean": float(values.mean()) if values.size else float("nan"),
                    "sd": float(values.std(ddof=1)) if values.size > 1 else float("nan"),
                    "n": int(values.size)}
    return out


def intensity_baseline_maps(volume, region) -> dict[str, np.ndarray]:
    """The intensity-thresholding baseline (Meissen et al. 2021): the image itself as anomaly map.

    Parameters
    ----------
    volume : array-like of float, shape (X, Y, Z)
        Intensities scaled to [0, 1] (e.g. a FLAIR or T2 volume after the preprocessing's
        normalisation); checked inside ``region`` only.
    region : array-like of bool, shape (X, Y, Z)
        Voxels the maps cover (the brain); 0 elsewhere.

    Returns
    -------
    dict
        ``bright``: the intensity inside ``region`` (finds hyperintense lesions, e.g. tumours or
        white-matter lesions in FLAIR); ``dark``: ``1 - intensity`` inside ``region``
        (hypointense lesions, e.g. in T1). Both float32 of shape (X, Y, Z) in [0, 1]. Picking, per
        lesion set, the better of the two polarities with the labels in hand is the baseline's
        BEST case (an optimistic reference, not a blind detector); a fair baseline fixes the
        polarity from the sequence and lesion type beforehand.
    """
    volume, region = np.asarray(volume, dtype=np.float32), np.asarray(region) != 0
    if volume.shape != region.shape:
        raise ValueError(f"volume {volume.shape} and region {region.shape} differ in shape.")
    inside = volume[region]
    if not np.all(np.isfinite(inside)):
        raise ValueError("volume has non-finite values inside region.")
    if inside.size and (inside.min() < -1e-6 or inside.max() > 1 + 1e-6):
        raise ValueError(f"volume must be scaled to [0, 1] inside region; got "
                         f"[{inside.min():.4g}, {inside.max():.4g}].")
    bright = np.where(region, np.clip(volume, 0.0, 1.0), 0.0).astype(np.float32)
    dark = np.where(region, 1.0 - bright, 0.0).astype(np.float32)
    return {"bright": bright, "dark": dark}


def brain_region(volume, level: float = 0.1) -> np.ndarray:
    """The voxels a map is judged on: those whose mean intensity over their 3×3×3 neighbourhood
    (3×3 in 2-D) exceeds ``level`` on the [0, 1] scale — brain tissue and CSF, not background
    (the local mean keeps isolated noise voxels out). ``volume (*spatial)`` -> bool, same shape."""
    from scipy.ndimage import uniform_filter

    return uniform_filter(np.asarray(volume, dtype=np.float32), size=3, mode="constant") > level
