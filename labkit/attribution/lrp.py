"""Layer-wise Relevance Propagation (LRP): the target logit is handed down the network layer by
layer, each neuron passing its relevance to its inputs in proportion to what they contributed,
until every pixel holds a share (Bach et al. 2015, "On Pixel-Wise Explanations for Non-Linear
Classifier Decisions by Layer-Wise Relevance Propagation", PLoS ONE; Montavon et al. 2019,
"Layer-Wise Relevance Propagation: An Overview", in Explainable AI, LNCS 11700).

Rules are small objects (:class:`Epsilon`, :class:`Gamma`, :class:`AlphaBeta`, :class:`ZPlus`,
:class:`ZBox`, :class:`Flat`, :class:`WSquare`) that say how one conv or dense layer passes
relevance down; a :class:`Composite` says which layer gets which rule (by name, by type, or
"the first layer"), the idea of zennit (Anders et al. 2021). What every other layer does:

- BatchNorm right after a conv / dense layer is folded into it (:func:`fold_batchnorm`); the
  rule sees the folded weights. A BatchNorm anywhere else passes relevance through unchanged.
- Elementwise layers (ReLU, ReLU6 and other activations, and every module that declares
  ``lrp_role = "passthrough"``, such as the models' input ``Normalize``): relevance passes
  through unchanged (zennit's ``Pass``), so pixel relevance is the relevance at the normalized
  input.
- Average pooling and every module that declares ``lrp_role = "proportional"`` (residual sums
  such as EfficientNet-Lite's ``Add``): each input gets the share it contributed,
  ``R_i = x_i dz/dx_i R / z`` (zennit's ``Norm``; for ``a + b``: ``R_a = a R / (a + b)``).
- Everything else gets the plain gradient: max pooling sends the relevance to the winning
  input, padding drops the relevance of the padded border, flatten / dropout / identity keep it.
  Operations written inside a module's ``forward`` (``a + b``, ``F.relu``) are invisible to
  hooks and get the gradient too; a functional residual sum would double the relevance.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .._core import check_number, hooks, preserved, resolve_layer
from ._common import Method, Option, checked_logits, prepare

STABILIZER = 1e-6  # added to every denominator with its sign (0 counts as +), as in zennit

_LINEAR = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_ELEMENTWISE = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU,
                nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid,
                nn.Tanh, nn.Softplus)
_PROPORTIONAL = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d,
                 nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)
# A model's own module says how relevance crosses it with a class attribute ``lrp_role``, so that
# LRP needs to know no model: "passthrough" (elementwise, like an activation or a normalization
# of the input) or "proportional" (each input gets the share it contributed, like a residual sum).
ROLES = ("passthrough", "proportional")


def _role(module: nn.Module) -> str | None:
    """The module's declared ``lrp_role``, else the role of its type (None: a rule's layer, a
    BatchNorm, or the plain gradient)."""
    role = getattr(module, "lrp_role", None)
    if role is not None:
        if role not in ROLES:
            raise ValueError(f"{type(module).__name__}.lrp_role must be one of {ROLES}, got {role!r}")
        return role
    if isinstance(module, _ELEMENTWISE):
        return "passthrough"
    return "proportional" if isinstance(module, _PROPORTIONAL) else None


# ---- the mechanism: one forward pass whose backward pass is the relevance propagation ----------

class _Link(torch.autograd.Function):
    """Forward: ``value`` (the layer input ``a`` or a variant of it: a+, a-, a bound, ones).
    Backward: ``value * grad`` into ``a``. Fed into a linear map ``F``, it makes the backward of
    ``F(value)`` equal to ``value * F^T(grad)``: the "input times gradient" step of every rule."""

    @staticmethod
    def forward(ctx, a, value):
        ctx.save_for_backward(value)
        return value.detach()

    @staticmethod
    def backward(ctx, grad):
        (value,) = ctx.saved_tensors
        return value * grad, None


class _Relevance(torch.autograd.Function):
    """Forward: the layer's true output ``value``, so the rest of the network runs as usual.
    Backward: the output relevance ``R`` times each ``scale`` (the rule's coefficient over its
    stabilized denominator; None: R unchanged) flows into the matching numerator (built from
    ``_Link``)."""

    @staticmethod
    def forward(ctx, value, scales, *numerators):
        ctx.scales = scales  # detached intermediates, not inputs: fine to keep on ctx
        return value.detach()  # a new tensor, so later in-place ops (ReLU(inplace=True)) work

    @staticmethod
    def backward(ctx, relevance):
        return (None, None, *(relevance if scale is None else relevance * scale for scale in ctx.scales))


class _Transposed(torch.autograd.Function):
    """What ``_Link`` followed by the layer gives in the backward pass, ``value * F^T(grad)``,
    without computing ``F(value)`` in the forward pass: it returns ``like`` (the layer's output,
    of the same shape) instead. For a rule whose denominator is the layer's own output
    (epsilon), that forward value is never used, and computing it cost a second conv pass."""

    @staticmethod
    def forward(ctx, a, value, like, layer, weight):
        ctx.save_for_backward(value, weight)
        ctx.layer, ctx.input_shape = layer, a.shape
        return like.detach()

    @staticmethod
    def backward(ctx, grad):
        value, weight = ctx.saved_tensors
        module = ctx.layer.module
        if isinstance(module, nn.Linear):
            back = grad @ weight
        else:
            back = _CONV_INPUT_GRAD[type(module)](ctx.input_shape, weight, grad, module.stride,
                                                  module.padding, module.dilation, module.groups)
        return value * back, None, None, None, None


_CONV_INPUT_GRAD = {nn.Conv1d: torch.nn.grad.conv1d_input, nn.Conv2d: torch.nn.grad.conv2d_input,
                    nn.Conv3d: torch.nn.grad.conv3d_input}


def _relevance(value, *terms):
    """``value`` whose backward sends ``R * scale`` into each ``(numerator, scale)``."""
    return _Relevance.apply(value, tuple(scale for _, scale in terms), *(num for num, _ in terms))


def _stabilized(z, epsilon=STABILIZER):
    """z + epsilon * sign(z), with sign(0) = +1: never zero, never changes sign."""
    return torch.where(z >= 0, z + epsilon, z - epsilon)


# ---- layers and rules --------------------------------------------------------------------------

class _Layer:
    """A conv or dense layer with the BatchNorm that follows it (if any) folded in, so that its
    output is ``F(x, weight) + bias``; ``bounds`` is the (low, high) box of its input for ZBox."""

    def __init__(self, name: str, module: nn.Module, batchnorm_name: str = "", batchnorm=None):
        self.name, self.module, self.batchnorm = name, module, batchnorm
        self.weight, self.bias = _folded(module, batchnorm_name, batchnorm)
        self.bounds = None

    def __call__(self, a, value, weight):
        """``F(value, weight)`` without bias, with ``value`` linked to the layer input ``a``."""
        linked = _Link.apply(a, value)
        if isinstance(self.module, nn.Linear):
            return F.linear(linked, weight)
        return self.module._conv_forward(linked, weight, None)

    def backward_only(self, a, z):
        """``self(a, a, self.weight)`` where only its backward is needed (its values would be
        ``z`` minus the bias): see :class:`_Transposed`."""
        m = self.module
        if isinstance(m, _CONV) and (isinstance(m.padding, str) or m.padding_mode != "zeros"):
            return self(a, a, self.weight)  # conv*_input knows neither
        return _Transposed.apply(a, a, z, self, self.weight)

    def plus_bias(self, t, bias):
        return t + (bias if isinstance(self.module, nn.Linear) else bias.reshape(-1, *[1] * (t.dim() - 2)))

    def signed(self, a, w_positive_in, w_negative_in):
        """``F(a+, w_positive_in) + F(a-, w_negative_in)``, linked to ``a``. After a ReLU
        ``a- = 0``: its term is left out, halving the work."""
        if a.min() >= 0:
            return self(a, a, w_positive_in)
        return self(a, a.clamp(min=0), w_positive_in) + self(a, a.clamp(max=0), w_negative_in)


class Rule:
    """How a conv or dense layer passes relevance to its input: ``output(layer, a, z)`` returns
    the layer output ``z`` (same values) whose backward maps output relevance to input relevance.
    ``first_layer_only``: the rule needs the pixels as its input (z^B)."""
    first_layer_only = False

    def output(self, layer: _Layer, a: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


@dataclass(frozen=True)
class Epsilon(Rule):
    """LRP-epsilon (Bach et al. 2015): ``R_j = a_j sum_k w_jk R_k / (z_k + epsilon sign z_k)``,
    ``z_k = sum_j a_j w_jk + b_k``. The default 1e-6 only avoids division by zero (LRP-0, which
    is gradient x input on ReLU networks); larger values (0.1-1 of typical |z|) absorb weak,
    contradictory contributions and give sparser maps (Montavon et al. 2019, sec. 10.2.2)."""
    epsilon: float = 1e-6

    def __post_init__(self):
        if check_number(self.epsilon, "epsilon", 0.0) == 0:
            raise ValueError("epsilon must be > 0 (use a tiny value such as 1e-9 for LRP-0), got 0")

    def output(self, layer, a, z):
        return _relevance(z, (layer.backward_only(a, z), 1 / _stabilized(z, self.epsilon)))


@dataclass(frozen=True)
class AlphaBeta(Rule):
    """LRP-alpha-beta (Bach et al. 2015): positive and negative contributions are redistributed
    separately, ``R_j = sum_k (alpha (a_j w_jk)+ / z+_k - beta (a_j w_jk)- / z-_k) R_k`` with
    ``z+_k = sum_j (a_j w_jk)+ + b+_k`` (likewise z-). alpha - beta = 1 keeps relevance
    conserved; common choices are (1, 0) (= z+) and (2, 1)."""
    alpha: float = 2.0
    beta: float = 1.0

    def __post_init__(self):
        check_number(self.alpha, "alpha", 0.0)
        check_number(self.beta, "beta", 0.0)
        if abs(self.alpha - self.beta - 1) > 1e-9:
            raise ValueError(f"alpha - beta must be 1 to conserve relevance, got alpha={self.alpha}, "
                             f"beta={self.beta}")

    def output(self, layer, a, z):
        w_pos, w_neg, b = layer.weight.clamp(min=0), layer.weight.clamp(max=0), layer.bias
        positive = layer.signed(a, w_pos, w_neg)
        terms = [(positive, self.alpha / _stabilized(layer.plus_bias(positive.detach(), b.clamp(min=0))))]
        if self.beta:
            negative = layer.signed(a, w_neg, w_pos)
            denominator = _stabilized(layer.plus_bias(negative.detach(), b.clamp(max=0)))
            terms.append((negative, -self.beta / denominator))
        return _relevance(z, *terms)


@dataclass(frozen=True)
class ZPlus(Rule):
    """LRP-z+ (Montavon et al. 2017, "Explaining nonlinear classification decisions with deep
    Taylor decomposition"): only positive contributions count, ``R_j = sum_k (a_j w_jk)+ R_k /
    z+_k``; the same as :class:`AlphaBeta` with alpha=1, beta=0. Inputs may be negative: then
    ``a_j w_jk`` with ``a_j < 0, w_jk < 0`` is a positive contribution (zennit's convention)."""

    def output(self, layer, a, z):
        return AlphaBeta(1.0, 0.0).output(layer, a, z)


@dataclass(frozen=True)
class Gamma(Rule):
    """LRP-gamma (Montavon et al. 2019, eq. 10.4): positive weights count ``1 + gamma`` times,
    ``R_j = sum_k a_j (w_jk + gamma w+_jk) R_k / sum_j a_j (w_jk + gamma w+_jk)``, for neurons
    with z_k > 0. As in zennit, negative inputs use ``w + gamma w-`` and neurons with z_k < 0
    favour negative contributions in the same way (Andeol et al. 2021)."""
    gamma: float = 0.25

    def __post_init__(self):
        check_number(self.gamma, "gamma", 0.0)

    def output(self, layer, a, z):
        w, b, g = layer.weight, layer.bias, self.gamma
        up, down = w + g * w.clamp(min=0), w + g * w.clamp(max=0)
        positive, negative = layer.signed(a, up, down), layer.signed(a, down, up)
        return _relevance(
            z, (positive, (z > 0) / _stabilized(layer.plus_bias(positive.detach(), b + g * b.clamp(min=0)))),
            (negative, (z < 0) / _stabilized(layer.plus_bias(negative.detach(), b + g * b.clamp(max=0)))))


@dataclass(frozen=True, eq=False)
class ZBox(Rule):
    """LRP-z^B for the first layer, whose inputs live in a box ``low <= x <= high`` (Montavon et
    al. 2017): ``R_j = sum_k (x_j w_jk - l_j w+_jk - h_j w-_jk) R_k / sum_j (same)``.

    ``low`` and ``high`` are *pixel* values (numbers, or tensors that broadcast to one image,
    e.g. per channel ``C x 1 x 1``); lrp maps them through whatever precedes the layer (the
    model's ``Normalize``, padding: elementwise affine maps, which send the box to a box), so
    padded borders get ``l = h = 0``, as the conv's own zero padding does."""
    low: float | torch.Tensor = 0.0
    high: float | torch.Tensor = 1.0
    first_layer_only = True  # no annotation: a class attribute, not a field

    def __post_init__(self):
        for name in ("low", "high"):
            if not isinstance(getattr(self, name), torch.Tensor):
                check_number(getattr(self, name), name, 0.0, 1.0)

    def output(self, layer, a, z):
        low, high = (bound.expand_as(a) for bound in layer.bounds)
        w = layer.weight
        numerator = layer(a, a, w) - layer(a, low, w.clamp(min=0)) - layer(a, high, w.clamp(max=0))
        return _relevance(z, (numerator, 1 / _stabilized(numerator.detach())))


@dataclass(frozen=True)
class Flat(Rule):
    """LRP-flat (Lapuschkin et al. 2019, "Unmasking Clever Hans predictors"): each output's
    relevance is spread evenly over its receptive field, ``R_j = sum_k R_k / n_k`` (weights and
    inputs taken as 1, no bias). Meant for the first layer."""

    def output(self, layer, a, z):
        numerator = layer(a, torch.ones_like(a), torch.ones_like(layer.weight))
        return _relevance(z, (numerator, 1 / _stabilized(numerator.detach())))


@dataclass(frozen=True)
class WSquare(Rule):
    """LRP-w^2 (Montavon et al. 2017): ``R_j = sum_k w_jk^2 R_k / sum_j w_jk^2`` (no bias), for
    a first layer with unbounded inputs; the input values do not matter."""

    def output(self, layer, a, z):
        numerator = layer(a, torch.ones_like(a), layer.weight ** 2)
        return _relevance(z, (numerator, 1 / _stabilized(numerator.detach())))


RULES = {"epsilon": Epsilon, "gamma": Gamma, "alpha_beta": AlphaBeta, "zplus": ZPlus,
         "zbox": ZBox, "flat": Flat, "wsquare": WSquare}


# ---- composites --------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class Composite:
    """Which rule each conv / dense layer gets (zennit's idea: rules apart from where they apply).

    ``names`` (dotted module name -> rule) wins over ``first`` (the first conv / dense layer
    in registration order) which wins over ``types`` (``(type or tuple of types, rule)``
    pairs, first match); a layer none of them matches gets lrp's ``rule``.
    """
    types: tuple = ()
    first: Rule | None = None
    names: Mapping[str, Rule] = field(default_factory=dict)

    def rule_for(self, name: str, module: nn.Module, first: bool) -> Rule | None:
        if name in self.names:
            return self.names[name]
        if first and self.first is not None:
            return self.first
        return next((rule for types, rule in self.types if isinstance(module, types)), None)


def epsilon_plus(epsilon: float = 1e-6) -> Composite:
    """z+ on convolutions, epsilon on dense layers (zennit's EpsilonPlus)."""
    return Composite(types=((_CONV, ZPlus()), (nn.Linear, Epsilon(epsilon))))


def epsilon_plus_flat(epsilon: float = 1e-6) -> Composite:
    """:func:`epsilon_plus` with the flat rule on the first layer (zennit's EpsilonPlusFlat)."""
    return Composite(types=epsilon_plus(epsilon).types, first=Flat())


def epsilon_plus_box(epsilon: float = 1e-6, low=0.0, high=1.0) -> Composite:
    """:func:`epsilon_plus` with z^B on the first layer."""
    return Composite(types=epsilon_plus(epsilon).types, first=ZBox(low, high))


def epsilon_gamma_box(epsilon: float = 1e-6, gamma: float = 0.25, low=0.0, high=1.0) -> Composite:
    """z^B on the first layer, gamma on the other convolutions, epsilon on dense layers
    (zennit's EpsilonGammaBox; Montavon et al. 2019, sec. 10.3)."""
    return Composite(types=((_CONV, Gamma(gamma)), (nn.Linear, Epsilon(epsilon))), first=ZBox(low, high))


def epsilon_alpha2_beta1(epsilon: float = 1e-6) -> Composite:
    """alpha=2, beta=1 on convolutions, epsilon on dense layers (zennit's EpsilonAlpha2Beta1)."""
    return Composite(types=((_CONV, AlphaBeta(2.0, 1.0)), (nn.Linear, Epsilon(epsilon))))


COMPOSITES = {f.__name__: f for f in (epsilon_plus, epsilon_plus_flat, epsilon_plus_box,
                                      epsilon_gamma_box, epsilon_alpha2_beta1)}
# Every name lrp can apply to a whole network by itself, with the arguments it stands for: the
# rules that fit any layer, then the composites.
NAMED = {**{name: {"rule": name} for name, rule in RULES.items() if not rule.first_layer_only},
         **{name: {"composite": name} for name in COMPOSITES}}


def _build(table: dict, name: str, options: dict, what: str):
    if name not in table:
        raise ValueError(f"unknown LRP {what} {name!r}; choose from {sorted(table)}")
    factory = table[name]
    try:
        return factory(**options)
    except TypeError as err:  # an option the rule or composite does not take
        raise TypeError(f"LRP {what} {name!r} does not take the options {sorted(options)}: {err}") from None


def _resolve(rule, composite, options) -> tuple[Rule, Composite | None]:
    """The default rule and the composite, built from names with ``options``."""
    if isinstance(composite, str):
        composite, options = _build(COMPOSITES, composite, options, "composite"), {}
    if isinstance(rule, str):
        rule, options = _build(RULES, rule, options, "rule"), {}
    if options:
        raise TypeError(f"rule options {sorted(options)} configure a rule or composite given by "
                        f"name; build the object with them instead")
    if not isinstance(rule, Rule):
        raise TypeError(f"rule must be a rule name {sorted(RULES)} or a Rule instance such as "
                        f"Epsilon(0.25), got {rule!r}")
    if composite is not None and not isinstance(composite, Composite):
        raise TypeError(f"composite must be None, a name {sorted(COMPOSITES)} or a Composite, "
                        f"got {composite!r}")
    return rule, composite


def _assign(model: nn.Module, rule, composite, options) -> list[tuple[str, nn.Module, Rule]]:
    """``(name, module, rule)`` for every conv / dense layer, in registration order."""
    rule, composite = _resolve(rule, composite, options)
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, _LINEAR)]
    if not layers:
        raise ValueError(f"LRP needs conv or dense layers (nn.Conv*d, nn.Linear); "
                         f"{type(model).__name__} has none")
    for name in composite.names if composite else ():
        if not isinstance(resolve_layer(model, name), _LINEAR):
            raise ValueError(f"composite names {name!r}, which is not a conv or dense layer")
    assigned = []
    for index, (name, module) in enumerate(layers):
        chosen = (composite.rule_for(name, module, index == 0) if composite else None) or rule
        if not isinstance(chosen, Rule):
            raise TypeError(f"the composite gives layer {name!r} {chosen!r}, which is not a Rule")
        if chosen.first_layer_only and index > 0:
            raise ValueError(f"z^B (ZBox) is a rule for the first layer ({layers[0][0]!r}), whose inputs "
                             f"are pixels, but it was given to {name!r}; use a composite such as "
                             f"'epsilon_gamma_box' or Composite(first=ZBox(low, high))")
        assigned.append((name, module, chosen))
    return assigned


# ---- BatchNorm folding -------------------------------------------------------------------------

def _batchnorm_after(model: nn.Module) -> dict[nn.Module, tuple[str, nn.Module]]:
    """``{conv or dense layer: (name, BatchNorm)}`` for each BatchNorm registered right after a
    conv / dense layer (zennit's SequentialMergeBatchNorm convention; lrp checks during the
    forward pass that the BatchNorm really takes that layer's output)."""
    leaves = [(name, m) for name, m in model.named_modules() if next(m.children(), None) is None]
    return {before: (name, m) for (_, before), (name, m) in zip(leaves, leaves[1:])
            if isinstance(before, _LINEAR) and isinstance(m, _BATCHNORM)}


def _folded(module: nn.Module, name: str, batchnorm: nn.Module | None):
    """(weight, bias) of ``module`` followed by eval-mode ``batchnorm``: ``w s`` and
    ``(b - mean) s + beta`` with ``s = gamma / sqrt(var + eps)`` (Ioffe & Szegedy 2015)."""
    weight = module.weight.detach()
    bias = module.bias.detach() if module.bias is not None else weight.new_zeros(weight.shape[0])
    if batchnorm is None:
        return weight, bias
    if batchnorm.running_var is None or batchnorm.num_features != weight.shape[0]:
        raise ValueError(f"BatchNorm {name!r} cannot be folded into the layer before it: it needs "
                         f"running statistics and {weight.shape[0]} features")
    scale = (batchnorm.running_var + batchnorm.eps).rsqrt()
    if batchnorm.weight is not None:
        scale = scale * batchnorm.weight.detach()
    shift = batchnorm.bias.detach() if batchnorm.bias is not None else 0.0
    folded_weight = weight * scale.reshape(-1, *[1] * (weight.dim() - 1))
    return folded_weight, (bias - batchnorm.running_mean) * scale + shift


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in which every BatchNorm that directly follows a conv / dense layer
    is folded into that layer and replaced by ``nn.Identity``: the same function in eval mode
    (up to float rounding). The original is not touched. lrp folds the same way on the fly."""
    folded = copy.deepcopy(model)
    for module, (name, batchnorm) in _batchnorm_after(folded).items():
        weight, bias = _folded(module, name, batchnorm)
        module.weight = nn.Parameter(weight, requires_grad=module.weight.requires_grad)
        module.bias = nn.Parameter(bias, requires_grad=module.weight.requires_grad)
        parent, _, child = name.rpartition(".")
        setattr(folded.get_submodule(parent), child, nn.Identity())
    return folded


# ---- hooks ----------------------------------------------------------------------------------------

def _pass(module, inputs, output):
    return _relevance(output, (inputs[0], None))


def _proportional(module, inputs, output):
    numerator = module.forward(*(_Link.apply(x, x) for x in inputs))  # .forward: no hooks again
    return _relevance(output, (numerator, 1 / _stabilized(output)))


def _rule_hook(layer: _Layer, rule: Rule, pending: dict):
    def hook(module, inputs, output):
        if layer.batchnorm is None:
            return rule.output(layer, inputs[0], output)
        pending[layer.batchnorm] = (inputs[0], output)  # the folded layer ends after its BatchNorm
        return None
    return hook


def _batchnorm_hook(layer: _Layer, rule: Rule, pending: dict):
    def hook(module, inputs, output):
        a, before = pending.pop(module, (None, None))
        if before is None or inputs[0] is not before:
            raise ValueError(f"the BatchNorm registered after {layer.name!r} does not take its output, "
                             f"so lrp cannot fold it; fold it yourself or register modules in the "
                             f"order they run")
        return rule.output(layer, a, output)
    return hook


class _Stop(Exception):
    """Ends the forward pass that maps the ZBox bounds, once they reach the first layer."""


def _input_box(model: nn.Module, module: nn.Module, rule: ZBox, x: torch.Tensor):
    """ZBox's pixel bounds as seen by ``module``'s input: images that are ``low`` (``high``)
    everywhere are run up to it."""
    images = []
    for bound_name in ("low", "high"):
        bound = torch.as_tensor(getattr(rule, bound_name), dtype=x.dtype, device=x.device)
        try:
            images.append(bound.expand(1, *x.shape[1:]))
        except RuntimeError:
            raise ValueError(f"ZBox {bound_name} must be a number or broadcast to one image "
                             f"{tuple(x.shape[1:])}, got shape {tuple(bound.shape)}") from None
    low, high = images
    if not ((low <= x).all() and (x <= high).all()):
        raise ValueError("ZBox needs low <= x <= high for every pixel (low, high are pixel values in "
                         "[0, 1]), got pixels outside the box")
    seen = []

    def stop(_, inputs):
        seen.append(inputs[0])
        raise _Stop

    handle = module.register_forward_pre_hook(stop)
    try:
        with torch.no_grad():
            model(torch.cat([low, high]))
    except _Stop:
        pass
    finally:
        handle.remove()
    return torch.minimum(seen[0][:1], seen[0][1:]), torch.maximum(seen[0][:1], seen[0][1:])


def _check_supported(model: nn.Module) -> None:
    """Layers with parameters that no rule covers (LayerNorm, embeddings, ...) would get the plain
    gradient, silently: refuse them, and modules that declare an unknown ``lrp_role``."""
    for name, m in model.named_modules():
        role = _role(m)  # first: an unknown declared role is refused on every module
        has_parameters = any(True for _ in m.parameters(recurse=False))
        if has_parameters and not isinstance(m, _LINEAR + _BATCHNORM) and role is None:
            raise ValueError(f"lrp has no rule for layer {name!r} ({type(m).__name__}); it handles "
                             f"conv, dense, BatchNorm and elementwise layers")


def _register(model: nn.Module, assigned, x: torch.Tensor, handles: list) -> None:
    """Hook every layer that relevance passes in a non-gradient way (see the module docstring)."""
    after, pending = _batchnorm_after(model), {}
    layers = [(_Layer(name, module, *after.get(module, ())), rule) for name, module, rule in assigned]
    for layer, rule in layers:  # before any hook exists, so this forward pass runs plain
        if isinstance(rule, ZBox):
            layer.bounds = _input_box(model, layer.module, rule, x)
    for layer, rule in layers:
        handles.append(layer.module.register_forward_hook(_rule_hook(layer, rule, pending)))
        if layer.batchnorm is not None:
            handles.append(layer.batchnorm.register_forward_hook(_batchnorm_hook(layer, rule, pending)))
    folded = {layer.batchnorm for layer, _ in layers}
    for m in model.modules():
        role = _role(m)
        if role == "passthrough" or (isinstance(m, _BATCHNORM) and m not in folded):
            handles.append(m.register_forward_hook(_pass))
        elif role == "proportional":
            handles.append(m.register_forward_hook(_proportional))


def lrp(model: nn.Module, x: torch.Tensor, target, rule="epsilon", composite=None,
        **rule_options) -> torch.Tensor:
    """Layer-wise Relevance Propagation of the target logit down to the pixels, ``B x C x H x W``.

    Relevance starts as the target class's logit (pre-softmax) on that class and 0 on the others,
    and each conv / dense layer passes it down by its rule (module docstring for the other
    layers). With biases, epsilon and stabilizers absorbing nothing, ``R.sum() == logit``.

    ``rule``: a name (``"epsilon"``, ``"gamma"``, ``"alpha_beta"``, ``"zplus"``, ``"flat"``,
    ``"wsquare"``, ``"zbox"`` for one-layer models) or a :class:`Rule` such as ``Gamma(0.5)``;
    every conv / dense layer gets it unless ``composite`` says otherwise. ``composite``: a name
    (``"epsilon_plus"``, ``"epsilon_plus_flat"``, ``"epsilon_plus_box"``, ``"epsilon_gamma_box"``,
    ``"epsilon_alpha2_beta1"``) or a :class:`Composite`. ``rule_options`` configure the
    composite when it is given by name, else the rule (``epsilon=``, ``gamma=``, ``alpha=``,
    ``beta=``, ``low=``, ``high=``).

    One forward and one backward pass: each hooked layer returns its true output, with a backward
    that is the layer's relevance rule (a "modified gradient" as in zennit, Anders et al. 2021).
    The model is left as it was; one in train mode runs in eval mode for the call, with a warning.
    """
    target = prepare(model, x, target)
    assigned = _assign(model, rule, composite, rule_options)
    _check_supported(model)
    with preserved(model), hooks() as handles, torch.enable_grad():
        _register(model, assigned, x, handles)
        x = x.detach().requires_grad_(True)
        logits = checked_logits(model, x, target)
        start = torch.zeros_like(logits).scatter_(1, target[:, None], logits.gather(1, target[:, None]))
        (relevance,) = torch.autograd.grad(logits, x, start.detach())
    return relevance.detach()


METHODS = (
    Method("lrp", lrp, "LRP", "sum", options={"rule": Option("epsilon_gamma_box", choices=NAMED)}),
)

__all__ = ["lrp", "Rule", "Epsilon", "Gamma", "AlphaBeta", "ZPlus", "ZBox", "Flat", "WSquare",
           "Composite", "fold_batchnorm"]
