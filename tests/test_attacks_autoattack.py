"""labkit.attacks.apgd / square / evaluate: analytic cases (eps = 0, the DLR loss's invariance,
the paper's checkpoints and square sizes), seeding, gradient-free Square, and AutoAttack's
sanity flags on a model that masks its gradients. The eps-ball, model-unchanged and bad-input
cases live in test_attacks.py's tables; peers in test_attacks_autoattack_peers.py."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import labkit.attacks as attacks
from attack_setup import fixed_images, standard_model
from labkit.attacks.apgd import checkpoints, dlr_loss
from labkit.attacks.square import square_fraction, square_pattern


@pytest.fixture(scope="module")
def model():
    return standard_model()


@pytest.fixture(scope="module")
def data():
    return fixed_images(16)


def _targets(y):
    return (y + 1 + torch.arange(len(y)) % 9) % 10


def _accuracy(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


CALLS = {
    "apgd-ce-linf": lambda m, x, y, **o: attacks.apgd(m, x, y, norm="linf", steps=4, **o),
    "apgd-dlr-l2": lambda m, x, y, **o: attacks.apgd(m, x, y, norm="l2", steps=4, loss="dlr", **o),
    "apgd-t-linf": lambda m, x, y, **o: attacks.apgd(m, x, y, steps=4, loss="dlr-targeted", target=_targets(y), **o),
    "square-linf": lambda m, x, y, **o: attacks.square(m, x, y, norm="linf", queries=15, **o),
    "square-l2": lambda m, x, y, **o: attacks.square(m, x, y, norm="l2", queries=15, **o),
}
EPS = {"linf": 0.1, "l2": 1.5}


@pytest.mark.parametrize("name", CALLS)
def test_eps_zero_returns_the_images(model, data, name):
    x, y = data
    assert torch.equal(CALLS[name](model, x, y, eps=0.0), x)


@pytest.mark.parametrize("name", CALLS)
def test_seeded_and_global_generator_untouched(model, data, name):
    x, y = data
    eps = EPS[name.rsplit("-", 1)[1]]
    state = torch.get_rng_state()
    a = CALLS[name](model, x, y, eps=eps, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, CALLS[name](model, x, y, eps=eps, seed=3))
    assert not torch.equal(a, CALLS[name](model, x, y, eps=eps, seed=4))


def test_dlr_is_invariant_to_shifting_and_scaling_the_logits():
    logits = torch.randn(8, 10, generator=torch.Generator().manual_seed(0))
    y, t = torch.arange(8) % 10, (torch.arange(8) + 3) % 10
    for target in (None, t):
        torch.testing.assert_close(dlr_loss(3.0 * logits - 7.0, y, target), dlr_loss(logits, y, target))


def test_dlr_by_hand():
    z = torch.tensor([[4.0, 3.0, 1.0, 0.0]])  # sorted: pi1 = 4, pi2 = 3, pi3 = 1, pi4 = 0
    y = torch.tensor([0])
    assert dlr_loss(z, y).item() == pytest.approx(-(4 - 3) / (4 - 1))
    assert dlr_loss(z, y, torch.tensor([2])).item() == pytest.approx(-(4 - 1) / (4 - 0.5))


def test_checkpoints_are_the_papers():
    # Croce & Hein 2020, Sec. 3.2: p = 0, 0.22, 0.41, 0.57, 0.70, 0.80, 0.87, 0.93, 0.99
    assert checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]


def test_square_sizes_follow_the_papers_schedule():
    assert square_fraction(0, 10000) == 0.8 and square_fraction(10, 10000) == 0.8
    assert square_fraction(11, 10000) == 0.4 and square_fraction(8001, 10000) == 0.8 / 512
    assert square_fraction(50, 1000) == 0.8 / 8  # rescaled: iteration 50 of 1000 is 500 of 10,000


def test_square_pattern_has_unit_norm_and_halves_of_opposite_sign():
    for s in (3, 5, 8):
        p = square_pattern(s)
        assert p.norm().item() == pytest.approx(1.0)
        assert (p[: s // 2] > 0).all() and (p[s // 2:] < 0).all()


def test_more_restarts_never_raise_accuracy(model, data):
    x, y = data
    one = attacks.apgd(model, x, y, eps=0.03, steps=3)
    two = attacks.apgd(model, x, y, eps=0.03, steps=3, restarts=2)
    fooled_once = model(one).argmax(1) != y
    assert (model(two).argmax(1) != y)[fooled_once].all()  # the first restart is the same run


class _NoGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        raise AssertionError("a black-box attack asked for a gradient")


class _Quantized(nn.Module):
    """The model on inputs rounded to 8 grey levels: the same decisions, no input gradient
    (round's derivative is 0), the textbook case of gradient masking."""
    def __init__(self, model, black_box=False):
        super().__init__()
        self.model, self.black_box = model, black_box

    def forward(self, x):
        if self.black_box:
            return self.model(_NoGradient.apply(x))
        return self.model(torch.round(x * 7) / 7)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_square_needs_no_gradient(model, data, norm):
    x, y = data
    adv = attacks.square(_Quantized(model, black_box=True).eval(), x, y, eps=EPS[norm], norm=norm, queries=100)
    assert _accuracy(model, adv, y) < _accuracy(model, x, y)


def test_evaluate_at_eps_zero_is_the_clean_accuracy(model, data):
    result = attacks.evaluate(model, data, eps=0.0, steps=2, n_targets=2, queries=3, progress=False)
    assert result.final == result.clean == _accuracy(model, *data)
    assert result.flags == []


def test_evaluate_flags_gradient_masking(model, data):
    masked = _Quantized(model).eval()
    with pytest.warns(UserWarning, match="gradient masking"):
        result = attacks.evaluate(masked, data, eps=0.1, steps=5, n_targets=2, queries=100, progress=False)
    assert any("Square attack lowered" in flag for flag in result.flags)
    assert any("all-zero input gradient" in flag for flag in result.flags)
    assert result.after["square"] < result.after["apgd-t"] <= result.after["apgd-ce"] <= result.clean


class _Noisy(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x) + 0.01 * torch.randn(len(x), 10)


def test_evaluate_flags_a_randomized_model(model, data):
    with pytest.warns(UserWarning, match="randomized"):
        result = attacks.evaluate(_Noisy(model).eval(), data, eps=0.0, steps=2, n_targets=1, queries=2,
                                  progress=False)
    assert any("different outputs" in flag for flag in result.flags)


def test_evaluate_is_the_worst_case_per_image(model, data):
    x, y = data
    result = attacks.evaluate(model, (x, y), eps=0.03, steps=5, n_targets=2, queries=20, batch_size=5,
                              progress=False)
    assert list(result.after) == ["apgd-ce", "apgd-t", "square"]
    values = [result.clean, *result.after.values()]
    assert values == sorted(values, reverse=True) and result.final == values[-1]
    assert result.robust.float().mean().item() == result.final
    with torch.no_grad():
        assert (model(x).argmax(1) == y)[result.robust].all()  # robust implies clean-correct
    assert "final" in result.table()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", CALLS)
def test_cuda_matches_cpu(model, data, name):
    x, y = data
    eps = EPS[name.rsplit("-", 1)[1]]
    on_cuda = CALLS[name](standard_model().cuda(), x.cuda(), y.cuda(), eps=eps)
    assert on_cuda.device.type == "cuda"
    # random draws are made on the CPU, so both devices search the same squares and starts
    assert (on_cuda.cpu() - CALLS[name](model, x, y, eps=eps)).abs().gt(1e-3).float().mean() < 0.01
