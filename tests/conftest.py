"""Shared fixtures. Tests run on CPU unless a test asks for the accelerator (marker `gpu`)."""
from __future__ import annotations

import os
import random

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


# The device that tests marked `gpu` compare against the CPU: cuda unless LABKIT_TEST_DEVICE
# says otherwise (LABKIT_TEST_DEVICE=cpu runs them as a dry run on a machine without a GPU).
ACCELERATOR = torch.device(os.environ.get("LABKIT_TEST_DEVICE", "cuda"))


def _available(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_available()
    if device.type == "mps":
        return torch.backends.mps.is_available()
    return device.type == "cpu"


@pytest.fixture(scope="session")
def accelerator() -> torch.device:
    return ACCELERATOR


def pytest_collection_modifyitems(config, items):
    """Skip a `gpu` test whose device is missing: the `accelerator` fixture's for the tests that
    take it, CUDA for the others (which name "cuda" themselves)."""
    for item in items:
        if "gpu" not in item.keywords:
            continue
        device = ACCELERATOR if "accelerator" in getattr(item, "fixturenames", ()) else torch.device("cuda")
        if not _available(device):
            item.add_marker(pytest.mark.skip(reason=f"needs a {device.type} device (LABKIT_TEST_DEVICE)"))


@pytest.fixture(autouse=True)
def reproducible_checks(request, monkeypatch):
    """A check draws fresh random inputs on every call. In the tests they come from a generator
    seeded by the test's id, so each test sees the same inputs on every run: on a rare input two
    typical mistakes give the same wrong answer, and which hint comes first must not make a run
    flaky."""
    from labkit.checks import _engine
    seeds = random.Random(request.node.nodeid)
    monkeypatch.setattr(_engine, "_fresh_seed", lambda: seeds.getrandbits(31))
