"""Synthetic lesions: geometry, intensity, grids and orientations, the cohort's BIDS derivative, the CLI."""

import json

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

from neuro_ood.config import DataConfig, ExperimentConfig
from neuro_ood.data.cohort import load_cohort, read_bids_cohort, select_inliers
from neuro_ood.data.lesions import LesionSpec, draw_lesions, render_lesion
from neuro_ood.data.synthetic import (_templates, synthesize_t1, synthesize_t1_with_lesions,
                                      write_synthetic_cohort)
from tests.conftest import invoke


def _tissue_4mm():
    """The MNI152 CSF/GM/WM maps subsampled to 4 mm ``(3, 50, 59, 48)`` and their affine."""
    tissue, affine, _, _ = _templates()
    return tissue[:, ::2, ::2, ::2], affine @ np.diag([2.0, 2.0, 2.0, 1.0])


def _reach_mm(spec):
    """Largest distance of a voxel the lesion may touch from its centre."""
    return spec.radius_mm * max(spec.axes) * np.exp(2.5 * spec.roughness) + 4.0


def test_sphere_volume_soft_edge_and_blob_outline():
    affine = np.eye(4)
    affine[:3, 3] = -20
    sphere = LesionSpec("ellipsoid", "hyper", 10.0, (0.0, 0.0, 0.0))
    soft = render_lesion(sphere, (41, 41, 41), affine)
    assert soft.dtype == np.float32 and soft.min() == 0 and soft.max() == 1
    assert (soft > 0.5).sum() == pytest.approx(4 / 3 * np.pi * 1000, rel=0.03)
    edge = (soft > 0) & (soft < 1)
    radius = np.linalg.norm(np.argwhere(edge) - 20, axis=1)
    assert radius.min() > 8.9 and radius.max() < 11.1  # the ramp is about one voxel wide
    blob = LesionSpec("blob", "hypo", 10.0, (0.0, 0.0, 0.0), roughness=0.3, seed=5)
    blob_mask = render_lesion(blob, (41, 41, 41), affine) > 0.5
    assert np.array_equal(blob_mask, render_lesion(blob, (41, 41, 41), affine) > 0.5)
    assert (blob_mask != (soft > 0.5)).sum() > 500  # an irregular outline, not the sphere
    with pytest.raises(ValueError, match="polarity"):
        LesionSpec("ellipsoid", "mixed", 5.0, (0.0, 0.0, 0.0))


def test_drawn_lesions_lie_in_the_brain_and_vary_in_size():
    tissue, affine = _tissue_4mm()
    parenchyma = tissue[1] + tissue[2]
    specs, volumes = [], []
    for seed in range(8):
        lesions = draw_lesions(np.random.default_rng(seed), tissue, affine, polarity="hyper")
        assert 1 <= len(lesions.specs) <= 3 and lesions.polarity == "hyper"
        assert lesions.parts.shape == (len(lesions.specs), *tissue.shape[1:])
        soft = lesions.soft
        assert soft.min() >= 0 and soft.max() <= 1 and np.array_equal(lesions.binary, soft > 0.5)
        assert lesions.binary.any() and (parenchyma[lesions.binary] > 0.5).all()
        for spec in lesions.specs:
            ijk = tuple(np.rint(nib.affines.apply_affine(np.linalg.inv(affine), spec.centre_mm)).astype(int))
            assert parenchyma[ijk] > 0.8 and lesions.binary[ijk]
            assert 3.0 <= spec.radius_mm <= 15.0 and 1.3 <= spec.level <= 1.6
        specs += lesions.specs
        volumes.append(lesions.binary.sum())
    radii = [s.radius_mm for s in specs]
    assert max(radii) > 2.5 * min(radii) and max(volumes) > 4 * min(volumes)
    assert {s.shape for s in specs} == {"ellipsoid", "blob"}
    mixed = [draw_lesions(np.random.default_rng(s), tissue, affine, "mixed", count=3) for s in range(4)]
    assert {s.polarity for m in mixed for s in m.specs} == {"hyper", "hypo"}
    assert {s.polarity for s in draw_lesions(np.random.default_rng(0), tissue, affine, "hypo", 3).specs} == {"hypo"}
    with pytest.raises(ValueError, match="polarity"):
        draw_lesions(np.random.default_rng(0), tissue, affine, polarity="bright")


def test_mask_shares_grid_and_noise_with_the_image_in_every_orientation():
    seen = set()
    for seed in (11, 1, 0, 3):  # RAS, LAS, LPS, LPS
        img, mask, specs = synthesize_t1_with_lesions(10.0, np.random.default_rng(seed), resolution_mm=4.0)
        code = nib.aff2axcodes(img.affine)
        seen.add(code)
        assert mask.shape == img.shape and np.array_equal(mask.affine, img.affine)
        assert np.array_equal(mask.get_sform(), img.get_sform()) and np.array_equal(mask.get_qform(), img.get_qform())
        m = np.asanyarray(mask.dataobj)
        assert m.dtype == np.uint8 and set(np.unique(m)) == {0, 1}
        # same nuisance draws, same noise: only voxels near a lesion differ from the lesion-free scan
        ref = synthesize_t1(10.0, np.random.default_rng(seed), resolution_mm=4.0)
        assert np.array_equal(ref.affine, img.affine)
        changed = np.asanyarray(img.dataobj) != np.asanyarray(ref.dataobj)
        assert changed[m > 0].all()
        world = nib.affines.apply_affine(img.affine, np.argwhere(changed))
        near = [np.linalg.norm(world - s.centre_mm, axis=1) <= _reach_mm(s) for s in specs]
        assert np.any(near, axis=0).all()
        # every lesion centre (world mm) falls in the stored mask, whatever the axis order
        for s in specs:
            ijk = tuple(np.rint(nib.affines.apply_affine(np.linalg.inv(mask.affine), s.centre_mm)).astype(int))
            assert m[ijk] == 1
    assert seen == {("R", "A", "S"), ("L", "A", "S"), ("L", "P", "S")}


@pytest.mark.parametrize("polarity", ["hyper", "hypo"])
def test_lesions_brighter_or_darker_than_surrounding_white_matter(polarity):
    for seed in range(3):
        img, mask, _ = synthesize_t1_with_lesions(10.0, np.random.default_rng(seed), 4.0, polarity=polarity)
        ref = np.asanyarray(synthesize_t1(10.0, np.random.default_rng(seed), 4.0).dataobj).astype(float)
        data = np.asanyarray(img.dataobj).astype(float)
        m = np.asanyarray(mask.dataobj) > 0
        shell = ndimage.binary_dilation(m, iterations=3) & ~ndimage.binary_dilation(m)
        wm = np.percentile(ref[shell], 95)  # white matter is the brightest tissue around a lesion
        assert 700 < wm < 1100
        if polarity == "hyper":
            assert np.median(data[m]) > 1.15 * wm
        else:
            assert np.median(data[m]) < 0.6 * wm


def test_lesions_are_deterministic_per_seed():
    a = synthesize_t1_with_lesions(10.0, np.random.default_rng(4), 4.0)
    b = synthesize_t1_with_lesions(10.0, np.random.default_rng(4), 4.0)
    assert a.lesions == b.lesions
    assert np.array_equal(np.asanyarray(a.image.dataobj), np.asanyarray(b.image.dataobj))
    assert np.array_equal(np.asanyarray(a.mask.dataobj), np.asanyarray(b.mask.dataobj))
    c = synthesize_t1_with_lesions(10.0, np.random.default_rng(4), 4.0, lesion_rng=np.random.default_rng(99))
    assert c.lesions != a.lesions and not np.array_equal(np.asanyarray(c.mask.dataobj), np.asanyarray(a.mask.dataobj))


def _t1(root, sub):
    return nib.load(root / sub / "anat" / f"{sub}_T1w.nii.gz")


def test_cohort_lesion_derivative_participants_and_inliers(tmp_path):
    kw = dict(n_inliers=2, ages=(1,), per_age=1, seed=3, resolution_mm=4.0)
    root = write_synthetic_cohort(tmp_path / "bids", n_lesion=2, lesion_polarity="mixed", **kw)
    plain = write_synthetic_cohort(tmp_path / "plain", **kw)
    fewer = write_synthetic_cohort(tmp_path / "fewer", n_lesion=1, **kw)

    df = pd.read_csv(root / "participants.tsv", sep="\t", dtype=str, keep_default_na=False)
    assert list(df.columns) == ["participant_id", "age", "sex", "group", "lesion", "lesion_volume_ml"]
    assert list(df.group) == ["inlier", "inlier", "age-1", "lesion", "lesion"]
    assert list(df.lesion[:3]) == ["n/a"] * 3 and set(df.lesion[3:]) <= {"hyper", "hypo", "mixed"}
    assert list(df.lesion_volume_ml[:3]) == ["n/a"] * 3 and df.age[3:].astype(float).between(9, 11).all()
    sidecar = json.loads((root / "participants.json").read_text())
    assert {"lesion", "lesion_volume_ml"} <= sidecar.keys() and sidecar["lesion_volume_ml"]["Units"] == "ml"
    description = json.loads((root / "derivatives" / "lesions" / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative" and description["GeneratedBy"][0]["Name"] == "neuro-ood synth"
    assert "lesion" not in pd.read_csv(plain / "participants.tsv", sep="\t").columns
    assert not (plain / "derivatives").exists()

    masks = sorted((root / "derivatives" / "lesions").glob("sub-*/anat/*"))
    assert [p.name for p in masks] == ["sub-0004_label-lesion_mask.nii.gz", "sub-0005_label-lesion_mask.nii.gz"]
    for path, volume in zip(masks, df.lesion_volume_ml[3:]):
        sub = path.name.split("_")[0]
        mask, img = nib.load(path), _t1(root, sub)
        assert mask.get_data_dtype() == np.uint8 and mask.shape == img.shape
        assert np.array_equal(mask.affine, img.affine)
        assert float(volume) == pytest.approx(np.count_nonzero(mask.dataobj) * 0.064, abs=1e-3)
    # earlier subjects, and the first lesion subject, are unchanged by adding lesion subjects
    for other, subs in ((plain, ["sub-0001", "sub-0002", "sub-0003"]), (fewer, ["sub-0001", "sub-0004"])):
        for sub in subs:
            assert np.array_equal(np.asanyarray(_t1(root, sub).dataobj), np.asanyarray(_t1(other, sub).dataobj))

    cfg = DataConfig()
    scans = {s.subject: s for s in read_bids_cohort(root, cfg)}
    assert [s for s in scans if scans[s].lesion] == ["sub-0004", "sub-0005"]
    assert scans["sub-0004"].lesion_mask == masks[0] and scans["sub-0004"].lesion_label in {"hyper", "hypo", "mixed"}
    assert scans["sub-0001"].lesion_mask is None and scans["sub-0001"].lesion_label is None
    assert [s.subject for s in select_inliers(list(scans.values()), cfg)] == ["sub-0001", "sub-0002"]

    from neuro_ood.pipelines.datasets import T1AgeCohort

    adapter = T1AgeCohort(ExperimentConfig())
    assert [adapter.has_inliers(s) for s in adapter.sources(root)] == [True, True, False, False, False]


def test_mask_names_sessions_and_table_lesion_column(tmp_path):
    for rel in ("sub-01/anat/sub-01_T1w.nii.gz", "sub-02/ses-1/anat/sub-02_ses-1_run-1_T1w.nii",
                "sub-03/anat/sub-03_T1w.nii.gz", "sub-04/anat/sub-04_T1w.nii.gz",
                "derivatives/a/sub-02/ses-1/anat/sub-02_ses-1_run-1_desc-lesion_mask.nii",
                "derivatives/b/sub-03/anat/sub-03_label-lesion_dseg.nii.gz",
                "derivatives/b/sub-01/anat/sub-01_label-brain_mask.nii.gz"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    (tmp_path / "participants.tsv").write_text("participant_id\tage\tlesion\nsub-01\t10\tNone\nsub-02\t10\t\n"
                                               "sub-03\t10\tn/a\nsub-04\t10\tstroke\n")
    scans = {s.subject: s for s in read_bids_cohort(tmp_path, DataConfig())}
    assert scans["sub-02"].lesion_mask == tmp_path / "derivatives/a/sub-02/ses-1/anat/sub-02_ses-1_run-1_desc-lesion_mask.nii"
    assert scans["sub-03"].lesion_mask.name == "sub-03_label-lesion_dseg.nii.gz"
    assert scans["sub-04"].lesion_label == "stroke" and scans["sub-04"].lesion_mask is None
    assert [s.subject for s in scans.values() if not s.lesion] == ["sub-01"]
    assert [s.subject for s in select_inliers(list(scans.values()), DataConfig())] == ["sub-01"]

    (tmp_path / "scans.tsv").write_text("path\tage\tlesion\na.nii\t10\tyes\nb.nii\t10\tno\n")
    table = load_cohort(tmp_path / "scans.tsv", DataConfig())
    assert [s.lesion for s in table] == [True, False]


def test_synth_command_with_lesions(tmp_path):
    result = invoke("synth", tmp_path / "c", "--inliers", "2", "--ages", "1", "--per-age", "1", "--resolution", "4",
                    "--lesions", "2", "--lesion-polarity", "hypo")
    assert result.exit_code == 0, result.output
    assert "5 scans (2 with lesions)" in result.stdout
    assert len(list((tmp_path / "c").glob("sub-*/anat/*_T1w.nii.gz"))) == 5
    assert len(list((tmp_path / "c" / "derivatives" / "lesions").glob("sub-*/anat/*_label-lesion_mask.nii.gz"))) == 2
    df = pd.read_csv(tmp_path / "c" / "participants.tsv", sep="\t", dtype=str, keep_default_na=False)
    assert list(df.lesion) == ["n/a"] * 3 + ["hypo"] * 2
    result = invoke("synth", tmp_path / "d", "--inliers", "1", "--lesions", "1", "--lesion-polarity", "bright")
    assert result.exit_code == 2 and "--lesion-polarity" in result.stderr and not (tmp_path / "d").exists()
