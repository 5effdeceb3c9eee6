"""labkit.checks._engine's diagnoses: a difference with a recognisable pattern is named, a
one-number answer never gets a factor, an offset or an error size, a capped error says "more
than", and failures name the case, also for exceptions and a changed model."""
import pytest
import torch
from torch import nn

from labkit import checks
from labkit.checks import _engine
from labkit.checks._engine import Case, Spec, close, value_hint

torch.manual_seed(0)
REF = torch.randn(2, 3, 5, 5)
X = torch.rand(2, 3, 5, 5) + 0.5


def hint(out, ref=REF, **options):
    return value_hint(out, ref, close, **options)


@pytest.mark.parametrize("out, fragment", [
    (-REF, "opposite sign"),
    (REF.abs(), "absolute value"),
    (REF.square(), "squares of the expected"),
    (3 * REF, "about 3 times"),
    (REF + 0.7, "shifted by the same constant"),
    (REF.transpose(-1, -2), "transposed"),
    (REF.flip(1), "flipped along the channel dimension"),
    (REF * X, "multiplied by `x`"),
    (REF[:1].expand_as(REF), "only the first image"),
    (torch.cat([REF[:, :1], 2 * REF[:, 1:]], 1), "channel(s) 0 come out right"),
    (torch.where(REF > 1.5, torch.zeros_like(REF), REF), "0 at"),
])
def test_a_pattern_in_the_difference_is_named(out, fragment):
    got = hint(out, inputs={"x": X})
    assert fragment in got and "values differ" not in got, got


def test_the_border_and_a_few_entries_are_located():
    border = REF.clone()
    border[..., 0, :] += 1.0
    assert "only at the border" in hint(border)
    few = REF.clone()
    few[:, :, 2, 2] += 5.0
    assert "most values are right" in hint(few)


def test_every_image_the_same_is_named():
    ref = torch.randn(3, 4, 4)
    assert "every image of the batch got the same result" in hint(ref.mean(0, keepdim=True).expand_as(ref), ref)


def test_one_number_per_image_gets_no_factor_offset_or_error_size():
    ref = torch.tensor([0.3, -0.7, 1.1])
    for out in (2.5 * ref, ref + 0.4, ref + torch.tensor([0.1, -2.0, 0.5])):
        got = hint(out, ref).replace("`1 -`", "")
        assert not any(c.isdigit() for c in got), got
    assert "same factor" in hint(2.5 * ref, ref)
    assert "shifted by the same constant" in hint(ref + 0.4, ref)
    scalar = torch.tensor(0.8)
    assert not any(c.isdigit() for c in hint(scalar * 1.3, scalar))


def test_a_capped_error_says_more_than():
    out = REF + 50 * torch.randn_like(REF)
    assert "more than 999%" in hint(out)
    assert "relative error" in hint(REF + 0.3 * torch.randn_like(REF))


def _spec(function_case):
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3)).eval()
    return Spec(name="check_demo", reference=lambda model, x: model(x).detach(),
                cases=lambda g: [Case((model, torch.rand(2, 1, 2, 2)), describe="the demo input")])


def _run(student):
    before = len(checks.results())
    _engine.run(_spec(None), student, seed=0)
    assert len(checks.results()) == before + 1
    return checks.results()[-1]


def test_an_exception_names_the_line_the_trap_and_the_case():
    def student(model, x):
        x = x.detach()
        (g,) = torch.autograd.grad(model(x).sum(), x)
        return g
    result = _run(student)
    assert not result["passed"]
    assert "line" in result["hint"] and "torch.autograd.grad(model(x).sum(), x)" in result["hint"]
    assert "requires_grad_(True)" in result["hint"] and "(on the demo input)" in result["hint"]


def test_a_changed_model_names_the_case():
    def student(model, x):
        model.train()
        return model(x).detach()
    result = _run(student)
    assert "train/eval mode" in result["hint"] and "(on the demo input)" in result["hint"]


def test_a_max_pair_is_told_to_take_values():
    result = _run(lambda model, x: model(x).detach().max(dim=1))
    assert ".values" in result["hint"]


def test_without_a_pattern_the_likeness_is_described():
    weights = 1 + torch.rand_like(REF)
    assert "the pattern is right" in hint(REF * weights)
    assert "points largely the opposite way" in hint(-REF * weights)
    assert "unrelated to the expected one" in hint(torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(5)))
