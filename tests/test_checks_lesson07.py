"""labkit.checks for lesson 07 (Grad-CAM): right answers pass, a hook left on the model is named,
each typical Grad-CAM and guided-backprop mistake gets its hint, a stub is "not implemented yet",
labkit's own implementations are refused."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from labkit import attribution, checks
from labkit.checks import _engine, lesson07
from test_checks import assert_no_reference_values, expect_hint, run_check, stub


def rows(n):
    return torch.arange(n)


def layer_output_and_gradient(model, x, target, layer, score=lambda z: z):
    captured = []
    handle = model.get_submodule(layer).register_forward_hook(lambda m, i, out: captured.append(out))
    try:
        logits = model(x.detach().requires_grad_(True))
    finally:
        handle.remove()
    (grad,) = torch.autograd.grad(score(logits)[rows(len(x)), target].sum(), captured[-1])
    return captured[-1].detach(), grad


def grad_cam(model, x, target, layer, score=lambda z: z, weights=lambda g: g.mean(dim=(2, 3), keepdim=True),
             rectify=F.relu, resize=lambda cam, size: F.interpolate(cam, size=size, mode="bilinear",
                                                                    align_corners=False)):
    a, g = layer_output_and_gradient(model, x, target, layer, score)
    return resize(rectify((weights(g) * a).sum(dim=1, keepdim=True)), x.shape[-2:])


def cam_variant(**changes):
    return lambda model, x, target, layer: grad_cam(model, x, target, layer, **changes)


def guided_backprop(model, x, target, rule=lambda grad_in, grad_out: grad_in.clamp(min=0), score=lambda z: z):
    handles = [m.register_full_backward_hook(lambda m, gi, go: (rule(gi[0], go[0]),))
               for m in model.modules() if isinstance(m, (nn.ReLU, nn.ReLU6))]
    try:
        x = x.detach().clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(score(model(x))[rows(len(x)), target].sum(), x)
    finally:
        for handle in handles:
            handle.remove()
    return grad


def guided_variant(**changes):
    return lambda model, x, target: guided_backprop(model, x, target, **changes)


EXERCISES = {checks.check_grad_cam: (grad_cam, lesson07.grad_cam, attribution.gradcam),
             checks.check_guided_backprop: (guided_backprop, attribution.guided_backprop,
                                            attribution.guided_backprop)}


@pytest.mark.parametrize("check", EXERCISES, ids=[c.__name__ for c in EXERCISES])
def test_right_answer_passes_and_labkits_is_refused(check):
    right, reference, public = EXERCISES[check]
    for _ in range(3):
        assert run_check(check, right) == (True, "")
    with _engine.accepting_reference():
        assert run_check(check, reference) == (True, "")
    expect_hint(check, public, "write your own implementation")
    expect_hint(check, lambda *args: public(*args), "write your own implementation")
    passed, hint = run_check(check, stub)
    assert not passed and hint.startswith("not implemented yet")


def test_the_reference_matches_a_hand_computed_grad_cam_of_a_linear_head():
    """Global average pooling then a linear layer: alpha_k = w_tk / (h w), so Grad-CAM is
    relu(sum_k w_tk A_k) / (h w), the CAM of Zhou et al. 2016, upsampled."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()
    x, target = torch.rand(2, 1, 6, 6), torch.tensor([0, 2])
    with torch.no_grad():
        a = model[0](x)
        cam = torch.einsum("bkhw,bk->bhw", a, model[3].weight[target])[:, None].relu() / 36
    assert torch.allclose(lesson07.grad_cam(model, x, target, "0"), cam, atol=1e-6)


def test_a_hook_left_registered_is_named():
    def hook_left(model, x, target, layer):
        model.get_submodule(layer).register_forward_hook(lambda *args: None)
        return grad_cam(model, x, target, layer)

    def backward_hook_left(model, x, target):
        for m in model.modules():
            if isinstance(m, nn.ReLU):
                m.register_full_backward_hook(lambda m, gi, go: (gi[0].clamp(min=0),))
        return guided_backprop(model, x, target, rule=lambda gi, go: gi)

    expect_hint(checks.check_grad_cam, hook_left, "left 1 hook(s) registered", "handle.remove()")
    expect_hint(checks.check_guided_backprop, backward_hook_left, "hook(s) registered", "handle.remove()")


GRAD_CAM_MISTAKES = [
    (cam_variant(rectify=lambda cam: cam), "apply a ReLU"),
    (cam_variant(rectify=torch.abs), "not with the absolute value"),
    (cam_variant(weights=lambda g: g), "pixel by pixel"),
    (cam_variant(weights=lambda g: g.sum(dim=(2, 3), keepdim=True)), "do not sum it"),
    (cam_variant(weights=lambda g: g.mean(dim=(2, 3), keepdim=True).relu()), "not to the weights"),
    # on some random inputs these two give the same wrong map, so either hint may come first;
    # both must send the student to the logit
    (cam_variant(score=lambda z: z.softmax(1)), "explains the class's logit"),
    (cam_variant(score=lambda z: z.log_softmax(1)), "explains the class's logit"),
    (lambda m, x, t, layer: grad_cam(m, x, m(x).argmax(1), layer), "predicted class"),
    (lambda m, x, t, layer: grad_cam(m, x, t[:1].expand_as(t), layer), "target[0]"),
    (cam_variant(resize=lambda cam, size: cam), "upsample it to the image's"),
    (cam_variant(resize=lambda cam, size: F.interpolate(cam, size=size)), "upsample bilinearly"),
    (cam_variant(resize=lambda cam, size: F.interpolate(cam, size=size, mode="bilinear", align_corners=True)),
     "upsample bilinearly"),
    (lambda m, x, t, layer: grad_cam(m, x, t, "0" if layer != "0" else "2"), "another layer"),
    (lambda m, x, t, layer: grad_cam(m, x, t, layer)[:, 0], "keep the channel dimension"),
]

def test_grad_cam_that_relies_on_trainable_parameters_fails_on_a_frozen_model():
    """Without an input that requires grad, the layer's output is in the graph only through the
    parameters; one case freezes them, as labkit's sanity check does."""
    def relies_on_parameters(model, x, target, layer):
        captured = []
        handle = model.get_submodule(layer).register_forward_hook(lambda m, i, out: captured.append(out))
        try:
            logits = model(x)
        finally:
            handle.remove()
        (grad,) = torch.autograd.grad(logits[rows(len(x)), target].sum(), captured[-1])
        cam = F.relu((grad.mean(dim=(2, 3), keepdim=True) * captured[-1]).sum(1, keepdim=True))
        return F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False).detach()

    expect_hint(checks.check_grad_cam, relies_on_parameters, "RuntimeError", "does not require grad")


GUIDED_MISTAKES = [
    (guided_variant(rule=lambda gi, go: gi), "plain gradient"),
    (guided_variant(rule=lambda gi, go: go.clamp(min=0)), "deconvnet"),
    (lambda m, x, t: guided_variant(rule=lambda gi, go: gi)(m, x, t).clamp(min=0), "not once at the end"),
    (guided_variant(rule=lambda gi, go: gi.clamp(max=0)), "kept the negative gradients"),
    (guided_variant(rule=lambda gi, go: gi.abs()), "absolute value"),
    (guided_variant(score=lambda z: z.softmax(1)), "softmax probability"),
    (lambda m, x, t: guided_backprop(m, x, m(x).argmax(1)), "predicted class"),
]
CASES = [(checks.check_grad_cam, wrong, hint) for wrong, hint in GRAD_CAM_MISTAKES] + \
        [(checks.check_guided_backprop, wrong, hint) for wrong, hint in GUIDED_MISTAKES]


@pytest.mark.parametrize("check, wrong, hint", CASES,
                         ids=[f"{c.__name__}-{hint}" for c, _, hint in CASES])
def test_typical_mistake_gets_its_hint(check, wrong, hint):
    for _ in range(2):  # on two sets of fresh inputs
        expect_hint(check, wrong, hint)


def test_guided_backprop_is_the_gradient_where_every_relu_gets_a_positive_gradient():
    """A one-hidden-layer ReLU net with positive output weights: no gradient arriving at the ReLU
    is negative, so guiding changes nothing."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    with torch.no_grad():
        net[3].weight.abs_()
    x, target = torch.rand(3, 1, 4, 4), torch.tensor([0, 1, 0])
    assert torch.allclose(attribution.guided_backprop(net, x, target), attribution.gradient(net, x, target))


def test_hints_never_show_reference_values(capsys):
    for check, wrong, _ in CASES:
        check(wrong)
    assert_no_reference_values(capsys.readouterr().out)
