import gzip
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from neuro_ood.data import image_builtins
from neuro_ood.data.image_builtins import BUILTIN, _crop_positions, _matplotlib_textures, _sklearn_photos
from neuro_ood.data.image_readers import (
    DatasetError, ImageSet, read_cifar, read_image_folder, read_mnist, read_svhn, to_grayscale, to_rgb,
)
from neuro_ood.data.image_sets import fit_images, load_dataset, split_train_test
from neuro_ood.errors import CohortError

MNIST_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist"


def _rng():
    return np.random.default_rng(0)


def _write_cifar10(folder, n=5, protocol=2):
    folder.mkdir(parents=True)
    data = _rng().integers(0, 256, (n, 3072), dtype=np.uint8)
    labels = list(range(n))
    batch = {b"batch_label": b"testing batch 1 of 1", b"data": data, b"labels": labels,
             b"filenames": [b"x.png"] * n}
    (folder / "test_batch").write_bytes(pickle.dumps(batch, protocol=protocol))
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"a"] * 10}))
    return data, labels


def test_cifar10_folder_parent_and_legacy_numpy_names(tmp_path):
    data, labels = _write_cifar10(tmp_path / "cifar-10-batches-py")
    for path in (tmp_path / "cifar-10-batches-py", tmp_path):
        s = read_cifar(path, "test")
        assert s.name == "cifar10" and s.images.shape == (5, 3, 32, 32) and s.images.dtype == np.float32
        np.testing.assert_array_equal(s.images, data.reshape(5, 3, 32, 32) / np.float32(255))
        np.testing.assert_array_equal(s.labels, labels)
        assert s.images[0, 1, 0, 0] == data[0, 1024] / np.float32(255)  # channel-major rows
    # numpy 1.x pickles (the real downloads) name numpy.core.multiarray; protocol 5 uses _frombuffer
    raw = (tmp_path / "cifar-10-batches-py" / "test_batch").read_bytes()
    assert b"numpy._core.multiarray" in raw
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(
        raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    np.testing.assert_array_equal(read_cifar(tmp_path).labels, labels)
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(
        pickle.dumps({b"data": data, b"labels": labels}, protocol=5))
    np.testing.assert_array_equal(read_cifar(tmp_path).images, data.reshape(5, 3, 32, 32) / np.float32(255))
    with pytest.raises(DatasetError, match="data_batch_1"):
        read_cifar(tmp_path, "train")


def test_cifar100(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    data = _rng().integers(0, 256, (4, 3072), dtype=np.uint8)
    (folder / "test").write_bytes(pickle.dumps({b"data": data, b"fine_labels": [3, 99, 0, 7],
                                                b"coarse_labels": [1, 2, 3, 4]}))
    (folder / "meta").write_bytes(pickle.dumps({b"fine_label_names": []}))
    s = load_dataset("cifar100", data_root=tmp_path)
    assert s.name == "cifar100"
    np.testing.assert_array_equal(s.images, data.reshape(4, 3, 32, 32) / np.float32(255))
    np.testing.assert_array_equal(s.labels, [3, 99, 0, 7])


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": _Evil(marker), b"labels": [0]}))
    with pytest.raises(DatasetError, match=r"test_batch: .*refused to load (posix|os|nt)\.system") as info:
        read_cifar(folder)
    assert isinstance(info.value, CohortError) and "\n" not in str(info.value)
    assert not marker.exists()
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": 1})[:-5])
    with pytest.raises(DatasetError, match="pickle"):
        read_cifar(folder)


def test_svhn_mat(tmp_path):
    x = _rng().integers(0, 256, (32, 32, 3, 3), dtype=np.uint8)
    scipy.io.savemat(tmp_path / "test_32x32.mat", {"X": x, "y": np.array([[10], [1], [9]], dtype=np.uint8)})
    for path in (tmp_path, tmp_path / "test_32x32.mat"):
        s = read_svhn(path)
        assert s.images.shape == (3, 3, 32, 32)
        np.testing.assert_array_equal(s.images, x.transpose(3, 2, 0, 1) / np.float32(255))
        np.testing.assert_array_equal(s.labels, [0, 1, 9])
    assert load_dataset("svhn", data_root=tmp_path, channels=1).images.shape == (3, 1, 32, 32)
    (tmp_path / "bad.mat").write_bytes(b"not a mat file at all" * 10)
    with pytest.raises(DatasetError, match="bad.mat: not a readable MATLAB file"):
        read_svhn(tmp_path / "bad.mat")


def _idx(array, magic):
    return struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape) + array.tobytes()


def test_mnist_idx_gz_raw_and_truncated(tmp_path):
    images = _rng().integers(0, 256, (6, 28, 28), dtype=np.uint8)
    labels = np.arange(6, dtype=np.uint8)
    gz, raw = tmp_path / "gz", tmp_path / "fashion-mnist"
    gz.mkdir(), raw.mkdir()
    (gz / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx(images, 0x803)))
    (gz / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx(labels, 0x801)))
    (raw / "train-images-idx3-ubyte").write_bytes(_idx(images, 0x803))
    (raw / "train-labels-idx1-ubyte").write_bytes(_idx(labels, 0x801))
    for s in (read_mnist(gz), read_mnist(gz / "t10k-images-idx3-ubyte.gz"), read_mnist(raw, "train"),
              load_dataset("fashion-mnist", data_root=tmp_path, split="train")):
        assert s.images.shape == (6, 1, 28, 28)
        np.testing.assert_array_equal(s.images[:, 0], images / np.float32(255))
        np.testing.assert_array_equal(s.labels, labels)
    full = (raw / "train-images-idx3-ubyte").read_bytes()
    (raw / "train-images-idx3-ubyte").write_bytes(full[:-100])
    with pytest.raises(DatasetError, match=r"train-images-idx3-ubyte: truncated IDX data: header says 6x28x28"):
        read_mnist(raw, "train")
    (raw / "train-images-idx3-ubyte").write_bytes(full)
    (raw / "train-labels-idx1-ubyte").write_bytes(_idx(labels[:5], 0x801))
    with pytest.raises(DatasetError, match="5 labels for 6 images"):
        read_mnist(raw, "train")
    (gz / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx(images, 0x803))[:-20])
    with pytest.raises(DatasetError, match="gzip"):
        read_mnist(gz)
    (gz / "t10k-images-idx3-ubyte.gz").write_bytes(_idx(labels, 0x801))
    with pytest.raises(DatasetError, match="magic 0x00000801, expected 0x00000803"):
        read_mnist(gz)


def test_image_folder(tmp_path):
    rgb = _rng().integers(0, 256, (4, 6, 3), dtype=np.uint8)
    for cls in ("cat", "dog"):
        (tmp_path / "set" / cls).mkdir(parents=True)
    Image.fromarray(rgb).save(tmp_path / "set" / "dog" / "a.png")
    Image.fromarray(rgb[::-1]).save(tmp_path / "set" / "cat" / "b.png")
    Image.fromarray(np.full((8, 12, 3), 200, np.uint8)).save(tmp_path / "set" / "dog" / "c.jpg", quality=95)
    s = read_image_folder(tmp_path / "set")
    assert s.images.shape == (3, 3, 4, 6) and s.name == "set"
    np.testing.assert_array_equal(s.labels, [0, 1, 1])  # cat, dog, dog
    np.testing.assert_array_equal(s.images[0], rgb[::-1].transpose(2, 0, 1) / np.float32(255))
    np.testing.assert_array_equal(s.images[1], rgb.transpose(2, 0, 1) / np.float32(255))
    assert np.allclose(s.images[2], 200 / 255, atol=3 / 255)  # JPEG, resized to 4x6
    assert read_image_folder(tmp_path / "set", size=(10, 10)).images.shape == (3, 3, 10, 10)
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.fromarray(rgb[..., 0]).save(flat / "g.png")
    g = load_dataset(f"folder:{flat}", split="all")
    assert g.labels is None and g.images.shape == (1, 1, 4, 6)
    np.testing.assert_array_equal(g.images[0, 0], rgb[..., 0] / np.float32(255))
    (flat / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(DatasetError, match="broken.png: not a readable image"):
        read_image_folder(flat)


def test_folder_train_and_test_never_share_an_image(tmp_path):
    from PIL import Image

    pool = tmp_path / "pool"
    pool.mkdir()
    for i in range(8):
        Image.fromarray(np.full((4, 4), 10 * i, np.uint8)).save(pool / f"{i}.png")
    train = load_dataset(f"folder:{pool}", split="train").images
    test = load_dataset(f"folder:{pool}", split="test").images
    assert len(train) == 6 and len(test) == 2
    assert not {float(x.mean()) for x in train} & {float(x.mean()) for x in test}
    for split in ("train", "test"):
        (tmp_path / "layout" / split).mkdir(parents=True)
        Image.fromarray(np.full((4, 4), 99 if split == "test" else 1, np.uint8)).save(tmp_path / "layout" / split / "a.png")
    assert load_dataset(f"folder:{tmp_path / 'layout'}", split="test").images.max() == pytest.approx(99 / 255)


def test_channel_conversions():
    x = np.zeros((1, 3, 1, 2), np.float32)
    x[0, :, 0, 0] = [1.0, 0.0, 0.0]
    x[0, :, 0, 1] = [0.5, 0.5, 1.0]
    g = to_grayscale(x)
    assert g.shape == (1, 1, 1, 2)
    np.testing.assert_allclose(g[0, 0, 0], [0.2989, 0.5 * 0.2989 + 0.5 * 0.5870 + 0.1140], rtol=1e-6)
    assert to_grayscale(g) is g or np.array_equal(to_grayscale(g), g)
    rgb = to_rgb(g)
    assert rgb.shape == (1, 3, 1, 2) and np.array_equal(rgb[:, 2], g[:, 0])


def test_fit_images():
    x = np.arange(2 * 1 * 4 * 4, dtype=np.float32).reshape(2, 1, 4, 4) / 32
    padded = fit_images(x, (8, 6), "pad")
    assert padded.shape == (2, 1, 8, 6)
    np.testing.assert_array_equal(padded[:, :, 2:6, 1:5], x)
    assert padded.sum() == pytest.approx(x.sum())
    cropped = fit_images(x, (2, 2), "pad")
    np.testing.assert_array_equal(cropped, x[:, :, 1:3, 1:3])
    mixed = fit_images(x, (2, 6), "pad")
    np.testing.assert_array_equal(mixed[:, :, :, 1:5], x[:, :, 1:3])
    # odd amounts (MONAI's convention): an odd pad puts the extra zero after the image; cutting 4
    # rows to 3 starts at 4 // 2 - 3 // 2 = 1, dropping the extra row before the kept part
    odd = fit_images(x, (3, 7), "pad")
    np.testing.assert_array_equal(odd[:, :, :, 1:5], x[:, :, 1:4])
    assert not odd[..., 0].any() and not odd[..., 5:].any()
    channels = np.stack([x[:, 0], 1 - x[:, 0], 0.5 * x[:, 0]], axis=1)  # N and C folded together
    np.testing.assert_array_equal(fit_images(channels, (3, 7), "pad")[:, 1, :, 1:5], 1 - x[:, 0, 1:4])
    up = fit_images(x, (8, 8), "resize")
    down = fit_images(np.ones((1, 3, 32, 32), np.float32) * 0.3, (7, 9), "resize")
    assert up.shape == (2, 1, 8, 8) and up.dtype == np.float32 and 0 <= up.min() and up.max() <= 1
    assert down.shape == (1, 3, 7, 9) and np.allclose(down, 0.3, atol=1e-6)  # no dark border
    assert fit_images(x[:0], (8, 8), "resize").shape == (0, 1, 8, 8)
    with pytest.raises(ValueError, match="unknown fit mode"):
        fit_images(x, (8, 8), "stretch")


def test_split_train_test_is_seeded_disjoint_and_sorted():
    s = ImageSet("s", np.arange(20, dtype=np.float32).reshape(20, 1, 1, 1), np.arange(20))
    train, test = split_train_test(s, 0.25, seed=3)
    assert len(train) == 15 and len(test) == 5
    assert not set(train.labels) & set(test.labels) and set(train.labels) | set(test.labels) == set(range(20))
    assert list(test.labels) == sorted(test.labels)
    np.testing.assert_array_equal(test.images[:, 0, 0, 0], test.labels)
    np.testing.assert_array_equal(split_train_test(s, 0.25, seed=3)[1].labels, test.labels)
    assert not np.array_equal(split_train_test(s, 0.25, seed=4)[1].labels, test.labels)
    with pytest.raises(ValueError, match="empty split"):
        split_train_test(s, 0.01)


def _position_coded(shape):
    """An (H, W, 3) uint8 photo whose pixels spell their own (y, x): r = x % 256, g = y % 256,
    b = 16 * (x // 256) + y // 256."""
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    return np.stack([xx % 256, yy % 256, 16 * (xx // 256) + yy // 256], axis=-1).astype(np.uint8)


def test_china_train_and_test_crops_never_overlap(monkeypatch):
    shape = _sklearn_photos("china")[0].shape
    monkeypatch.setattr(image_builtins, "_sklearn_photos", lambda *names: [_position_coded(shape) for _ in names])
    corners = {}
    for split in ("train", "test"):
        crops = np.rint(load_dataset("china", split=split, n=2000, size=(32, 32)).images * 255).astype(int)
        x = crops[:, 0] + 256 * (crops[:, 2] // 16)
        y = crops[:, 1] + 256 * (crops[:, 2] % 16)
        # every crop is a 32x32 window of the photo at (y[0, 0], x[0, 0])
        assert (x == x[:, :1, :1] + np.arange(32)[None, None, :]).all()
        assert (y == y[:, :1, :1] + np.arange(32)[None, :, None]).all()
        corners[split] = y[:, 0, 0], x[:, 0, 0]
        assert len(set(zip(*corners[split]))) > 500  # still spread over the photo
    (ty, tx), (sy, sx) = corners["train"], corners["test"]
    overlap = (np.clip(32 - np.abs(sy[:, None] - ty[None]), 0, None)
               * np.clip(32 - np.abs(sx[:, None] - tx[None]), 0, None))
    assert overlap.max() == 0, (f"{np.mean(overlap.max(axis=1) > 0):.1%} of test crops overlap a train crop, "
                                f"{np.mean(overlap.max(axis=1) >= 512):.1%} by half or more")


@pytest.mark.parametrize("name, load", [
    ("photos", lambda: _sklearn_photos("china", "flower")), ("china", lambda: _sklearn_photos("china")),
    ("flower", lambda: _sklearn_photos("flower")), ("textures", _matplotlib_textures)])
@pytest.mark.parametrize("size", [(32, 32), (16, 24)])
def test_photo_crop_builtins_use_disjoint_pixels(name, load, size):
    shapes = [p.shape[:2] for p in load()]
    used = {}
    for split in ("train", "test"):
        which, ys, xs = _crop_positions(shapes, 1000, size, seed=0, split=split, name=name)
        used[split] = [np.zeros(s, bool) for s in shapes]
        for k, y, x in zip(which, ys, xs):
            assert y + size[0] <= shapes[k][0] and x + size[1] <= shapes[k][1]
            used[split][k][y:y + size[0], x:x + size[1]] = True
    for k in range(len(shapes)):
        assert used["train"][k].any() and used["test"][k].any()
        assert not (used["train"][k] & used["test"][k]).any()
    whole = _crop_positions(shapes, 1000, size, seed=0, split="all", name=name)
    assert max(whole[2] + size[1]) > min(whole[2]) + shapes[0][1] // 2  # other splits: the whole photo


@pytest.mark.parametrize("name", sorted(BUILTIN))
def test_builtins_offline_and_seeded(name):
    a = load_dataset(name, n=50, seed=1)
    b = load_dataset(name, n=50, seed=1)
    c = load_dataset(name, n=50, seed=2)
    assert a.images.dtype == np.float32 and 0 <= a.images.min() and a.images.max() <= 1
    expected = (50, 1, 8, 8) if name == "digits" else (50, 3, 32, 32)
    assert a.images.shape == expected
    np.testing.assert_array_equal(a.images, b.images)
    assert not np.array_equal(a.images, c.images)
    assert not np.array_equal(a.images, load_dataset(name, n=50, seed=1, split="train").images)
    sized = load_dataset(name, n=10, channels=1, size=(16, 16))
    assert sized.images.shape == (10, 1, 16, 16) and sized.images.max() <= 1


def test_builtin_specifics():
    digits = load_dataset("digits", split="all")
    assert digits.images.shape == (1797, 1, 8, 8) and digits.images.max() == 1.0
    assert set(digits.labels) == set(range(10))
    train, test = load_dataset("digits", split="train"), load_dataset("digits", split="test")
    assert len(train) + len(test) == 1797
    tr, te = split_train_test(digits, 0.25, seed=0)
    np.testing.assert_array_equal(te.images, test.images)
    assert len(load_dataset("uniform")) == 2000
    const = load_dataset("constant", n=5).images
    assert np.all(np.ptp(const.reshape(5, -1), axis=1) == 0)
    gauss = load_dataset("gaussian", n=100).images
    assert (gauss == 0).mean() > 0.2 and (gauss == 1).mean() > 0.2  # N(0.5, 1) clipped
    mix = load_dataset("mix:digits+photos", channels=1, size=(16, 16), n=20)
    assert mix.images.shape == (40, 1, 16, 16) and mix.labels is None
    assert isinstance(mix, ImageSet)


def test_load_dataset_errors(tmp_path):
    with pytest.raises(DatasetError, match="imagenet: unknown data set; known: cifar10"):
        load_dataset("imagenet", data_root=tmp_path)
    with pytest.raises(CohortError, match=r"cifar10 \(test\) not found; looked for: cifar-10-batches-py"):
        load_dataset("cifar10", data_root=tmp_path)
    with pytest.raises(DatasetError, match="svhn.*test_32x32.mat"):
        load_dataset("svhn", data_root=tmp_path)
    with pytest.raises(DatasetError, match="needs a data root"):
        load_dataset("mnist")
    with pytest.raises(DatasetError, match="different image shapes"):
        load_dataset("mix:digits+photos", n=4)


def test_real_mnist_test_set():
    if not (MNIST_DIR / "t10k-images-idx3-ubyte.gz").exists() and not (MNIST_DIR / "t10k-images-idx3-ubyte").exists():
        pytest.skip(f"{MNIST_DIR} is absent (the shared MNIST test files are not beside this checkout)")
    s = load_dataset("mnist", data_root=MNIST_DIR.parent)
    assert s.images.shape == (10000, 1, 28, 28) and s.images.dtype == np.float32
    assert s.images.min() == 0 and s.images.max() == 1
    assert s.labels.dtype == np.int64 and set(s.labels) == set(range(10))
