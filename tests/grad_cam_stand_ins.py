"""Import pytorch-grad-cam where its import-time dependencies are missing (test-only).

pytorch-grad-cam imports cv2, ttach, torchvision and sklearn when it is imported; none is
installed here (torchvision must not be). Its GradCAM uses only ``cv2.resize`` of them. Missing
ones get stand-ins for the duration of the ``with`` block: ``cv2.resize`` as bilinear
interpolation, everything else inert (constructible, failing loudly when used). Afterwards the
stand-ins and pytorch-grad-cam's own modules are removed from ``sys.modules``, so nothing else
sees them.
Shared by tests/test_attribution_peers.py and tests/benchmarks/bench_attribution.py.
"""
from __future__ import annotations

import contextlib
import importlib.util
import sys
import types

import numpy as np
import torch
import torch.nn.functional as F


class StandInUsed(RuntimeError):
    pass


def _inert(name: str):
    """A placeholder class: BaseCAM constructs an (unused) test-time augmentation from ttach;
    calling an instance fails loudly."""
    def fail(self, *args, **kwargs):
        raise StandInUsed(f"stand-in {name} was used")
    return type(name, (), {"__init__": lambda self, *args, **kwargs: None, "__call__": fail})


def _module(name: str, **attributes) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attributes)

    def placeholder(attr: str):
        if attr.startswith("__"):  # importlib, inspect, warnings probe __file__, __path__, ...
            raise AttributeError(attr)
        return _inert(f"{name}.{attr}")
    module.__getattr__ = placeholder
    return module


def _cv2_resize(image: np.ndarray, size) -> np.ndarray:
    """cv2.resize(image, (width, height)) with INTER_LINEAR, which for upscaling samples at the
    same half-pixel centres as bilinear interpolation with align_corners=False."""
    tensor = torch.from_numpy(np.ascontiguousarray(image))[None, None]
    return F.interpolate(tensor, size=tuple(size[::-1]), mode="bilinear", align_corners=False)[0, 0].numpy()


def _importable(name: str) -> bool:
    return name in sys.modules or importlib.util.find_spec(name) is not None


@contextlib.contextmanager
def pytorch_grad_cam():
    """Yields ``(GradCAM, ClassifierOutputTarget)``; raises ImportError when pytorch-grad-cam
    (pip package grad-cam) is not installed."""
    if importlib.util.find_spec("pytorch_grad_cam") is None:
        raise ImportError("pytorch-grad-cam (pip package grad-cam) is not installed")
    stand_ins = {name: _module(name, **attributes) for name, attributes in {
        "cv2": {"resize": _cv2_resize}, "ttach": {}, "torchvision": {}, "torchvision.transforms": {},
        "torchvision.transforms.functional": {}, "sklearn": {}, "sklearn.decomposition": {},
    }.items() if not _importable(name.split(".")[0])}
    # Only the stand-ins and pytorch-grad-cam leave sys.modules afterwards: real modules it
    # imported (scipy.ndimage, PIL, ...) stay, as C extensions cannot be loaded twice.
    sys.modules.update(stand_ins)
    try:
        from pytorch_grad_cam import GradCAM
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
        yield GradCAM, ClassifierOutputTarget
    finally:
        for name in [n for n in sys.modules if n in stand_ins or n.split(".")[0] == "pytorch_grad_cam"]:
            del sys.modules[name]
