"""labkit: a Jupyter practicum on interpretability and adversarial examples in PyTorch.

Submodules (``labkit.data``, ``labkit.models``, ``labkit.attribution``, ``labkit.attacks``,
``labkit.train``, ``labkit.featvis``, ``labkit.plot``, ``labkit.checks``) are imported on first use,
so ``import labkit`` stays fast.
"""
from __future__ import annotations

import importlib
import os
import random

import numpy as np
import torch

__version__ = "0.1.0"

_SUBMODULES = ("data", "models", "attribution", "attacks", "train", "featvis", "plot", "checks",
               "notebooks", "grade", "explore")


def get_device() -> torch.device:
    """The best available device: CUDA, then Apple MPS, then CPU.

    ``$LABKIT_DEVICE`` (e.g. ``cpu``, ``cuda:1``) overrides the choice.
    """
    override = os.environ.get("LABKIT_DEVICE")
    if override:
        try:
            return torch.device(override)
        except RuntimeError as err:
            raise ValueError(f"LABKIT_DEVICE must name a torch device such as 'cpu' or 'cuda', "
                             f"got {override!r}") from err
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def seed_everything(seed: int = 0) -> None:
    """Seed Python's ``random``, NumPy and torch (CPU and every CUDA device)."""
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f"labkit.{name}")
    raise AttributeError(f"module 'labkit' has no attribute {name!r}")


__all__ = ["get_device", "seed_everything", "__version__", *_SUBMODULES]
