from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from neuro_ood.config import PreprocessingConfig
from neuro_ood.data.brats import BratsCase, find_brats_case, find_brats_cases
from neuro_ood.errors import CohortError, ConfigError, ScanError
from neuro_ood.preprocessing.brats import BratsSlicePreprocessor
from neuro_ood.preprocessing.presets import preprocessing_fingerprint, volume_transforms

REAL_CASE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "brats_case"

SHAPE = (40, 40, 30)
SPACING = 2.0
# Native spacing: no resampling, so slice indices and tumour voxel counts are known exactly.
CFG = PreprocessingConfig(preset="brats", spacing_mm=[SPACING] * 3, slice_size=[44, 48])

NAMES = {  # canonical -> file stem per naming
    "2021": {"t1": "{case}_t1", "t1ce": "{case}_t1ce", "t2": "{case}_t2", "flair": "{case}_flair",
             "seg": "{case}_seg"},
    "2023": {"t1": "{case}-t1n", "t1ce": "{case}-t1c", "t2": "{case}-t2w", "flair": "{case}-t2f",
             "seg": "{case}-seg"},
    "bare": {"t1": "t1n", "t1ce": "t1c", "t2": "t2w", "flair": "t2f", "seg": "segmentation_model_output"},
}


def phantom():
    """RAS voxel order, 2 mm: an ellipsoid brain with a graded tumour (labels 1-3) in some axial slices.

    Each modality has its own contrast: the tumour is dark on t1, bright on t1ce, t2 and flair, and
    the brain carries a gradient along x (t1), y (t1ce), z (t2) or none (flair).
    """
    x, y, z = np.meshgrid(*[np.arange(s, dtype=np.float32) for s in SHAPE], indexing="ij")
    brain = ((x - 20) / 14) ** 2 + ((y - 19) / 16) ** 2 + ((z - 14) / 11) ** 2 < 1
    r = np.sqrt((x - 24) ** 2 + (y - 22) ** 2 + (z - 17) ** 2)
    seg = np.where(r < 4, np.where(r < 2, 1, np.where(r < 3, 2, 3)), 0).astype(np.uint8)
    tumour = seg > 0
    images = {
        "t1": np.where(tumour, 40.0, 100 + x),
        "t1ce": np.where(tumour, 300.0, 100 + y),
        "t2": np.where(tumour, 200.0, 60 + 2 * z),
        "flair": np.where(tumour, 250.0, 80.0 + 0 * x),
    }
    images = {k: (v * brain).astype(np.float32) for k, v in images.items()}
    affine = np.diag([SPACING, SPACING, SPACING, 1.0])
    affine[:3, 3] = [-40.0, -42.0, -20.0]
    return images, seg, brain, affine


def save(path, data, affine, flip_axes=()):
    """Store the same world-space image with the given voxel axes flipped (e.g. (0, 1): RAS -> LPS)."""
    ornt = np.array([[i, -1 if i in flip_axes else 1] for i in range(3)])
    nib.save(nib.Nifti1Image(data, affine).as_reoriented(ornt), path)


def write_case(folder: Path, naming="2021", case="BraTS2021_00001", flip_axes=(), with_seg=True, images=None,
               seg=None):
    folder.mkdir(parents=True, exist_ok=True)
    default_images, default_seg, _, affine = phantom()
    images = images or default_images
    seg = default_seg if seg is None else seg
    for name, data in images.items():
        save(folder / (NAMES[naming][name].format(case=case) + ".nii.gz"), data, affine, flip_axes)
    if with_seg:
        save(folder / (NAMES[naming]["seg"].format(case=case) + ".nii.gz"), seg, affine, flip_axes)
    return folder


def expected(cfg=CFG, seg=None):
    """Kept axial indices (native RAS z), their tumour flags (at least ``min_tumour_voxels``) and
    tumour voxel counts, from the phantom itself (``seg``: another segmentation on its grid).

    The crop box is the brain's bounding box plus one voxel (every brain voxel is foreground);
    the brain fraction is measured over the cropped slice area.
    """
    _, phantom_seg, brain, _ = phantom()
    seg = phantom_seg if seg is None else seg
    lo = [max(int(np.nonzero(brain.any(axis=tuple(a for a in range(3) if a != d)))[0].min()) - 1, 0) for d in range(3)]
    hi = [min(int(np.nonzero(brain.any(axis=tuple(a for a in range(3) if a != d)))[0].max()) + 2, SHAPE[d])
          for d in range(3)]
    area = (hi[0] - lo[0]) * (hi[1] - lo[1])
    fraction = brain.sum(axis=(0, 1)) / area
    kept = [z for z in range(lo[2], hi[2]) if fraction[z] >= cfg.min_brain_fraction]
    voxels = np.array([(seg[..., z] > 0).sum() for z in kept], dtype=np.int64)
    return kept, voxels >= cfg.min_tumour_voxels, voxels


# --- discovery ---------------------------------------------------------------------------------

@pytest.mark.parametrize("naming, case, suffixes", [
    ("2021", "BraTS2021_00001", {"t1": "_t1", "t1ce": "_t1ce", "t2": "_t2", "flair": "_flair", "seg": "_seg"}),
    ("2023", "BraTS-GLI-00002-000", {"t1": "-t1n", "t1ce": "-t1c", "t2": "-t2w", "flair": "-t2f", "seg": "-seg"}),
])
def test_find_case_maps_names_to_canonical_modalities(tmp_path, naming, case, suffixes):
    write_case(tmp_path / "c", naming, case)
    found = find_brats_case(tmp_path / "c")
    assert found.case_id == case
    assert list(found.modalities) == ["t1", "t1ce", "t2", "flair"]
    for name, suffix in suffixes.items():
        path = found.seg if name == "seg" else found.modalities[name]
        assert path.name == f"{case}{suffix}.nii.gz"


def test_bare_names_take_folder_as_id_and_any_seg_file(tmp_path):
    write_case(tmp_path / "patient7", "bare")
    found = find_brats_case(tmp_path / "patient7")
    assert found.case_id == "patient7"
    assert {k: v.name for k, v in found.modalities.items()} == {
        "t1": "t1n.nii.gz", "t1ce": "t1c.nii.gz", "t2": "t2w.nii.gz", "flair": "t2f.nii.gz"}
    assert found.seg.name == "segmentation_model_output.nii.gz"


def test_find_cases_in_root_or_case_folder_sorted(tmp_path):
    write_case(tmp_path / "b", "2023", "BraTS-GLI-00009-000", with_seg=False)
    write_case(tmp_path / "a", "2021", "BraTS2021_00005")
    (tmp_path / "notes").mkdir()
    cases = find_brats_cases(tmp_path)
    assert [c.case_id for c in cases] == ["BraTS-GLI-00009-000", "BraTS2021_00005"]
    assert cases[0].seg is None and cases[1].seg is not None
    assert [c.case_id for c in find_brats_cases(tmp_path / "a")] == ["BraTS2021_00005"]
    with pytest.raises(CohortError, match="no BraTS case"):
        find_brats_cases(tmp_path / "notes")


def test_missing_modality_is_named(tmp_path):
    folder = write_case(tmp_path / "c", "2021", "X")
    (folder / "X_t1ce.nii.gz").unlink()
    (folder / "X_flair.nii.gz").unlink()
    with pytest.raises(CohortError, match="missing modalities t1ce, flair"):
        find_brats_case(folder)
    with pytest.raises(CohortError, match="missing modalities t1ce, flair"):
        find_brats_cases(tmp_path)


# --- preprocessing -----------------------------------------------------------------------------

@pytest.mark.parametrize("thresholds", [{}, {"min_brain_fraction": 0.3, "min_tumour_voxels": 30}])
def test_shapes_range_and_exact_tumour_flags(tmp_path, thresholds):
    cfg = PreprocessingConfig(**{**CFG.__dict__, **thresholds})
    pre = BratsSlicePreprocessor(cfg)
    slices, voxels = pre(find_brats_case(write_case(tmp_path / "c")))
    kept, want_tumour, want_voxels = expected(cfg)
    tumour = voxels >= cfg.min_tumour_voxels
    if thresholds:  # the thresholds bite: fewer brain slices, the tumour's thin caps no longer count
        assert len(kept) < len(expected()[0]) and want_tumour.sum() < expected()[1].sum()
    assert slices.shape == (len(kept), 4, 44, 48) and slices.dtype == np.float32
    assert voxels.dtype == np.int64 and voxels.shape == (len(kept),)
    np.testing.assert_array_equal(voxels, want_voxels)
    assert 0 <= slices.min() and slices.max() <= 1
    assert np.isclose(slices.reshape(-1, 4, 44 * 48).max(axis=(0, 2)), 1).all()  # each channel reaches 1
    np.testing.assert_array_equal(tumour, want_tumour)
    assert tumour.any() and not tumour.all()
    assert pre.fingerprint == preprocessing_fingerprint(cfg)


def test_channels_follow_config_order_and_t1_is_not_t1ce(tmp_path):
    case = find_brats_case(write_case(tmp_path / "c"))
    slices, voxels = BratsSlicePreprocessor(CFG)(case)
    tumour = voxels >= CFG.min_tumour_voxels
    order = ["flair", "t1ce", "t2", "t1"]
    reordered, _ = BratsSlicePreprocessor(PreprocessingConfig(**{**CFG.__dict__, "modalities": order}))(case)
    np.testing.assert_allclose(reordered, slices[:, [3, 1, 2, 0]], atol=1e-6)
    # The tumour is dark on t1 (channel 0) and the brightest tissue on t1ce (channel 1).
    middle = slices[np.nonzero(tumour)[0][len(np.nonzero(tumour)[0]) // 2]]
    t1ce_peak = np.unravel_index(np.argmax(middle[1]), middle[1].shape)
    assert middle[0][t1ce_peak] < 0.5 < middle[1][t1ce_peak]


def test_2021_and_2023_namings_give_the_same_output(tmp_path):
    a = BratsSlicePreprocessor(CFG)(find_brats_case(write_case(tmp_path / "a", "2021", "BraTS2021_1")))
    b = BratsSlicePreprocessor(CFG)(find_brats_case(write_case(tmp_path / "b", "2023", "BraTS-GLI-1-000")))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def test_lps_case_gives_the_same_output_as_ras(tmp_path):
    pre = BratsSlicePreprocessor(CFG)
    ras = pre(find_brats_case(write_case(tmp_path / "ras")))
    lps_folder = write_case(tmp_path / "lps", flip_axes=(0, 1))
    assert nib.aff2axcodes(nib.load(lps_folder / "BraTS2021_00001_t1.nii.gz").affine) == ("L", "P", "S")
    lps = pre(find_brats_case(lps_folder))
    np.testing.assert_allclose(lps[0], ras[0], atol=1e-5)
    np.testing.assert_array_equal(lps[1], ras[1])


@pytest.mark.parametrize("spacing, min_dice", [(SPACING, 1.0), (3.0, 0.8)])
def test_segmentation_stays_on_the_image_grid(tmp_path, spacing, min_dice):
    """After orientation, resampling and cropping, seg > 0 is where t1ce shows the (clipped-bright) tumour."""
    cfg = PreprocessingConfig(**{**CFG.__dict__, "spacing_mm": [spacing] * 3})
    pre = BratsSlicePreprocessor(cfg)
    out = pre.volume(pre.load(find_brats_case(write_case(tmp_path / "c", flip_axes=(0, 2)))))
    image, seg = torch.as_tensor(out["image"]), torch.as_tensor(out["seg"])
    assert seg.shape == (1, *image.shape[1:])
    assert set(np.unique(seg.numpy())) <= {0.0, 1.0, 2.0, 3.0}
    labelled, bright = (seg[0] > 0).numpy(), (image[1] > 0.8).numpy()
    dice = 2 * (labelled & bright).sum() / (labelled.sum() + bright.sum())
    assert dice >= min_dice - 1e-9
    # The image steps are exactly those of the T1 preset's chain, channel-wise.
    reference = volume_transforms(cfg, channel_wise=True)(pre.load(find_brats_case(tmp_path / "c"))["image"])
    np.testing.assert_allclose(image.numpy(), torch.as_tensor(reference).numpy(), atol=1e-6)


def test_case_without_seg_has_no_tumour_slices(tmp_path):
    slices, voxels = BratsSlicePreprocessor(CFG)(find_brats_case(write_case(tmp_path / "c", with_seg=False)))
    assert slices.shape[0] == len(expected()[0]) and voxels.shape == (slices.shape[0],) and not voxels.any()


def test_all_background_seg_is_valid(tmp_path):
    folder = write_case(tmp_path / "c", "2021", "X")
    _, _, _, affine = phantom()
    save(folder / "X_seg.nii.gz", np.zeros(SHAPE, np.uint8), affine)
    _, voxels = BratsSlicePreprocessor(CFG)(find_brats_case(folder))
    assert not voxels.any()


def test_mismatched_modality_shapes_raise_scan_error(tmp_path):
    images, _, _, affine = phantom()
    folder = write_case(tmp_path / "c", "2021", "BraTS2021_00042")
    save(folder / "BraTS2021_00042_t2.nii.gz", images["t2"][:, :, :28], affine)
    with pytest.raises(ScanError, match="BraTS2021_00042.*t2 has shape"):
        BratsSlicePreprocessor(CFG)(find_brats_case(folder))


def test_config_is_checked():
    with pytest.raises(ConfigError, match="preset 'brats'"):
        BratsSlicePreprocessor(PreprocessingConfig(preset="t1"))
    with pytest.raises(ConfigError, match="modalities"):
        BratsSlicePreprocessor(PreprocessingConfig(preset="brats", modalities=["t1", "t1c"]))


def test_n4_option_runs(tmp_path):
    cfg = PreprocessingConfig(**{**CFG.__dict__, "n4": True, "n4_iterations": [5, 5]})
    slices, voxels = BratsSlicePreprocessor(cfg)(find_brats_case(write_case(tmp_path / "c")))
    assert slices.shape == (len(expected()[0]), 4, 44, 48) and 0 <= slices.min() and slices.max() <= 1
    np.testing.assert_array_equal(voxels, expected()[2])


def test_real_brats_case():
    if not REAL_CASE.is_dir():
        pytest.skip(f"{REAL_CASE} is absent (the shared development data is not beside this checkout)")
    cases = find_brats_cases(REAL_CASE)
    assert len(cases) == 1 and isinstance(cases[0], BratsCase) and cases[0].seg is not None
    cfg = PreprocessingConfig(preset="brats", spacing_mm=[2.0, 2.0, 2.0], slice_size=[120, 120])
    slices, voxels = BratsSlicePreprocessor(cfg)(cases[0])
    tumour = voxels >= cfg.min_tumour_voxels
    assert slices.ndim == 4 and slices.shape[1:] == (4, 120, 120) and slices.dtype == np.float32
    assert 20 <= slices.shape[0] <= 78  # 155 mm at 2 mm is 78 slices; a brain spans well over 20
    assert 0 <= slices.min() and slices.max() <= 1
    assert tumour.shape == (slices.shape[0],) and tumour.any() and not tumour.all()


# --- groups: a slice with any tumour voxel is never an inlier -----------------------------------

def test_slice_with_a_few_tumour_voxels_is_never_an_inlier(tmp_path):
    from neuro_ood.config import ExperimentConfig
    from neuro_ood.pipelines.datasets import BratsTumourCohort

    _, seg, _, _ = phantom()
    seg = seg.copy()
    seg[20:23, 19, 8] = 1  # 3 tumour voxels in slice z = 8, below min_tumour_voxels = 10
    adapter = BratsTumourCohort(ExperimentConfig(dataset="brats", preprocessing=CFG))
    source = adapter._source(find_brats_case(write_case(tmp_path / "c", seg=seg)))
    arrays = adapter.preprocess(source)
    kept, _, want_voxels = expected(seg=seg)
    np.testing.assert_array_equal(arrays["tumour_voxels"], want_voxels)
    assert arrays["tumour_voxels"][kept.index(8)] == 3
    items = adapter.items(source, arrays)
    groups = {z: item.group for z, item in zip(kept, items)}
    assert groups[8] is None and not adapter.is_inlier(items[kept.index(8)])
    for z, voxels in zip(kept, want_voxels):
        if voxels == 0:
            assert groups[z] == "no tumour" and adapter.is_inlier(items[kept.index(z)])
        elif voxels >= CFG.min_tumour_voxels:
            assert groups[z] == "tumour"
    assert sum(g is None for g in groups.values()) == 1
    # min_tumour_voxels only decides what counts as a tumour slice: at 3 the slice is evaluated.
    low = PreprocessingConfig(**{**CFG.__dict__, "min_tumour_voxels": 3})
    adapter = BratsTumourCohort(ExperimentConfig(dataset="brats", preprocessing=low))
    assert adapter.items(source, arrays)[kept.index(8)].group == "tumour"


def test_unsegmented_case_has_no_groups(tmp_path):
    from neuro_ood.config import ExperimentConfig
    from neuro_ood.pipelines.datasets import BratsTumourCohort

    adapter = BratsTumourCohort(ExperimentConfig(dataset="brats", preprocessing=CFG))
    source = adapter._source(find_brats_case(write_case(tmp_path / "c", with_seg=False)))
    items = adapter.items(source, adapter.preprocess(source))
    assert items and all(item.group is None for item in items)


def test_brats_fingerprint_has_its_own_version():
    """Preprocessed BraTS arrays changed (tumour flags -> voxel counts): old caches and runs are refused,
    T1 fingerprints are untouched."""
    import dataclasses
    import hashlib
    import json

    from neuro_ood.preprocessing.presets import LATER_OPTIONS, PRESET_ONLY

    def version_1(cfg):  # as computed before the later options existed
        fields = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in LATER_OPTIONS and k not in PRESET_ONLY}
        payload = json.dumps({"version": 1, **fields}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    assert preprocessing_fingerprint(CFG) != version_1(CFG)
    t1 = PreprocessingConfig()
    assert preprocessing_fingerprint(t1) == version_1(t1)
