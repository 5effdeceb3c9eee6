"""labkit: a Jupyter practicum on interpretability and adversarial examples in PyTorch.

Submodules (``labkit.data``, ``labkit.models``, ``labkit.attribution``, ``labkit.attacks``,
``labkit.train``, ``labkit.featvis``, ``labkit.plot``, ``labkit.checks``) are imported on first use,
so ``import labkit`` stays fast.
"""
from __future__ import annotations

import importlib

from ._core import get_device, seed_everything

__version__ = "0.1.0"

_SUBMODULES = ("data", "models", "attribution", "attacks", "train", "featvis", "plot", "checks",
               "notebooks", "grade", "explore")


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f"labkit.{name}")
    raise AttributeError(f"module 'labkit' has no attribute {name!r}")


__all__ = ["get_device", "seed_everything", "__version__", *_SUBMODULES]
