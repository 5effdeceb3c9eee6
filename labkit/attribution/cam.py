"""Attributions that look inside the network: guided backpropagation, Grad-CAM and their
product, guided Grad-CAM. Targets are logits (pre-softmax), as in the papers."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .._core import hooks, preserved, resolve_layer
from ._common import Method, Option, prepare, target_logits

GUIDED_ACTIVATIONS = (nn.ReLU, nn.ReLU6)


def cam_layer_name(model: nn.Module) -> str:
    """Grad-CAM's default layer: the model's ``gradcam_layer`` attribute when it has one, else
    the last ``nn.Conv2d`` in registration order. labkit's models point ``gradcam_layer`` at
    their last *rectified* feature maps, as in the paper: before the ReLU, a map whose
    weighted sum is negative everywhere gives an all-zero Grad-CAM (on FashionCNN's ``conv5``,
    for about half of the test images)."""
    if getattr(model, "gradcam_layer", None):
        return model.gradcam_layer
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError("the model has no nn.Conv2d layer; pass layer= explicitly")
    return convs[-1]


def _guide_relus(model: nn.Module, handles: list, active=lambda: True) -> None:
    """Make every ``nn.ReLU`` / ``nn.ReLU6`` module pass back only positive gradients while
    ``active()``: the gradient arriving at its output is clamped at 0 before the module's own
    backward masks it, giving ``relu(grad_out) * relu'(input)`` = ``relu(grad_in)``."""
    def clamp_gradient(module, inputs, output):
        if output.requires_grad:
            handles.append(output.register_hook(lambda grad: grad.clamp_min(0) if active() else grad))

    for module in model.modules():
        if isinstance(module, GUIDED_ACTIVATIONS):
            handles.append(module.register_forward_hook(clamp_gradient))


def guided_backprop(model: nn.Module, x: torch.Tensor, target) -> torch.Tensor:
    """Guided backpropagation (Springenberg et al. 2015, "Striving for Simplicity: The All
    Convolutional Net"): the gradient ``df_t/dx``, except that every ReLU passes back only
    positive gradients, ``R_in = (x_in > 0) * relu(R_out)``.

    Only ReLUs that are ``nn.ReLU`` or ``nn.ReLU6`` modules are guided (``relu6``: the mask is
    ``0 < x_in < 6``); ``F.relu`` or ``torch.relu`` called inside ``forward`` are invisible to
    hooks and keep their plain gradient. The guiding is done by hooks (a forward hook on each
    such module puts a gradient hook on its output), all removed when the call ends. captum's
    GuidedBackprop gives the same result where it guides the same modules (it hooks ``nn.ReLU``
    only).
    """
    target = prepare(model, x, target)
    with preserved(model), hooks() as handles:
        _guide_relus(model, handles)
        inputs = x.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(target_logits(model, inputs, target).sum(), inputs)
    return grad


def _capture_output(module: nn.Module, handles: list) -> list:
    """Record the output of ``module`` on every call (the last one counts)."""
    outputs = []

    def record(module, inputs, output):
        if not isinstance(output, torch.Tensor) or output.dim() != 4:
            shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
            raise ValueError(f"Grad-CAM needs a layer with a B x K x h x w output, got {shape}")
        outputs.append(output)

    handles.append(module.register_forward_hook(record))
    return outputs


def _cam(activation: torch.Tensor, grad: torch.Tensor, size, relu: bool, upsample: bool) -> torch.Tensor:
    weights = grad.mean(dim=(2, 3), keepdim=True)
    cam = (weights * activation).sum(dim=1, keepdim=True)
    if relu:
        cam = cam.clamp_min(0)
    if upsample:
        cam = F.interpolate(cam, size=size, mode="bilinear", align_corners=False)
    return cam.detach()


def gradcam(model: nn.Module, x: torch.Tensor, target, layer=None, relu: bool = True,
            upsample: bool = True) -> torch.Tensor:
    """Grad-CAM (Selvaraju et al. 2017, "Grad-CAM: Visual Explanations from Deep Networks via
    Gradient-based Localization"): with ``A`` the ``K x h x w`` output of ``layer``,
    ``relu(sum_k alpha_k A_k)``, ``alpha_k = mean_ij df_t/dA_kij``.

    ``layer``: a submodule or its dotted name; default the model's ``gradcam_layer`` (labkit's
    models: their last rectified feature maps), else the last ``nn.Conv2d``. Returns
    ``B x 1 x H x W``: bilinearly upsampled to the input size (``upsample=False`` keeps
    ``h x w``; ``relu=False`` keeps the negative evidence). The backward pass stops at ``layer``.
    """
    target = prepare(model, x, target)
    module = resolve_layer(model, cam_layer_name(model) if layer is None else layer)
    with preserved(model), hooks() as handles:
        outputs = _capture_output(module, handles)
        # The input must require grad for the layer's output to be in the graph (the
        # parameters are frozen); autograd.grad still stops at the layer.
        selected = target_logits(model, x.detach().requires_grad_(True), target)
        _check_reached(outputs, module)
        (grad,) = torch.autograd.grad(selected.sum(), outputs[-1])
    return _cam(outputs[-1], grad, x.shape[-2:], relu, upsample)


def _check_reached(outputs: list, module: nn.Module) -> None:
    if not outputs:
        raise ValueError(f"layer {type(module).__name__} is not used in the model's forward pass")


def guided_gradcam(model: nn.Module, x: torch.Tensor, target, layer=None) -> torch.Tensor:
    """Guided Grad-CAM (Selvaraju et al. 2017): guided backpropagation times the ReLU'd
    Grad-CAM of ``layer`` bilinearly upsampled to the input, ``guided_backprop * gradcam``
    (captum's GuidedGradCam with ``interpolate_mode="bilinear"``). Shaped like ``x``.

    One forward pass serves both: the backward to ``layer`` runs with plain ReLU gradients,
    the second one, to the input, with guided ones.
    """
    target = prepare(model, x, target)
    module = resolve_layer(model, cam_layer_name(model) if layer is None else layer)
    state = {"guided": False}
    with preserved(model), hooks() as handles:
        outputs = _capture_output(module, handles)
        _guide_relus(model, handles, active=lambda: state["guided"])
        inputs = x.detach().requires_grad_(True)
        selected = target_logits(model, inputs, target).sum()
        _check_reached(outputs, module)
        (layer_grad,) = torch.autograd.grad(selected, outputs[-1], retain_graph=True)
        state["guided"] = True
        (input_grad,) = torch.autograd.grad(selected, inputs)
    return input_grad * _cam(outputs[-1], layer_grad, x.shape[-2:], relu=True, upsample=True)


METHODS = (
    Method("guided_backprop", guided_backprop, "guided backprop", "max_abs"),
    Method("gradcam", gradcam, "Grad-CAM", "sum", options={"layer": Option(layer=True)}),
    Method("guided_gradcam", guided_gradcam, "guided Grad-CAM", "max_abs", options={"layer": Option(layer=True)}),
)
