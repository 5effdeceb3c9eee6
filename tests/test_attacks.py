"""labkit.attacks: the eps-ball and [0, 1] invariants, the model left as it was, bad input, and
the properties the lessons rely on (targeted success, accuracy falling with eps, DeepFool's
small perturbations, the random-noise control). Peer comparisons: test_attacks_peers.py."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import labkit.attacks as attacks
from attack_setup import fixed_images, standard_model, trained_available, trained_model
from labkit.models import FashionCNN


@pytest.fixture(scope="module")
def model():
    return standard_model()


@pytest.fixture(scope="module")
def data():
    return fixed_images(16)


def _per_image_targets(y):
    return (y + 1 + torch.arange(len(y)) % 9) % 10  # a different target per image, never the label


# name -> (call, norm, eps): norm/eps of the ball the output must stay in (None: no ball)
ATTACKS = {
    "fgsm": (lambda m, x, y: attacks.fgsm(m, x, y, eps=0.05), "linf", 0.05),
    "fgsm-targeted": (lambda m, x, y: attacks.fgsm(m, x, _per_image_targets(y), eps=0.05, targeted=True),
                      "linf", 0.05),
    "gradient_step": (lambda m, x, y: attacks.gradient_step(m, x, y, eps=0.05), "linf", 0.05),
    "pgd-linf": (lambda m, x, y: attacks.pgd(m, x, y, eps=0.05, step_size=0.03, steps=3, random_start=True),
                 "linf", 0.05),
    "pgd-l2": (lambda m, x, y: attacks.pgd(m, x, y, eps=1.0, step_size=0.6, steps=3, norm="l2",
                                           random_start=True), "l2", 1.0),
    "pgd-targeted-early-stop": (lambda m, x, y: attacks.pgd(m, x, _per_image_targets(y), eps=0.1, steps=3,
                                                            targeted=True, early_stop=True), "linf", 0.1),
    "deepfool": (lambda m, x, y: attacks.deepfool(m, x, steps=3), None, None),
    "apgd-ce-linf": (lambda m, x, y: attacks.apgd(m, x, y, eps=0.05, steps=5), "linf", 0.05),
    "apgd-t-l2": (lambda m, x, y: attacks.apgd(m, x, y, eps=1.0, norm="l2", steps=5, loss="dlr-targeted",
                                               target=_per_image_targets(y)), "l2", 1.0),
    "square-linf": (lambda m, x, y: attacks.square(m, x, y, eps=0.05, queries=20), "linf", 0.05),
    "square-l2": (lambda m, x, y: attacks.square(m, x, y, eps=1.0, norm="l2", queries=20), "l2", 1.0),
}


@pytest.mark.parametrize("name", ATTACKS)
def test_output_stays_in_the_eps_ball_and_in_unit_range(model, data, name):
    call, norm, eps = ATTACKS[name]
    x, y = data
    out = call(model, x, y)
    assert out.shape == x.shape and out.dtype == x.dtype and out.device == x.device
    assert not out.requires_grad
    assert out.min() >= 0 and out.max() <= 1
    assert not torch.equal(out, x), "the attack changed nothing"
    delta = (out - x).flatten(1)
    if norm == "linf":
        assert delta.abs().max() <= eps + 1e-6
    elif norm == "l2":
        assert delta.norm(dim=1).max() <= eps * (1 + 1e-5)


def _fresh_model_in_a_state_to_keep():
    torch.manual_seed(1)
    model = FashionCNN().train()
    model.conv1.weight.requires_grad_(False)
    model.classifier.weight.grad = torch.ones_like(model.classifier.weight)
    model.conv3.register_forward_hook(lambda module, inputs, output: None)
    return model


def _snapshot(model):
    return {
        "training": [m.training for m in model.modules()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "grad": [p.grad for p in model.parameters()],
        "grad_values": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "hooks": [(len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
                  for m in model.modules()],
        "state": {k: v.clone() for k, v in model.state_dict().items()},
    }


def _assert_same(before, after):
    assert before["training"] == after["training"]
    assert before["requires_grad"] == after["requires_grad"]
    assert all(a is b for a, b in zip(before["grad"], after["grad"]))
    assert all((a is None and b is None) or torch.equal(a, b)
               for a, b in zip(before["grad_values"], after["grad_values"]))
    assert before["hooks"] == after["hooks"]
    assert before["state"].keys() == after["state"].keys()
    assert all(torch.equal(before["state"][k], after["state"][k]) for k in before["state"])


EVALUATIONS = {
    "accuracy": lambda m, x, y: attacks.accuracy(m, (x, y), "pgd", eps=0.05, steps=2, batch_size=3,
                                                 progress=False),
    "robustness_curve": lambda m, x, y: attacks.robustness_curve(m, (x, y), "fgsm", [0, 0.1], progress=False),
    "transfer": lambda m, x, y: attacks.transfer(m, m, x, y, "fgsm", eps=0.1),
    "evaluate": lambda m, x, y: attacks.evaluate(m, (x, y), eps=0.05, steps=2, queries=3, n_targets=2,
                                                 progress=False),
    "error inside evaluate": lambda m, x, y: attacks.evaluate(m, (x, torch.full_like(y, 10)), eps=0.1,
                                                              progress=False),
    "error inside the attack": lambda m, x, y: attacks.pgd(m, x, torch.full_like(y, 10), eps=0.1, steps=2),
}


@pytest.mark.parametrize("name", [*ATTACKS, *EVALUATIONS])
def test_the_model_is_left_exactly_as_it_was(name):
    """Mode (here train, which the call switches to eval and back with a warning), requires_grad,
    .grad, hooks and weights survive every call, also one that raises."""
    x, y = fixed_images(6)
    model = _fresh_model_in_a_state_to_keep()
    before = _snapshot(model)
    call = ATTACKS[name][0] if name in ATTACKS else EVALUATIONS[name]
    with pytest.warns(UserWarning, match="train mode"):
        if name.startswith("error inside"):
            with pytest.raises(ValueError, match="(y|labels) must be class indices"):
                call(model, x, y)
        else:
            call(model, x, y)
    _assert_same(before, _snapshot(model))


def _small():
    x, y = fixed_images(2)
    return x, y


BAD_INPUT = [
    (lambda m, x, y: attacks.fgsm(m, x, y, eps=-0.1), ValueError, "eps must be a number >= 0"),
    (lambda m, x, y: attacks.fgsm(m, x, y, eps=math.nan), ValueError, "eps must be a number >= 0"),
    (lambda m, x, y: attacks.fgsm(m, x, y, eps="0.1"), TypeError, "eps must be a number"),
    (lambda m, x, y: attacks.pgd(m, x, y, eps=0.1, steps=0), ValueError, "steps must be >= 1"),
    (lambda m, x, y: attacks.pgd(m, x, y, eps=0.1, steps=2.5), TypeError, "steps must be an int"),
    (lambda m, x, y: attacks.pgd(m, x, y, eps=0.1, step_size=-0.01), ValueError, "step_size must be"),
    (lambda m, x, y: attacks.pgd(m, x, y, eps=0.1, norm="l1"), ValueError, "norm must be one of"),
    (lambda m, x, y: attacks.pgd(m, x, y, eps=0.1, random_start=torch.zeros(1, 1, 28, 28)), ValueError,
     "random_start as a tensor"),
    (lambda m, x, y: attacks.pgd(m, x, y, eps=0.1, early_stop=True, loss_fn=lambda m, x, y: m(x).sum()),
     ValueError, "early_stop"),
    (lambda m, x, y: attacks.pgd(m, x, y, eps=math.inf, random_start=True), ValueError, "finite eps"),
    (lambda m, x, y: attacks.fgsm(m, x, y + 10, eps=0.1), ValueError, r"y must be class indices in \[0, 9\]"),
    (lambda m, x, y: attacks.pgd(m, x, y - 10, eps=0.1), ValueError, r"y must be class indices in \[0, 9\]"),
    (lambda m, x, y: attacks.fgsm(m, x, y[:1].repeat(3), eps=0.1), ValueError, "expected length 2"),
    (lambda m, x, y: attacks.fgsm(m, x, y.float(), eps=0.1), TypeError, "integer class indices"),
    (lambda m, x, y: attacks.fgsm(m, (x * 255).to(torch.uint8), y, eps=0.1), TypeError, "float"),
    (lambda m, x, y: attacks.pgd(m, x * 2 + 0.5, y, eps=0.1), ValueError, r"\[0, 1\]"),
    (lambda m, x, y: attacks.fgsm(m, x[0], y, eps=0.1), ValueError, "4 dimensions"),
    (lambda m, x, y: attacks.fgsm(m, x.masked_fill(x > 0.5, math.nan), y, eps=0.1), ValueError, "NaN"),
    (lambda m, x, y: attacks.deepfool(m, x, steps=0), ValueError, "steps must be >= 1"),
    (lambda m, x, y: attacks.deepfool(m, x, overshoot=-0.1), ValueError, "overshoot must be"),
    (lambda m, x, y: attacks.deepfool(m, x, y=y + 10), ValueError, "y must be class indices"),
    (lambda m, x, y: attacks.deepfool(m, x, candidates=1), ValueError, "candidates must be"),
    (lambda m, x, y: attacks.deepfool(m, x, candidates=11), ValueError, "candidates must be"),
    (lambda m, x, y: attacks.accuracy(m, (x, y), "nope"), ValueError, "unknown attack 'nope'"),
    (lambda m, x, y: attacks.accuracy(m, (x, y), 5), TypeError, "attack must be a function"),
    (lambda m, x, y: attacks.robustness_curve(m, (x, y), "fgsm", [0.1, 0.1]), ValueError, "distinct"),
    (lambda m, x, y: attacks.robustness_curve(m, (x, y), "fgsm", [-0.1]), ValueError, "eps must be"),
    (lambda m, x, y: attacks.transfer(m, "victim", x, y, "fgsm", eps=0.1), TypeError, "torch.nn.Module"),
    (lambda m, x, y: attacks.apgd(m, x, y, eps=-0.1), ValueError, "eps must be a number >= 0"),
    (lambda m, x, y: attacks.apgd(m, x, y, eps=0.1, norm="L2"), ValueError, "norm must be one of"),
    (lambda m, x, y: attacks.apgd(m, x * 2 + 0.5, y, eps=0.1), ValueError, r"\[0, 1\]"),
    (lambda m, x, y: attacks.apgd(m, x, y + 10, eps=0.1), ValueError, r"y must be class indices in \[0, 9\]"),
    (lambda m, x, y: attacks.apgd(m, x, y, eps=0.1, loss="cw"), ValueError, "loss must be one of"),
    (lambda m, x, y: attacks.apgd(m, x, y, eps=0.1, loss="dlr-targeted"), ValueError, "needs target="),
    (lambda m, x, y: attacks.apgd(m, x, y, eps=0.1, loss="dlr-targeted", target=y), ValueError,
     "target must differ"),
    (lambda m, x, y: attacks.apgd(m, x, y, eps=0.1, loss="dlr-targeted", target=y + 10), ValueError,
     r"target must be class indices in \[0, 9\]"),
    (lambda m, x, y: attacks.apgd(m, x, y, eps=0.1, target=y), ValueError, "target= is for"),
    (lambda m, x, y: attacks.apgd(m, x, y, eps=0.1, steps=0), ValueError, "steps must be >= 1"),
    (lambda m, x, y: attacks.apgd(m, x, y, eps=0.1, rho=1.5), ValueError, "rho must be"),
    (lambda m, x, y: attacks.square(m, x, y, eps=-1.0, norm="l2"), ValueError, "eps must be a number >= 0"),
    (lambda m, x, y: attacks.square(m, x, y, eps=0.1, norm="linfinity"), ValueError, "norm must be one of"),
    (lambda m, x, y: attacks.square(m, x - 0.5, y, eps=0.1), ValueError, r"\[0, 1\]"),
    (lambda m, x, y: attacks.square(m, x, y - 10, eps=0.1), ValueError, r"y must be class indices in \[0, 9\]"),
    (lambda m, x, y: attacks.square(m, x, y, eps=0.1, queries=0), ValueError, "queries must be >= 1"),
    (lambda m, x, y: attacks.square(m, x, y, eps=0.1, p_init=0), ValueError, "p_init must be"),
    (lambda m, x, y: attacks.evaluate(m, (x, y), eps=-0.1), ValueError, "eps must be a number >= 0"),
    (lambda m, x, y: attacks.evaluate(m, (x, y), eps=0.1, norm="l1"), ValueError, "norm must be one of"),
    (lambda m, x, y: attacks.evaluate(m, (x * 3, y), eps=0.1), ValueError, r"\[0, 1\]"),
    (lambda m, x, y: attacks.evaluate(m, (x, y + 10), eps=0.1, progress=False), ValueError,
     r"labels must be class indices in \[0, 9\]"),
    (lambda m, x, y: attacks.evaluate(m, (x, y), eps=0.1, n_targets=10, progress=False), ValueError,
     r"n_targets must be in \[1, 9\]"),
    (lambda m, x, y: attacks.evaluate("model", (x, y), eps=0.1), TypeError, "torch.nn.Module"),
]


@pytest.mark.parametrize("case", range(len(BAD_INPUT)))
def test_bad_input_raises_a_clear_error(model, case):
    call, error, message = BAD_INPUT[case]
    x, y = _small()
    with pytest.raises(error, match=message):
        call(model, x, y)


def test_gradient_step_is_the_max_normalized_gradient(model, data):
    x, y = data
    eps = 0.05
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(model(xg), y, reduction="sum"), xg)
    expected = (x + eps * g / g.flatten(1).abs().amax(1).view(-1, 1, 1, 1)).clamp(0, 1)
    torch.testing.assert_close(attacks.gradient_step(model, x, y, eps), expected)


def test_attacks_run_under_no_grad(model, data):
    x, y = data
    with torch.no_grad():
        inside = attacks.fgsm(model, x, y, eps=0.05)
    assert torch.equal(inside, attacks.fgsm(model, x, y, eps=0.05))


def test_pgd_custom_loss_fn(model, data):
    """A positive rescaling of the loss leaves L-inf PGD unchanged; any objective can be
    ascended, with y handed to it as given."""
    x, y = data
    scaled = attacks.pgd(model, x, y, eps=0.05, steps=3,
                         loss_fn=lambda m, x, y: 3 * F.cross_entropy(m(x), y))
    assert torch.equal(scaled, attacks.pgd(model, x, y, eps=0.05, steps=3))
    raised = attacks.pgd(model, x, None, eps=0.05, steps=3, loss_fn=lambda m, x, y: m(x)[:, 0].sum())
    with torch.no_grad():
        assert (model(raised)[:, 0] > model(x)[:, 0]).all()


def test_pgd_early_stop_returns_fooling_images_where_it_stopped(model, data):
    x, y = data
    steps = 6
    stopped = attacks.pgd(model, x, y, eps=0.1, steps=steps, early_stop=True)
    full = attacks.pgd(model, x, y, eps=0.1, steps=steps)
    with torch.no_grad():
        fooled_stopped = model(stopped).argmax(1) != y
        fooled_full = model(full).argmax(1) != y
    # an image still unfooled follows the full run's path, so early stop fools at least as many
    assert fooled_stopped.sum() >= fooled_full.sum()
    assert not torch.equal(stopped, full), "no image stopped early"


def test_random_delta_fills_the_ball(data):
    x = data[0].repeat(16, 1, 1, 1)
    generator = torch.Generator().manual_seed(0)
    linf = attacks.random_delta(x, 0.1, "linf", generator)
    assert linf.abs().max() <= 0.1 and linf.abs().max() > 0.099 and abs(linf.mean()) < 3e-3
    l2 = attacks.random_delta(x, 2.0, "l2", generator).flatten(1).norm(dim=1)
    assert l2.max() <= 2.0 * (1 + 1e-6) and l2.min() < 0.5 and l2.max() > 1.5
    again = attacks.random_delta(x, 0.1, "linf", torch.Generator().manual_seed(0))
    assert torch.equal(again, linf)


def test_project_onto_the_ball():
    delta = torch.tensor([3.0, 4.0]).view(1, 1, 1, 2)
    torch.testing.assert_close(attacks.project(delta, 1.0, "l2"), delta / 5)
    torch.testing.assert_close(attacks.project(delta, 10.0, "l2"), delta)
    torch.testing.assert_close(attacks.project(delta, 3.5, "linf"), torch.tensor([3.0, 3.5]).view(1, 1, 1, 2))


def test_accuracy_takes_every_data_form(model, data):
    x, y = data
    with torch.no_grad():
        expected = (model(x).argmax(1) == y).float().mean().item()
    pairs = [(x[i], int(y[i])) for i in range(len(y))]
    assert attacks.accuracy(model, (x, y), progress=False) == pytest.approx(expected)
    assert attacks.accuracy(model, pairs, batch_size=5, progress=False) == pytest.approx(expected)
    by_name = attacks.accuracy(model, (x, y), "fgsm", eps=0.05, progress=False)
    by_function = attacks.accuracy(model, (x, y), attacks.fgsm, eps=0.05, progress=False)
    assert by_name == by_function


def test_accuracy_on_a_tensor_dataset(model, data):
    # TensorDataset.tensors is the (images, labels) tuple itself, not a method to call
    x, y = data
    dataset = torch.utils.data.TensorDataset(x, y)
    clean = attacks.accuracy(model, dataset, batch_size=5, progress=False)
    assert clean == attacks.accuracy(model, (x, y), progress=False)
    attacked = attacks.accuracy(model, dataset, "fgsm", eps=0.05, limit=7, progress=False)
    assert attacked == attacks.accuracy(model, (x[:7], y[:7]), "fgsm", eps=0.05, progress=False)


def test_deepfool_options(model, data):
    x, y = data
    whole = attacks.deepfool(model, x, steps=3)
    torch.testing.assert_close(attacks.deepfool(model, x, steps=3, batch_size=5), whole, atol=1e-5, rtol=0)
    with torch.no_grad():
        wrong = model(x).argmax(1) != y
    away_from_labels = attacks.deepfool(model, x, steps=3, y=y)
    assert torch.equal(away_from_labels[wrong], x[wrong])


def test_transfer_through_the_model_itself_is_the_white_box_attack(model, data):
    x, y = data
    result = attacks.transfer(model, model, x, y, "fgsm", eps=0.05)
    assert torch.equal(result.adversarial, attacks.fgsm(model, x, y, eps=0.05))
    assert result.victim_accuracy == result.surrogate_accuracy
    assert result.victim_clean_accuracy == attacks.accuracy(model, (x, y), progress=False)


# --- what the lessons rely on, on the trained models ---------------------------------------


def test_targeted_attacks_reach_per_image_targets():
    model = trained_model()
    x, y = fixed_images(64)
    targets = _per_image_targets(y)
    linf = attacks.pgd(model, x, targets, eps=0.15, step_size=0.03, steps=10, targeted=True)
    l2 = attacks.pgd(model, x, targets, eps=2.5, step_size=0.5, steps=10, norm="l2", targeted=True)
    with torch.no_grad():
        assert (model(linf).argmax(1) == targets).float().mean() >= 0.9
        assert (model(l2).argmax(1) == targets).float().mean() >= 0.9


def test_accuracy_falls_with_eps_on_the_robustness_curve():
    model = trained_model()
    data = fixed_images(128)
    eps_list = [0, 0.01, 0.03, 0.05, 0.1]
    curve = attacks.robustness_curve(model, data, "pgd", eps_list, steps=5, random_start=True,
                                     progress=False)
    assert list(curve) == eps_list
    assert curve[0] == attacks.accuracy(model, data, progress=False)
    accuracies = list(curve.values())
    assert all(later <= earlier + 2 / 128 for earlier, later in zip(accuracies, accuracies[1:]))
    assert accuracies[-1] < accuracies[0] - 0.5


def test_the_curve_is_what_robustness_plot_draws():
    from labkit.plot import robustness_plot
    curve = attacks.robustness_curve(standard_model(), fixed_images(8), "fgsm", [0, 0.1], progress=False)
    figure = robustness_plot({"standard": curve})
    assert [list(line.get_xdata()) for line in figure.axes[0].lines] == [[0, 0.1]]


def test_deepfool_needs_less_than_fgsm_at_its_flip_point():
    """FGSM's smallest flipping eps per image (bisection) against DeepFool's perturbation, in L2:
    DeepFool aims at the nearest boundary, FGSM moves every pixel."""
    model = trained_model()
    x, y = fixed_images(32)
    with torch.no_grad():
        label = model(x).argmax(1)
    deepfool = attacks.deepfool(model, x)
    with torch.no_grad():
        assert (model(deepfool).argmax(1) != label).float().mean() >= 0.95
    # FGSM at eps is clip(x + eps * sign), the sign fixed by the gradient at x: bisect eps per image
    sign = (attacks.fgsm(model, x, label, eps=1.0) - x).sign()
    low, high = torch.zeros(len(x), 1, 1, 1), torch.full((len(x), 1, 1, 1), 0.3)
    for _ in range(10):
        middle = (low + high) / 2
        flipped = _flipped(model, (x + middle * sign).clamp(0, 1), label).view(-1, 1, 1, 1)
        high, low = torch.where(flipped, middle, high), torch.where(flipped, low, middle)
    fgsm = (x + high * sign).clamp(0, 1)
    flips = _flipped(model, fgsm, label)
    assert flips.float().mean() >= 0.9
    deepfool_norm = (deepfool - x).flatten(1).norm(dim=1)[flips]
    fgsm_norm = (fgsm - x).flatten(1).norm(dim=1)[flips]
    assert deepfool_norm.mean() < fgsm_norm.mean()


def _flipped(model, x, label):
    with torch.no_grad():
        return model(x).argmax(1) != label


def test_random_noise_of_the_same_size_barely_moves_accuracy():
    """The seed's control: random +-eps per pixel (FGSM's size in every norm) leaves the trained
    model's accuracy almost unchanged, FGSM's chosen signs collapse it."""
    model = trained_model()
    x, y = fixed_images(256)
    eps = 0.05
    generator = torch.Generator().manual_seed(0)
    noise = torch.randint(0, 2, x.shape, generator=generator).float() * 2 - 1
    clean = attacks.accuracy(model, (x, y), progress=False)
    noisy = attacks.accuracy(model, ((x + eps * noise).clamp(0, 1), y), progress=False)
    fgsm = attacks.accuracy(model, (x, y), "fgsm", eps=eps, progress=False)
    assert clean - fgsm >= 0.3
    assert abs(clean - noisy) <= 0.15 * (clean - fgsm)


@pytest.mark.skipif(not trained_available("fmnist-cnn-robust"), reason="needs fmnist-cnn-robust weights")
def test_fgsm_examples_of_the_standard_model_transfer_poorly_to_the_robust_one():
    x, y = fixed_images(64)
    result = attacks.transfer(trained_model(), trained_model("fmnist-cnn-robust"), x, y, "fgsm", eps=0.1)
    assert result.victim_accuracy > result.surrogate_accuracy + 0.3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(model, data):
    x, y = data
    cuda_model = standard_model().cuda()
    for call in (lambda m, x, y: attacks.pgd(m, x, y, eps=1.0, step_size=0.3, steps=3, norm="l2"),
                 lambda m, x, y: attacks.deepfool(m, x, steps=3)):
        on_cuda = call(cuda_model, x.cuda(), y.cuda())
        assert on_cuda.device.type == "cuda"
        torch.testing.assert_close(on_cuda.cpu(), call(model, x, y), atol=1e-3, rtol=0)
