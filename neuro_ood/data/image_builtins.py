"""Offline built-in image sets, made from data that ships with the installed packages.

:data:`BUILTIN` maps a name to a maker ``make(n, size, channels, seed, split) -> ImageSet``:

* ``digits``: scikit-learn's 1797 8×8 greyscale digits, labels 0-9. It is one fixed pool of real
  images (listed in :data:`POOLS`): its maker returns all of it, and
  :func:`neuro_ood.data.image_sets.load_dataset` splits it 75/25, subsamples and resizes it like a
  read set.
* ``photos``, ``china``, ``flower``, ``textures``: seeded random crops of scikit-learn's sample
  photos (both, the detailed city scene, the flower on a smooth background) and of matplotlib's
  sample portrait and terrain maps, RGB. Crops of ``split="train"`` and ``split="test"`` come from
  disjoint column ranges of every photo (:func:`crop_region`), so no test crop shares a pixel with a
  training crop.
* ``uniform``, ``gaussian`` (N(0.5, 1) clipped, MSMA A.1), ``constant``: noise images.

Every maker returns images float32 ``(N, C, H, W)`` in [0, 1]. Generated sets have
:data:`GENERATED_DEFAULT_N` images unless ``n`` says otherwise; ``train`` and ``test`` draw from
different random streams of the same ``seed``.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from neuro_ood.data.image_readers import ImageSet

GENERATED_DEFAULT_N = 2000
TEST_REGION_FRACTION = 0.25  # of each photo's columns, on its right, hold the test crops


def _rng(seed: int, split: str) -> np.random.Generator:
    return np.random.default_rng([int(seed), {"train": 1, "test": 2}.get(split, 3)])


def _digits(n, size, channels, seed, split):
    """All of scikit-learn's digits: images (1797, 1, 8, 8), labels (1797,) in 0..9.

    A fixed pool: ``n``, ``size``, ``channels``, ``seed`` and ``split`` are applied by
    ``load_dataset`` (see :data:`POOLS`).
    """
    from sklearn.datasets import load_digits

    d = load_digits()
    return ImageSet("digits", (d.images / 16.0)[:, None], d.target)


def _sklearn_photos(*names: str) -> list[np.ndarray]:
    """scikit-learn's sample photos (china.jpg, flower.jpg) as (H, W, 3) uint8."""
    from sklearn.datasets import load_sample_image

    return [load_sample_image(f"{name}.jpg") for name in names]


def _matplotlib_textures() -> list[np.ndarray]:
    """matplotlib's sample data as (H, W, 3) uint8: a portrait photo (grace_hopper.jpg) and two
    terrain elevation maps (jacksboro_fault_dem, topobathy) rendered as grey levels."""
    from matplotlib import cbook
    from matplotlib.image import imread

    def grey(array: np.ndarray) -> np.ndarray:
        array = np.nan_to_num(np.asarray(array, dtype=np.float64))
        low, high = np.percentile(array, [1, 99])
        scaled = np.clip((array - low) / max(high - low, 1e-9), 0, 1)
        return np.repeat((scaled * 255).astype(np.uint8)[..., None], 3, axis=2)

    portrait = np.asarray(imread(cbook.get_sample_data("grace_hopper.jpg")))[..., :3]
    dem = cbook.get_sample_data("jacksboro_fault_dem.npz")["elevation"]
    bathy = cbook.get_sample_data("topobathy.npz")["topo"]
    return [portrait.astype(np.uint8), grey(dem), grey(bathy)]


def crop_region(width: int, crop_width: int, split: str) -> tuple[int, int]:
    """Columns ``[start, stop)`` of a photo ``width`` pixels wide that ``split``'s crops lie in.

    ``"test"``: the right :data:`TEST_REGION_FRACTION` of the columns (at least ``crop_width``);
    ``"train"``: the columns left of them. The two never share a column, so a test crop never
    overlaps a training crop. Any other split: the whole width.
    """
    if split not in ("train", "test"):
        return 0, width
    boundary = width - max(int(round(width * TEST_REGION_FRACTION)), crop_width)
    return (0, boundary) if split == "train" else (boundary, width)


def _crop_positions(shapes: list[tuple[int, int]], n: int, size: tuple[int, int], seed: int,
                    split: str, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Seeded crop positions: photo index, top row and left column of each of ``n`` crops.

    ``shapes`` are the photos' (H, W); ``size`` the crops' (h, w). Every crop lies inside its
    photo's :func:`crop_region` for ``split``. Returns three int64 arrays (n,).
    """
    h, w = size
    heights = np.array([s[0] for s in shapes])
    regions = np.array([crop_region(s[1], w, split) for s in shapes]).reshape(-1, 2)
    for (ph, pw), (x0, x1) in zip(shapes, regions):
        if h > ph or w > pw:
            raise ValueError(f"{name}: crop {h}x{w} is larger than the sample photo {ph}x{pw}")
        if w > x1 - x0:
            raise ValueError(f"{name}: crop {h}x{w} does not fit the {split} region (columns {x0}..{x1 - 1}) "
                             f"of the sample photo {ph}x{pw}")
    rng = _rng(seed, split)
    which = rng.integers(0, len(shapes), n)
    ys = rng.integers(0, heights[which] - h + 1)
    xs = rng.integers(regions[which, 0], regions[which, 1] - w + 1)
    return which, ys, xs


def _crops(name: str, load: Callable[[], list[np.ndarray]]):
    """A built-in of seeded random crops of the photos ``load`` returns, RGB (N, 3, h, w)."""

    def make(n, size, channels, seed, split):
        h, w = size or (32, 32)
        photos = load()
        which, ys, xs = _crop_positions([p.shape[:2] for p in photos], n, (h, w), seed, split, name)
        out = np.empty((n, 3, h, w), dtype=np.float32)
        for i, (k, y, x) in enumerate(zip(which, ys, xs)):
            out[i] = photos[k][y:y + h, x:x + w].transpose(2, 0, 1) / 255.0
        return ImageSet(name, out, None)

    return make


def _noise(kind):
    def make(n, size, channels, seed, split):
        shape = (n, channels or 3) + tuple(size or (32, 32))
        rng = _rng(seed, split)
        if kind == "uniform":
            x = rng.random(shape)
        elif kind == "gaussian":  # N(0.5, 1) clipped, as in MSMA (Mahmood et al. 2021) A.1
            x = np.clip(rng.normal(0.5, 1.0, shape), 0.0, 1.0)
        else:  # constant grey images, a classic likelihood failure case
            x = np.broadcast_to(rng.random(n)[:, None, None, None], shape)
        return ImageSet(kind, np.asarray(x, dtype=np.float32), None)
    return make


BUILTIN = {
    "digits": _digits,      # sklearn load_digits, 1797 8x8 greyscale, labels 0-9
    "photos": _crops("photos", lambda: _sklearn_photos("china", "flower")),  # crops of sklearn's sample photos
    "china": _crops("china", lambda: _sklearn_photos("china")),      # a detailed city scene
    "flower": _crops("flower", lambda: _sklearn_photos("flower")),   # a flower on a smooth background
    "textures": _crops("textures", _matplotlib_textures),            # matplotlib's portrait and terrain maps
    "uniform": _noise("uniform"),
    "gaussian": _noise("gaussian"),
    "constant": _noise("constant"),
}
# Built-ins that are one fixed pool of real images: load_dataset splits them 75/25 (fixed seed,
# so train and test never share an image), subsamples them to ``n`` and resizes them to ``size``.
POOLS = frozenset({"digits"})
