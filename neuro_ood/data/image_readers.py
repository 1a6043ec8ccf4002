"""Readers of natural-image sets in the formats they ship in, and channel conversions.

Holds :class:`ImageSet` (images float32 ``(N, C, H, W)`` in [0, 1], labels int64 ``(N,)`` or
None) and :class:`DatasetError` (one line: the path and the reason a file cannot be used), and
reads CIFAR-10/100 python pickles (through a restricted unpickler that only builds numpy arrays),
SVHN cropped-digit ``.mat`` files, MNIST / Fashion-MNIST IDX files (raw or gzip) and folders of
PNG/JPEG images; :func:`to_grayscale` and :func:`to_rgb` convert between 1 and 3 channels.
Finding a set by name is :mod:`neuro_ood.data.image_sets`; the offline generated sets are
:mod:`neuro_ood.data.image_builtins`.
"""

from __future__ import annotations

import gzip
import importlib
import io
import pickle
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from neuro_ood.errors import CohortError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


class DatasetError(CohortError):
    """An image data set is missing, unsafe, truncated or malformed."""

    def __init__(self, path, reason: str):
        self.path = str(path)
        self.reason = " ".join(str(reason).split())
        super().__init__(f"{self.path}: {self.reason}")


@dataclass
class ImageSet:
    """A set of images.

    Attributes
    ----------
    name : str
    images : float32 array (N, C, H, W) in [0, 1]
    labels : int64 array (N,) or None
    """

    name: str
    images: np.ndarray
    labels: np.ndarray | None = None

    def __post_init__(self):
        self.images = np.ascontiguousarray(self.images, dtype=np.float32)
        if self.images.ndim != 4:
            raise ValueError(f"{self.name}: images must be (N, C, H, W), got shape {self.images.shape}")
        if self.labels is not None:
            self.labels = np.asarray(self.labels, dtype=np.int64).reshape(-1)
            if len(self.labels) != len(self.images):
                raise ValueError(f"{self.name}: {len(self.labels)} labels for {len(self.images)} images")

    def __len__(self) -> int:
        return len(self.images)


# --------------------------------------------------------------------------- CIFAR pickles

def _numpy_attr(module: str, name: str):
    for candidate in (module.replace("numpy.core", "numpy._core"), module.replace("numpy._core", "numpy.core")):
        try:
            return getattr(importlib.import_module(candidate), name)
        except (ImportError, AttributeError):
            continue
    raise pickle.UnpicklingError(f"{module}.{name} is not available in this numpy")


_SAFE_GLOBALS = {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")} | {
    (f"numpy.{core}.{mod}", name)
    for core in ("core", "_core")
    for mod, name in (("multiarray", "_reconstruct"), ("multiarray", "scalar"), ("numeric", "_frombuffer"))
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that builds only dicts, lists, bytes, str, numbers and numpy arrays/scalars."""

    def find_class(self, module, name):
        if (module, name) not in _SAFE_GLOBALS:
            raise pickle.UnpicklingError(f"refused to load {module}.{name}: only numpy arrays are allowed "
                                         "in a data-set pickle (the file may be malicious)")
        if module == "_codecs":
            import codecs
            return codecs.encode
        return _numpy_attr(module, name)


def _safe_unpickle(raw: bytes, where) -> object:
    try:
        return _RestrictedUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except pickle.UnpicklingError as err:
        raise DatasetError(where, f"unsafe or corrupt pickle ({err})") from None
    except Exception as err:  # truncated streams raise EOFError, ValueError, ...
        raise DatasetError(where, f"corrupt or truncated pickle ({type(err).__name__}: {err})") from None


def _get(batch: dict, key: str):
    return batch.get(key.encode(), batch.get(key))


def read_cifar(path, split: str = "test") -> ImageSet:
    """Read CIFAR-10 or CIFAR-100 ("python version" pickles).

    Parameters
    ----------
    path : folder ``cifar-10-batches-py`` (``data_batch_1..5``, ``test_batch``) or
        ``cifar-100-python`` (``train``, ``test``), a folder holding one of them, or the
        ``cifar-10-python.tar.gz`` / ``cifar-100-python.tar.gz`` archive.
    split : "train" or "test"

    Returns
    -------
    ImageSet named "cifar10" or "cifar100": images (N, 3, 32, 32), labels (N,) (fine labels
    for CIFAR-100).
    """
    path = Path(path)
    if split not in ("train", "test"):
        raise DatasetError(path, f"unknown split {split!r} (expected 'train' or 'test')")
    names10 = ["test_batch"] if split == "test" else [f"data_batch_{i}" for i in range(1, 6)]
    names100 = [split]
    if path.is_file() and path.name.endswith((".tar.gz", ".tgz", ".tar")):
        try:
            with tarfile.open(path) as tar:
                members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
                cifar10 = any(m in members for m in ("test_batch", "data_batch_1", "batches.meta"))
                kind, names = (10, names10) if cifar10 else (100, names100)
                if any(n not in members for n in names):
                    raise DatasetError(path, f"archive holds no CIFAR {split} batch ({', '.join(names)})")
                blobs = [(f"{path}!{n}", tar.extractfile(members[n]).read()) for n in names]
        except (tarfile.TarError, EOFError, OSError, zlib.error) as err:
            raise DatasetError(path, f"corrupt or truncated archive ({err})") from None
    else:
        folder = path
        for sub in ("cifar-10-batches-py", "cifar-100-python"):
            if (path / sub).is_dir() and not (path / "test_batch").exists() and not (path / "meta").exists():
                folder = path / sub
                break
        if (folder / names10[0]).exists() or (folder / "batches.meta").exists():
            kind, names = 10, names10
        elif (folder / "meta").exists() or (folder / "test").is_file() or (folder / "train").is_file():
            kind, names = 100, names100
        else:
            raise DatasetError(path, "no CIFAR data: expected cifar-10-batches-py/ (test_batch, data_batch_1..5) "
                                     "or cifar-100-python/ (train, test)")
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise DatasetError(folder, f"missing CIFAR file(s) {', '.join(missing)}")
        blobs = [(folder / n, (folder / n).read_bytes()) for n in names]
    images, labels = [], []
    for where, raw in blobs:
        batch = _safe_unpickle(raw, where)
        if not isinstance(batch, dict) or _get(batch, "data") is None:
            raise DatasetError(where, "not a CIFAR batch (expected a dict with a 'data' entry)")
        data = np.asarray(_get(batch, "data"))
        lab = _get(batch, "labels" if kind == 10 else "fine_labels")
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
            raise DatasetError(where, f"CIFAR 'data' must be uint8 (N, 3072), got {data.dtype} {data.shape}")
        if lab is None or len(lab) != len(data):
            raise DatasetError(where, f"CIFAR labels missing or of wrong length for {len(data)} images")
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(np.asarray(lab, dtype=np.int64))
    return ImageSet(f"cifar{kind}", np.concatenate(images).astype(np.float32) / 255.0, np.concatenate(labels))


# --------------------------------------------------------------------------- SVHN

def read_svhn(path, split: str = "test") -> ImageSet:
    """Read SVHN cropped digits (``train_32x32.mat`` / ``test_32x32.mat`` / ``extra_32x32.mat``).

    Parameters
    ----------
    path : the ``.mat`` file or its folder. ``X`` is uint8 (32, 32, 3, N), ``y`` (N, 1) with
        10 meaning the digit 0.

    Returns
    -------
    ImageSet "svhn": images (N, 3, 32, 32), labels (N,) in 0..9.
    """
    import scipy.io

    path = Path(path)
    if path.is_dir():
        path = path / f"{split}_32x32.mat"
    if not path.is_file():
        raise DatasetError(path, "SVHN file not found")
    try:
        mat = scipy.io.loadmat(str(path))
    except Exception as err:  # scipy raises ValueError, NotImplementedError (v7.3), ...
        raise DatasetError(path, f"not a readable MATLAB file ({type(err).__name__}: {err})") from None
    if "X" not in mat:
        raise DatasetError(path, "no 'X' array (not an SVHN cropped-digits file)")
    x = np.asarray(mat["X"])
    if x.ndim != 4 or x.shape[2] != 3:
        raise DatasetError(path, f"'X' must be (H, W, 3, N), got shape {x.shape}")
    images = np.transpose(x, (3, 2, 0, 1)).astype(np.float32)
    images /= 255.0 if x.dtype == np.uint8 or images.max() > 1 else 1.0
    labels = None
    if "y" in mat:
        labels = np.asarray(mat["y"]).reshape(-1).astype(np.int64)
        if len(labels) != len(images):
            raise DatasetError(path, f"{len(labels)} labels for {len(images)} images")
        labels[labels == 10] = 0
    return ImageSet("svhn", images, labels)


# --------------------------------------------------------------------------- MNIST IDX

def _read_idx(path: Path, magic: int) -> np.ndarray:
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (EOFError, OSError, zlib.error) as err:
            raise DatasetError(path, f"corrupt or truncated gzip stream ({err})") from None
    if len(raw) < 4:
        raise DatasetError(path, f"truncated IDX file ({len(raw)} bytes, no header)")
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise DatasetError(path, f"not an IDX file of the expected kind (magic 0x{found:08x}, expected 0x{magic:08x})")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetError(path, "truncated IDX header")
    dims = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    expected = int(np.prod(dims))
    if len(raw) - header != expected:
        raise DatasetError(path, f"{'truncated' if len(raw) - header < expected else 'oversized'} IDX data: header "
                                 f"says {'x'.join(map(str, dims))} = {expected} bytes, file holds {len(raw) - header}")
    return np.frombuffer(raw, np.uint8, offset=header).reshape(dims)


def _find_file(folder: Path, stems: list[str]) -> Path | None:
    for stem in stems:
        for name in (stem, stem + ".gz"):
            if (folder / name).is_file():
                return folder / name
    return None


def read_mnist(path, split: str = "test", name: str = "mnist") -> ImageSet:
    """Read MNIST-style IDX files (MNIST, Fashion-MNIST, KMNIST), raw or gzip.

    Parameters
    ----------
    path : the folder holding ``t10k-images-idx3-ubyte[.gz]`` / ``train-images-idx3-ubyte[.gz]``
        (and the ``...-labels-idx1-ubyte`` files), or the images file itself.
    split : "train" or "test" (ignored when ``path`` is a file)
    name : name of the returned set

    Returns
    -------
    ImageSet: images (N, 1, H, W), labels (N,) or None when no labels file is found.
    """
    path = Path(path)
    prefix = {"test": "t10k", "train": "train"}.get(split)
    if path.is_dir():
        if prefix is None:
            raise DatasetError(path, f"unknown split {split!r} (expected 'train' or 'test')")
        images_file = _find_file(path, [f"{prefix}-images-idx3-ubyte", f"{prefix}-images.idx3-ubyte"])
        if images_file is None:
            raise DatasetError(path, f"no {prefix}-images-idx3-ubyte[.gz] here")
    elif path.is_file():
        images_file = path
    else:
        raise DatasetError(path, "MNIST file or folder not found")
    images = _read_idx(images_file, 0x00000803)
    stem = images_file.name.removesuffix(".gz")
    labels_file = _find_file(images_file.parent, [stem.replace("images-idx3", "labels-idx1")
                                                   .replace("images.idx3", "labels.idx1")])
    labels = None
    if labels_file is not None and labels_file != images_file:
        labels = _read_idx(labels_file, 0x00000801)
        if len(labels) != len(images):
            raise DatasetError(labels_file, f"{len(labels)} labels for {len(images)} images in {images_file.name}")
    return ImageSet(name, images[:, None].astype(np.float32) / 255.0, labels)


# --------------------------------------------------------------------------- image folders

def _load_image(file: Path, gray: bool, size_hw: tuple[int, int] | None) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(file) as im:
            if im.mode.startswith("I;16") and gray:
                arr = np.asarray(im, dtype=np.float32) / 65535.0
                im = Image.fromarray(arr)  # float32 -> mode "F"
            else:
                im = im.convert("L" if gray else "RGB")
                arr = None
            if size_hw is not None and im.size != (size_hw[1], size_hw[0]):
                im = im.resize((size_hw[1], size_hw[0]), Image.BILINEAR)
                arr = None
            if arr is None:
                arr = np.asarray(im, dtype=np.float32) / (1.0 if im.mode == "F" else 255.0)
    except Exception as err:  # PIL raises UnidentifiedImageError, OSError (truncated), ...
        raise DatasetError(file, f"not a readable image ({type(err).__name__}: {err})") from None
    arr = np.clip(arr, 0.0, 1.0)
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def read_image_folder(path, size: tuple[int, int] | None = None) -> ImageSet:
    """Read a folder of PNG/JPEG images: class subfolders or a flat folder.

    Parameters
    ----------
    path : folder. With subfolders holding images, labels are the index of the subfolder in
        sorted order; otherwise the folder's own images are read and labels are None.
    size : (H, W) for every image; default: the first image's size. Images are resized
        bilinearly (Pillow).

    Returns
    -------
    ImageSet named after the folder: images (N, 1, H, W) if every image is greyscale, else
    (N, 3, H, W).
    """
    from PIL import Image

    path = Path(path)
    if not path.is_dir():
        raise DatasetError(path, "image folder not found")

    def images_in(folder: Path) -> list[Path]:
        return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)

    classes = sorted(d.name for d in path.iterdir() if d.is_dir() and images_in(d))
    loose = images_in(path)
    if classes and loose:
        raise DatasetError(path, f"mixes {len(loose)} loose images with class subfolders; use one layout")
    if classes:
        files = [(f, i) for i, c in enumerate(classes) for f in images_in(path / c)]
    else:
        files = [(f, -1) for f in loose]
    if not files:
        raise DatasetError(path, f"no images ({', '.join(IMAGE_SUFFIXES)}) here or in its subfolders")
    gray_modes = {"1", "L", "LA", "I", "F", "I;16", "I;16B", "I;16L"}
    try:
        modes = []
        for f, _ in files:
            with Image.open(f) as im:
                modes.append(im.mode)
                if size is None:
                    size = (im.size[1], im.size[0])
    except Exception as err:
        raise DatasetError(f, f"not a readable image ({type(err).__name__}: {err})") from None
    gray = all(m in gray_modes for m in modes)
    images = np.stack([_load_image(f, gray, tuple(size)) for f, _ in files])
    labels = np.array([i for _, i in files], dtype=np.int64) if classes else None
    return ImageSet(path.name, images, labels)


# --------------------------------------------------------------------------- conversions

def to_grayscale(images: np.ndarray) -> np.ndarray:
    """(N, 3, H, W) -> (N, 1, H, W) with 0.2989 r + 0.5870 g + 0.1140 b; (N, 1, H, W) passes through."""
    images = np.asarray(images, dtype=np.float32)
    if images.shape[1] == 1:
        return images
    if images.shape[1] != 3:
        raise ValueError(f"expected 1 or 3 channels, got shape {images.shape}")
    weights = np.array([0.2989, 0.5870, 0.1140], dtype=np.float32)
    return np.clip(np.einsum("nchw,c->nhw", images, weights)[:, None], 0.0, 1.0).astype(np.float32)


def to_rgb(images: np.ndarray) -> np.ndarray:
    """(N, 1, H, W) -> (N, 3, H, W) by repeating the channel; (N, 3, H, W) passes through."""
    images = np.asarray(images, dtype=np.float32)
    if images.shape[1] == 3:
        return images
    if images.shape[1] != 1:
        raise ValueError(f"expected 1 or 3 channels, got shape {images.shape}")
    return np.repeat(images, 3, axis=1)
