"""Checks for lesson 00 (setup and tour): the warm-up exercise."""
from __future__ import annotations

import torch

from . import _engine
from ._cases import classifier_cases
from ._engine import Mistake, Spec

__all__ = ["check_predict_proba"]


def _predict_proba(model, x):
    """Reference: class probabilities, ``softmax(f(x))`` over the classes, detached."""
    with torch.no_grad():
        return model(x).softmax(dim=1)


def _with_grad(function):
    def wrong(model, x):
        with torch.enable_grad():
            return function(model(x)).detach()
    return wrong


PREDICT_PROBA = Spec(
    name="check_predict_proba",
    reference=_predict_proba,
    cases=lambda generator: classifier_cases(generator, with_target=False),
    dims=("batch", "class"),
    mistakes=(
        Mistake("these are the logits (raw scores): turn them into probabilities with a softmax "
                "over the classes", _with_grad(lambda z: z)),
        Mistake("the softmax runs over the wrong dimension: each image's probabilities must sum "
                "to 1 over the classes (dim=1), not over the batch", _with_grad(lambda z: z.softmax(dim=0))),
        Mistake("these are log-probabilities (log_softmax): return the probabilities themselves",
                _with_grad(lambda z: z.log_softmax(dim=1))),
        Mistake("sigmoid treats every class on its own, so the values do not sum to 1: use softmax",
                _with_grad(torch.sigmoid)),
        Mistake("dividing the logits by their sum does not give probabilities (logits can be "
                "negative): softmax exponentiates first", _with_grad(lambda z: z / z.sum(1, keepdim=True))),
        Mistake("that is a one-hot vector of the predicted class (argmax): return the probability "
                "of every class, softmax over the classes",
                _with_grad(lambda z: torch.nn.functional.one_hot(z.argmax(1), z.shape[1]).to(z.dtype))),
        Mistake("the exponentials are divided by their sum over the whole batch: divide each image's "
                "by its own sum over the classes (dim=1)", _with_grad(lambda z: z.exp() / z.exp().sum())),
    ),
)


def check_predict_proba(predict_proba) -> _engine.Result:
    """Warm-up: ``predict_proba(model, x)`` returns the ``B x classes`` probabilities of a batch."""
    return _engine.run(PREDICT_PROBA, predict_proba)
