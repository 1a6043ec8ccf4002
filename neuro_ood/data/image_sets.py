"""The image-set registry and spec language, and the size and split helpers every set goes through.

:func:`load_dataset` turns a spec into an :class:`~neuro_ood.data.image_readers.ImageSet` of the
requested channels and size: a set name found under a data root in its standard layout
(:data:`_PLACES`, with aliases such as ``cifar-10`` or ``fmnist``), ``folder:<path>``, an offline
built-in (:data:`neuro_ood.data.image_builtins.BUILTIN`) or ``mix:<a>+<b>+...``.
:func:`fit_images` brings images to a size (MONAI centred pad/crop or anti-aliased bilinear
resize) and :func:`split_train_test` splits one set into disjoint train and test parts
(scikit-learn). Images are float32 ``(N, C, H, W)`` in [0, 1] throughout.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from neuro_ood.data.image_builtins import BUILTIN, GENERATED_DEFAULT_N, POOLS, _rng
from neuro_ood.data.image_readers import (
    DatasetError, ImageSet, _find_file, read_cifar, read_image_folder, read_mnist, read_svhn, to_grayscale,
    to_rgb,
)

_FIT_CHUNK = 1024  # images per MONAI call in fit_images


def fit_images(images: np.ndarray, size: tuple[int, int], mode: str = "pad") -> np.ndarray:
    """Bring images (N, C, H, W) float32 in [0, 1] to (N, C, *size), float32.

    ``mode="pad"``: :class:`monai.transforms.ResizeWithPadOrCrop`, no resampling: each axis is
    zero-padded (an odd pad puts the extra row/column after the image) or centre-cropped, MONAI's
    way: the kept part starts at ``H // 2 - h // 2``, so cutting an odd number of rows from an even
    ``H`` drops the extra row before the kept part.
    ``mode="resize"``: :class:`monai.transforms.Resize`, bilinear (``align_corners=False``), with
    MONAI's Gaussian anti-aliasing on axes that shrink, clipped to [0, 1]. MONAI's Gaussian
    zero-pads, which would darken the border; the result is divided by the same transform of an
    all-ones image, so a constant image stays constant.

    Both transforms act on one channel-first image (C, H, W) and are purely spatial, so the
    batch's N and C are folded into MONAI's channel axis, ``_FIT_CHUNK`` images at a time.
    """
    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 4:
        raise ValueError(f"images must be (N, C, H, W), got shape {images.shape}")
    th, tw = int(size[0]), int(size[1])
    n, c, h, w = images.shape
    if (h, w) == (th, tw):
        return images
    if mode not in ("pad", "resize"):
        raise ValueError(f"unknown fit mode {mode!r} (expected 'pad' or 'resize')")
    import torch
    from monai.transforms import Resize, ResizeWithPadOrCrop

    if mode == "pad":
        transform = ResizeWithPadOrCrop((th, tw), method="symmetric", mode="constant")
    else:
        resize = Resize((th, tw), mode="bilinear", align_corners=False, anti_aliasing=True)
        weight = resize(torch.ones((1, h, w))).as_tensor()  # < 1 near the border when anti-aliasing

        def transform(x):
            return resize(x).as_tensor() / weight

    out = np.empty((n, c, th, tw), dtype=np.float32)
    for start in range(0, n, _FIT_CHUNK):
        batch = torch.from_numpy(np.ascontiguousarray(images[start:start + _FIT_CHUNK]))
        m = len(batch)
        out[start:start + m] = np.asarray(transform(batch.reshape(m * c, h, w))).reshape(m, c, th, tw)
    if mode == "resize":
        np.clip(out, 0.0, 1.0, out=out)
    return out


def split_train_test(imageset: ImageSet, test_fraction: float = 0.25, seed: int = 0) -> tuple[ImageSet, ImageSet]:
    """Random (seeded) disjoint split of one set into (train, test), by
    :func:`sklearn.model_selection.train_test_split`.

    The test part holds ``round(N * test_fraction)`` images; each part keeps the set's order
    (sorted indices). Images (N, C, H, W) and labels are split alike.
    """
    from sklearn.model_selection import train_test_split

    n = len(imageset)
    n_test = int(round(n * test_fraction))
    if not 0 < n_test < n:
        raise ValueError(f"test_fraction {test_fraction} leaves an empty split of {n} images")
    train_idx, test_idx = train_test_split(np.arange(n), test_size=n_test, random_state=seed, shuffle=True)

    def pick(idx):
        idx = np.sort(idx)
        return ImageSet(imageset.name, imageset.images[idx],
                        None if imageset.labels is None else imageset.labels[idx])

    return pick(train_idx), pick(test_idx)


def _fixed_split(imageset: ImageSet, split: str) -> ImageSet:
    """The ``split`` part ("test", else train) of a fixed 75/25 split (seed 0, whatever the run's seed)."""
    return split_train_test(imageset, 0.25, seed=0)[split == "test"]


_ALIASES = {"cifar-10": "cifar10", "cifar-100": "cifar100", "fashionmnist": "fashion-mnist",
            "fashion_mnist": "fashion-mnist", "fmnist": "fashion-mnist"}

# Places under data_root where each set is looked for (first hit wins).
_PLACES = {
    "cifar10": ["cifar-10-batches-py", "cifar10/cifar-10-batches-py", "cifar-10/cifar-10-batches-py",
                "CIFAR10/cifar-10-batches-py", "cifar10", "cifar-10-python.tar.gz"],
    "cifar100": ["cifar-100-python", "cifar100/cifar-100-python", "cifar-100/cifar-100-python",
                 "CIFAR100/cifar-100-python", "cifar100", "cifar-100-python.tar.gz"],
    "svhn": ["{split}_32x32.mat", "svhn/{split}_32x32.mat", "SVHN/{split}_32x32.mat"],
    "mnist": [".", "mnist", "MNIST", "MNIST/raw", "mnist/raw"],
    "fashion-mnist": ["fashion-mnist", "FashionMNIST", "FashionMNIST/raw", "fashion_mnist", "fashion-mnist/raw"],
}


def _find_real(name: str, data_root, split: str) -> ImageSet:
    if data_root is None:
        raise DatasetError(name, f"needs a data root (no data_root given); offline built-ins: {', '.join(BUILTIN)}")
    root = Path(data_root)
    places = [root / p.format(split=split) for p in _PLACES[name]]
    for place in places:
        if name.startswith("cifar"):
            if place.exists() and (place.is_file() or any((place / s).exists() for s in
                                   ("test_batch", "data_batch_1", "meta", "test", "train"))):
                return read_cifar(place, split)
        elif name == "svhn":
            if place.is_file():
                return read_svhn(place, split)
        elif place.is_dir() and _find_file(place, [f"{'t10k' if split == 'test' else split}-images-idx3-ubyte",
                                                   f"{'t10k' if split == 'test' else split}-images.idx3-ubyte"]):
            return read_mnist(place, split, name=name)
    looked = ", ".join(str(p.relative_to(root)) for p in places)
    raise DatasetError(root, f"{name} ({split}) not found; looked for: {looked}")


def load_dataset(spec: str, data_root=None, split: str = "test", channels: int | None = None,
                 size: tuple[int, int] | None = None, n: int | None = None, seed: int = 0,
                 fit: str = "resize") -> ImageSet:
    """Load a data set by name and bring it to the requested channels and size.

    Parameters
    ----------
    spec : "cifar10", "cifar100", "svhn", "mnist", "fashion-mnist", "folder:<path>" (relative
        paths are tried under ``data_root`` first; ``<path>/train`` and ``<path>/test`` are used
        when present, else a fixed 75/25 split of the folder), a built-in (:data:`BUILTIN`: "digits",
        "photos", "china", "flower", "textures", "uniform", "gaussian", "constant") or
        "mix:<a>+<b>+..." (concatenation after conversion; labels dropped since the label spaces
        differ).
    data_root : folder holding the downloaded sets in their standard names.
    split : "train" or "test" ("all" for digits: no split). The photo-crop built-ins draw train
        and test crops from disjoint column ranges of each photo
        (:func:`neuro_ood.data.image_builtins.crop_region`).
    channels : 1 (greyscale) or 3 (RGB), or None to keep the set's own.
    size : (H, W), or None to keep the set's own.
    n : number of images of a generated set (default 2000); for other sets a seeded random
        subset of at most ``n`` images.
    seed : seed of generated sets and subsets (train and test draw different images).
    fit : how ``size`` is reached for read sets (:func:`fit_images`): "resize" (bilinear) or "pad"
        (centred pad/crop); built-ins are always resized.

    Returns
    -------
    ImageSet: images (N, channels, H, W) float32 in [0, 1].
    """
    if channels not in (None, 1, 3):
        raise DatasetError(spec, f"channels must be 1 or 3, got {channels!r}")
    if spec.startswith("mix:"):
        parts = [p for p in spec[4:].split("+") if p]
        if not parts:
            raise DatasetError(spec, "empty mix (expected mix:<a>+<b>)")
        sets = [load_dataset(p, data_root, split, channels, size, n, seed, fit) for p in parts]
        shapes = {s.images.shape[1:] for s in sets}
        if len(shapes) > 1:
            raise DatasetError(spec, f"parts have different image shapes {sorted(shapes)}; give channels and size")
        return ImageSet(spec[4:], np.concatenate([s.images for s in sets]), None)
    if spec.startswith("folder:"):
        folder = Path(spec[7:])
        if data_root is not None and not folder.is_absolute() and (Path(data_root) / folder).is_dir():
            folder = Path(data_root) / folder
        if (folder / split).is_dir():  # folder/train, folder/test layouts
            result = read_image_folder(folder / split)
        elif split == "all":
            result = read_image_folder(folder)
        else:  # one pool of images: a fixed 75/25 split, so train and test never share an image
            try:
                result = _fixed_split(read_image_folder(folder), split)
            except ValueError as err:
                raise DatasetError(folder, str(err)) from None
    else:
        name = _ALIASES.get(spec.lower(), spec.lower())
        if name in POOLS:  # a fixed pool of real images (digits): split, subsampled and resized below
            result = BUILTIN[name](n, size, channels, seed, split)
            if split in ("train", "test"):
                result = _fixed_split(result, split)
            fit = "resize"
        elif name in BUILTIN:  # generated at the requested size
            result = BUILTIN[name](GENERATED_DEFAULT_N if n is None else n, size, channels, seed, split)
            n = None
        elif name in _PLACES:
            result = _find_real(name, data_root, split)
        else:
            raise DatasetError(spec, f"unknown data set; known: {', '.join([*_PLACES, *BUILTIN])}, "
                                     "folder:<path>, mix:<a>+<b>")
    images, labels = result.images, result.labels
    if n is not None and n < len(images):
        idx = np.sort(_rng(seed, split).choice(len(images), n, replace=False))
        images, labels = images[idx], None if labels is None else labels[idx]
    if channels == 1:
        images = to_grayscale(images)
    elif channels == 3:
        images = to_rgb(images)
    if size is not None:
        images = fit_images(images, size, mode=fit)
    return ImageSet(result.name, images, labels)
