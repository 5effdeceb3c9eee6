"""Checks for the practicum's exercises: ``check_<exercise>(your_function)``.

Each check runs your function and labkit's reference on fresh random inputs (new models, images
and shapes on every call) and prints one line:

    ✅ check_gradient: passed
    ❌ check_gradient: the result has the opposite sign: check the direction (+/-) of your formula

A hint says *what* differs (type, device, dtype, shape, sign, a scale factor, a missing clamp or
projection, probabilities instead of logits, a model left changed, ...) and on which input (the
model, the batch, the parameters), never the reference's values. Handing in labkit's own
implementation is refused: write your own.

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

What a check returns, and test cells
------------------------------------
A check returns its :class:`Result` (``.passed``, ``.hint``, ``.name``), truthy on a pass, so
``assert check_gradient(gradient)`` works; the cell shows only the printed line. Inside
``with raising():`` a failing check raises ``AssertionError(hint)`` and a passing one writes
nothing to stderr: what graders that score a test cell by its errors need. nbgrader gets this
without asking: while it autogrades or validates, it sets ``NBGRADER_EXECUTION`` in the
kernel's environment, and the checks raise then (see the README, "Using labkit with nbgrader").

A student's code runs in the same process as the checks, so these records show what the checks
said, not a tamper-proof verdict; the grader (``python -m labkit.grade``) decides how far to
trust them.
"""
import functools
import importlib
import inspect
import pkgutil

from ._engine import Result, clear_results, raising, results


def _grading_keywords_ignored(check):
    """``check`` that also takes the grader's keywords (``points=``, ``all_or_nothing=``, see
    ``labkit.grade.GRADING_KEYWORDS``), which a lesson writes in its check calls and which mean
    nothing in the student's kernel."""
    @functools.wraps(check)
    def call(*args, points=None, all_or_nothing=None, **kwargs):
        return check(*args, **kwargs)
    signature = inspect.signature(check)
    call.__signature__ = signature.replace(parameters=[
        *signature.parameters.values(),
        *(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None) for name in ("points", "all_or_nothing"))])
    return call


# every ``lessonNN`` module lists its checks in ``__all__``; a new lesson's checks appear here
# by adding its module, nothing else
__all__ = ["results", "clear_results", "Result", "raising"]
for _lesson in sorted(info.name for info in pkgutil.iter_modules(__path__) if info.name.startswith("lesson")):
    _module = importlib.import_module(f".{_lesson}", __name__)
    globals().update({name: _grading_keywords_ignored(getattr(_module, name)) if name.startswith("check_")
                      else getattr(_module, name) for name in _module.__all__})
    __all__ += _module.__all__

# the concept questions ("predict before you run"), ``check_qNN_<topic>(answer)``
from . import _questions  # noqa: E402

globals().update({name: _grading_keywords_ignored(getattr(_questions, name))
                   for name in _questions.__all__ if name.startswith("check_")})
__all__ += [name for name in _questions.__all__ if name.startswith("check_")]
