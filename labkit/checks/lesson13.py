"""Checks for lesson 13 (features and shortcuts): the non-robust data set of Ilyas et al. 2019
(images attacked toward a target class and relabelled), the robust data set (images grown to
match the robust model's representation), and the place a Clever Hans model looks at."""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .. import attacks, shortcuts
from . import _engine
from ._cases import attack_inputs, draw, images, other_classes, tiny_cnn
from ._engine import Case, Mistake, Spec

__all__ = ["check_nonrobust_batch", "check_robust_batch", "check_suspicious_region"]


def _adapted(adapter, student, what: str):
    """Run ``student`` through ``adapter``; a result of the wrong kind raises a ValueError that
    says what to return (the check shows it with the case)."""
    if not callable(student):
        return student
    adapted = adapter(student)

    def checked(*args):
        out = adapted(*args)
        if isinstance(out, _engine.NotAPair):
            got = "None (did you forget the `return`?)" if out.out is None else f"a {type(out.out).__name__}"
            raise ValueError(f"{student.__name__} must return {what}; it returned {got}")
        return out
    return functools.wraps(student)(checked)


# ------------------------------------------------------------------ 1. the non-robust data set

def nonrobust_batch(model, x, y, target, eps, steps):
    """Reference: targeted L2 PGD toward ``target`` (step 2.5 eps / steps, no random start) and
    the label ``target``, as ``images_and_labels`` stacks them."""
    return _engine.images_and_labels(shortcuts.nonrobust_dataset)(model, x, target, eps=eps, steps=steps)


def _pgd_variant(labels="target", goal="target", targeted=True, norm="l2", step=2.5):
    def wrong(model, x, y, target, eps, steps):
        aim = target if goal == "target" else y
        moved = attacks.pgd(model, x, aim, eps=eps, step_size=step * eps / steps, steps=steps, norm=norm,
                            targeted=targeted)
        return _engine.images_and_labels(lambda: (moved, target if labels == "target" else y))()
    return wrong


def _nonrobust_cases(generator: torch.Generator):
    cases = []
    for model, x, y, classes, describe in attack_inputs(generator):
        target = other_classes(generator, y, classes)
        eps, steps = round(float(0.3 + torch.rand(1, generator=generator)), 2), draw(generator, 3, 6)
        cases.append(Case((model, x, y, target, eps, steps), describe=f"{describe}, eps={eps}, steps={steps}"))
    return cases


def _in_ball(out, case):
    x, eps = case.args[1], case.args[4]
    moved = out[:, :-1] - x.flatten(1)
    if (moved.norm(dim=1) > eps * (1 + 1e-4) + 1e-6).any():
        return "an image moved further than eps in L2 norm: project the change back onto the eps-ball after every step"
    if out[:, :-1].min() < 0 or out[:, :-1].max() > 1:
        return "the images must stay valid: clamp them to [0, 1] after every step"
    return None


NONROBUST = Spec(
    name="check_nonrobust_batch",
    adapter="images_and_labels",
    reference=nonrobust_batch,
    cases=_nonrobust_cases,
    forbidden=(shortcuts.nonrobust_dataset,),
    dims=("batch", "pixels and label"),
    steps="steps",
    mistakes=(
        Mistake("the label of each new image is its target class: the data set is relabelled (keeping "
                "y makes a plain adversarially perturbed data set)", _pgd_variant(labels="y")),
        Mistake("the attack must be targeted: step *down* the loss of the target class (targeted=True); "
                "you pushed the image away from the target", _pgd_variant(targeted=False)),
        Mistake("the attack must be targeted toward `target`; yours pushed the image away from its own "
                "class y (an untargeted attack) and lands anywhere", _pgd_variant(goal="y", targeted=False)),
        Mistake("this is an L2 attack (norm='l2'): steps along g / ||g||_2 and an L2 ball, not sign steps",
                _pgd_variant(norm="linf")),
        Mistake("both labels and attack are off: move toward `target` and label each image with it",
                _pgd_variant(labels="y", goal="y", targeted=False)),
        Mistake("use the step size 2.5 * eps / steps (PGD's default), so the attack can reach the edge of "
                "the ball", _pgd_variant(step=1.0)),
    ),
    constraints=(_in_ball,),
)


def check_nonrobust_batch(nonrobust_batch) -> _engine.Result:
    """``nonrobust_batch(model, x, y, target, eps, steps)``: ``(x_t, labels)``, each image moved
    by targeted L2 PGD toward its target class and labelled with it."""
    return _engine.run(NONROBUST, _adapted(_engine.images_and_labels, nonrobust_batch,
                                           "the pair (images, labels)"))


# ------------------------------------------------------------------ 2. the robust data set

def robust_batch(robust_model, x, start, steps, lr):
    """Reference: :func:`labkit.shortcuts.robust_dataset`."""
    return shortcuts.robust_dataset(robust_model, x, start, steps=steps, lr=lr)


def _phi(model, x):
    return torch.nn.Sequential(*list(model.children())[:-1])(x).flatten(1)


def _descent_variant(maximize=False, clamp=True, goal_from="x", power=1):
    def wrong(model, x, start, steps, lr):
        with torch.no_grad():
            goal = _phi(model, x if goal_from == "x" else start)
        x_r = start.clone().requires_grad_(True)
        optimizer = torch.optim.Adam([x_r], lr=lr, maximize=maximize)
        for _ in range(steps):
            with torch.enable_grad():  # the gradient of x_r only: the model's .grad stays as it was
                (x_r.grad,) = torch.autograd.grad(((_phi(model, x_r) - goal).norm(dim=1) ** power).sum(), x_r)
            optimizer.step()
            if clamp:
                with torch.no_grad():
                    x_r.clamp_(0, 1)
        return x_r.detach()
    return wrong


def _robust_cases(generator: torch.Generator):
    from ._cases import describe
    cases = []
    for batch, channels, height, width in ((1, 1, draw(generator, 7, 10), draw(generator, 7, 10)),
                                          (draw(generator, 3, 5), 1, draw(generator, 8, 12), draw(generator, 8, 12)),
                                          (draw(generator, 3, 5), 3, 8, draw(generator, 7, 10))):
        model = tiny_cnn(channels, draw(generator, 4, 10))
        x = images(generator, batch, channels, height, width, saturated=0.3)
        start = images(generator, batch, channels, height, width, saturated=0.3)
        steps, lr = draw(generator, 3, 5), round(float(0.05 + 0.1 * torch.rand(1, generator=generator)), 3)
        cases.append(Case((model, x, start, steps, lr),
                          describe=f"{describe(batch, channels, height, width)}, steps={steps}, lr={lr}"))
    return cases


def _changed_start(out, case):
    if isinstance(out, torch.Tensor) and out.shape == case.args[2].shape and torch.allclose(out, case.args[2]):
        return ("the result is the start image unchanged: the goal is phi(x), the representation of "
                "the image to imitate, and the descent moves `start` toward it")
    return None


ROBUST = Spec(
    name="check_robust_batch",
    reference=robust_batch,
    cases=_robust_cases,
    forbidden=(shortcuts.robust_dataset, shortcuts.representation_distance),
    steps="steps",
    delta_from=lambda case: case.args[2],
    mistakes=(
        Mistake("the distance ||phi(x_r) - phi(x)|| must fall: minimize it (you climbed it)",
                _descent_variant(maximize=True)),
        Mistake("the images must stay valid: clamp to [0, 1] after every step", _descent_variant(clamp=False)),
        Mistake("minimize the distance ||phi(x_r) - phi(x)||_2 itself, summed over the images, not its square",
                _descent_variant(power=2)),
        Mistake("x and start are swapped: phi(x) is the goal, and the descent begins at `start`",
                lambda m, x, s, n, a: _descent_variant()(m, s, x, n, a)),
        Mistake("start from `start` (another image) and move it toward phi(x); starting from x itself, "
                "there is nothing to do", lambda m, x, s, n, a: _descent_variant()(m, x, x, n, a)),
    ),
    requirements=(_changed_start,),
)


def check_robust_batch(robust_batch) -> _engine.Result:
    """``robust_batch(robust_model, x, start, steps, lr)``: images grown from ``start`` by
    ``steps`` steps of Adam (learning rate ``lr``) down ``||phi(x_r) - phi(x)||_2`` (summed over
    the images), clamped to [0, 1] after each step."""
    return _engine.run(ROBUST, robust_batch)


# ------------------------------------------------------------------ 3. where a Clever Hans model looks

def suspicious_region(maps, size):
    """Reference: the top-left ``(row, col)`` of the ``size x size`` window with the largest
    mean ``|map|``, averaged over the images (``maps``: ``B x H x W``)."""
    mean = F.avg_pool2d(maps.abs().mean(0)[None, None], size, stride=1)[0, 0]
    index = int(mean.flatten().argmax())
    return torch.tensor([index // mean.shape[1], index % mean.shape[1]], device=maps.device)


SIGNED = ("take the magnitude |map| of every map *before* averaging: relevance for and against a class "
          "both count, and signed values of different images cancel")


def _region_variant(magnitude=torch.abs, first_only=False, window=True, centre=False, swap=False,
                    after=lambda m: m):
    def wrong(maps, size):
        chosen = maps[:1] if first_only else maps
        mean = after(magnitude(chosen).mean(0))[None, None]
        mean = F.avg_pool2d(mean, size, stride=1)[0, 0] if window else mean[0, 0]
        index = int(mean.flatten().argmax())
        row, col = index // mean.shape[1], index % mean.shape[1]
        if centre:
            row, col = row + size // 2, col + size // 2
        return torch.tensor([col, row] if swap else [row, col], device=maps.device)
    return wrong


def _region_cases(generator: torch.Generator):
    """Maps like a Clever Hans model's: in every image a "garment" of strong relevance at a place
    of its own; in every image but image 0 (an even number of them) a small square at one and the
    same place, its sign alternating, so that a signed mean cancels it and image 0 alone does not
    show it; in image 1 one pixel brighter than the square, which only a pixel-wise argmax picks;
    all on weak noise."""
    cases = []
    for batch in (3, 5, 7):
        height, width, size = draw(generator, 14, 20), draw(generator, 14, 20), draw(generator, 2, 4)
        maps = 0.05 * torch.randn(batch, height, width, generator=generator)
        for i in range(batch):
            r, c = draw(generator, 0, height - 6), draw(generator, 0, width - 6)
            maps[i, r:r + 6, c:c + 6] += 0.6 * torch.rand(6, 6, generator=generator)
        row, col = draw(generator, 0, height - size), draw(generator, 0, width - size)
        while row == col:  # a swapped answer must differ
            col = draw(generator, 0, width - size)
        signs = torch.tensor([0.0] + [1.0 if i % 2 else -1.0 for i in range(1, batch)])
        maps[:, row:row + size, col:col + size] += 2.0 * signs.view(-1, 1, 1)
        maps[1, draw(generator, 0, height - 1), draw(generator, 0, width - 1)] += 4.0 * batch
        cases.append(Case((maps, size), describe=f"{batch} maps of {height}x{width}, size={size}"))
    return cases


REGION = Spec(
    name="check_suspicious_region",
    adapter="coordinate",
    reference=suspicious_region,
    cases=_region_cases,
    dims=("row/col",),
    match=lambda out, ref, case: torch.equal(out.cpu(), ref.cpu()),
    mistakes=(
        Mistake("you answered (col, row): return the row first (counted from the top), then the column",
                _region_variant(swap=True)),
        Mistake("return the window's top-left pixel, not its centre", _region_variant(centre=True)),
        Mistake("score each size x size window by its mean (or sum) over the window, not single pixels: "
                "one extreme pixel is not a region", _region_variant(window=False)),
        Mistake(SIGNED, _region_variant(magnitude=lambda m: m)),
        Mistake(SIGNED, _region_variant(magnitude=lambda m: m, after=torch.abs)),
        Mistake("one image can mislead (a single bright spot, the garment): average |map| over all the images",
                _region_variant(first_only=True)),
    ),
)


def check_suspicious_region(suspicious_region) -> _engine.Result:
    """``suspicious_region(maps, size)``: ``(row, col)``, the top-left pixel of the ``size x size``
    window where ``|maps|``, averaged over the images, is largest."""
    return _engine.run(REGION, _adapted(_engine.coordinate, suspicious_region, "the pair (row, col) of two ints"))
