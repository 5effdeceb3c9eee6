"""The comparison engine behind every ``check_*``: run the student's function and labkit's
reference on the same fresh inputs and turn any difference into a hint.

A check never shows the reference's values: hints name what differs (type, device, dtype,
shape, sign, a scale factor, a missing clamp or projection, a known mistake), and numbers in
them are shapes, factors or error percentages only.

Each check prints one line, ``✅ <check>: passed`` or ``❌ <check>: <hint>``, and records
a :class:`Result`; see ``labkit.checks`` for where results go.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import inspect
import json
import linecache
import os
import random
import secrets
import sys
import sysconfig
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from .._core import HOOK_DICTS, get_device

LOG_ENV = "LABKIT_CHECK_LOG"
NOT_IMPLEMENTED = ("not implemented yet: replace the `raise NotImplementedError(...)` line "
                   "with your code, run that cell, then this one again")
REFUSED = ("this is labkit's own implementation (or calls it): write your own implementation; "
           "labkit's is there to compare with")


@dataclass(frozen=True)
class Result:
    """One check's outcome, as the grader reads it."""
    check: str
    passed: bool
    hint: str
    time: str
    seed: int | None = None


_RESULTS: list[Result] = []


def results() -> list[dict]:
    """Every result recorded in this Python process, oldest first, as dicts."""
    return [dataclasses.asdict(result) for result in _RESULTS]


def clear_results() -> None:
    _RESULTS.clear()


def record(check: str, passed: bool, hint: str = "", seed: int | None = None) -> Result:
    """Print the outcome and keep it: in memory and, when ``$LABKIT_CHECK_LOG`` names a file,
    as one more JSON line there."""
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    result = Result(check, passed, "" if passed else hint, now, seed)
    _RESULTS.append(result)
    print(f"✅ {check}: passed" if passed else f"❌ {check}: {hint}")
    log = os.environ.get(LOG_ENV)
    if log:
        line = json.dumps({"check": check, "passed": passed, "hint": result.hint, "time": now,
                           "seed": seed}, ensure_ascii=False)
        with open(log, "a", encoding="utf-8") as f:
            f.write(line + "\n")
    return result


class Failure(Exception):
    """A check failed; ``str(failure)`` is the hint for the student."""


@dataclass
class Case:
    """One set of fresh inputs: the arguments for the student's function and the reference,
    and a description of them for hints (never their values)."""
    args: tuple
    kwargs: dict = field(default_factory=dict)
    describe: str = ""
    reset: Callable[[], None] | None = None  # runs between the reference and the student's code

    @property
    def model(self) -> nn.Module | None:
        return next((a for a in self.args if isinstance(a, nn.Module)), None)


@dataclass(frozen=True)
class Mistake:
    """A typical wrong implementation: if the student's output matches ``wrong(*args,
    **kwargs)``, the student is told ``hint``."""
    hint: str
    wrong: Callable


# ---------------------------------------------------------------- running the student's code

_LIBRARY_ROOTS = tuple(str(Path(p).resolve()) for p in {
    Path(__file__).resolve().parents[1], Path(torch.__file__).resolve().parent,
    Path(np.__file__).resolve().parent, *(sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib")),
})


def _is_library(filename: str) -> bool:
    try:
        resolved = str(Path(filename).resolve())
    except (OSError, ValueError):
        return False
    return resolved.startswith(_LIBRARY_ROOTS)


def _student_frame(err: BaseException):
    """The innermost traceback entry in the student's own code (not labkit, torch, stdlib)."""
    frames = [f for f in traceback.extract_tb(err.__traceback__) if not _is_library(f.filename)]
    return frames[-1] if frames else None


def _summarize(err: Exception) -> str:
    message = str(err).strip().splitlines()[0] if str(err).strip() else ""
    if len(message) > 200:
        message = message[:197] + "..."
    text = f"your code raised {type(err).__name__}" + (f": {message}" if message else "")
    frame = _student_frame(err)
    if frame is not None:
        line = (frame.line or linecache.getline(frame.filename, frame.lineno)).strip()
        text += f" (in {frame.name}, line {frame.lineno}" + (f": `{line}`)" if line else ")")
    return text


def _code_objects(functions) -> set:
    codes = set()
    for fn in functions:
        while True:
            if isinstance(fn, functools.partial):
                fn = fn.func
            elif hasattr(fn, "__wrapped__"):
                fn = fn.__wrapped__
            elif inspect.ismethod(fn):
                fn = fn.__func__
            else:
                break
        code = getattr(fn, "__code__", None)
        if code is not None:
            codes.add(code)
    return codes


@contextlib.contextmanager
def _watch_calls(codes: set):
    """Notice (with ``sys.setprofile``) whether any function with one of ``codes`` runs. Under a
    profiler or debugger that already uses the hook, only the identity test in ``_check`` applies."""
    seen: list[str] = []
    if sys.getprofile() is not None or not codes:
        yield seen
        return

    def profile(frame, event, arg):
        if event == "call" and frame.f_code in codes:
            seen.append(frame.f_code.co_name)

    sys.setprofile(profile)
    try:
        yield seen
    finally:
        sys.setprofile(None)


def _run_student(student: Callable, case: Case, forbidden: set):
    try:
        with _watch_calls(forbidden) as seen:
            out = student(*case.args, **case.kwargs)
    except NotImplementedError as err:
        frame = _student_frame(err)
        if frame is None or traceback.extract_tb(err.__traceback__)[-1] != frame:
            raise Failure(_summarize(err)) from None  # raised inside torch: a real error
        if frame.name != getattr(student, "__name__", frame.name):
            raise Failure(f"not implemented yet: your function calls `{frame.name}`, which still "
                          f"raises NotImplementedError; write that one first") from None
        raise Failure(NOT_IMPLEMENTED) from None
    except Exception as err:  # the student's bug, summarized in one line instead of a traceback
        raise Failure(_summarize(err)) from None
    if seen:
        raise Failure(REFUSED)
    return out


@contextlib.contextmanager
def _isolated_random_state(seed: int, device: torch.device):
    """Seed torch, NumPy and ``random`` for the check, then restore the notebook's own state,
    so running a check never changes what later cells draw."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed)
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


@contextlib.contextmanager
def _one_thread():
    """The checks' tensors are tiny: one CPU thread is fastest, and several can be 100 x slower
    when the cores are busy with other work."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------- the model and inputs stay as they were

def _model_snapshot(model: nn.Module) -> dict:
    return {
        "modes": [m.training for m in model.modules()],
        "hooks": sum(len(getattr(m, name)) for m in model.modules() for name in HOOK_DICTS if hasattr(m, name)),
        "grads": [p.grad is not None for p in model.parameters()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "weights": [t.detach().clone() for t in model.state_dict().values()],
    }


def _model_changes(before: dict, model: nn.Module) -> str | None:
    after = _model_snapshot(model)
    if after["modes"] != before["modes"]:
        return ("your function changed the model's train/eval mode; leave it as it came in "
                "(it is already in eval mode)")
    if after["hooks"] > before["hooks"]:
        extra = after["hooks"] - before["hooks"]
        return (f"your function left {extra} hook(s) registered on the model: keep the handle "
                f"that register_..._hook returns and call handle.remove() (in a finally: block)")
    if after["grads"] != before["grads"]:
        return ("your function left gradients in the model's parameters (.grad): use "
                "torch.autograd.grad(output, x) instead of .backward(), or put .grad back to None")
    if after["requires_grad"] != before["requires_grad"]:
        return "your function changed requires_grad of the model's parameters; leave them as they were"
    if any(not torch.equal(a, b) for a, b in zip(after["weights"], before["weights"])):
        return "your function changed the model's weights; it must only read them"
    return None


def _input_snapshot(case: Case) -> list:
    return [(i, a.detach().clone(), a.requires_grad) for i, a in enumerate(case.args)
            if isinstance(a, torch.Tensor)]


def _input_changes(before: list, case: Case, names: Sequence[str]) -> str | None:
    for index, values, requires_grad in before:
        arg = case.args[index]
        name = names[index] if index < len(names) else f"argument {index + 1}"
        if arg.requires_grad != requires_grad:
            return (f"your function set requires_grad on its input `{name}`: work on a copy, "
                    f"e.g. `{name} = {name}.detach().clone().requires_grad_(True)`")
        if arg.grad is not None:
            return f"your function left a .grad on its input `{name}`: use torch.autograd.grad on a copy"
        if not torch.equal(arg.detach(), values):
            return (f"your function changed its input `{name}` in place; compute on a copy "
                    f"(`{name}.clone()`) and leave the original as it was")
    return None


# ---------------------------------------------------------------- comparing outputs

def close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-3, atol: float = 1e-6) -> bool:
    """``a`` equals ``b`` up to ``rtol`` of ``b``'s largest magnitude (gradients computed along
    other code paths differ by float rounding, never by more)."""
    if a.shape != b.shape:
        return False
    scale = b.abs().max().item() if b.numel() else 0.0
    return bool((a - b).abs().max().item() <= atol + rtol * scale) if a.numel() else True


def _fmt_shape(shape) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ")"


def type_hint(out, ref: torch.Tensor) -> str | None:
    """What is wrong with the kind of thing returned, before looking at values."""
    if out is None:
        return "your function returned None: did you forget the `return`?"
    if isinstance(out, np.ndarray):
        return "your function returned a NumPy array: return a torch.Tensor (no .numpy() at the end)"
    if isinstance(out, (tuple, list)):
        return f"your function returned a {type(out).__name__}: return a single torch.Tensor"
    if not isinstance(out, torch.Tensor):
        return f"your function returned a {type(out).__name__}, expected a torch.Tensor"
    if out.device != ref.device:
        return (f"the result is on {out.device} but the inputs are on {ref.device}: keep it on "
                f"the model's device (no .cpu() or .to(...) at the end)")
    if out.requires_grad:
        return ("the result still requires grad (it is attached to the autograd graph): "
                "return it .detach()-ed")
    if out.dtype != ref.dtype:
        advice = {torch.float64: " (NumPy or a Python float list crept in? use .float())"}.get(out.dtype, "")
        if not out.is_floating_point() and ref.is_floating_point():
            advice = " (integers: did you take an argmax or convert with .long()?)"
        return f"the result has dtype {out.dtype}, expected {ref.dtype}{advice}"
    return None


def shape_hint(out: torch.Tensor, ref: torch.Tensor, dims: Sequence[str]) -> str | None:
    if out.shape == ref.shape:
        return None
    expected, got = _fmt_shape(ref.shape), _fmt_shape(out.shape)
    base = f"the result has shape {got}, expected {expected}"
    if out.dim() == ref.dim() - 1:
        # the last dimension whose removal gives ``out`` (a size-1 channel is likelier gone than the batch)
        removed = [d for d in range(ref.dim()) if tuple(ref.shape[:d]) + tuple(ref.shape[d + 1:]) == tuple(out.shape)]
        if removed == [0]:
            return base + ": the batch dimension is missing (one result per image)"
        if removed:
            d = removed[-1]
            name = dims[d] if d < len(dims) else f"dimension {d}"
            return base + f": the {name} dimension is missing (did you sum, average or max over it?)"
    if out.dim() == ref.dim() + 1 and 1 in out.shape:
        return base + ": there is an extra dimension of size 1 (squeeze it)"
    if out.dim() == ref.dim():
        for d in range(ref.dim()):
            if out.shape[d] == 1 and ref.shape[d] != 1 and all(
                    out.shape[k] == ref.shape[k] for k in range(ref.dim()) if k != d):
                name = dims[d] if d < len(dims) else f"dimension {d}"
                return base + f": the {name} dimension was reduced to 1 (keep all of it)"
    if out.numel() == ref.numel():
        return base + ": the right number of values in the wrong arrangement (check the order of dimensions)"
    return base


def value_hint(out: torch.Tensor, ref: torch.Tensor, match: Callable) -> str:
    """Why ``out`` does not ``match`` ``ref``: sign, absolute value, scale, batch, or how far."""
    # float64 on the CPU for the arithmetic (MPS has no float64); ``match`` gets float32 tensors
    out, ref = out.detach().cpu(), ref.detach().cpu()
    flat_out, flat_ref = out.double().flatten(), ref.double().flatten()
    if match(out, -ref):
        return "the result has the opposite sign: check the direction (+/-) of your formula"
    if (ref < 0).any() and match(out, ref.abs()):
        return "you took the absolute value, but the result should keep its sign (no .abs())"
    if (out < 0).any() and (ref >= 0).all() and match(out.abs(), ref):
        return "the signs are off: the result should be an absolute value (|.|), yours has negative entries"
    energy = flat_ref.dot(flat_ref).item()
    if energy > 0:
        factor = flat_out.dot(flat_ref).item() / energy
        if abs(factor - 1) > 1e-3 and factor != 0 and match(out, (ref.double() * factor).to(ref.dtype)):
            if abs(out.abs().max().item() - 1) < 1e-3:
                return ("the result looks normalized (its largest value is 1): return the raw "
                        "values; normalize only for plotting")
            return f"the result is off by a constant factor: about {factor:.3g} times the expected values"
    if out.dim() > 1 and out.shape[0] > 1:
        good = [match(out[i:i + 1], ref[i:i + 1]) for i in range(out.shape[0])]
        if good[0] and not all(good):
            return ("only the first image of the batch comes out right: every image needs its own "
                    "computation (its own target, its own normalization), not image 0's")
        if any(good) and not all(good):
            return "some images of the batch come out right and others not: is something mixed across the batch?"
        factors = []
        for i in range(out.shape[0]):
            r, o = flat_ref.view(out.shape[0], -1)[i], flat_out.view(out.shape[0], -1)[i]
            e = r.dot(r).item()
            factors.append(o.dot(r).item() / e if e > 0 else 0.0)
        if all(f > 0 for f in factors) and max(factors) / min(factors) > 1.01 and all(
                match(out[i:i + 1], (ref[i:i + 1].double() * factors[i]).to(ref.dtype)) for i in range(len(factors))):
            return ("each image is scaled by a different factor: did you normalize each image "
                    "(e.g. divide by its maximum)? the expected result is not normalized")
    error = (flat_out - flat_ref).norm().item() / max(flat_ref.norm().item(), 1e-12)
    return f"the values differ from labkit's reference (relative error {min(error, 9.99):.0%})"


# ---------------------------------------------------------------- the engine

@dataclass
class Spec:
    """How to check one exercise.

    - ``reference(*args, **kwargs)``: labkit's answer (also what ``type``/``shape`` hints compare
      with); ``forbidden``: other labkit functions that must not be handed in or called.
    - ``cases(generator)``: fresh :class:`Case` inputs, drawn from ``generator``.
    - ``requirements`` and ``constraints``: ``(out, case) -> hint or None``, properties every
      answer must have; requirements are tested before the values are compared (how a random
      method drew its noise), constraints after the known mistakes (in [0, 1], in the eps-ball).
    - ``expected(case)``: when given, the right answer once the student's code has run, instead
      of the reference's output (for a random method: the answer for exactly the noisy inputs
      the student's code evaluated).
    - ``match(out, ref, case)``: equality (default :func:`close`); ``mistakes``: typical wrong
      implementations with their hints; ``dims``: names of the output's dimensions for shape
      hints; ``delta_from(case)``: value hints compare ``out - delta_from(case)`` (an attack's
      change of the image rather than the image); ``shape_hints``: ``(out, ref, case) -> hint or
      None``, tried before the generic shape hint when the shapes differ (a known cause, such
      as a map left at a layer's resolution).
    """
    name: str
    reference: Callable
    cases: Callable[[torch.Generator], list]
    mistakes: Sequence[Mistake] = ()
    constraints: Sequence[Callable] = ()
    requirements: Sequence[Callable] = ()
    expected: Callable[[Case], torch.Tensor] | None = None
    match: Callable | None = None
    dims: Sequence[str] = ("batch", "channel", "height", "width")
    forbidden: Sequence[Callable] = ()
    delta_from: Callable[[Case], torch.Tensor] | None = None
    shape_hints: Sequence[Callable] = ()


_ACCEPT_REFERENCE = False


@contextlib.contextmanager
def accepting_reference():
    """For labkit's own tests: let a check run labkit's reference as if a student wrote it."""
    global _ACCEPT_REFERENCE
    previous, _ACCEPT_REFERENCE = _ACCEPT_REFERENCE, True
    try:
        yield
    finally:
        _ACCEPT_REFERENCE = previous


def _fresh_seed() -> int:
    """The seed of a check's inputs when none is given: new on every call."""
    return secrets.randbits(31)


def run(spec: Spec, student, seed: int | None = None) -> bool:
    """Check ``student`` against ``spec``; print and record the result; return whether it passed."""
    seed = _fresh_seed() if seed is None else seed
    try:
        _check(spec, student, seed)
    except Failure as failure:
        record(spec.name, False, str(failure), seed)
        return False
    record(spec.name, True, "", seed)
    return True


def _check(spec: Spec, student, seed: int) -> None:
    if not callable(student):
        raise Failure(f"pass your function itself (without calling it), got {type(student).__name__}")
    forbidden = set() if _ACCEPT_REFERENCE else _code_objects([spec.reference, *spec.forbidden])
    if _code_objects([student]) & forbidden:
        raise Failure(REFUSED)
    names = list(inspect.signature(spec.reference).parameters)
    device = get_device()
    with _isolated_random_state(seed, device), _one_thread():
        generator = torch.Generator().manual_seed(seed)
        cases = spec.cases(generator)
        for case in cases:
            case.args = tuple(a.to(device) if isinstance(a, (torch.Tensor, nn.Module)) else a
                              for a in case.args)
            _check_case(spec, student, case, names, forbidden)


def _check_case(spec: Spec, student, case: Case, names, forbidden) -> None:
    match = spec.match or (lambda a, b, c: close(a, b))
    ref = spec.reference(*case.args, **case.kwargs)
    if case.reset is not None:
        case.reset()
    model_before = _model_snapshot(case.model) if case.model is not None else None
    inputs_before = _input_snapshot(case)
    out = _run_student(student, case, forbidden)
    changed = (_model_changes(model_before, case.model) if model_before else None) \
        or _input_changes(inputs_before, case, names)
    if changed:
        raise Failure(changed)
    where = f" (on {case.describe})" if case.describe else ""
    hint = type_hint(out, ref)
    if hint is None and out.shape != ref.shape:
        known = (shape_hint_of(out, ref, case) for shape_hint_of in spec.shape_hints)
        hint = next(filter(None, known), None) or shape_hint(out, ref, spec.dims)
    if hint:
        raise Failure(hint + where)
    if not torch.isfinite(out).all():
        raise Failure("the result contains NaN or infinite values" + where)
    for requirement in spec.requirements:
        hint = requirement(out, case)
        if hint:
            raise Failure(hint + where)
    if spec.expected is not None:
        ref = spec.expected(case)
    if match(out, ref, case):
        return
    # a known mistake names the cause best, then the properties every answer must have
    for mistake in spec.mistakes:
        wrong = mistake.wrong(*case.args, **case.kwargs)
        if isinstance(wrong, torch.Tensor) and wrong.shape == out.shape and match(out, wrong, case):
            raise Failure(mistake.hint + where)
    for constraint in spec.constraints:
        hint = constraint(out, case)
        if hint:
            raise Failure(hint + where)
    if spec.delta_from is not None:  # compare the changes (x_adv - x), not the images
        start = spec.delta_from(case)
        out, ref = out - start, ref - start
    raise Failure(value_hint(out, ref, lambda a, b: match(a, b, case)) + where)

