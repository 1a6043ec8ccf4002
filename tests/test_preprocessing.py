import nibabel as nib
import numpy as np
import pytest
import torch

from neuro_ood.config import PreprocessingConfig
from neuro_ood.errors import ScanError
from neuro_ood.preprocessing.cache import PreprocessedCache
from neuro_ood.preprocessing.presets import T1SlicePreprocessor, preprocessing_fingerprint
from neuro_ood.preprocessing.transforms import AxialSlices, N4BiasFieldCorrection
from tests.conftest import shared_data

CFG = PreprocessingConfig(spacing_mm=[2.0, 2.0, 2.0], slice_size=[60, 70], slice_offsets=[-2, 0, 2])


def phantom_ras(shape=(60, 70, 50)):
    """An ellipsoidal 'head' with a bright blob in the right-anterior quadrant, RAS voxel order, 2 mm."""
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    head = ((x / 0.7) ** 2 + (y / 0.8) ** 2 + (z / 0.7) ** 2 < 1).astype(np.float32) * 100
    head[((x - 0.35) ** 2 + (y - 0.4) ** 2 + z ** 2) < 0.03] = 300
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = -np.array(shape) + 1
    return head, affine


def save_flipped(path, data, affine, axes):
    """Store the same world-space image with the given voxel axes flipped (e.g. RAS -> LPS)."""
    image = nib.Nifti1Image(data, affine)
    ornt = np.array([[i, -1 if i in axes else 1] for i in range(3)])
    nib.save(image.as_reoriented(ornt), path)


def test_t1_slices_shape_range_and_ras_orientation(tmp_path):
    data, affine = phantom_ras()
    save_flipped(tmp_path / "ras.nii.gz", data, affine, axes=())
    save_flipped(tmp_path / "lps.nii.gz", data, affine, axes=(0, 1))
    assert nib.aff2axcodes(nib.load(tmp_path / "lps.nii.gz").affine) == ("L", "P", "S")
    pre = T1SlicePreprocessor(CFG)
    ras, lps = pre(tmp_path / "ras.nii.gz"), pre(tmp_path / "lps.nii.gz")
    assert ras.shape == (3, 1, 60, 70) and ras.dtype == np.float32
    assert ras.min() >= 0 and ras.max() <= 1
    np.testing.assert_allclose(ras, lps, atol=1e-5)
    # The blob is right (+x) and anterior (+y): it lies in the high-row, high-column quadrant.
    middle = ras[1, 0]
    row, col = np.unravel_index(np.argmax(middle), middle.shape)
    assert row > 30 and col > 35


def test_pad_keeps_physical_size_resize_does_not(tmp_path):
    data, affine = phantom_ras()
    half = data[::2, ::2, ::2]                      # the same head at half the size
    small = np.zeros_like(data)
    small[15:15 + half.shape[0], 17:17 + half.shape[1], 12:12 + half.shape[2]] = half
    save_flipped(tmp_path / "big.nii.gz", data, affine, axes=())
    save_flipped(tmp_path / "small.nii.gz", small, affine, axes=())
    padded = T1SlicePreprocessor(CFG)
    resized = T1SlicePreprocessor(PreprocessingConfig(**{**CFG.__dict__, "slice_fit": "resize"}))
    area = lambda pre, name: (pre(tmp_path / name)[1, 0] > 0.1).sum()
    assert area(padded, "small.nii.gz") < 0.5 * area(padded, "big.nii.gz")
    assert area(resized, "small.nii.gz") > 0.7 * area(resized, "big.nii.gz")


def test_offsets_outside_the_head_are_a_scan_error(tmp_path):
    data, affine = phantom_ras()
    save_flipped(tmp_path / "ras.nii.gz", data, affine, axes=())
    with pytest.raises(ScanError, match="slice offsets"):
        T1SlicePreprocessor(PreprocessingConfig(**{**CFG.__dict__, "slice_offsets": [-40, 0, 40]}))(
            tmp_path / "ras.nii.gz")


def test_axial_slices_pick_offsets_from_the_middle():
    volume = torch.arange(10, dtype=torch.float32).view(1, 1, 1, 10).expand(2, 3, 4, 10)
    slices = AxialSlices([-2, 0, 3])(volume)
    assert slices.shape == (3, 2, 3, 4)
    assert slices[:, 0, 0, 0].tolist() == [3.0, 5.0, 8.0]


def test_fingerprint_tracks_every_field():
    assert preprocessing_fingerprint(CFG) == preprocessing_fingerprint(PreprocessingConfig(**CFG.__dict__))
    assert preprocessing_fingerprint(CFG) != preprocessing_fingerprint(PreprocessingConfig(**{**CFG.__dict__, "n4": True}))


def test_cache_hits_by_content_and_misses_on_other_fingerprint(tmp_path):
    source = tmp_path / "a.bin"
    source.write_bytes(b"scan")
    calls = []

    def compute():
        calls.append(1)
        return {"slices": np.ones((3, 1, 2, 2), np.float32) * len(calls), "flags": np.array([True, False])}

    cache = PreprocessedCache(tmp_path / "cache", "fp1")
    first = cache.get_or_compute([source], compute)
    copy = tmp_path / "renamed.bin"
    copy.write_bytes(b"scan")
    again = cache.get_or_compute([copy], compute)
    assert len(calls) == 1 and set(again) == {"slices", "flags"}
    np.testing.assert_array_equal(again["slices"], first["slices"])
    np.testing.assert_array_equal(again["flags"], [True, False])
    PreprocessedCache(tmp_path / "cache", "fp2").get_or_compute([source], compute)
    assert len(calls) == 2
    copy.write_bytes(b"edited scan")
    cache.get_or_compute([copy], compute)
    assert len(calls) == 3


def test_n4_removes_a_smooth_bias_field():
    data, affine = phantom_ras((40, 40, 40))
    x = np.linspace(-1, 1, 40)[:, None, None]
    biased = data * (1 + 0.4 * x)
    from monai.data import MetaTensor

    image = MetaTensor(torch.from_numpy(biased[None].astype(np.float32)), affine=torch.from_numpy(affine))
    corrected = N4BiasFieldCorrection(shrink=2, iterations=[30, 30])(image)[0].numpy()
    tissue = (data > 50) & (data < 200)
    cv = lambda v: v[tissue].std() / v[tissue].mean()
    assert cv(corrected) < 0.5 * cv(biased)


def test_real_paediatric_scan_preprocesses():
    path = shared_data("paediatric_t1w_bids", "sub-0002", "ses-V01", "anat", "sub-0002_ses-V01_T1w.nii.gz")
    slices = T1SlicePreprocessor(PreprocessingConfig())(path)
    assert slices.shape == (3, 1, 90, 110) and np.isfinite(slices).all() and slices.max() == pytest.approx(1.0)


def test_a_volume_without_positive_signal_is_a_scan_error(tmp_path):
    data, affine = phantom_ras()
    save_flipped(tmp_path / "negative.nii.gz", -data, affine, axes=())
    with pytest.raises(ScanError, match="negative.nii.gz"):
        T1SlicePreprocessor(CFG)(tmp_path / "negative.nii.gz")
