"""Two small networks for certified training with interval bound propagation (IBP): a plain
chain of layers (no residual, no pooling tricks), so :mod:`labkit.certify` bounds every layer
and the bounds stay tight enough to certify at Fashion-MNIST's eps = 0.1."""
from __future__ import annotations

import torch
from torch import nn

from .fashion_cnn import FASHION_MEAN, FASHION_STD, Normalize


class _Chain(nn.Module):
    """``forward`` applies the children in order: the chain IBP walks is the model itself."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.children():
            x = layer(x)
        return x


class FashionMLP(_Chain):
    """784 -> 256 -> 256 -> 10 with ReLUs, normalization inside: 269k parameters. The network
    lesson 11's students bound by hand (Linear + ReLU only)."""

    def __init__(self, hidden: int = 256, num_classes: int = 10):
        super().__init__()
        self.normalize = Normalize([FASHION_MEAN], [FASHION_STD])
        self.flatten = nn.Flatten()
        self.fc1, self.relu1 = nn.Linear(28 * 28, hidden), nn.ReLU()
        self.fc2, self.relu2 = nn.Linear(hidden, hidden), nn.ReLU()
        self.classifier = nn.Linear(hidden, num_classes)


class SmallCNN(_Chain):
    """The "small" IBP model of Gowal et al. 2018 for 28 x 28 inputs: conv 4x4 stride 2 (16) ->
    conv 4x4 stride 2 (32) -> linear 1568 -> 100 -> 10, ReLUs between, normalization inside:
    166k parameters."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.normalize = Normalize([FASHION_MEAN], [FASHION_STD])
        self.conv1, self.relu1 = nn.Conv2d(1, 16, 4, stride=2, padding=1), nn.ReLU()
        self.conv2, self.relu2 = nn.Conv2d(16, 32, 4, stride=2, padding=1), nn.ReLU()
        self.flatten = nn.Flatten()
        self.fc1, self.relu3 = nn.Linear(32 * 7 * 7, 100), nn.ReLU()
        self.classifier = nn.Linear(100, num_classes)
