"""labkit.attribution.lrp: against zennit (the peer), against the rules' explicit per-neuron
formulas, conservation on bias-free ReLU networks, BatchNorm folding, bad input, and the model
left exactly as it was."""
from __future__ import annotations

import copy
import importlib
import importlib.util
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import labkit
from labkit.attribution.lrp import (Composite, Epsilon, Flat, Gamma, ZBox, ZPlus,
                                    fold_batchnorm, lrp)
from labkit.models import WEIGHTS_DIR, FashionCNN, Normalize
from labkit.models.efficientnet_lite import Add, ConvUnit, MBConv
from zennit_stand_in import import_zennit

STABILIZER = 1e-6


# ---- fixtures -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def zennit():
    """zennit's modules, imported with a torchvision stand-in (see zennit_stand_in.py)."""
    if importlib.util.find_spec("zennit") is None:
        pytest.skip("zennit is not installed (pip install --no-deps zennit)")
    return import_zennit()


@pytest.fixture(scope="module")
def fashion():
    """FashionCNN in float64 (the comparisons are then exact up to rounding): the shipped
    weights when they exist, else a seeded random one; and 3 test images with targets."""
    if (WEIGHTS_DIR / "fmnist-cnn.pt").is_file():
        model = labkit.models.load("fmnist-cnn", device="cpu")
    else:
        torch.manual_seed(0)
        model = FashionCNN().eval()
    x, _ = labkit.data.fashion_mnist("test").tensors([0, 1, 2])
    return model.double(), x.double(), torch.tensor([9, 2, 1])


@pytest.fixture(scope="module")
def effnet():
    """EfficientNet-Lite0 (ImageNet weights) in float64 on a 32 x 32 photo (any side divisible
    by 32 runs every layer), with its predicted class as target."""
    model = labkit.models.load("imagenet-effnet-lite0", device="cpu").double()
    x = labkit.data.sample_photos(32)[0][:1].double()
    with torch.no_grad():
        return model, x, model(x).argmax(1)


def _conv_bn_net():
    """Conv-BN-ReLU6 (stride 2, padded), an MBConv block with a residual Add, average pooling,
    and a dense layer with BatchNorm1d and in-place ReLU: every layer kind lrp knows."""
    torch.manual_seed(1)
    model = nn.Sequential(Normalize([0.4, 0.5, 0.6], [0.2, 0.3, 0.25]), ConvUnit(3, 8, 3, stride=2),
                          MBConv(8, 8, 3, 1, 4), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(8 * 4 * 4, 16),
                          nn.BatchNorm1d(16), nn.ReLU(inplace=True), nn.Dropout(), nn.Linear(16, 5))
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            m.running_mean.normal_(0, 0.5), m.running_var.uniform_(0.5, 2)
            m.weight.data.normal_(1, 0.5), m.bias.data.normal_(0, 0.5)
    return model.double().eval()


# ---- zennit as the oracle ---------------------------------------------------------------------

def _zennit_relevance(zennit, model, x, target, composite):
    """zennit's LRP with the same starting relevance (the target logit on the target class)."""
    with zennit.attribution.Gradient(model, composite) as attributor:
        logits = model(x)
        start = torch.zeros_like(logits).scatter_(1, target[:, None], logits.gather(1, target[:, None]))
        _, relevance = attributor(x, start.detach())
    return relevance


def _zennit_ready(model):
    """A copy on which zennit's BatchNorm merge is exact: zennit 0.5.1 turns a merged BatchNorm
    into (x - 0) / sqrt(1 + eps), not the identity, so eps goes into running_var (same function)."""
    model = copy.deepcopy(model)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            m.running_var += m.eps - 1e-12
            m.eps = 1e-12
    return model


def _canonizers(zennit):
    """BatchNorm merging, and labkit's residual Add as zennit's Sum over stacked summands (the
    way zennit's ResNet canonizer rewrites residual blocks), so Add gets zennit's Norm rule."""
    def add_as_sum(self, a, b):
        return self.canonizer_sum(torch.stack([a, b], dim=-1))

    def attributes(name, module):
        return {"forward": add_as_sum.__get__(module), "canonizer_sum": zennit.layer.Sum()} \
            if isinstance(module, Add) else None

    return [zennit.canonizers.SequentialMergeBatchNorm(), zennit.canonizers.AttributeCanonizer(attributes)]


def _uniform(zennit, rule, canonizers=()):
    """zennit composite giving ``rule`` to every conv / dense layer, Pass to labkit's Normalize."""
    layer_map = [(Normalize, zennit.rules.Pass())] + zennit.composites.layer_map_base() + [
        ((zennit.types.Convolution, nn.Linear), rule)]
    return zennit.composites.LayerMapComposite(layer_map, canonizers=list(canonizers))


def _box_bounds(model, x):
    """Pixel bounds 0 and 1 as seen by the first conv: through Normalize, and through the
    explicit ZeroPad2d of EfficientNet's stem (padded border: l = h = 0)."""
    low, high = ((v - model.normalize.mean) / model.normalize.std for v in (0.0, 1.0))
    pad = getattr(getattr(model, "stem", None), "pad", None)
    if pad is None:
        return low, high
    return tuple(F.pad(b.expand(1, 3, *x.shape[2:]), pad.padding) for b in (low, high))


def _zennit_composite(zennit, name, model, x, canonizers=()):
    c, r, t = zennit.composites, zennit.rules, zennit.types
    keep = {"layer_map": [(Normalize, r.Pass())], "canonizers": list(canonizers)}
    if name == "epsilon_plus":
        return c.EpsilonPlus(**keep)
    if name == "epsilon_plus_flat":
        return c.EpsilonPlusFlat(**keep)
    if name == "epsilon_alpha2_beta1":
        return c.EpsilonAlpha2Beta1(**keep)
    low, high = _box_bounds(model, x)
    if name == "epsilon_gamma_box":
        return c.EpsilonGammaBox(low, high, **keep)
    layer_map = keep["layer_map"] + c.layer_map_base() + [(t.Convolution, r.ZPlus()),
                                                           (nn.Linear, r.Epsilon())]
    return c.SpecialFirstLayerMapComposite(layer_map, [(t.Linear, r.ZBox(low, high))],
                                           canonizers=list(canonizers))


RULES = [  # labkit options, the zennit rule
    ({"rule": "epsilon"}, lambda r: r.Epsilon()),
    ({"rule": "epsilon", "epsilon": 0.25}, lambda r: r.Epsilon(0.25)),
    ({"rule": "zplus"}, lambda r: r.ZPlus()),
    ({"rule": "alpha_beta", "alpha": 1, "beta": 0}, lambda r: r.AlphaBeta(1, 0)),
    ({"rule": "alpha_beta", "alpha": 2, "beta": 1}, lambda r: r.AlphaBeta(2, 1)),
    ({"rule": "gamma"}, lambda r: r.Gamma()),
    ({"rule": Gamma(1.0)}, lambda r: r.Gamma(1.0)),
    ({"rule": "flat"}, lambda r: r.Flat()),
    ({"rule": "wsquare"}, lambda r: r.WSquare(zero_params=["bias"])),  # the paper's w^2: no bias
]
COMPOSITES = ["epsilon_plus", "epsilon_plus_flat", "epsilon_plus_box", "epsilon_gamma_box",
              "epsilon_alpha2_beta1"]


def _assert_same(ours, theirs, rtol=1e-7, atol=1e-9):
    """Close up to rounding; ``atol`` is relative to the largest relevance."""
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, rtol=rtol, atol=atol * theirs.abs().max().item())


@pytest.mark.peers
@pytest.mark.parametrize("options, zennit_rule", RULES, ids=[str(list(o.values())) for o, _ in RULES])
def test_rules_match_zennit_on_fashion_cnn(zennit, fashion, options, zennit_rule):
    model, x, target = fashion
    ours = lrp(model, x, target, **options)
    composite = _uniform(zennit, zennit_rule(zennit.rules))
    _assert_same(ours, _zennit_relevance(zennit, model, x, target, composite))


@pytest.mark.peers
@pytest.mark.parametrize("name", COMPOSITES)
def test_composites_match_zennit_on_fashion_cnn(zennit, fashion, name):
    model, x, target = fashion
    theirs = _zennit_relevance(zennit, model, x, target, _zennit_composite(zennit, name, model, x))
    _assert_same(lrp(model, x, target, composite=name), theirs)


@pytest.mark.peers
@pytest.mark.parametrize("options, zennit_rule", RULES[:1] + RULES[2:3] + RULES[4:6],
                         ids=["epsilon", "zplus", "alpha2_beta1", "gamma"])
def test_rules_match_zennit_on_a_net_with_batchnorm_residual_and_pooling(zennit, options, zennit_rule):
    model = _conv_bn_net()
    x, target = torch.rand(3, 3, 16, 16, dtype=torch.double), torch.tensor([0, 4, 2])
    composite = _uniform(zennit, zennit_rule(zennit.rules), _canonizers(zennit))
    _assert_same(lrp(model, x, target, **options),
                 _zennit_relevance(zennit, _zennit_ready(model), x, target, composite))


@pytest.mark.peers
@pytest.mark.parametrize("name", ["epsilon_plus", "epsilon_gamma_box", "epsilon_alpha2_beta1"])
def test_composites_match_zennit_on_efficientnet(zennit, effnet, name):
    model, x, target = effnet
    ready = _zennit_ready(model)
    composite = _zennit_composite(zennit, name, ready, x, _canonizers(zennit))
    theirs = _zennit_relevance(zennit, ready, x, target, composite)
    # zennit runs the merged convolutions, labkit the model's own conv + BatchNorm: the forward
    # passes differ in the last bits, and residual sums that nearly cancel (R_a = a R / (a + b))
    # magnify that (to ~5e-9 of the largest relevance for alpha2-beta1, ~3e-11 for the others)
    _assert_same(lrp(model, x, target, composite=name), theirs, rtol=1e-6, atol=1e-7)


# ---- the rules' explicit formulas on one dense layer ---------------------------------------------

def _stab(z):
    return z + STABILIZER * (2 * (z >= 0).double() - 1)


def _naive(rule, contributions, weight, bias, z, low, high):
    """Per-neuron relevance share ``B x K x J`` (output k to input j) of each rule, written out
    from Bach et al. 2015 / Montavon et al. 2017, 2019 (contributions[b, k, j] = a_j w_kj)."""
    c, pos, neg = contributions, contributions.clamp(min=0), contributions.clamp(max=0)
    col = lambda t: t[..., None]  # noqa: E731  (per output neuron, broadcast over inputs)
    if rule == "epsilon":
        return c / col(_stab(z))
    if rule == "zplus":
        return pos / col(_stab(pos.sum(-1) + bias.clamp(min=0)))
    if rule == "alpha2_beta1":
        return (2 * pos / col(_stab(pos.sum(-1) + bias.clamp(min=0)))
                - neg / col(_stab(neg.sum(-1) + bias.clamp(max=0))))
    if rule == "gamma":
        up, down = c + 0.25 * pos, c + 0.25 * neg
        return (col(z > 0) * up / col(_stab(up.sum(-1) + bias + 0.25 * bias.clamp(min=0)))
                + col(z < 0) * down / col(_stab(down.sum(-1) + bias + 0.25 * bias.clamp(max=0))))
    if rule == "zbox":
        share = c - low * weight.clamp(min=0) - high * weight.clamp(max=0)
        return share / col(_stab(share.sum(-1)))
    if rule == "flat":
        return torch.ones_like(c) / _stab(torch.tensor(float(c.shape[-1])))
    if rule == "wsquare":
        return (weight ** 2 / col(_stab((weight ** 2).sum(-1)))).expand_as(c)
    raise AssertionError(rule)


@pytest.mark.parametrize("rule", ["epsilon", "zplus", "alpha2_beta1", "gamma", "zbox", "flat", "wsquare"])
def test_rules_follow_their_formulas_on_one_dense_layer(rule):
    torch.manual_seed(2)
    model = nn.Sequential(Normalize([0.5], [0.25]), nn.Flatten(), nn.Linear(16, 3)).double().eval()
    x, target = torch.rand(5, 1, 4, 4, dtype=torch.double), torch.tensor([0, 1, 2, 0, 1])
    a = (x.flatten(1) - 0.5) / 0.25  # signed inputs, so negative-input terms count
    weight, bias = model[2].weight.detach(), model[2].bias.detach()
    z = a @ weight.T + bias
    low, high = (0 - 0.5) / 0.25, (1 - 0.5) / 0.25
    share = _naive(rule, a[:, None, :] * weight, weight, bias, z, low, high)
    expected = (share * z[:, :, None]).gather(1, target[:, None, None].expand(-1, 1, 16)).squeeze(1)
    options = {"alpha2_beta1": {"rule": "alpha_beta", "alpha": 2, "beta": 1},
               "zbox": {"composite": Composite(first=ZBox(0.0, 1.0))}}.get(rule, {"rule": rule})
    torch.testing.assert_close(lrp(model, x, target, **options).flatten(1), expected, rtol=1e-9, atol=1e-12)


# ---- conservation ---------------------------------------------------------------------------------

class _Residual(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.relu, self.add = nn.ReLU(), Add()

    def forward(self, x):
        return self.add(x, self.relu(self.conv(x)))


@pytest.mark.parametrize("options", [{"rule": "epsilon", "epsilon": 1e-9}, {"rule": "zplus"},
                                     {"rule": "gamma"}, {"composite": "epsilon_plus"}],
                         ids=["epsilon", "zplus", "gamma", "epsilon_plus"])
def test_relevance_sums_to_the_target_logit_on_a_bias_free_relu_net(options):
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1, bias=False), nn.ReLU(), nn.MaxPool2d(2),
                          _Residual(6), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(),
                          nn.Linear(6 * 4 * 4, 12, bias=False), nn.ReLU(), nn.Linear(12, 4, bias=False))
    with torch.no_grad():  # logits of order 1-10, so the stabilizers (1e-6) absorb ~1e-7 of them
        for p in model.parameters():
            p *= 3
    model = model.double().eval()
    x = torch.rand(4, 1, 16, 16, dtype=torch.double)
    all_logits = model(x).detach()
    target = all_logits.abs().argmax(1)  # the largest logit by size, positive or negative
    logits = all_logits.gather(1, target[:, None]).squeeze(1)
    relevance = lrp(model, x, target, **options)
    assert logits.abs().min() > 0.5
    torch.testing.assert_close(relevance.sum((1, 2, 3)), logits, rtol=1e-5, atol=1e-6)


# ---- BatchNorm folding -------------------------------------------------------------------------

def test_folded_efficientnet_gives_the_same_logits_and_leaves_the_original(effnet):
    model, x, _ = effnet
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folded = fold_batchnorm(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-9, atol=1e-9)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("rule", ["epsilon", "zplus", "gamma", "alpha_beta"])
def test_lrp_folds_batchnorm_on_the_fly_like_the_folded_copy(rule):
    model = _conv_bn_net()
    x, target = torch.rand(2, 3, 16, 16, dtype=torch.double), torch.tensor([1, 3])
    torch.testing.assert_close(lrp(model, x, target, rule=rule),
                               lrp(fold_batchnorm(model), x, target, rule=rule))


# ---- batches, targets, shapes ----------------------------------------------------------------------

def test_per_sample_targets_give_each_image_its_own_relevance(fashion):
    model, x, target = fashion
    batched = lrp(model, x, target, composite="epsilon_plus")
    one_by_one = torch.cat([lrp(model, x[i:i + 1], int(target[i]), composite="epsilon_plus")
                            for i in range(len(x))])
    torch.testing.assert_close(batched, one_by_one)
    assert batched.shape == x.shape and not batched.requires_grad


def test_a_float32_model_gives_float32_relevance_close_to_float64():
    torch.manual_seed(4)
    model = FashionCNN().eval()
    x = torch.rand(2, 1, 28, 28)
    ours = lrp(model, x, [1, 2], composite="epsilon_gamma_box")
    assert ours.dtype == torch.float32
    reference = lrp(model.double(), x.double(), [1, 2], composite="epsilon_gamma_box")
    torch.testing.assert_close(ours.double(), reference, rtol=1e-3, atol=1e-4 * reference.abs().max().item())


def test_composite_by_name_and_first_layer_with_a_fallback_rule(fashion):
    model, x, target = fashion
    composite = Composite(types=((nn.Conv2d, ZPlus()),), names={"conv1": Flat()})
    torch.testing.assert_close(lrp(model, x, target, rule=Epsilon(), composite=composite),
                               lrp(model, x, target, composite="epsilon_plus_flat"))
    same_as_box = Composite(types=((nn.Conv2d, Gamma()),), first=ZBox(0.0, 1.0))
    torch.testing.assert_close(lrp(model, x, target, composite=same_as_box),
                               lrp(model, x, target, composite="epsilon_gamma_box"))


# ---- bad input ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, error, message", [
    ({"rule": "lrp0"}, ValueError, "unknown LRP rule 'lrp0'; choose from"),
    ({"composite": "plus"}, ValueError, "unknown LRP composite 'plus'"),
    ({"rule": "epsilon", "epsilon": -1.0}, ValueError, "epsilon must be in"),
    ({"rule": "epsilon", "epsilon": 0}, ValueError, "epsilon must be > 0"),
    ({"rule": "epsilon", "epsilon": "small"}, TypeError, "epsilon must be a number"),
    ({"rule": "alpha_beta", "alpha": 1, "beta": 1}, ValueError, "alpha - beta must be 1"),
    ({"rule": "gamma", "gamma": -0.5}, ValueError, "gamma must be in"),
    ({"rule": "epsilon", "gamma": 0.25}, TypeError, "does not take the options \\['gamma'\\]"),
    ({"rule": Epsilon(), "epsilon": 0.1}, TypeError, "configure a rule or composite given by name"),
    ({"rule": Epsilon}, TypeError, "rule must be a rule name"),
    ({"composite": 3}, TypeError, "composite must be None, a name"),
    ({"rule": "zbox"}, ValueError, "rule for the first layer \\('conv1'\\).*given to 'conv2'"),
    ({"composite": Composite(names={"conv9": Flat()})}, ValueError, "no layer named 'conv9'"),
    ({"composite": Composite(names={"relu1": Flat()})}, ValueError, "'relu1', which is not a conv"),
    ({"composite": Composite(types=((nn.Conv2d, "zplus"),))}, TypeError, "which is not a Rule"),
    ({"composite": "epsilon_gamma_box", "low": 1.5}, ValueError, "low must be in \\[0.0, 1.0\\]"),
    ({"composite": "epsilon_gamma_box", "low": torch.zeros(5)}, ValueError, "broadcast to one image"),
    ({"composite": "epsilon_gamma_box", "low": 0.5}, ValueError, "low <= x <= high"),
])
def test_bad_rules_and_options_are_refused_with_a_clear_message(random_cnn, kwargs, error, message):
    x = torch.rand(2, 1, 28, 28)
    with pytest.raises(error, match=message):
        lrp(random_cnn, x, [0, 1], **kwargs)


@pytest.mark.parametrize("x, target, error, message", [
    (torch.rand(1, 28, 28), 0, ValueError, "must have 4 dimensions"),
    ((torch.rand(2, 1, 28, 28) * 255).to(torch.uint8), 0, TypeError, "float tensor"),
    (torch.rand(2, 1, 28, 28) * 2, 0, ValueError, "in \\[0, 1\\]"),
    (torch.rand(2, 1, 28, 28), [0, 1, 2], ValueError, "expected length 2"),
    (torch.rand(2, 1, 28, 28), 10, ValueError, "class indices in \\[0, 9\\]"),
])
def test_bad_images_and_targets_are_refused(random_cnn, x, target, error, message):
    with pytest.raises(error, match=message):
        lrp(random_cnn, x, target)


def test_layers_without_an_lrp_rule_are_refused():
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.LayerNorm(8), nn.Linear(8, 2)).eval()
    with pytest.raises(ValueError, match="no rule for layer '2' \\(LayerNorm\\)"):
        lrp(model, torch.rand(1, 1, 4, 4), 0)
    with pytest.raises(ValueError, match="needs conv or dense layers"):
        lrp(nn.Sequential(nn.Flatten()), torch.rand(1, 1, 4, 4), 0)


class _BatchNormFirst(nn.Module):
    """Registers conv before bn, but runs bn first: folding bn into conv would be wrong."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(12, 2))

    def forward(self, x):
        return self.head(self.conv(self.bn(x)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_images_on_another_device_are_refused(random_cnn):
    with pytest.raises(ValueError, match="is on cuda"):
        lrp(random_cnn, torch.rand(1, 1, 28, 28, device="cuda"), 0)


# ---- the model is left exactly as it was ------------------------------------------------------------

def _state(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [(p.requires_grad, None if p.grad is None else p.grad.clone()) for p in model.parameters()],
            [m.training for m in model.modules()],
            [(name, list(getattr(m, name))) for m in model.modules() for name in
             ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")])


def _same_state(a, b):
    params, grads, modes, hook_keys = a
    params2, grads2, modes2, hook_keys2 = b
    assert params.keys() == params2.keys() and all(torch.equal(params[k], params2[k]) for k in params)
    assert [r for r, _ in grads] == [r for r, _ in grads2]
    assert all((g is None and h is None) or torch.equal(g, h) for (_, g), (_, h) in zip(grads, grads2))
    assert modes == modes2 and hook_keys == hook_keys2


@pytest.mark.parametrize("case", ["epsilon", "epsilon_gamma_box", "bad target", "bn order", "bad option"])
def test_the_model_is_unchanged_also_when_lrp_raises(case):
    model = _BatchNormFirst() if case == "bn order" else _conv_bn_net()
    model.train()  # lrp evaluates in eval mode and restores train mode
    for i, p in enumerate(model.parameters()):
        p.grad = torch.full_like(p, 0.5) if i % 2 else None
    next(model.parameters()).requires_grad_(False)
    model.register_forward_hook(lambda *args: None)
    before = _state(model)
    x = torch.rand(2, 3, 2, 2) if case == "bn order" else torch.rand(2, 3, 16, 16, dtype=torch.double)
    call = {"epsilon": lambda: lrp(model, x, [0, 1]),
            "epsilon_gamma_box": lambda: lrp(model, x, [0, 1], composite="epsilon_gamma_box"),
            "bad target": lambda: lrp(model, x, [0, 7]),
            "bn order": lambda: lrp(model, x, [0, 1]),
            "bad option": lambda: lrp(model, x, [0, 1], rule="gamma", gamma=-1.0)}[case]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the train -> eval warning
        if case in ("epsilon", "epsilon_gamma_box"):
            call()
        else:
            with pytest.raises(ValueError, match={"bad target": "class indices", "bad option": "gamma must",
                                                  "bn order": "does not take its output"}[case]):
                call()
    _same_state(before, _state(model))


# ---- modules of a model's own declare their LRP role --------------------------------------------

class _Sum(nn.Module):
    """A residual sum of this test's own, unknown to labkit: it declares its role."""
    lrp_role = "proportional"

    def forward(self, a, b):
        return a + b


class _Undeclared(_Sum):
    lrp_role = None  # the same sum without a role: LRP hands it the plain gradient


class _Scale(nn.Module):
    """An elementwise input transform with a learnable parameter, declared pass-through."""
    lrp_role = "passthrough"

    def __init__(self):
        super().__init__()
        self.gain = nn.Parameter(torch.tensor(2.0))

    def forward(self, x):
        return x * self.gain


class _ToyResidual(nn.Module):
    def __init__(self, add):
        super().__init__()
        self.scale, self.conv1 = _Scale(), nn.Conv2d(1, 4, 3, padding=1, bias=False)
        self.conv2, self.relu, self.add = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.ReLU(), add
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 3, bias=False))

    def forward(self, x):
        a = self.relu(self.conv1(self.scale(x)))
        return self.head(self.add(a, self.relu(self.conv2(a))))


def test_a_module_declares_its_lrp_role_and_lrp_follows_it():
    torch.manual_seed(0)
    model = _ToyResidual(_Sum()).double().eval()
    x = torch.rand(3, 1, 8, 8, dtype=torch.double)
    logits = model(x).detach()
    target = logits.argmax(1)
    relevance = lrp(model, x, target, rule="epsilon", epsilon=1e-9)
    # bias-free: relevance is conserved through the declared sum and the declared scale
    torch.testing.assert_close(relevance.sum((1, 2, 3)), logits.gather(1, target[:, None]).squeeze(1),
                               rtol=1e-5, atol=1e-6)  # the stabilizers (1e-6) absorb a little
    undeclared = _ToyResidual(_Undeclared()).double().eval()
    undeclared.load_state_dict(model.state_dict())
    # without a role the sum passes the gradient to both summands: relevance is no longer conserved,
    # and the parameterized scale is refused as a layer LRP has no rule for
    undeclared.scale.lrp_role = None
    with pytest.raises(ValueError, match="no rule for layer 'scale'"):
        lrp(undeclared, x, target, rule="epsilon", epsilon=1e-9)
    undeclared.scale.lrp_role = "passthrough"
    total = lrp(undeclared, x, target, rule="epsilon", epsilon=1e-9).sum((1, 2, 3))
    assert (total - logits.gather(1, target[:, None]).squeeze(1)).abs().max() > 1e-2


def test_an_unknown_lrp_role_is_refused():
    model = _ToyResidual(_Sum()).eval()
    model.add.lrp_role = "residual"
    with pytest.raises(ValueError, match="lrp_role must be one of"):
        lrp(model, torch.rand(1, 1, 8, 8), 0)


def test_lrp_imports_no_model():
    import ast
    import pathlib
    lrp_module = importlib.import_module("labkit.attribution.lrp")  # the attribute is the function
    tree = ast.parse(pathlib.Path(lrp_module.__file__).read_text())
    imported = [node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    assert not any("models" in name for name in imported), imported
