"""Checks for the practicum's exercises: ``check_<exercise>(your_function)``.

Each check runs your function and labkit's reference on fresh random inputs (new models, images
and shapes on every call) and prints one line:

    ✅ check_gradient: passed
    ❌ check_gradient: the result has the opposite sign: check the direction (+/-) of your formula

A hint says *what* differs (type, device, dtype, shape, sign, a scale factor, a missing clamp or
projection, probabilities instead of logits, a model left changed, ...), never the reference's
values. Handing in labkit's own implementation is refused: write your own.

Where results go (for the grader)
---------------------------------
Every check records ``{check, passed, hint, time, seed}``:

- in memory: :func:`results` returns the list of dicts of this Python process, oldest first
  (:func:`clear_results` empties it);
- on disk: when the environment variable ``LABKIT_CHECK_LOG`` names a file, each result is
  appended to it as one JSON line, e.g.
  ``{"check": "check_gradient", "passed": false, "hint": "...", "time": "2025-01-01T12:00:00+00:00", "seed": 123}``.
  ``time`` is UTC (ISO 8601); ``seed`` reproduces the inputs of that call
  (``labkit.checks._engine.run(spec, fn, seed=...)``); ``hint`` is empty when passed.

A student's code runs in the same process as the checks, so these records show what the checks
said, not a tamper-proof verdict; the grader (``python -m labkit.grade``) decides how far to
trust them.
"""
from ._engine import clear_results, results
from .lesson00 import check_predict_proba
from .lesson01 import check_gradient, check_gradient_x_input, check_saliency_map
from .lesson02 import check_integrated_gradients, check_smoothgrad
from .lesson03 import check_fgsm, check_gradient_step, check_pgd

__all__ = ["results", "clear_results", "check_predict_proba", "check_gradient",
           "check_gradient_x_input", "check_saliency_map", "check_smoothgrad",
           "check_integrated_gradients", "check_fgsm", "check_gradient_step", "check_pgd"]
