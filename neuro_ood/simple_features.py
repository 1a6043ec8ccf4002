"""Hand-crafted intensity and morphometric features of an image: what the simple baseline sees.

The features are computed on the same preprocessed input every detector gets, ``x (N, C, *spatial)``
float32 in [0, 1] (2-D slices ``(N, C, H, W)`` or 3-D volumes ``(N, C, D, H, W)`` alike); nothing
here knows of MRI files, spacings or ages. Per row:

1. **The foreground region** (shared by the channels): voxels whose largest channel value is above
   :data:`FOREGROUND_THRESHOLD` (0.1 of the [0, 1] range — the preprocessing's own head-crop
   threshold, ``preprocessing.foreground_fraction``, at its default), reduced to its largest
   connected component (face connectivity; drops isolated background-noise voxels) with the holes
   filled (dark regions enclosed by it, e.g. ventricles, belong to it). Connected components and
   hole filling are :func:`scipy.ndimage.label` and :func:`scipy.ndimage.binary_fill_holes`.
2. **Per channel, intensities inside the region** (:data:`INTENSITY_FEATURES`): the quantiles
   :data:`QUANTILES` (%), mean and standard deviation, a :data:`HISTOGRAM_BINS`-bin histogram over
   [0, 1] normalised to fractions of the region, and tissue-contrast estimates: the 75th/25th
   quantile ratio and difference, and a two-class Otsu split of the region's intensities (Otsu's
   criterion on a 128-bin histogram between the region's minimum and maximum, as SimpleITK's
   ``OtsuThresholdImageFilter`` computes it — in numpy here, as that filter costs milliseconds a call and
   scikit-image is no dependency; ``tests/test_simple_features.py`` checks the two agree): its
   threshold, the mean of each class, the fraction of the region in the brighter class and the
   Michelson contrast ``(high − low) / (high + low)`` of the two class means.
3. **Shape** (:func:`shape_feature_names`): the region's size (voxel count) and its bounding-box
   extent (voxels) along each spatial axis, in the order of the array's axes.

An empty region (nothing above the threshold) gives zeros throughout. :func:`feature_names` names
the entries of :func:`simple_features`' rows, ``(C × len(INTENSITY_FEATURES) + 1 + spatial dims,)``.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

#: Foreground: the largest channel value above this (after the preprocessing's [0, 1] scaling).
FOREGROUND_THRESHOLD = 0.1
#: Intensity quantiles (%) of the foreground, per channel.
QUANTILES = (5, 10, 25, 50, 75, 90, 95)
#: Bins of the per-channel foreground histogram over [0, 1] (fractions of the foreground, sum 1).
HISTOGRAM_BINS = 16
#: Histogram bins of the Otsu threshold search (SimpleITK's default).
OTSU_BINS = 128

#: Names of the per-channel intensity entries, in order (prefixed ``c<k>_`` when C > 1).
INTENSITY_FEATURES = (
    *(f"q{q:02d}" for q in QUANTILES),            # foreground intensity quantiles, [0, 1]
    "mean", "std",                                # foreground intensity mean and standard deviation
    *(f"hist{b:02d}" for b in range(HISTOGRAM_BINS)),  # fraction of the foreground in bin b of [0, 1]
    "q75_q25_ratio", "q75_q25_diff",              # inter-quartile contrast (ratio 0 if q25 is 0)
    "otsu_threshold",                             # two-class Otsu split of the foreground intensities
    "otsu_low_mean", "otsu_high_mean",            # mean intensity of the darker / brighter class
    "otsu_high_fraction",                         # fraction of the foreground in the brighter class
    "otsu_contrast",                              # (high − low) / (high + low) of the class means
)


def shape_feature_names(spatial_dims: int) -> tuple[str, ...]:
    """``("size", "extent_0", …)``: foreground voxel count and bounding-box extent (voxels) per axis."""
    return ("size", *(f"extent_{axis}" for axis in range(spatial_dims)))


def feature_names(channels: int, spatial_dims: int) -> tuple[str, ...]:
    """Names of the entries of a :func:`simple_features` row for ``(C, *spatial)`` inputs: the
    intensity entries of each channel in turn, then the shape entries."""
    per_channel = (INTENSITY_FEATURES if channels == 1 else
                   tuple(f"c{c}_{name}" for c in range(channels) for name in INTENSITY_FEATURES))
    return (*per_channel, *shape_feature_names(spatial_dims))


def foreground_region(image: np.ndarray, threshold: float = FOREGROUND_THRESHOLD) -> np.ndarray:
    """``image (C, *spatial)`` -> boolean ``(*spatial)``: the largest connected component of the voxels
    whose largest channel value is above ``threshold``, holes filled (see the module docstring)."""
    above = np.asarray(image).max(axis=0) > threshold
    labels, count = ndimage.label(above)
    if count == 0:
        return above
    sizes = np.bincount(labels.ravel())[1:]
    return ndimage.binary_fill_holes(labels == 1 + int(np.argmax(sizes)))


def otsu_threshold(values: np.ndarray, bins: int = OTSU_BINS) -> float:
    """Otsu's threshold of ``values`` (at least two distinct): of ``bins`` equal bins between their
    minimum and maximum, the upper edge of the last bin of the darker class, the classes chosen to
    maximise the between-class variance ``w0 w1 (μ0 − μ1)²`` of the bin centres (the first maximum).
    SimpleITK's ``OtsuThresholdImageFilter`` with ``bins`` histogram bins splits alike (its threshold
    within 1 % of a bin: its histogram reaches slightly past the maximum; near-ties aside)."""
    counts, edges = np.histogram(values, bins=bins, range=(float(values.min()), float(values.max())))
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(counts)[:-1].astype(np.float64)
    w1 = counts.sum() - w0
    s0 = np.cumsum(counts * centres)[:-1]
    s1 = (counts * centres).sum() - s0
    with np.errstate(divide="ignore", invalid="ignore"):
        between = np.where((w0 > 0) & (w1 > 0), w0 * w1 * (s0 / w0 - s1 / w1) ** 2, -1.0)
    return float(edges[int(np.argmax(between)) + 1])


def otsu_split(values: np.ndarray) -> tuple[float, float, float, float]:
    """``(threshold, low mean, high mean, high fraction)`` of a two-class Otsu split of ``values``
    (:func:`otsu_threshold`); the brighter class is ``values > threshold``. Fewer than two distinct
    values: no split (threshold = low mean = high mean = the value, fraction 0)."""
    values = np.asarray(values, dtype=np.float64).ravel()
    if values.size == 0:
        return 0.0, 0.0, 0.0, 0.0
    if values.min() == values.max():
        return float(values[0]), float(values[0]), float(values[0]), 0.0
    threshold = otsu_threshold(values)
    high = values > threshold
    return threshold, float(values[~high].mean()), float(values[high].mean()), float(high.mean())


def _intensity_features(values: np.ndarray) -> list[float]:
    if values.size == 0:
        return [0.0] * len(INTENSITY_FEATURES)
    quantiles = np.percentile(values, QUANTILES)
    q25, q75 = quantiles[QUANTILES.index(25)], quantiles[QUANTILES.index(75)]
    histogram = np.histogram(np.clip(values, 0.0, 1.0), bins=HISTOGRAM_BINS, range=(0.0, 1.0))[0] / values.size
    threshold, low, high, fraction = otsu_split(values)
    return [*quantiles, values.mean(), values.std(), *histogram,
            q75 / q25 if q25 > 0 else 0.0, q75 - q25,
            threshold, low, high, fraction, (high - low) / (high + low) if high + low > 0 else 0.0]


def image_features(image: np.ndarray, threshold: float = FOREGROUND_THRESHOLD) -> np.ndarray:
    """One image ``(C, *spatial)`` -> float64 ``(F,)`` named by :func:`feature_names`."""
    image = np.asarray(image, dtype=np.float64)
    region = foreground_region(image, threshold)
    row = [v for channel in image for v in _intensity_features(channel[region])]
    if region.any():
        extents = []
        for axis in range(region.ndim):
            occupied = np.flatnonzero(region.any(axis=tuple(a for a in range(region.ndim) if a != axis)))
            extents.append(int(occupied[-1] - occupied[0]) + 1)
    else:
        extents = [0] * region.ndim
    return np.array([*row, float(region.sum()), *extents], dtype=np.float64)


def simple_features(x: np.ndarray, threshold: float = FOREGROUND_THRESHOLD) -> np.ndarray:
    """``x (N, C, *spatial)`` in [0, 1] -> float64 ``(N, F)``, one :func:`image_features` row per image,
    ``F = C × len(INTENSITY_FEATURES) + 1 + len(spatial)``."""
    x = np.asarray(x)
    if x.ndim < 3:
        raise ValueError(f"expected images (N, C, *spatial), got shape {x.shape}")
    width = len(feature_names(x.shape[1], x.ndim - 2))
    return np.stack([image_features(image, threshold) for image in x]) if len(x) else np.zeros((0, width))
