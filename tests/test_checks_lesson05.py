"""Lesson 05's checks (the Sobel edge map, Pearson's correlation per map): right answers pass on
fresh inputs, each typical mistake gets its hint, a stub is "not implemented", labkit's
references are refused, and the references agree with independent computations."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from labkit import checks
from labkit.checks import _engine, lesson05
from test_checks import assert_no_reference_values, expect_hint, run_check, stub

SOBEL = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]])  # flipped: a true convolution


def derivatives(x, grey=lambda x: x.mean(dim=1), pad="zeros"):
    image = grey(x)[:, None]
    image = F.pad(image, (1, 1, 1, 1), mode="replicate") if pad == "replicate" else F.pad(image, (1, 1, 1, 1))
    gx = F.conv2d(image, SOBEL.flip(0, 1)[None, None])  # written as the correlation of the flipped kernel
    gy = F.conv2d(image, SOBEL.flip(0, 1).T[None, None])
    return gx[:, 0], gy[:, 0]


def edge_map(x):
    gx, gy = derivatives(x)
    return torch.sqrt(gx ** 2 + gy ** 2)


def correlation(a, b):
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    a = (a - a.mean(1, keepdim=True)) / a.std(1, keepdim=True)
    b = (b - b.mean(1, keepdim=True)) / b.std(1, keepdim=True)
    return (a * b).sum(1) / (a.shape[1] - 1)


def test_edge_map_reference_matches_a_hand_computed_edge():
    x = torch.zeros(1, 3, 5, 5)
    x[..., 2:] = 1.0  # a vertical step edge between columns 1 and 2
    edges = lesson05.edge_map(x)[0]
    # inside: |Gx| = 1 + 2 + 1 = 4 on both sides of the step, 0 elsewhere; the zero padding
    # adds edges along the image border where it is bright
    assert torch.equal(edges[1:4, 1:3], torch.full((3, 2), 4.0))
    assert torch.equal(edges[1:4, 0], torch.zeros(3))


def test_correlation_reference_matches_numpy():
    a, b = torch.rand(4, 6, 7), torch.rand(4, 6, 7)
    b = b + torch.rand(4, 1, 1) * a
    expected = [np.corrcoef(a[i].flatten().numpy(), b[i].flatten().numpy())[0, 1] for i in range(4)]
    assert np.allclose(lesson05.correlation(a, b).numpy(), expected, atol=1e-6)


EXERCISES = {checks.check_edge_map: (edge_map, lesson05.edge_map),
             checks.check_correlation: (correlation, lesson05.correlation)}
ids = [check.__name__ for check in EXERCISES]


@pytest.mark.parametrize("check", EXERCISES, ids=ids)
def test_right_answers_pass_on_many_fresh_inputs(check):
    for _ in range(4):
        assert run_check(check, EXERCISES[check][0]) == (True, "")


@pytest.mark.parametrize("check", EXERCISES, ids=ids)
def test_labkits_reference_passes_when_allowed_and_is_refused_otherwise(check):
    reference = EXERCISES[check][1]
    with _engine.accepting_reference():
        assert run_check(check, reference) == (True, "")
    expect_hint(check, reference, "write your own implementation")
    expect_hint(check, lambda *args: reference(*args), "write your own implementation")


@pytest.mark.parametrize("check", EXERCISES, ids=ids)
def test_the_placeholder_is_not_implemented_yet(check, capsys):
    passed, hint = run_check(check, stub)
    assert not passed and hint.startswith("not implemented yet")
    assert capsys.readouterr().out.count("\n") == 1


def from_derivatives(combine, **options):
    return lambda x: combine(*derivatives(x, **options))


def centred(t):
    t = t.reshape(len(t), -1)
    return t - t.mean(1, keepdim=True)


EDGE_MISTAKES = [
    (from_derivatives(lambda gx, gy: gx.abs()), "only one direction"),
    (from_derivatives(lambda gx, gy: gy.abs()), "only one direction"),
    (from_derivatives(lambda gx, gy: gx ** 2 + gy ** 2), "take the square root"),
    (from_derivatives(lambda gx, gy: gx.abs() + gy.abs()), "|Gx| + |Gy|"),
    (from_derivatives(lambda gx, gy: gx + gy), "with their signs"),
    (from_derivatives(lambda gx, gy: torch.sqrt(gx ** 2 + gy ** 2), grey=lambda x: x.sum(dim=1)), "you summed them"),
    (from_derivatives(lambda gx, gy: torch.sqrt(gx ** 2 + gy ** 2), grey=lambda x: x[:, 0]), "only the first channel"),
    (lambda x: torch.stack([edge_map(x[:, c:c + 1]) for c in range(x.shape[1])]).mean(0), "separate channels"),
    (from_derivatives(lambda gx, gy: torch.sqrt(gx ** 2 + gy ** 2), pad="replicate"), "pad with zeros"),
    (lambda x: edge_map(x)[:, 1:-1, 1:-1], "shape"),
    (lambda x: edge_map(x)[:, None], "extra dimension of size 1"),
    (lambda x: 2 * edge_map(x), "constant factor"),
]

CORRELATION_MISTAKES = [
    (lambda a, b: F.cosine_similarity(a.reshape(len(a), -1), b.reshape(len(b), -1)), "cosine similarity"),
    (lambda a, b: (centred(a) * centred(b)).mean(1), "covariance"),
    (lambda a, b: F.cosine_similarity(a.reshape(len(a), -1) - a.mean(), b.reshape(len(b), -1) - b.mean()),
     "not the mean of the whole batch"),
    (lambda a, b: correlation(a.reshape(1, -1), b.reshape(1, -1)).expand(len(a)), "whole batch at once"),
    (lambda a, b: correlation(a.flatten(1).argsort(1).argsort(1).float(), b.flatten(1).argsort(1).argsort(1).float()),
     "Spearman"),
    (lambda a, b: correlation(a.reshape(1, -1), b.reshape(1, -1))[0], "batch dimension is missing"),
    (lambda a, b: -correlation(a, b), "opposite sign"),
]
CASES = ([(checks.check_edge_map, wrong, hint) for wrong, hint in EDGE_MISTAKES]
         + [(checks.check_correlation, wrong, hint) for wrong, hint in CORRELATION_MISTAKES])


def test_every_typical_mistake_of_the_specs_is_tested():
    assert len(EDGE_MISTAKES) >= len(lesson05.EDGE_MAP.mistakes)
    assert len(CORRELATION_MISTAKES) >= len(lesson05.CORRELATION.mistakes)


@pytest.mark.parametrize("check, wrong, hint", CASES, ids=[f"{c.__name__}-{i}" for i, (c, _, _) in enumerate(CASES)])
def test_typical_mistake_gets_its_hint(check, wrong, hint):
    for _ in range(2):  # on two sets of fresh inputs
        expect_hint(check, wrong, hint)


def test_hints_never_show_reference_values(capsys):
    for check, wrong, _ in CASES:
        check(wrong)
    assert_no_reference_values(capsys.readouterr().out)
