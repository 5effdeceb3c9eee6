"""Quantus for the tests and benchmarks, imported where its import-time dependencies are missing.

Quantus imports cv2 (for perturbation functions the tests never call) and, through zennit,
torchvision (for two ResNet block classes); neither is installed here (torchvision must not
be). Inert stand-ins sit in sys.modules while quantus is imported and are removed after; only
they leave sys.modules (C extensions cannot be loaded twice). A stand-in's missing attribute
raises AttributeError, so using one fails loudly.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
import types

from torch import nn


def import_quantus() -> types.ModuleType:
    """The quantus package; raises ImportError when it (PyPI ``quantus``) is not installed."""
    if importlib.util.find_spec("quantus") is None:
        raise ImportError("quantus is not installed")
    resnet = types.ModuleType("torchvision.models.resnet")
    resnet.Bottleneck = type("Bottleneck", (nn.Module,), {})
    resnet.BasicBlock = type("BasicBlock", (nn.Module,), {})
    stand_ins = {name: module for name, module in {
        "cv2": types.ModuleType("cv2"), "torchvision": types.ModuleType("torchvision"),
        "torchvision.models": types.ModuleType("torchvision.models"),
        "torchvision.models.resnet": resnet}.items()
        if name.split(".")[0] not in sys.modules and importlib.util.find_spec(name.split(".")[0]) is None}
    sys.modules.update(stand_ins)
    try:
        return importlib.import_module("quantus")
    finally:
        for name in stand_ins:
            sys.modules.pop(name, None)
