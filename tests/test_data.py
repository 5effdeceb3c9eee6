"""labkit.data: Fashion-MNIST from real files, the search order, damaged and missing data."""
import gzip
import shutil

import pytest
import torch

from labkit import data


@pytest.fixture(autouse=True)
def fresh_cache(monkeypatch, tmp_path):
    """Each test sees an empty decoded-array cache and the dataset lookup starts anew."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("LABKIT_DATA", raising=False)
    data._fashion_mnist_cached.cache_clear()
    yield
    data._fashion_mnist_cached.cache_clear()


def _real_folder():
    for how, folder in data._candidate_dirs(None):
        if (folder / "t10k-images-idx3-ubyte.gz").is_file():
            return folder
    pytest.skip("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")


def test_real_files_load_completely():
    train, test = data.fashion_mnist("train"), data.fashion_mnist("test")
    assert len(train) == 60000 and len(test) == 10000
    image, label = test[0]
    assert image.shape == (1, 28, 28) and image.dtype == torch.float32
    assert 0 <= image.min() and image.max() <= 1 and isinstance(label, int)
    assert torch.equal(test.labels.bincount(), torch.full((10,), 1000))
    x, y = test.tensors(torch.arange(5))
    assert x.shape == (5, 1, 28, 28) and torch.equal(x[0], image) and y[0] == label
    assert len(data.FASHION_CLASSES) == 10 and data.FASHION_CLASSES[9] == "Ankle boot"


def test_cached_read_matches_first_read():
    first = data.fashion_mnist("test")
    data._fashion_mnist_cached.cache_clear()
    second = data.fashion_mnist("test")  # from the .npz cache now
    assert torch.equal(first.images, second.images) and torch.equal(first.labels, second.labels)


def _copy_test_split(dest):
    dest.mkdir(parents=True)
    for name in data._FILES["test"]:
        shutil.copy(_real_folder() / f"{name}.gz", dest / f"{name}.gz")
    return dest


def test_root_and_environment_come_first(tmp_path, monkeypatch):
    root = _copy_test_split(tmp_path / "mine")
    assert data.fashion_mnist("test", root=root).source == root
    data._fashion_mnist_cached.cache_clear()
    monkeypatch.setenv("LABKIT_DATA", str(root))
    assert data.fashion_mnist("test").source == root


def test_uncompressed_files_are_read(tmp_path):
    root = tmp_path / "raw"
    root.mkdir()
    for name in data._FILES["test"]:
        with gzip.open(_real_folder() / f"{name}.gz") as src, open(root / name, "wb") as dst:
            shutil.copyfileobj(src, dst)
    assert len(data.fashion_mnist("test", root=root)) == 10000


def test_truncated_file_is_named(tmp_path):
    root = _copy_test_split(tmp_path / "broken")
    images = root / "t10k-images-idx3-ubyte.gz"
    images.write_bytes(images.read_bytes()[:100000])
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte.gz"):
        data.fashion_mnist("test", root=root)


def test_short_payload_is_named(tmp_path):
    root = _copy_test_split(tmp_path / "short")
    labels = root / "t10k-labels-idx1-ubyte.gz"
    with gzip.open(labels) as f:
        raw = f.read()
    with gzip.open(labels, "wb") as f:
        f.write(raw[:-10])  # a valid gzip whose content is 10 labels short
    with pytest.raises(ValueError, match="t10k-labels-idx1-ubyte.gz.*truncated"):
        data.fashion_mnist("test", root=root)


def test_wrong_magic_is_named(tmp_path):
    root = _copy_test_split(tmp_path / "magic")
    with gzip.open(root / "t10k-images-idx3-ubyte.gz", "wb") as f:
        f.write(b"\x00\x00\x08\x01" + bytes(100))
    with pytest.raises(ValueError, match="t10k-images.*bad header"):
        data.fashion_mnist("test", root=root)


def test_missing_dataset_names_every_way(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "_debian_dir", lambda: tmp_path / "no-debian")
    monkeypatch.setattr(data, "_torchvision_download", lambda split: None)
    monkeypatch.setenv("LABKIT_DATA", str(tmp_path / "no-env"))
    with pytest.raises(FileNotFoundError) as err:
        data.fashion_mnist("test", root=tmp_path / "no-root")
    message = str(err.value)
    for way in ("root", "LABKIT_DATA", "dataset-fashion-mnist", "torchvision", "no-root", "no-env"):
        assert way in message


def test_bad_split():
    with pytest.raises(ValueError, match="'train' or 'test'"):
        data.fashion_mnist("validation")


def test_sample_photos():
    images, names = data.sample_photos(64)
    assert images.shape == (len(names), 3, 64, 64) and names[0] == "chelsea"
    assert 0 <= images.min() and images.max() <= 1 and images.std() > 0.05
    with pytest.raises(ValueError):
        data.sample_photos(4)
    with pytest.raises(ValueError, match="no photo"):
        data.sample_photos(32, names=["not_a_photo"])
    with pytest.raises(ValueError, match="RGB"):
        data.sample_photos(32, names=["camera"])  # greyscale


def test_imagenet_classes_offline():
    classes = data.imagenet_classes()
    assert len(classes) == 1000
    assert classes[0] == "tench" and classes[281] == "tabby" and classes[999] == "toilet tissue"
