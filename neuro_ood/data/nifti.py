"""Validated NIfTI reading: every way a file can be unusable becomes one :class:`ScanError`."""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np

from neuro_ood.errors import ScanError

NIFTI_SUFFIXES = (".nii", ".nii.gz")


def is_nifti_name(path: str | Path) -> bool:
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def _open_image(path: Path) -> nib.Nifti1Image:
    if not path.exists():
        raise ScanError(path, "file not found")
    if not path.is_file():
        raise ScanError(path, "not a file")
    if path.stat().st_size == 0:
        raise ScanError(path, "empty file (0 bytes)")
    if not is_nifti_name(path):
        raise ScanError(path, "not a NIfTI file (expected .nii or .nii.gz)")
    try:
        image = nib.load(str(path))
    except (gzip.BadGzipFile, zlib.error, EOFError) as err:
        raise ScanError(path, f"corrupt gzip stream ({err})") from None
    except nib.filebasedimages.ImageFileError:
        raise ScanError(path, "not a NIfTI file (no valid NIfTI-1/2 header)") from None
    except Exception as err:  # nibabel raises many types for broken headers
        raise ScanError(path, f"unreadable NIfTI header ({type(err).__name__}: {err})") from None
    if not isinstance(image, (nib.Nifti1Image, nib.Nifti2Image)):
        raise ScanError(path, f"not a NIfTI file ({type(image).__name__})")
    return image


def load_volume(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a 3-D scan and check that it holds a usable image.

    Returns
    -------
    data : float32 array (X, Y, Z) in the file's voxel order; non-finite voxels set to 0.
    affine : float64 array (4, 4), voxel indices -> world mm.

    Raises
    ------
    ScanError
        Missing, empty, non-NIfTI, corrupt or truncated file; 2-D or 4-D (more than one
        volume) image; zero-sized axis; no finite voxel; constant image.
    """
    path = Path(path)
    image = _open_image(path)
    shape = tuple(int(s) for s in image.shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) > 3:
        raise ScanError(path, f"{len(shape)}-D image of shape {tuple(image.shape)} "
                              f"({int(np.prod(shape[3:]))} volumes); a single 3-D volume is expected")
    if len(shape) < 3 or 1 in shape:
        raise ScanError(path, f"{sum(s > 1 for s in shape)}-D image of shape {tuple(image.shape)}; "
                              "a 3-D volume is expected")
    if image.get_data_dtype().kind not in "biuf":
        raise ScanError(path, f"voxel type {image.get_data_dtype()} is not a scalar intensity (e.g. an RGB image); "
                              "a greyscale 3-D volume is expected")
    if min(shape) == 0:
        raise ScanError(path, f"image has an empty axis (shape {tuple(image.shape)})")
    try:
        data = np.asarray(image.dataobj, dtype=np.float32).reshape(shape)
    except (EOFError, zlib.error, gzip.BadGzipFile) as err:
        raise ScanError(path, f"truncated or corrupt data ({err})") from None
    except (ValueError, OSError) as err:
        raise ScanError(path, f"truncated data: the file holds fewer voxels than its header says ({err})") from None
    finite = np.isfinite(data)
    if not finite.any():
        raise ScanError(path, "no finite voxel (all NaN or infinite)")
    if not finite.all():
        data = np.where(finite, data, 0.0).astype(np.float32)
    if float(data.max()) == float(data.min()):
        raise ScanError(path, f"constant image (every voxel is {float(data.min()):g}); no contrast to analyse")
    affine = np.asarray(image.affine, dtype=np.float64)
    if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise ScanError(path, "invalid affine (singular or non-finite): voxel-to-world mapping unknown")
    return data, affine


def scan_geometry(path: str | Path) -> tuple[tuple[int, int, int], np.ndarray]:
    """The grid of a 3-D scan file without reading its voxels: ``shape (X, Y, Z)`` and the
    (4, 4) voxel -> world mm affine that :func:`load_volume` uses."""
    path = Path(path)
    image = _open_image(path)
    shape = tuple(int(s) for s in image.shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) != 3:
        raise ScanError(path, f"image of shape {tuple(image.shape)}; a 3-D volume is expected")
    return shape, np.asarray(image.affine, dtype=np.float64)
