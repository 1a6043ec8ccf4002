"""Synthetic BIDS cohort of paediatric T1-weighted brain MRI built from the MNI152 templates.

The cohort mimics the task of the MSMA paper (multiscale score matching for brain MRI
out-of-distribution detection): a detector is trained on 9-11-year-olds (ABCD) and must flag
younger children (EBDS, 1, 2, 4 and 6 years) as atypical, with the youngest easiest to flag.

Age model. An immaturity index ``d = age_deviation(age)`` is 1 at one year and decays
exponentially (time constant 3.5 years) to about 0.06-0.10 at 9-11 years. It drives the two
dominant effects of early brain development seen on T1w images:

* brain size: the brain is scaled about its centre by ``1 - 0.18 d`` (a 1-year-old brain is
  ~18% smaller in linear size, ~45% smaller in volume);
* myelination: the white/grey matter intensity ratio falls from adult-like 1.38 (``d = 0``)
  to 1.05 (``d = 1``), since unmyelinated white matter is darker on T1.

Every subject, inlier or not, also gets nuisance variation so that 9-11-year-olds differ among
themselves: a rigid pose (rotation up to 4 degrees per axis, translation up to 4 mm), a smooth
random deformation (up to 3 mm), a global scale jitter (3%), tissue intensity jitter (3%), a
smooth multiplicative bias field (up to 10%) and Rician noise (2-3% of the WM intensity).
A 6-year-old (``d = 0.24``) is then ~3% smaller in linear size with ~4% lower contrast than a
10-year-old (``d = 0.08``), about two nuisance standard deviations, whereas a 1-year-old is far
outside the inlier range; the paper's gradation (1 y easiest, 6 y hardest) follows.

Volumes are stored in a random axis orientation (RAS, LAS or LPS) with a matching affine, so
that the world-space image does not depend on it.

Optional lesion subjects (:func:`synthesize_t1_with_lesions`, ``n_lesion`` of
:func:`write_synthetic_cohort`) get 1-3 focal lesions (:mod:`neuro_ood.data.lesions`) blended into
the clean contrast before the bias field and noise, with a binary mask on the same grid.
"""

from __future__ import annotations

import functools
import gzip
import pathlib
from collections.abc import Sequence
from typing import NamedTuple

import nibabel as nib
import numpy as np
from scipy import ndimage
from scipy.spatial.transform import Rotation

from neuro_ood.data.lesions import POLARITIES, LesionSpec, draw_lesions
from neuro_ood.io import atomic_write, write_json, write_text

TEMPLATE_MM = 2.0
AGE_TAU_YEARS = 3.5
MAX_SHRINK = 0.18
WM_GM_RATIO_ADULT = 1.38
WM_GM_RATIO_INFANT = 1.05
GM_INTENSITY = 650.0
CSF_INTENSITY = 250.0
ORIENTATIONS = {"RAS": (), "LAS": (0,), "LPS": (0, 1)}


def age_deviation(age_years: float) -> float:
    """Immaturity index in [0, 1]: 1 at (or below) 1 year, ``exp(-(age - 1) / AGE_TAU_YEARS)`` above."""
    return float(min(1.0, np.exp(-(float(age_years) - 1.0) / AGE_TAU_YEARS)))


@functools.lru_cache(maxsize=1)
def _templates() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """MNI152 2 mm CSF/GM/WM probability maps ``(3, 99, 117, 95)``, affine, brain centre (mm), shape."""
    from nilearn import datasets

    mask = datasets.load_mni152_brain_mask(resolution=2)
    m = np.asarray(mask.get_fdata(), dtype=np.float32)
    gm = np.asarray(datasets.load_mni152_gm_template(resolution=2).get_fdata(), np.float32) * m
    wm = np.asarray(datasets.load_mni152_wm_template(resolution=2).get_fdata(), np.float32) * m
    csf = np.clip(m - gm - wm, 0.0, None)
    centre = nib.affines.apply_affine(mask.affine, np.argwhere(m > 0).mean(axis=0))
    return np.stack([csf, gm, wm]), mask.affine, centre, np.array(m.shape)


@functools.lru_cache(maxsize=4)
def _grid(resolution_mm: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tissue maps pre-smoothed for ``resolution_mm``, output shape and output affine (RAS, mm)."""
    tissue, affine, _, shape = _templates()
    fov = shape * TEMPLATE_MM
    out_shape = np.maximum(np.round(fov / resolution_mm).astype(int), 1)
    centre = nib.affines.apply_affine(affine, (shape - 1) / 2.0)
    out_affine = np.diag([resolution_mm] * 3 + [1.0])
    out_affine[:3, 3] = centre - resolution_mm * (out_shape - 1) / 2.0
    sigma = np.sqrt(max(resolution_mm**2 - TEMPLATE_MM**2, 0.0)) / (2.355 * TEMPLATE_MM)
    if sigma > 0:
        tissue = np.stack([ndimage.gaussian_filter(t, sigma) for t in tissue])
    return tissue, out_shape, out_affine


@functools.lru_cache(maxsize=4)
def _basis(shape: tuple[int, int, int], n_nodes: int = 4) -> tuple[np.ndarray, ...]:
    """Separable Gaussian bases ``(n_i, n_nodes)`` spanning each axis, for smooth random fields."""
    bases = []
    for n in shape:
        x = np.linspace(0.0, 1.0, n)[:, None]
        nodes = np.linspace(0.0, 1.0, n_nodes)[None, :]
        bases.append(np.exp(-0.5 * ((x - nodes) * (n_nodes - 1)) ** 2).astype(np.float32))
    return tuple(bases)


def _smooth_fields(rng: np.random.Generator, n_fields: int, shape: tuple[int, int, int]) -> np.ndarray:
    """``(n_fields, *shape)`` smooth random fields, each with maximum absolute value 1."""
    bx, by, bz = _basis(shape)
    coef = rng.standard_normal((n_fields,) + (bx.shape[1],) * 3).astype(np.float32)
    f = np.einsum("ia,najk->nijk", bx, np.einsum("jb,nabk->najk", by, np.einsum("kc,nabc->nabk", bz, coef)))
    return f / np.abs(f).reshape(n_fields, -1).max(axis=1)[:, None, None, None]


def _reorient(data: np.ndarray, affine: np.ndarray, code: str) -> tuple[np.ndarray, np.ndarray]:
    """Flip RAS-ordered ``data`` into orientation ``code`` and adjust ``affine`` to keep world space."""
    affine = affine.copy()
    for ax in ORIENTATIONS[code]:
        affine[:3, 3] += affine[:3, ax] * (data.shape[ax] - 1)
        affine[:3, ax] *= -1
    return np.ascontiguousarray(np.flip(data, ORIENTATIONS[code])), affine


class LesionedT1(NamedTuple):
    """A synthetic T1w image with lesions: ``image`` (int16), ``mask`` (uint8 binary lesion mask,
    same shape, affine and axis order) and the ``lesions`` drawn, centres in world mm."""

    image: nib.Nifti1Image
    mask: nib.Nifti1Image
    lesions: tuple[LesionSpec, ...]


def synthesize_t1(
    age_years: float, rng: np.random.Generator, resolution_mm: float = 2.0, nuisance: bool = True
) -> nib.Nifti1Image:
    """One synthetic T1w volume of a child of ``age_years``.

    Returns an int16 3-D image of shape ``round(198, 234, 190) / resolution_mm`` (the MNI152
    field of view) with voxel size ``resolution_mm`` mm, in RAS, LAS or LPS axis order drawn
    from ``rng``. Intensities are scanner-like: CSF ~250, GM ~650, adult WM ~900, background ~0
    plus noise. ``nuisance=False`` drops all per-subject variation, leaving the age effects.
    """
    return _synthesize(age_years, rng, resolution_mm, nuisance)[0]


def synthesize_t1_with_lesions(
    age_years: float,
    rng: np.random.Generator,
    resolution_mm: float = 2.0,
    nuisance: bool = True,
    polarity: str = "mixed",
    lesion_rng: np.random.Generator | None = None,
) -> LesionedT1:
    """:func:`synthesize_t1` with 1-3 lesions (:mod:`neuro_ood.data.lesions`) of ``polarity``
    ``hyper``, ``hypo`` or ``mixed``.

    The lesions are drawn from ``lesion_rng`` (default: a child stream spawned from ``rng``), so
    ``rng`` makes the same draws as in :func:`synthesize_t1`: outside the lesions the image is
    identical to ``synthesize_t1(age_years, <same rng>, ...)``. They are blended into the clean
    contrast before the bias field and Rician noise, and the mask gets the image's reorientation.
    """
    if polarity not in POLARITIES:
        raise ValueError(f"lesion polarity must be one of {', '.join(POLARITIES)}, got {polarity!r}")
    lesion_rng = rng.spawn(1)[0] if lesion_rng is None else lesion_rng
    image, mask, specs = _synthesize(age_years, rng, resolution_mm, nuisance, (lesion_rng, polarity))
    return LesionedT1(image, mask, specs)


def _nifti(data: np.ndarray, out_affine: np.ndarray, code: str) -> nib.Nifti1Image:
    """``data`` (RAS voxel order on the grid ``out_affine``) stored in orientation ``code``."""
    data, affine = _reorient(data, out_affine, code)
    out = nib.Nifti1Image(data, affine)
    out.set_sform(affine, code=1)
    out.set_qform(affine, code=1)
    out.header.set_xyzt_units("mm")
    return out


def _synthesize(
    age_years: float,
    rng: np.random.Generator,
    resolution_mm: float,
    nuisance: bool,
    lesions: tuple[np.random.Generator, str] | None = None,
) -> tuple[nib.Nifti1Image, nib.Nifti1Image | None, tuple[LesionSpec, ...]]:
    """Image, lesion mask (None without ``lesions``: a ``(lesion_rng, polarity)`` pair) and lesions."""
    if resolution_mm <= 0:
        raise ValueError(f"resolution_mm must be positive, got {resolution_mm}")
    tissue, out_shape, out_affine = _grid(float(resolution_mm))
    _, t_affine, centre, _ = _templates()
    shape = tuple(int(n) for n in out_shape)
    d = age_deviation(age_years)
    code = list(ORIENTATIONS)[rng.integers(len(ORIENTATIONS))]

    scale = 1.0 - MAX_SHRINK * d
    intensity = np.array([CSF_INTENSITY, GM_INTENSITY, GM_INTENSITY])
    intensity[2] *= WM_GM_RATIO_ADULT + (WM_GM_RATIO_INFANT - WM_GM_RATIO_ADULT) * d
    rot, shift = np.eye(3), np.zeros(3)
    if nuisance:
        rot = Rotation.from_euler("xyz", rng.uniform(-4, 4, 3), degrees=True).as_matrix()
        shift = rng.uniform(-4, 4, 3)
        scale *= 1.0 + rng.uniform(-0.03, 0.03)
        intensity *= 1.0 + rng.uniform(-0.03, 0.03, 3)
        fields = _smooth_fields(rng, 4, shape)
        disp = fields[:3] * rng.uniform(1.0, 3.0, (3, 1, 1, 1)).astype(np.float32)
        bias = 1.0 + fields[3] * rng.uniform(0.03, 0.10)
        noise_sd = rng.uniform(0.02, 0.03) * intensity[2]

    # Pull back each output voxel (world y) to the template: x = c + R^T (y - c - t) / s + u(y).
    vox2tpl = np.linalg.inv(t_affine)
    lin = vox2tpl[:3, :3] @ rot.T @ out_affine[:3, :3] / scale
    off = vox2tpl[:3, :3] @ (centre + rot.T @ (out_affine[:3, 3] - centre - shift) / scale) + vox2tpl[:3, 3]
    ijk = [np.arange(n, dtype=np.float32) for n in shape]
    coords = np.empty((3,) + shape, np.float32)
    for r in range(3):
        coords[r] = (
            off[r]
            + lin[r, 0] * ijk[0][:, None, None]
            + lin[r, 1] * ijk[1][None, :, None]
            + lin[r, 2] * ijk[2][None, None, :]
        )
    if nuisance:
        coords += np.einsum("ij,j...->i...", vox2tpl[:3, :3].astype(np.float32), disp)

    contrast = np.tensordot(intensity.astype(np.float32), tissue, axes=1)
    img = ndimage.map_coordinates(contrast, coords, order=1, mode="constant", cval=0.0, prefilter=False)
    drawn = None
    if lesions is not None:  # on the subject's own anatomy: the tissue maps warped like the image
        warped = np.stack([ndimage.map_coordinates(t, coords, order=1, mode="constant", cval=0.0, prefilter=False)
                           for t in tissue])
        drawn = draw_lesions(lesions[0], warped, out_affine, polarity=lesions[1])
        img = drawn.insert(img, intensity)
    if nuisance:
        img *= bias
        noise = rng.standard_normal((2,) + shape, dtype=np.float32) * np.float32(noise_sd)
        img = np.hypot(img + noise[0], noise[1])

    data = np.clip(np.rint(img), 0, np.iinfo(np.int16).max).astype(np.int16)
    if drawn is None:
        return _nifti(data, out_affine, code), None, ()
    return _nifti(data, out_affine, code), _nifti(drawn.binary.astype(np.uint8), out_affine, code), drawn.specs


def _write_nifti_gz(path: pathlib.Path, img: nib.Nifti1Image) -> None:
    with atomic_write(path) as tmp:
        tmp.write_bytes(gzip.compress(img.to_bytes(), compresslevel=1))


def write_synthetic_cohort(
    out_dir,
    n_inliers: int,
    ages: Sequence[float] = (1, 2, 4, 6),
    per_age: int = 10,
    seed: int = 0,
    inlier_age_range: tuple[float, float] = (9.0, 11.0),
    resolution_mm: float = 2.0,
    n_lesion: int = 0,
    lesion_polarity: str = "mixed",
) -> pathlib.Path:
    """Write a BIDS raw dataset of ``n_inliers`` inliers and ``per_age`` children per age in ``ages``.

    Inliers (group ``inlier``, ages uniform in ``inlier_age_range``) come first as
    ``sub-0001``...; then the outliers (group ``age-<a>``, age exactly ``a``); then ``n_lesion``
    subjects with 1-3 lesions of ``lesion_polarity`` (``hyper``, ``hypo`` or ``mixed``; group
    ``lesion``, ages uniform in ``inlier_age_range``), whose binary masks go to
    ``derivatives/lesions/sub-X/anat/sub-X_label-lesion_mask.nii.gz`` (uint8, the T1w's grid).
    With lesion subjects, ``participants.tsv`` also has ``lesion`` (``n/a``, or the polarity the
    subject got: ``hyper``, ``hypo`` or ``mixed``) and ``lesion_volume_ml`` (binary mask volume).
    Each subject draws from its own generator seeded by ``(seed, group, index)``, so adding
    subjects leaves earlier ones unchanged. Returns ``out_dir`` as a ``pathlib.Path``.
    """
    if lesion_polarity not in POLARITIES:
        raise ValueError(f"lesion polarity must be one of {', '.join(POLARITIES)}, got {lesion_polarity!r}")
    if n_lesion < 0:
        raise ValueError(f"n_lesion must be >= 0, got {n_lesion}")
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    subjects = [(np.random.default_rng([seed, 0, i]), None, "inlier") for i in range(n_inliers)]
    for a in ages:
        key = int(round(float(a) * 1000))
        subjects += [(np.random.default_rng([seed, 1, key, j]), float(a), f"age-{a:g}") for j in range(per_age)]
    subjects += [(np.random.default_rng([seed, 2, j]), None, "lesion") for j in range(n_lesion)]

    derivatives = out_dir / "derivatives" / "lesions"
    rows = ["participant_id\tage\tsex\tgroup" + ("\tlesion\tlesion_volume_ml" if n_lesion else "")]
    for n, (rng, age, group) in enumerate(subjects, start=1):
        if age is None:
            age = float(rng.uniform(*inlier_age_range))
        sex = "M" if rng.random() < 0.5 else "F"
        sub = f"sub-{n:04d}"
        anat = out_dir / sub / "anat"
        anat.mkdir(parents=True, exist_ok=True)
        row = f"{sub}\t{age:.2f}\t{sex}\t{group}"
        if group == "lesion":
            img, mask, specs = synthesize_t1_with_lesions(age, rng, resolution_mm, polarity=lesion_polarity)
            _write_nifti_gz(derivatives / sub / "anat" / f"{sub}_label-lesion_mask.nii.gz", mask)
            voxel_ml = abs(np.linalg.det(mask.affine[:3, :3])) / 1000.0
            volume = float(np.count_nonzero(np.asanyarray(mask.dataobj))) * voxel_ml
            kinds = {spec.polarity for spec in specs}
            row += f"\t{kinds.pop() if len(kinds) == 1 else 'mixed'}\t{volume:.3f}"
        else:
            img = synthesize_t1(age, rng, resolution_mm)
            row += "\tn/a\tn/a" if n_lesion else ""
        _write_nifti_gz(anat / f"{sub}_T1w.nii.gz", img)
        rows.append(row)

    write_text(out_dir / "participants.tsv", "\n".join(rows) + "\n")
    description = {
        "Name": "neuro-ood synthetic cohort",
        "BIDSVersion": "1.8.0",
        "DatasetType": "raw",
        "GeneratedBy": [{"Name": "neuro-ood synth"}],
    }
    sidecar = {
        "age": {"Description": "Age at scan", "Units": "years"},
        "sex": {"Description": "Sex", "Levels": {"M": "male", "F": "female"}},
        "group": {"Description": "'inlier' (training age range) or 'age-<a>' (younger outlier group)"},
    }
    if n_lesion:
        sidecar["group"]["Description"] += " or 'lesion' (training age range, with synthetic lesions)"
        sidecar["lesion"] = {
            "Description": "Polarity of the synthetic lesions on T1 relative to the surrounding tissue; masks in "
                           "derivatives/lesions/sub-<label>/anat/sub-<label>_label-lesion_mask.nii.gz",
            "Levels": {"hyper": "all lesions hyperintense (1.3-1.6 x white matter)",
                       "hypo": "all lesions hypointense (CSF-like to 0.5 x grey matter)",
                       "mixed": "both hyper- and hypointense lesions", "n/a": "no lesion"},
        }
        sidecar["lesion_volume_ml"] = {"Description": "Volume of the binary lesion mask", "Units": "ml"}
        write_json(derivatives / "dataset_description.json", {
            "Name": "neuro-ood synthetic lesion masks",
            "BIDSVersion": "1.8.0",
            "DatasetType": "derivative",
            "GeneratedBy": [{"Name": "neuro-ood synth",
                             "Description": "synthetic lesions inserted before bias field and noise; binary "
                                            "masks (soft mask > 0.5) on each T1w's grid"}],
        })
    write_json(out_dir / "dataset_description.json", description)
    write_json(out_dir / "participants.json", sidecar)
    return out_dir
