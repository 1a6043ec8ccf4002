"""The simple baseline's features on hand-made images whose answers are known."""

import numpy as np
import pytest

from neuro_ood.simple_features import (HISTOGRAM_BINS, INTENSITY_FEATURES, OTSU_BINS, feature_names,
                                       foreground_region, otsu_split, otsu_threshold, simple_features)


def two_tissue_box():
    """A 20×24 slice: a 10×12 box (rows 5–14, columns 4–15) of 0.3 (its first 3 rows, 36 voxels, 30 %)
    and 0.8 (84 voxels), a 0.05 background, one isolated bright voxel far from the box."""
    image = np.full((1, 1, 20, 24), 0.05, np.float32)
    image[0, 0, 5:15, 4:16] = 0.8
    image[0, 0, 5:8, 4:16] = 0.3
    image[0, 0, 18, 22] = 0.9          # background noise: not part of the region
    return image


def features_of(x):
    rows = simple_features(x)
    assert rows.shape == (len(x), len(feature_names(x.shape[1], x.ndim - 2))) and rows.dtype == np.float64
    return dict(zip(feature_names(x.shape[1], x.ndim - 2), rows[0]))


def test_two_tissue_box_gives_its_size_extent_quantiles_histogram_and_contrast():
    f = features_of(two_tissue_box())
    assert (f["size"], f["extent_0"], f["extent_1"]) == (120, 10, 12)
    for q in ("q05", "q10", "q25"):
        assert f[q] == pytest.approx(0.3)
    for q in ("q50", "q75", "q90", "q95"):
        assert f[q] == pytest.approx(0.8)
    assert f["mean"] == pytest.approx(0.3 * 0.3 + 0.7 * 0.8)
    assert f["std"] == pytest.approx(np.sqrt(0.3 * 0.35 ** 2 + 0.7 * 0.15 ** 2))
    histogram = np.array([f[f"hist{b:02d}"] for b in range(HISTOGRAM_BINS)])
    expected = np.zeros(HISTOGRAM_BINS)
    expected[4], expected[12] = 0.3, 0.7          # 0.3 in [0.25, 0.3125), 0.8 in [0.75, 0.8125)
    np.testing.assert_allclose(histogram, expected, atol=1e-12)
    assert f["q75_q25_ratio"] == pytest.approx(0.8 / 0.3) and f["q75_q25_diff"] == pytest.approx(0.5)
    assert 0.3 <= f["otsu_threshold"] < 0.8
    assert f["otsu_low_mean"] == pytest.approx(0.3) and f["otsu_high_mean"] == pytest.approx(0.8)
    assert f["otsu_high_fraction"] == pytest.approx(0.7)
    assert f["otsu_contrast"] == pytest.approx(0.5 / 1.1)


def test_enclosed_dark_voxels_belong_to_the_region():
    image = two_tissue_box()
    image[0, 0, 10:12, 8:12] = 0.02            # a 2×4 dark "ventricle" inside the box
    f = features_of(image)
    assert (f["size"], f["extent_0"], f["extent_1"]) == (120, 10, 12)
    assert f["hist00"] == pytest.approx(8 / 120) and f["q05"] == pytest.approx(0.02)
    region = foreground_region(image[0])
    assert region.sum() == 120 and not region[18, 22]


def test_volumes_and_channels():
    volume = np.zeros((2, 2, 6, 8, 10), np.float32)
    volume[0, 0, 1:4, 2:7, 3:5] = 0.5          # a 3×5×2 box seen in channel 0 ...
    volume[0, 1, 1:4, 2:7, 3:5] = 0.25         # ... at half the intensity in channel 1
    names = feature_names(2, 3)
    assert names[:len(INTENSITY_FEATURES)] == tuple(f"c0_{n}" for n in INTENSITY_FEATURES)
    assert names[-4:] == ("size", "extent_0", "extent_1", "extent_2")
    rows = simple_features(volume)
    f, empty = dict(zip(names, rows[0])), rows[1]
    assert (f["size"], f["extent_0"], f["extent_1"], f["extent_2"]) == (30, 3, 5, 2)
    assert f["c0_q50"] == pytest.approx(0.5) and f["c1_q50"] == pytest.approx(0.25)
    assert f["c1_hist04"] == 1.0 and f["c0_otsu_high_fraction"] == 0.0   # one intensity: no split
    assert not empty.any()                                                 # nothing above the threshold


def test_otsu_split_separates_two_intensities():
    values = np.r_[np.full(40, 0.2), np.full(60, 0.7)]
    threshold, low, high, fraction = otsu_split(values)
    assert 0.2 <= threshold < 0.7 and (low, high, fraction) == pytest.approx((0.2, 0.7, 0.6))
    assert otsu_split(np.array([])) == (0.0, 0.0, 0.0, 0.0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_otsu_threshold_is_simpleitks(seed):
    sitk = pytest.importorskip("SimpleITK")
    rng = np.random.default_rng(seed)
    values = np.r_[rng.normal(0.35, 0.06, 700), rng.normal(0.75, 0.08, 400)].clip(0, 1)
    otsu = sitk.OtsuThresholdImageFilter()
    otsu.SetNumberOfHistogramBins(OTSU_BINS)
    otsu.Execute(sitk.GetImageFromArray(values.reshape(1, -1)))
    bin_width = (values.max() - values.min()) / OTSU_BINS
    assert otsu_threshold(values) == pytest.approx(otsu.GetThreshold(), abs=0.01 * bin_width)
