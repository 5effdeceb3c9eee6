"""labkit: a Jupyter practicum on interpretability and adversarial examples in PyTorch.

Submodules (``labkit.data``, ``labkit.models``, ``labkit.attribution``, ``labkit.attacks``,
``labkit.train``, ``labkit.featvis``, ``labkit.plot``, ``labkit.checks``,
``labkit.shortcuts``) are imported on first use,
so ``import labkit`` stays fast.

Threads: ``import labkit`` sets torch's CPU thread count to ``$LABKIT_THREADS`` when that is set;
otherwise, in a notebook kernel where ``OMP_NUM_THREADS`` is not set either, to
:func:`default_threads` (half the usable cores, at most 4). torch's own default, one thread per
core, made the lessons several times slower on a shared 2-core machine
(``tests/benchmarks/threads.py`` measures it).
"""
from __future__ import annotations

import importlib
import os
import sys

import torch

from ._core import get_device, seed_everything

__version__ = "0.1.0"

_SUBMODULES = ("data", "models", "attribution", "attacks", "train", "featvis", "plot", "checks",
               "notebooks", "grade", "explore", "shortcuts")


THREADS_ENV = "LABKIT_THREADS"


def default_threads(cpus: int | None = None) -> int:
    """labkit's CPU thread count for notebook kernels: half the usable cores, at least 1, at most 4.

    The lessons' tensors are small: extra threads gain little, and on a machine whose other cores
    are busy (a shared server, several kernels) they cost far more than they gain. Half the cores
    leaves room for the browser, the explorer's background thread and other kernels.
    """
    if cpus is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(4, cpus // 2))


def _set_threads() -> None:
    value = os.environ.get(THREADS_ENV, "").strip()
    if value:
        if not value.isdigit() or int(value) < 1:
            raise ValueError(f"{THREADS_ENV} must be a whole number of threads >= 1, got {value!r}")
        torch.set_num_threads(int(value))
    elif "ipykernel" in sys.modules and not os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(default_threads())


_set_threads()


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f"labkit.{name}")
    raise AttributeError(f"module 'labkit' has no attribute {name!r}")


__all__ = ["get_device", "seed_everything", "default_threads", "__version__", *_SUBMODULES]
