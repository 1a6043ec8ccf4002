import json

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from neuro_ood.data.synthetic import age_deviation, synthesize_t1, write_synthetic_cohort


def _foreground_stats(img, threshold=150.0):
    data = np.asanyarray(img.dataobj).astype(np.float64)
    fg = data[data > threshold]
    volume_mm3 = fg.size * abs(np.linalg.det(img.affine[:3, :3]))
    return volume_mm3, np.percentile(fg, 99) / np.percentile(fg, 50)


@pytest.mark.parametrize("resolution", [2.0, 4.0])
def test_volume_shape_affine(resolution):
    img = synthesize_t1(10.0, np.random.default_rng(0), resolution_mm=resolution)
    data = np.asanyarray(img.dataobj)
    assert data.ndim == 3
    assert data.dtype in (np.int16, np.float32)
    assert np.isfinite(data).all() and data.std() > 0
    np.testing.assert_allclose(img.header.get_zooms(), [resolution] * 3)
    np.testing.assert_allclose(np.sqrt((img.affine[:3, :3] ** 2).sum(axis=0)), [resolution] * 3)
    extent = np.array(data.shape) * resolution
    np.testing.assert_allclose(extent, [198, 234, 190], atol=resolution)
    assert 700 < np.percentile(data[data > 150], 99) < 1100


def test_determinism():
    a = synthesize_t1(4.0, np.random.default_rng(7), resolution_mm=4.0)
    b = synthesize_t1(4.0, np.random.default_rng(7), resolution_mm=4.0)
    c = synthesize_t1(4.0, np.random.default_rng(8), resolution_mm=4.0)
    assert np.array_equal(np.asanyarray(a.dataobj), np.asanyarray(b.dataobj))
    np.testing.assert_array_equal(a.affine, b.affine)
    assert a.shape != c.shape or not np.array_equal(np.asanyarray(a.dataobj), np.asanyarray(c.dataobj))


def test_age_deviation_monotone():
    ages = np.linspace(0.5, 12, 50)
    d = np.array([age_deviation(a) for a in ages])
    assert np.all(np.diff(d) <= 0) and np.all(np.diff(d[ages > 1]) < 0)
    assert age_deviation(1) == pytest.approx(1.0)
    assert all(0.04 <= age_deviation(a) <= 0.12 for a in (9, 10, 11))
    assert age_deviation(6) > 2 * age_deviation(9)


def test_young_brain_smaller_and_less_contrasted():
    stats = {
        age: _foreground_stats(synthesize_t1(age, np.random.default_rng(0), resolution_mm=4.0, nuisance=False))
        for age in (1, 6, 10)
    }
    (v1, c1), (v6, c6), (v10, c10) = stats[1], stats[6], stats[10]
    assert v1 < 0.7 * v10 and v1 < v6 < v10
    assert c1 < c6 < c10
    assert c10 - c1 > 0.15


def test_nuisance_varies_inliers():
    imgs = [synthesize_t1(10.0, np.random.default_rng(i), resolution_mm=4.0, nuisance=False) for i in range(2)]
    canon = [np.asanyarray(nib.as_closest_canonical(im).dataobj) for im in imgs]
    assert np.array_equal(*canon)
    noisy = [nib.as_closest_canonical(synthesize_t1(10.0, np.random.default_rng(i), 4.0)) for i in range(2)]
    assert not np.array_equal(*[np.asanyarray(im.dataobj) for im in noisy])


def test_orientation_and_world_space():
    imgs = [synthesize_t1(10.0, np.random.default_rng(i), resolution_mm=4.0, nuisance=False) for i in range(8)]
    codes = {nib.aff2axcodes(im.affine) for im in imgs}
    assert codes - {("R", "A", "S")} and codes <= {("R", "A", "S"), ("L", "A", "S"), ("L", "P", "S")}
    canon = [nib.as_closest_canonical(im) for im in imgs]
    for im in canon:
        assert nib.aff2axcodes(im.affine) == ("R", "A", "S")
        np.testing.assert_allclose(im.affine, canon[0].affine)
        np.testing.assert_array_equal(np.asanyarray(im.dataobj), np.asanyarray(canon[0].dataobj))
    img = imgs[next(i for i, im in enumerate(imgs) if nib.aff2axcodes(im.affine) != ("R", "A", "S"))]
    data = np.asanyarray(img.dataobj)
    ijk = np.array([10, 20, 30])
    world = nib.affines.apply_affine(img.affine, ijk)
    ijk_canon = np.rint(nib.affines.apply_affine(np.linalg.inv(canon[0].affine), world)).astype(int)
    assert data[tuple(ijk)] == np.asanyarray(canon[0].dataobj)[tuple(ijk_canon)]


def test_write_cohort_bids_layout(tmp_path):
    root = write_synthetic_cohort(tmp_path / "bids", n_inliers=3, ages=(1, 6), per_age=2, seed=3, resolution_mm=4.0)
    assert root == tmp_path / "bids"
    description = json.loads((root / "dataset_description.json").read_text())
    assert description["BIDSVersion"] == "1.8.0" and description["DatasetType"] == "raw"
    sidecar = json.loads((root / "participants.json").read_text())
    assert sidecar["age"]["Units"] == "years" and {"sex", "group"} <= sidecar.keys()

    df = pd.read_csv(root / "participants.tsv", sep="\t")
    assert list(df.columns) == ["participant_id", "age", "sex", "group"]
    assert list(df.participant_id) == [f"sub-{i:04d}" for i in range(1, 8)]
    assert list(df.group) == ["inlier"] * 3 + ["age-1"] * 2 + ["age-6"] * 2
    assert df.age[:3].between(9, 11).all() and list(df.age[3:]) == [1, 1, 6, 6]
    assert set(df.sex) <= {"M", "F"}
    for sub in df.participant_id:
        img = nib.load(root / sub / "anat" / f"{sub}_T1w.nii.gz")
        assert img.ndim == 3

    again = write_synthetic_cohort(tmp_path / "more", n_inliers=4, ages=(1, 6), per_age=2, seed=3, resolution_mm=4.0)
    df2 = pd.read_csv(again / "participants.tsv", sep="\t")
    assert df2.age[:3].tolist() == df.age[:3].tolist()
    first, last = "sub-0001", (df.participant_id.iloc[-1], df2.participant_id.iloc[-1])
    for a, b in [(first, first), last]:
        x = nib.load(root / a / "anat" / f"{a}_T1w.nii.gz").get_fdata()
        y = nib.load(again / b / "anat" / f"{b}_T1w.nii.gz").get_fdata()
        np.testing.assert_array_equal(x, y)
