"""Fresh inputs for the checks: small random models and images of varied shapes, drawn anew for
every call (from the generator the engine seeds), so an answer cannot be tuned to one input."""
from __future__ import annotations

import torch
from torch import nn

from ._engine import Case


def tiny_cnn(channels: int, classes: int, smooth: bool = False) -> nn.Module:
    """A two-convolution classifier for any image size, random weights from the (seeded)
    global generator, in eval mode with trainable parameters, as a loaded model would be.
    ``smooth`` swaps ReLU for Softplus, for methods that integrate along a path."""
    act = nn.Softplus if smooth else nn.ReLU
    model = nn.Sequential(
        nn.Conv2d(channels, 6, 3, padding=1), act(),
        nn.Conv2d(6, 8, 3, stride=2, padding=1), act(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, classes))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)  # larger weights: a visibly non-linear model, softmax far from uniform
    return model.eval()


class Cubic(nn.Module):
    """``f_k(x) = sum_i c_ki x_i^3 + w_ki x_i``: each pixel's effect is known in closed form
    (gradient ``3 c x^2 + w``), so stochastic and path methods have exact expected answers."""

    def __init__(self, shape: tuple[int, int, int], classes: int, generator: torch.Generator):
        super().__init__()
        features = shape[0] * shape[1] * shape[2]
        self.cubic = nn.Parameter(torch.randn(classes, features, generator=generator))
        self.linear = nn.Parameter(torch.randn(classes, features, generator=generator) * 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(1)
        return flat.pow(3) @ self.cubic.T + flat @ self.linear.T


class Recording(nn.Module):
    """A model that keeps a copy of every batch it is called on (in ``seen``)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.seen: list[torch.Tensor] = []
        self.train(model.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.detach().clone())
        return self.model(x)


def draw(generator: torch.Generator, low: int, high: int) -> int:
    """An int in [low, high]."""
    return int(torch.randint(low, high + 1, (1,), generator=generator))


def images(generator: torch.Generator, batch: int, channels: int, height: int, width: int,
           saturated: float = 0.0, low: float = 0.0, high: float = 1.0) -> torch.Tensor:
    """Random images in [low, high]; a fraction ``saturated`` of the pixels set to exactly 0 or 1
    (like Fashion-MNIST's black background), where a missing clamp shows."""
    x = low + (high - low) * torch.rand(batch, channels, height, width, generator=generator)
    if saturated:
        pick = torch.rand(x.shape, generator=generator)
        x = torch.where(pick < saturated * 0.7, torch.zeros_like(x), x)
        x = torch.where(pick > 1 - saturated * 0.3, torch.ones_like(x), x)
    return x


def describe(batch: int, channels: int, height: int, width: int) -> str:
    kind = {1: "grey", 3: "RGB"}.get(channels, f"{channels}-channel")
    return (f"one {kind} {height}x{width} image" if batch == 1
            else f"a batch of {batch} {kind} {height}x{width} images")


def image_shapes(generator: torch.Generator) -> list[tuple[int, int, int, int]]:
    """One grey image, a batch of RGB images, a batch of grey images; sizes vary per call. The
    RGB batch holds 2 images, not 3, so that a reduction over the wrong one of batch and channel
    dimensions changes the shape."""
    return [(1, 1, draw(generator, 6, 10), draw(generator, 6, 10)),
            (2, 3, draw(generator, 6, 12), draw(generator, 6, 12)),
            (draw(generator, 2, 4), 1, draw(generator, 8, 12), draw(generator, 8, 12))]


def classifier_cases(generator: torch.Generator, smooth: bool = False, saturated: float = 0.0,
                     with_target: bool = True) -> list[Case]:
    """``(model, x, target)`` per shape of :func:`image_shapes` (``(model, x)`` without target)."""
    cases = []
    for batch, channels, height, width in image_shapes(generator):
        classes = draw(generator, 4, 10)
        model = tiny_cnn(channels, classes, smooth)
        x = images(generator, batch, channels, height, width, saturated)
        args = (model, x)
        if with_target:
            args += (targets(generator, model, x, classes),)
        cases.append(Case(args, describe=describe(batch, channels, height, width)))
    return cases


def targets(generator: torch.Generator, model, x: torch.Tensor, classes: int) -> torch.Tensor:
    """Random target classes, never the model's prediction and not all the same in a batch, so
    that explaining the predicted class or image 0's target is told apart from the right answer."""
    with torch.no_grad():
        predicted = model(x).argmax(dim=1)
    target = other_classes(generator, predicted, classes)
    if len(target) > 1 and (target == target[0]).all():
        choices = [c for c in range(classes) if c not in (predicted[1].item(), target[0].item())]
        target[1] = choices[draw(generator, 0, len(choices) - 1)]
    return target


def other_classes(generator: torch.Generator, y: torch.Tensor, classes: int) -> torch.Tensor:
    """A class different from ``y`` for every image (targets for targeted attacks)."""
    shift = torch.randint(1, classes, y.shape, generator=generator)
    return (y + shift) % classes


def attack_inputs(generator: torch.Generator):
    """``(model, x, y, classes, description)`` for each shape an attack check tries: the usual
    ones plus a batch of 8, on which mistakes that show on only some images (max(g) instead of
    max|g|, a norm of the whole batch) show. A generator: what the caller draws in between
    comes from the same random stream."""
    shapes = image_shapes(generator) + [(8, 1, draw(generator, 8, 12), draw(generator, 8, 12))]
    for batch, channels, height, width in shapes:
        classes = draw(generator, 4, 10)
        model = tiny_cnn(channels, classes)
        x = images(generator, batch, channels, height, width, saturated=0.4)
        y = torch.randint(classes, (batch,), generator=generator)
        yield model, x, y, classes, describe(batch, channels, height, width)
