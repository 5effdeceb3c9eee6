"""Models and images shared by the attack tests (not a test module itself)."""
from __future__ import annotations

import pytest
import torch

from labkit.data import fashion_mnist
from labkit.models import REGISTRY, FashionCNN, load


def trained_available(name: str = "fmnist-cnn") -> bool:
    return REGISTRY[name].weights().is_file()


def standard_model() -> torch.nn.Module:
    """The shipped standard model; a seeded random FashionCNN until its weights exist."""
    if trained_available():
        return load("fmnist-cnn", device="cpu")
    torch.manual_seed(0)
    return FashionCNN().eval()


def trained_model(name: str = "fmnist-cnn") -> torch.nn.Module:
    """A shipped model, for tests of trained behaviour; skips while its weights are missing."""
    if not trained_available(name):
        pytest.skip(f"needs the shipped {name!r} weights (python -m labkit.train {name})")
    return load(name, device="cpu")


def fixed_images(count: int, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed slice of the Fashion-MNIST test set."""
    return fashion_mnist("test").tensors(slice(start, start + count))
