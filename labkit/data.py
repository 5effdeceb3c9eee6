"""Where the practicum's images come from: Fashion-MNIST, natural photos, class names."""
from __future__ import annotations

import functools
import gzip
import hashlib
import os
import shutil
import subprocess
import zlib
from importlib import resources
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, TensorDataset

FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
          "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
_IDX_MAGIC = {3: 2051, 1: 2049}  # IDX magic numbers: unsigned bytes, 3-d images / 1-d labels


class FashionMNIST(Dataset):
    """Fashion-MNIST as tensors in memory: ``dataset[i]`` is ``(1x28x28 float image in [0, 1], label)``.

    ``images`` (uint8, N x 28 x 28) and ``labels`` (long, N) hold everything; ``tensors()`` gives
    the whole split as float images at once, which is faster than a DataLoader for small models.
    """

    classes = FASHION_CLASSES

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, split: str, source: Path):
        self.images, self.labels, self.split, self.source = images, labels, split, source

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index):
        return self.images[index].unsqueeze(-3).float() / 255, int(self.labels[index])

    def tensors(self, indices=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Images ``N x 1 x 28 x 28`` (float, [0, 1]) and labels for ``indices`` (default: all)."""
        images = self.images if indices is None else self.images[indices]
        labels = self.labels if indices is None else self.labels[indices]
        return images.unsqueeze(1).float() / 255, labels.clone()

    def __repr__(self) -> str:
        return f"FashionMNIST(split={self.split!r}, n={len(self)}, source={str(self.source)!r})"


def _candidate_dirs(root) -> list[tuple[str, Path]]:
    candidates = []
    if root is not None:
        candidates.append(("root argument", Path(root)))
    if os.environ.get("LABKIT_DATA"):
        candidates.append(("$LABKIT_DATA", Path(os.environ["LABKIT_DATA"])))
    candidates.append(("Debian package dataset-fashion-mnist", _debian_dir()))
    candidates.append(("torchvision download cache", _cache_dir() / "torchvision"))
    expanded = []
    for how, folder in candidates:
        # accept the folder itself or the layouts torchvision and the Debian package use
        for sub in (folder, folder / "fashion-mnist", folder / "FashionMNIST" / "raw"):
            expanded.append((how, sub))
    return expanded


def _debian_dir() -> Path:
    if DEBIAN_FASHION_MNIST.is_dir() or shutil.which("dpkg") is None:
        return DEBIAN_FASHION_MNIST
    try:
        listing = subprocess.run(["dpkg", "-L", "dataset-fashion-mnist"], capture_output=True,
                                 text=True, timeout=10).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return DEBIAN_FASHION_MNIST
    hits = [Path(p).parent for p in listing if p.endswith("t10k-images-idx3-ubyte.gz")]
    return hits[0] if hits else DEBIAN_FASHION_MNIST


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "labkit"


def _find(folder: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """Read an IDX file (optionally gzipped) of unsigned bytes; any damage raises naming the file."""
    path = Path(path)
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as err:
        raise ValueError(f"{path} is corrupt or truncated ({err}); reinstall the dataset") from err
    header = 4 + 4 * ndim
    if len(raw) < header or int.from_bytes(raw[:4], "big") != _IDX_MAGIC[ndim]:
        raise ValueError(f"{path} is not an IDX file of {ndim}-d unsigned bytes (bad header)")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(shape))
    if len(raw) != expected:
        raise ValueError(f"{path} is truncated or corrupt: expected {expected} bytes for shape "
                         f"{shape}, found {len(raw)}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _load_arrays(images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Decoded arrays, cached as .npy keyed by the source files (gunzip costs ~1 s; this ~10 ms)."""
    stats = [images_path.resolve(), images_path.stat().st_size, images_path.stat().st_mtime_ns,
             labels_path.resolve(), labels_path.stat().st_size, labels_path.stat().st_mtime_ns]
    key = hashlib.sha256(repr(stats).encode()).hexdigest()[:16]
    cache = _cache_dir() / "fashion-mnist" / f"{images_path.name.split('-')[0]}-{key}.npz"
    if cache.is_file():
        try:
            with np.load(cache) as stored:
                return stored["images"], stored["labels"]
        except (OSError, ValueError, KeyError, zlib.error):
            pass  # a damaged cache is rebuilt from the source files below
    images, labels = read_idx(images_path, 3), read_idx(labels_path, 1)
    if len(images) != len(labels):
        raise ValueError(f"{images_path} holds {len(images)} images but {labels_path} holds "
                         f"{len(labels)} labels")
    if labels.max() >= len(FASHION_CLASSES):
        raise ValueError(f"{labels_path} holds labels up to {labels.max()}, expected 0-9")
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".{os.getpid()}.tmp.npz")
        np.savez(tmp, images=images, labels=labels)
        os.replace(tmp, cache)
    except OSError:
        pass  # a read-only home only costs speed
    return images, labels


@functools.lru_cache(maxsize=4)
def _fashion_mnist_cached(split: str, root: str | None, env: str | None) -> FashionMNIST:
    tried = []
    for how, folder in _candidate_dirs(root):
        images_path = _find(folder, _FILES[split][0])
        labels_path = _find(folder, _FILES[split][1])
        if images_path and labels_path:
            images, labels = _load_arrays(images_path, labels_path)
            return FashionMNIST(torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64)),
                                split, images_path.parent)
        tried.append(f"{how}: {folder}")
    downloaded = _torchvision_download(split)
    if downloaded is not None:
        return _fashion_mnist_cached(split, str(downloaded), env)
    raise FileNotFoundError(
        f"Fashion-MNIST ({split}) not found. Looked for {_FILES[split][0]}[.gz] in:\n  "
        + "\n  ".join(dict.fromkeys(tried))
        + "\nGet it one of these ways: pass root= a folder with the four IDX files; set "
          "$LABKIT_DATA to such a folder; install the Debian package "
          "(sudo apt-get install dataset-fashion-mnist); or, online with torchvision installed, "
          "labkit downloads it into ~/.cache/labkit/torchvision.")


def _torchvision_download(split: str) -> Path | None:
    try:
        from torchvision.datasets import FashionMNIST as TorchvisionFashionMNIST
    except Exception:  # absent, or a build whose import fails against this torch
        return None
    root = _cache_dir() / "torchvision"
    try:
        TorchvisionFashionMNIST(str(root), train=(split == "train"), download=True)
    except Exception:  # offline
        return None
    return root / "FashionMNIST" / "raw"


def fashion_mnist(split: str = "train", root=None) -> FashionMNIST:
    """Fashion-MNIST (Xiao et al. 2017): 60,000 training and 10,000 test images, 28 x 28 grey.

    Looked for in ``root``, then ``$LABKIT_DATA``, then the Debian package
    ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``), then downloaded with
    torchvision into ``~/.cache/labkit`` when online. A corrupt or truncated file raises an error
    naming it; nothing found raises one error listing every way to get the data.
    """
    if split not in _FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    return _fashion_mnist_cached(split, None if root is None else str(root), os.environ.get("LABKIT_DATA"))


PHOTOS = ("chelsea", "coffee", "astronaut", "rocket")


def sample_photos(size: int = 224, names=PHOTOS) -> tuple[torch.Tensor, list[str]]:
    """Natural photos shipped with scikit-image, centre-cropped to squares and resized:
    ``(B x 3 x size x size float tensor in [0, 1], names)``. Default: a cat (``chelsea``), a cup
    of coffee, an astronaut and a rocket."""
    if not isinstance(size, int) or size < 8:
        raise ValueError(f"size must be an int >= 8, got {size!r}")
    try:
        import skimage.data
    except ImportError as err:
        raise ImportError("sample_photos needs scikit-image: pip install scikit-image") from err
    images = []
    for name in names:
        loader = getattr(skimage.data, name, None)
        if loader is None:
            raise ValueError(f"scikit-image has no photo named {name!r}")
        image = torch.from_numpy(np.ascontiguousarray(loader())).float() / 255
        if image.dim() != 3 or image.shape[2] != 3:
            raise ValueError(f"scikit-image photo {name!r} is not an RGB image (shape {tuple(image.shape)})")
        h, w = image.shape[:2]
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        square = image[top:top + side, left:left + side].permute(2, 0, 1)[None]
        images.append(F.interpolate(square, size=(size, size), mode="bilinear",
                                    antialias=True, align_corners=False)[0])
    return torch.stack(images).clamp(0, 1), list(names)


@functools.lru_cache(maxsize=1)
def _imagenet_classes() -> tuple[str, ...]:
    text = resources.files("labkit").joinpath("imagenet_classes.txt").read_text()
    return tuple(text.splitlines())


def imagenet_classes() -> list[str]:
    """The 1000 ImageNet-1k class names in index order (shipped with labkit; works offline)."""
    return list(_imagenet_classes())


def as_tensors(data, limit=None):
    """``(images, labels)`` from an ``(images, labels)`` pair, a dataset with ``.tensors()``
    (labkit's Fashion-MNIST), a ``torch.utils.data.TensorDataset`` (whose ``.tensors`` is the
    pair itself, not a method) or any dataset of ``(image, label)`` items; the first ``limit``."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], torch.Tensor):
        x, y = data
    elif isinstance(data, TensorDataset) and len(data.tensors) == 2:
        x, y = data.tensors
    elif callable(getattr(data, "tensors", None)):
        x, y = data.tensors()
    else:
        items = [data[i] for i in range(len(data))]
        x = torch.stack([item[0] for item in items])
        y = torch.as_tensor([int(item[1]) for item in items])
    if limit is not None:
        x, y = x[:limit], y[:limit]
    return x, y
