import gzip

import nibabel as nib
import numpy as np
import pytest

from neuro_ood.data.nifti import load_volume
from neuro_ood.errors import ScanError


def write_bad_files(folder):
    """Every kind of unusable input the CLI must survive, keyed by the expected message part."""
    rng = np.random.default_rng(0)
    volume = rng.random((12, 12, 12)).astype(np.float32)
    nib.save(nib.Nifti1Image(volume, np.eye(4)), folder / "good.nii.gz")
    raw = (folder / "good.nii.gz").read_bytes()
    cases = {}
    (folder / "truncated.nii.gz").write_bytes(raw[: len(raw) // 2])
    cases["truncated.nii.gz"] = "truncated"
    corrupt = bytearray(raw)
    corrupt[60:160] = rng.integers(0, 256, 100, dtype=np.uint8).tobytes()
    (folder / "corrupt.nii.gz").write_bytes(bytes(corrupt))
    cases["corrupt.nii.gz"] = "corrupt"
    nib.save(nib.Nifti1Image(volume, np.eye(4)), folder / "plain.nii")
    plain = (folder / "plain.nii").read_bytes()
    (folder / "truncated.nii").write_bytes(plain[: len(plain) // 2])
    cases["truncated.nii"] = "truncated"
    (folder / "text.nii.gz").write_text("subject,age\nsub-01,10\n")
    cases["text.nii.gz"] = "not a NIfTI"
    with gzip.open(folder / "gztext.nii.gz", "wt") as handle:
        handle.write("hello " * 200)
    cases["gztext.nii.gz"] = "not a NIfTI"
    nib.save(nib.Nifti1Image(volume[:, :, 0], np.eye(4)), folder / "slice2d.nii.gz")
    cases["slice2d.nii.gz"] = "2-D image"
    nib.save(nib.Nifti1Image(np.stack([volume, volume], -1), np.eye(4)), folder / "series4d.nii.gz")
    cases["series4d.nii.gz"] = "4-D image"
    nib.save(nib.Nifti1Image(np.full_like(volume, np.nan), np.eye(4)), folder / "nan.nii.gz")
    cases["nan.nii.gz"] = "no finite voxel"
    nib.save(nib.Nifti1Image(np.full_like(volume, 7.0), np.eye(4)), folder / "constant.nii.gz")
    cases["constant.nii.gz"] = "constant image"
    (folder / "empty.nii.gz").write_bytes(b"")
    cases["empty.nii.gz"] = "empty file"
    (folder / "scan.mgz").write_bytes(raw)
    cases["scan.mgz"] = "not a NIfTI"
    cases["missing.nii.gz"] = "file not found"
    rgb = np.zeros((6, 6, 6), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    nib.save(nib.Nifti1Image(rgb, np.eye(4)), folder / "rgb.nii.gz")
    cases["rgb.nii.gz"] = "not a scalar intensity"
    return cases


def test_good_volume_loads(tmp_path):
    write_bad_files(tmp_path)
    data, affine = load_volume(tmp_path / "good.nii.gz")
    assert data.shape == (12, 12, 12) and data.dtype == np.float32
    assert affine.shape == (4, 4)


def test_single_volume_4d_is_accepted(tmp_path):
    volume = np.random.default_rng(1).random((8, 8, 8, 1)).astype(np.float32)
    nib.save(nib.Nifti1Image(volume, np.eye(4)), tmp_path / "one.nii.gz")
    assert load_volume(tmp_path / "one.nii.gz")[0].shape == (8, 8, 8)


def test_partial_nan_is_zeroed(tmp_path):
    volume = np.random.default_rng(1).random((8, 8, 8)).astype(np.float32)
    volume[0] = np.nan
    nib.save(nib.Nifti1Image(volume, np.eye(4)), tmp_path / "some_nan.nii.gz")
    data, _ = load_volume(tmp_path / "some_nan.nii.gz")
    assert np.isfinite(data).all() and (data[0] == 0).all()


@pytest.mark.parametrize("name", ["truncated.nii.gz", "corrupt.nii.gz", "truncated.nii", "text.nii.gz",
                                  "gztext.nii.gz", "slice2d.nii.gz", "series4d.nii.gz", "nan.nii.gz",
                                  "constant.nii.gz", "empty.nii.gz", "scan.mgz", "missing.nii.gz", "rgb.nii.gz"])
def test_bad_inputs_raise_one_line_scan_error(tmp_path, name):
    expected = write_bad_files(tmp_path)[name]
    with pytest.raises(ScanError) as info:
        load_volume(tmp_path / name)
    message = str(info.value)
    assert expected in message
    assert "\n" not in message and message.startswith(str(tmp_path / name))
