"""Shared fixtures. Tests run on CPU unless a test asks for CUDA (marker `gpu`)."""
from __future__ import annotations

import os

import matplotlib

# Agg for this process only: an MPLBACKEND variable would reach nbval's kernels and stop
# plt.show() from displaying the figures stored in the solution notebooks.
matplotlib.use("Agg")

import pytest
import torch

import labkit
from labkit.models import WEIGHTS_DIR, FashionCNN

# Tests use small tensors: one thread is barely slower alone and many times faster on a busy
# machine, where two OpenMP threads keep waiting for each other.
torch.set_num_threads(int(os.environ.get("LABKIT_TEST_THREADS", "1")))


def weights_exist(name: str) -> bool:
    return (WEIGHTS_DIR / f"{name}.pt").is_file()


@pytest.fixture
def fashion_test():
    return labkit.data.fashion_mnist("test")


@pytest.fixture
def random_cnn():
    """A FashionCNN with seeded random weights, in eval mode, on CPU."""
    torch.manual_seed(0)
    return FashionCNN().eval()


@pytest.fixture(scope="session")
def fmnist_cnn():
    if not weights_exist("fmnist-cnn"):
        pytest.skip("shipped weights fmnist-cnn.pt not built yet (python -m labkit.train fmnist-cnn)")
    return labkit.models.load("fmnist-cnn", device="cpu")


@pytest.fixture(scope="session")
def fmnist_cnn_robust():
    if not weights_exist("fmnist-cnn-robust"):
        pytest.skip("shipped weights fmnist-cnn-robust.pt not built yet "
                    "(python -m labkit.train fmnist-cnn-robust)")
    return labkit.models.load("fmnist-cnn-robust", device="cpu")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
