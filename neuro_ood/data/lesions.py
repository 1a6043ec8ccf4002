"""Synthetic focal lesions for the synthetic T1 cohort, so that anomaly localisation can be measured.

A lesion is an ellipsoid (semi-axes ``radius_mm`` times an anisotropy of up to ~1.3 per axis,
randomly rotated) or a *blob*: the same ellipsoid whose radius along each direction is modulated
by a smooth random function on the sphere (8 random Fourier features), giving an irregular,
lobulated outline. Its mask is soft: a linear ramp one voxel wide across the outline (0.5 on it),
multiplied by the parenchyma probability (GM + WM) so that lesions stay inside the brain; the
binary mask is ``soft > 0.5``.

Intensity model (on the clean, noise-free contrast image, before bias field and noise). Inside
the lesion the tissue intensity ``x`` becomes ``(1 - m) x + m L`` where ``m`` is the soft mask and
``L`` the lesion intensity, relative to the subject's own tissue intensities (CSF, GM, WM):

* ``hyper``: ``L = level * WM`` with ``level`` uniform in [1.3, 1.6] (WM ~900, so L ~1170-1440);
* ``hypo``: ``L = CSF + level * (0.5 GM - CSF)`` with ``level`` uniform in [0, 1] (L ~250-325:
  CSF-like to half the GM intensity, e.g. a cyst, infarct or T1 "black hole").

Each subject gets 1-3 lesions (uniform); radii are log-uniform in [3, 15] mm (0.1-14 ml),
shapes ellipsoid or blob with equal odds. Centres lie on a voxel centre in white matter
(WM probability > 0.8) or deep grey matter (GM > 0.5 at least 25 mm inside the brain), with
GM + WM > 0.8, at least one radius inside the brain where such voxels exist. Everything works on a volume in RAS voxel
order with its voxel-to-world affine (mm), such as the grid of :mod:`neuro_ood.data.synthetic`.
"""

from __future__ import annotations

from dataclasses import dataclass

import nibabel as nib
import numpy as np
from scipy import ndimage
from scipy.spatial.transform import Rotation

SHAPES = ("ellipsoid", "blob")
POLARITIES = ("hyper", "hypo", "mixed")
COUNT_RANGE = (1, 3)
RADIUS_RANGE_MM = (3.0, 15.0)
HYPER_WM_RANGE = (1.3, 1.6)
WM_CENTRE_PROBABILITY = 0.8
GM_CENTRE_PROBABILITY = 0.5
DEEP_GM_DEPTH_MM = 25.0
PARENCHYMA_CENTRE_PROBABILITY = 0.8
MAX_ANISOTROPY = 0.25  # log of the largest semi-axis ratio to the mean radius
ROUGHNESS_RANGE = (0.15, 0.35)  # log-radius modulation of blobs per unit of the (clipped) field
_N_FEATURES = 8
_FIELD_CLIP = 2.5


@dataclass(frozen=True)
class LesionSpec:
    """One lesion. ``centre_mm`` is in world (RAS, mm) coordinates; ``radius_mm`` is the geometric
    mean semi-axis; ``axes`` the semi-axis ratios (geometric mean 1) along the rotated frame
    ``rotation_deg`` (xyz Euler angles); ``level`` sets the intensity (see the module docstring);
    ``roughness`` and ``seed`` shape a blob's outline (ignored for ellipsoids)."""

    shape: str
    polarity: str
    radius_mm: float
    centre_mm: tuple[float, float, float]
    axes: tuple[float, float, float] = (1.0, 1.0, 1.0)
    rotation_deg: tuple[float, float, float] = (0.0, 0.0, 0.0)
    level: float = 1.45
    roughness: float = 0.0
    seed: int = 0

    def __post_init__(self):
        if self.shape not in SHAPES:
            raise ValueError(f"lesion shape must be one of {', '.join(SHAPES)}, got {self.shape!r}")
        if self.polarity not in POLARITIES[:2]:
            raise ValueError(f"lesion polarity must be hyper or hypo, got {self.polarity!r}")
        if self.radius_mm <= 0:
            raise ValueError(f"lesion radius must be positive, got {self.radius_mm}")

    def intensity(self, tissue_intensity) -> float:
        """Lesion intensity ``L`` given the subject's ``(CSF, GM, WM)`` intensities."""
        csf, gm, wm = (float(v) for v in tissue_intensity)
        if self.polarity == "hyper":
            return self.level * wm
        return csf + self.level * (0.5 * gm - csf)


@dataclass(frozen=True)
class Lesions:
    """Lesions drawn for one subject on one grid: ``parts`` ``(n, X, Y, Z)`` float32 soft masks in
    [0, 1], one per spec, in the grid's voxel order."""

    specs: tuple[LesionSpec, ...]
    parts: np.ndarray

    @property
    def soft(self) -> np.ndarray:
        """``(X, Y, Z)`` float32 soft mask in [0, 1] of all lesions (voxel-wise maximum)."""
        return self.parts.max(axis=0) if len(self.parts) else np.zeros(self.parts.shape[1:], np.float32)

    @property
    def binary(self) -> np.ndarray:
        """``(X, Y, Z)`` bool lesion mask, ``soft > 0.5``."""
        return self.soft > 0.5

    @property
    def polarity(self) -> str:
        """``hyper`` or ``hypo`` when all lesions share it, else ``mixed``."""
        kinds = {s.polarity for s in self.specs}
        return kinds.pop() if len(kinds) == 1 else "mixed"

    def insert(self, image: np.ndarray, tissue_intensity) -> np.ndarray:
        """Blend ``image`` (clean contrast, same grid) towards each lesion's intensity, in spec order;
        voxels outside every lesion keep their exact value. Returns a new float32 array."""
        out = np.array(image, dtype=np.float32, copy=True)
        for spec, m in zip(self.specs, self.parts):
            inside = m > 0
            level = np.float32(spec.intensity(tissue_intensity))
            out[inside] = out[inside] * (1 - m[inside]) + m[inside] * level
        return out


def _voxel_mm(affine: np.ndarray) -> np.ndarray:
    return np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))


def _outline_factor(spec: LesionSpec, u: np.ndarray) -> np.ndarray:
    """Radius multiplier along unit directions ``u`` ``(..., 3)`` (lesion frame): 1 for ellipsoids."""
    if spec.shape == "ellipsoid" or spec.roughness == 0:
        return np.ones(u.shape[:-1], np.float64)
    rng = np.random.default_rng(spec.seed)
    omega = rng.normal(0.0, 2.0, (_N_FEATURES, 3))
    phase = rng.uniform(0.0, 2 * np.pi, _N_FEATURES)
    field = np.cos(u @ omega.T + phase).sum(axis=-1) / np.sqrt(_N_FEATURES / 2)
    return np.exp(spec.roughness * np.clip(field, -_FIELD_CLIP, _FIELD_CLIP))


def render_lesion(spec: LesionSpec, shape: tuple[int, int, int], affine: np.ndarray) -> np.ndarray:
    """``shape`` float32 soft mask in [0, 1] of one lesion on the grid of voxel-to-world ``affine`` (mm):
    1 more than half a voxel inside the outline, 0 more than half a voxel outside, linear between."""
    affine = np.asarray(affine, np.float64)
    voxel = _voxel_mm(affine)
    centre = np.asarray(spec.centre_mm, np.float64)
    axes = spec.radius_mm * np.asarray(spec.axes, np.float64)
    reach = axes.max() * (np.exp(spec.roughness * _FIELD_CLIP) if spec.shape == "blob" else 1.0) + 2 * voxel.max()
    c = nib.affines.apply_affine(np.linalg.inv(affine), centre)
    half = reach / voxel
    lo = np.clip(np.floor(c - half), 0, np.array(shape)).astype(int)
    hi = np.clip(np.ceil(c + half) + 1, 0, np.array(shape)).astype(int)
    out = np.zeros(shape, np.float32)
    if np.any(hi <= lo):
        return out
    ijk = np.stack(np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi)], indexing="ij"), axis=-1)
    rot = Rotation.from_euler("xyz", spec.rotation_deg, degrees=True).as_matrix()
    p = (nib.affines.apply_affine(affine, ijk) - centre) @ rot  # lesion frame: p = R^T (x - c)
    dist = np.linalg.norm(p, axis=-1)
    r_norm = np.linalg.norm(p / axes, axis=-1)
    # radius of the ellipsoid along each voxel's direction; at the centre any positive value will do
    rho = np.divide(dist, r_norm, out=np.full_like(dist, spec.radius_mm), where=r_norm > 0)
    u = p / np.maximum(dist, 1e-9)[..., None]
    signed_mm = dist - _outline_factor(spec, u) * rho  # radial distance to the outline, < 0 inside
    ramp = np.clip(0.5 - signed_mm / np.cbrt(voxel.prod()), 0.0, 1.0)
    out[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = ramp
    return out


def _centre_candidates(tissue: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flat indices of voxels allowed as lesion centres and each one's depth inside the brain (mm)."""
    _, gm, wm = tissue
    depth = ndimage.distance_transform_edt(tissue.sum(axis=0) > 0.5, sampling=_voxel_mm(affine))
    allowed = (wm > WM_CENTRE_PROBABILITY) | ((gm > GM_CENTRE_PROBABILITY) & (depth > DEEP_GM_DEPTH_MM))
    allowed &= gm + wm > PARENCHYMA_CENTRE_PROBABILITY
    index = np.flatnonzero(allowed)
    return index, depth.reshape(-1)[index]


def draw_lesions(
    rng: np.random.Generator,
    tissue: np.ndarray,
    affine: np.ndarray,
    polarity: str = "mixed",
    count: int | None = None,
    radius_range_mm: tuple[float, float] = RADIUS_RANGE_MM,
) -> Lesions:
    """Draw ``count`` (default: uniform in 1-3) lesions for one subject and render them.

    ``tissue`` is ``(3, X, Y, Z)``: CSF, GM and WM probabilities on the grid of voxel-to-world
    ``affine`` (RAS voxel order, mm). ``polarity`` is ``hyper``, ``hypo`` or ``mixed`` (each lesion
    hyper or hypo with equal odds). Every lesion's soft mask is confined to the parenchyma
    (multiplied by GM + WM); the binary mask of :class:`Lesions` holds at least the centre voxels.
    """
    if polarity not in POLARITIES:
        raise ValueError(f"lesion polarity must be one of {', '.join(POLARITIES)}, got {polarity!r}")
    tissue = np.asarray(tissue, np.float32)
    index, depth = _centre_candidates(tissue, affine)
    if index.size == 0:
        raise ValueError("no white or deep grey matter voxel to place a lesion in")
    shape = tissue.shape[1:]
    parenchyma = np.clip(tissue[1] + tissue[2], 0.0, 1.0)
    n = int(rng.integers(COUNT_RANGE[0], COUNT_RANGE[1] + 1)) if count is None else int(count)
    specs, parts = [], []
    for _ in range(n):
        radius = float(np.exp(rng.uniform(*np.log(radius_range_mm))))
        deep = depth >= min(radius, 0.5 * depth.max())
        centre_voxel = np.unravel_index(rng.choice(index[deep]), shape)
        kind = str(rng.choice(SHAPES))
        pol = polarity if polarity != "mixed" else str(rng.choice(POLARITIES[:2]))
        log_axes = rng.uniform(-MAX_ANISOTROPY, MAX_ANISOTROPY, 3)
        spec = LesionSpec(
            shape=kind,
            polarity=pol,
            radius_mm=radius,
            centre_mm=tuple(float(v) for v in nib.affines.apply_affine(affine, centre_voxel)),
            axes=tuple(float(v) for v in np.exp(log_axes - log_axes.mean())),
            rotation_deg=tuple(float(v) for v in rng.uniform(-180, 180, 3)),
            level=float(rng.uniform(*HYPER_WM_RANGE) if pol == "hyper" else rng.uniform(0.0, 1.0)),
            roughness=float(rng.uniform(*ROUGHNESS_RANGE)) if kind == "blob" else 0.0,
            seed=int(rng.integers(2**31)),
        )
        specs.append(spec)
        parts.append(render_lesion(spec, shape, affine) * parenchyma)
    return Lesions(specs=tuple(specs), parts=np.stack(parts) if parts else np.zeros((0, *shape), np.float32))
