"""FashionCNN: the practicum's small convolutional network for 28 x 28 Fashion-MNIST images."""
from __future__ import annotations

import torch
from torch import nn

FASHION_MEAN, FASHION_STD = 0.2860, 0.3530  # of the Fashion-MNIST training pixels


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel, so the model takes images in [0, 1]."""
    lrp_role = "passthrough"  # LRP hands relevance through unchanged: pixel relevance = relevance at its output

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32).reshape(1, -1, 1, 1))
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32).reshape(1, -1, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std


class FashionCNN(nn.Module):
    """Five 3x3 convolutions (32-32 | 64-96 | 128 channels, max-pooled 28 -> 14 -> 7), global
    average pooling to a 128-d representation, and one linear classifier: 195k parameters.

    The "deep network" of the seed blog post, shrunk for 28 x 28 inputs. Layers the lessons use
    by name: ``relu5`` (the rectified 7 x 7 maps of the last conv layer ``conv5``: Grad-CAM's
    default, ``gradcam_layer``), ``representation`` (the 128-d
    input of ``classifier``, what :func:`labkit.models.features` returns), ``conv1`` (filters).
    """

    gradcam_layer = "relu5"

    def __init__(self, num_classes: int = 10, dropout: float = 0.25):
        super().__init__()
        self.normalize = Normalize([FASHION_MEAN], [FASHION_STD])
        self.conv1, self.relu1 = nn.Conv2d(1, 32, 3, padding=1), nn.ReLU()
        self.conv2, self.relu2 = nn.Conv2d(32, 32, 3, padding=1), nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv3, self.relu3 = nn.Conv2d(32, 64, 3, padding=1), nn.ReLU()
        self.conv4, self.relu4 = nn.Conv2d(64, 96, 3, padding=1), nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        self.conv5, self.relu5 = nn.Conv2d(96, 128, 3, padding=1), nn.ReLU()
        self.pool3 = nn.AdaptiveAvgPool2d(1)
        self.representation = nn.Flatten()
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.children():
            x = layer(x)
        return x
