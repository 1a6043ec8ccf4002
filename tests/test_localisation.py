import math

import numpy as np
import pytest

from neuro_ood.localisation import (METRICS, intensity_baseline_maps, mean_of_scans, pooled_voxel_metrics,
                                    voxel_metrics)

# Four voxels (as a 2×2×1 volume), ranked high to low: .8 lesion, .6 normal, .4 lesion, .2 normal.
HAND_MAP = np.array([0.8, 0.6, 0.4, 0.2]).reshape(2, 2, 1)
HAND_MASK = np.array([1, 0, 1, 0]).reshape(2, 2, 1)


def _dice(segmentation: np.ndarray, mask: np.ndarray) -> float:
    return 2 * np.sum(segmentation & mask) / (np.sum(segmentation) + np.sum(mask))


def _structured_scans(n_scans: int, heavy_tail: bool, seed: int = 1):
    """Noise maps with a brighter box-shaped lesion per scan and a per-scan offset, (24, 24, 24)."""
    rng = np.random.default_rng(seed)
    maps, masks = [], []
    for i in range(n_scans):
        mask = np.zeros((24, 24, 24), dtype=bool)
        x, y, z = rng.integers(6, 18, 3)
        mask[x - 3:x + 3, y - 2:y + 3, z - 4:z + 2] = True
        noise = rng.standard_t(2, mask.shape) if heavy_tail else rng.normal(size=mask.shape)
        maps.append(noise + 1.5 * mask + 0.3 * i)
        masks.append(mask)
    return maps, masks


def test_four_voxels_by_hand():
    # AUROC: (lesion, normal) pairs ordered right: (.8,.6) (.8,.2) (.4,.2), wrong: (.4,.6) -> 3/4.
    # AP: precision at each lesion voxel, 1/1 at .8 and 2/3 at .4 -> 5/6.
    # Dice of map >= t: t=.8: 2/3; t=.6: 2/4; t=.4: 4/5; t=.2: 4/6 -> best 0.8 at 0.4.
    m = voxel_metrics(HAND_MAP, HAND_MASK)
    assert set(m) == {*METRICS, "best_threshold", "n_voxels", "n_lesion"}
    assert m["auroc"] == pytest.approx(0.75)
    assert m["auprc"] == pytest.approx(5 / 6)
    assert m["best_dice"] == pytest.approx(0.8)
    assert m["best_threshold"] == pytest.approx(0.4)
    assert (m["n_voxels"], m["n_lesion"]) == (4, 2)


def test_perfect_map_scores_one_and_its_threshold_segments_the_lesion():
    rng = np.random.default_rng(0)
    mask = rng.random((6, 5, 4)) < 0.2
    anomaly = np.where(mask, 2 + rng.random(mask.shape), rng.random(mask.shape))
    m = voxel_metrics(anomaly, mask)
    assert [m[k] for k in METRICS] == pytest.approx([1.0, 1.0, 1.0])
    assert np.array_equal(anomaly >= m["best_threshold"], mask)


def test_constant_map_is_chance():
    mask = np.zeros((5, 4, 2), dtype=bool)
    mask[0, :3] = True  # 6 of 40 voxels: prevalence 0.15
    m = voxel_metrics(np.full(mask.shape, 0.3), mask)
    assert m["auroc"] == pytest.approx(0.5)
    assert m["auprc"] == pytest.approx(0.15)
    assert m["best_dice"] == pytest.approx(2 * 0.15 / 1.15)  # everything segmented
    assert m["best_threshold"] == pytest.approx(0.3)


def test_region_restricts_the_evaluated_voxels():
    # Pad the four hand voxels with voxels outside the region that would spoil the ranking.
    anomaly = np.concatenate([HAND_MAP, np.full((2, 2, 1), 5.0)], axis=2)
    mask = np.concatenate([HAND_MASK, np.zeros((2, 2, 1), dtype=int)], axis=2)
    region = np.zeros(anomaly.shape, dtype=bool)
    region[..., 0] = True
    inside = voxel_metrics(anomaly, mask, region)
    assert inside == voxel_metrics(HAND_MAP, HAND_MASK)
    everywhere = voxel_metrics(anomaly, mask)
    assert everywhere["n_voxels"] == 8 and everywhere["auroc"] < inside["auroc"]


def test_scan_without_lesion_gives_nan_not_an_error():
    rng = np.random.default_rng(0)
    m = voxel_metrics(rng.random((3, 3, 3)), np.zeros((3, 3, 3), dtype=bool))
    assert m["n_lesion"] == 0 and m["n_voxels"] == 27
    assert all(math.isnan(m[k]) for k in (*METRICS, "best_threshold"))
    # lesion voxels outside the evaluated region do not count
    mask, region = np.zeros((3, 3, 3), dtype=bool), np.ones((3, 3, 3), dtype=bool)
    mask[0, 0, 0], region[0, 0, 0] = True, False
    assert math.isnan(voxel_metrics(rng.random((3, 3, 3)), mask, region)["auroc"])


def test_invalid_inputs_raise():
    with pytest.raises(ValueError, match="shape"):
        voxel_metrics(np.zeros((2, 2, 2)), np.zeros((2, 2, 3)))
    with pytest.raises(ValueError, match="non-finite"):
        voxel_metrics(np.full((2, 2, 1), np.nan), HAND_MASK)
    assert voxel_metrics(np.where(HAND_MASK, np.nan, HAND_MAP), HAND_MASK, HAND_MASK == 0)["n_voxels"] == 2
    with pytest.raises(ValueError, match="no voxels"):
        voxel_metrics(HAND_MAP, HAND_MASK, np.zeros((2, 2, 1), dtype=bool))


def test_pooled_of_one_scan_is_the_scan_and_pooling_uses_one_threshold():
    maps, masks = _structured_scans(2, heavy_tail=False)
    single = pooled_voxel_metrics(maps[:1], masks[:1])
    assert single.pop("binned") is False and single.pop("n_scans") == 1
    assert single == voxel_metrics(maps[0], masks[0])
    pooled = pooled_voxel_metrics(maps, masks)
    together = voxel_metrics(np.concatenate(maps), np.concatenate(masks))
    assert {k: pooled[k] for k in together} == together
    regions = [np.ones(m.shape, dtype=bool) for m in maps]
    regions[1][:12] = False
    restricted = pooled_voxel_metrics(maps, masks, regions)
    assert restricted["n_voxels"] == 2 * 24 ** 3 - 12 * 24 * 24
    assert restricted == pooled_voxel_metrics([maps[0], maps[1][12:]], [masks[0], masks[1][12:]])


@pytest.mark.parametrize("heavy_tail", [False, True])
def test_binned_pooled_agrees_with_exact(heavy_tail):
    maps, masks = _structured_scans(8, heavy_tail)
    exact = pooled_voxel_metrics(maps, masks)
    binned = pooled_voxel_metrics(maps, masks, max_voxels=24 ** 3)  # over budget -> histograms
    assert exact["binned"] is False and binned["binned"] is True
    assert (binned["n_voxels"], binned["n_lesion"]) == (exact["n_voxels"], exact["n_lesion"])
    for key in METRICS:
        assert binned[key] == pytest.approx(exact[key], abs=1e-3), key
    # the binned best threshold is a bin edge whose segmentation has exactly the binned Dice
    segmentation = np.concatenate(maps) >= binned["best_threshold"]
    assert _dice(segmentation, np.concatenate(masks)) == pytest.approx(binned["best_dice"], rel=1e-9)


@pytest.mark.parametrize("binning", ["quantile", "range"])
def test_other_binnings_also_agree(binning):
    # Looser than the default "mixed" binning: on a set this small (~13 voxels per quantile bin)
    # pure quantile bins are coarse in the sparse high tail where AP is decided.
    maps, masks = _structured_scans(4, heavy_tail=False, seed=2)
    exact = pooled_voxel_metrics(maps, masks)
    binned = pooled_voxel_metrics(maps, masks, max_voxels=0, binning=binning)
    for key in METRICS:
        assert binned[key] == pytest.approx(exact[key], abs=1e-2), key
    with pytest.raises(ValueError, match="binning"):
        pooled_voxel_metrics(maps, masks, max_voxels=0, binning="log")


def test_mean_of_scans_skips_lesion_free_scans_and_nans():
    per_scan = [{"auroc": 0.6, "auprc": 0.2, "best_dice": 0.1, "n_lesion": 5},
                {"auroc": 0.8, "auprc": 0.4, "best_dice": float("nan"), "n_lesion": 3},
                {"auroc": 0.1, "auprc": 0.1, "best_dice": 0.1, "n_lesion": 0},  # ignored: no lesion
                voxel_metrics(HAND_MAP, np.zeros_like(HAND_MASK))]
    summary = mean_of_scans(per_scan)
    assert (summary["n_scans"], summary["n_with_lesion"]) == (4, 2)
    assert summary["auroc"]["mean"] == pytest.approx(0.7)
    assert summary["auroc"]["sd"] == pytest.approx(math.sqrt(0.02))  # sample sd of .6, .8
    assert summary["auroc"]["n"] == 2
    assert summary["best_dice"]["mean"] == pytest.approx(0.1)
    assert summary["best_dice"]["n"] == 1 and math.isnan(summary["best_dice"]["sd"])
    assert math.isnan(mean_of_scans([])["auprc"]["mean"])


def test_intensity_baseline_polarities():
    rng = np.random.default_rng(0)
    volume = 0.4 + 0.1 * rng.random((8, 8, 8))
    region = np.zeros(volume.shape, dtype=bool)
    region[1:7, 1:7, 1:7] = True
    bright_lesion = np.zeros(volume.shape, dtype=bool)
    bright_lesion[2:4, 2:4, 2:4] = True
    dark_lesion = np.zeros(volume.shape, dtype=bool)
    dark_lesion[4:6, 4:6, 4:6] = True
    volume[bright_lesion], volume[dark_lesion] = 0.9, 0.1
    volume[~region] = 7.0  # outside the region: ignored, even out of range
    maps = intensity_baseline_maps(volume, region)
    assert set(maps) == {"bright", "dark"}
    assert maps["bright"].dtype == np.float32 and maps["bright"].shape == volume.shape
    assert np.allclose(maps["bright"][region], volume[region])
    assert np.allclose(maps["dark"][region], 1 - volume[region])
    assert not maps["bright"][~region].any() and not maps["dark"][~region].any()
    assert voxel_metrics(maps["bright"], bright_lesion, region)["auroc"] == 1.0
    assert voxel_metrics(maps["dark"], bright_lesion, region)["auroc"] == 0.0
    assert voxel_metrics(maps["dark"], dark_lesion, region)["best_dice"] == 1.0
    volume[region] *= 2
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        intensity_baseline_maps(volume, region)
