"""zennit for the tests and benchmarks, imported without torchvision.

zennit imports torchvision at import time, only for its ResNet canonizers (the two block
classes of torchvision.models.resnet). torchvision must not be installed here, so a stand-in
with those two names sits in sys.modules while zennit is imported, and is removed after.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from unittest import mock

from torch import nn


def import_zennit() -> types.SimpleNamespace:
    """zennit's modules (``attribution``, ``canonizers``, ``composites``, ``layer``, ``rules``,
    ``types``) as attributes; the real torchvision is used when it is installed."""
    resnet = types.ModuleType("torchvision.models.resnet")
    resnet.Bottleneck = type("Bottleneck", (nn.Module,), {})
    resnet.BasicBlock = type("BasicBlock", (nn.Module,), {})
    stand_ins = {"torchvision": types.ModuleType("torchvision"),
                 "torchvision.models": types.ModuleType("torchvision.models"),
                 "torchvision.models.resnet": resnet}
    have_torchvision = "torchvision" in sys.modules or importlib.util.find_spec("torchvision") is not None
    with mock.patch.dict(sys.modules, {} if have_torchvision else stand_ins):
        names = ("attribution", "canonizers", "composites", "layer", "rules", "types")
        return types.SimpleNamespace(**{n: importlib.import_module(f"zennit.{n}") for n in names})
