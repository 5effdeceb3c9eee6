"""The comparison engine behind every ``check_*``: run the student's function and labkit's
reference on the same fresh inputs and turn any difference into a hint.

A check never shows the reference's values: hints name what differs (type, device, dtype,
shape, sign, a square, a scale factor, a constant offset, transposed or flipped axes, a factor
of an input, images of the batch mixed, where in a map the difference lies, a step too few or
a gradient computed once, a missing clamp or projection, a known mistake), and numbers in them
are shapes, factors or error percentages only. When the answer is one number per image, not even
those: a factor or an offset would give the reference away. Every hint ends with the case it
failed on ("(on a batch of 2 RGB 10x8 images, eps=0.05)"), and an exception raised in the
student's code is shown with its line and, for the known traps, what usually causes it.

Each check prints one line, ``✅ <check>: passed`` or ``❌ <check>: <hint>``, records a
:class:`Result` and returns it (truthy on a pass); see ``labkit.checks`` for where results go.
Under :func:`raising` (on by itself while nbgrader autogrades or validates) a failing check
raises ``AssertionError(hint)`` and a passing one writes nothing to stderr.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import inspect
import io
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
    """One check's outcome, as the grader reads it; what a check returns. Truthy on a pass, so
    ``assert check_x(f)`` works; ``str()`` is the line the check printed."""
    check: str
    passed: bool
    hint: str
    time: str
    seed: int | None = None

    @property
    def name(self) -> str:
        return self.check

    def __bool__(self) -> bool:
        return self.passed

    def __str__(self) -> str:
        return f"✅ {self.check}: passed" if self.passed else f"❌ {self.check}: {self.hint}"

    def _ipython_display_(self) -> None:
        """A check cell ends in the call: the check already printed its line, so no ``Out[]``
        (which would also read as partial credit to nbgrader)."""


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
    print(result)
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


# (part of the message, what it usually means in these exercises): the traps students fall into
KNOWN_ERRORS = (
    ("does not require grad", "the tensor you differentiate does not depend on an input that "
     "requires grad: make the copy `x = x.detach().clone().requires_grad_(True)` before the "
     "forward pass, outside torch.no_grad(), and differentiate with respect to that copy"),
    ("appears to not have been used in the graph", "you differentiate with respect to a tensor "
     "the output was not computed from: call the model on the very tensor you set requires_grad on"),
    ("backward through the graph a second time", "each backward pass needs a fresh forward pass: "
     "call the model again at every step (on the current image) before differentiating"),
    ("can be implicitly created only for scalar outputs", "differentiate a single number: pick each "
     "image's score and .sum() them (one image's gradient does not depend on the others)"),
    ("leaf Variable that requires grad is being used in an in-place operation", "an in-place change "
     "(`+=`, `.clamp_()`) of a tensor that requires grad: write `x = x + ...` or work on a "
     ".detach()-ed copy"),
    ("Can't call numpy() on Tensor that requires grad", "stay in torch (no .numpy()), or .detach() first"),
    ("Expected all tensors to be on the same device", "create new tensors on the input's device "
     "(torch.zeros_like(x), or device=x.device)"),
    ("Boolean value of Tensor with more than one", "`if`/`and`/`or` on a tensor of several values: "
     "use torch.where, masks or .all()/.any()"),
    ("only Tensors of floating point", "requires_grad needs a float tensor: do not convert the input to integers"),
    ("must match the size of tensor", "two tensors with different shapes meet in one operation: "
     "check each tensor's shape (keepdim=True in reductions, .view(-1, 1, 1, 1) for per-image values)"),
    ("shapes cannot be multiplied", "the matrix shapes do not fit: flatten the images with "
     ".flatten(1) and check which side the weight goes on (a @ W.T for nn.Linear)"),
    ("out of bounds", "an index is out of range: the target classes index dimension 1 (the classes), "
     "the batch index dimension 0"),
)


def _summarize(err: Exception) -> str:
    full = str(err).strip()
    message = full.splitlines()[0] if full else ""
    if len(message) > 200:
        message = message[:197] + "..."
    text = f"your code raised {type(err).__name__}" + (f": {message}" if message else "")
    frame = _student_frame(err)
    if frame is not None:
        line = (frame.line or linecache.getline(frame.filename, frame.lineno)).strip()
        text += f" (in {frame.name}, line {frame.lineno}" + (f": `{line}`)" if line else ")")
    if isinstance(err, (RuntimeError, IndexError, ValueError, TypeError)):
        known = next((advice for part, advice in KNOWN_ERRORS if part in full), None)
        if known:
            text += f"; {known}"
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
    if type(out).__module__ == "torch.return_types":
        return (f"your function returned the (values, indices) pair of torch.{type(out).__name__}: "
                f"take its .values (or use torch.amax / torch.amin)")
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
    if out.dim() == ref.dim() >= 1 and out.shape[1:] == ref.shape[1:] and out.shape[0] != ref.shape[0]:
        return base + (": the first (batch) dimension has the wrong size: one result per image; "
                       "did you reduce over the batch (dim=0) instead of another dimension?")
    if out.dim() == ref.dim() >= 2 and out.shape[:-2] == ref.shape[:-2]:
        (h, w), (rh, rw) = out.shape[-2:], ref.shape[-2:]
        if (h, w) == (rw, rh):
            return base + ": height and width are swapped (check .T / .transpose / permute)"
        if h < rh and rh - h == rw - w and (rh - h) % 2 == 0:
            return base + (f": {rh - h} pixels smaller in height and width, as after a convolution "
                           f"without padding: pad by {(rh - h) // 2} pixel(s) (padding=...)")
    if out.dim() == ref.dim():
        for d in range(ref.dim()):
            if out.shape[d] == 1 and ref.shape[d] != 1 and all(
                    out.shape[k] == ref.shape[k] for k in range(ref.dim()) if k != d):
                name = dims[d] if d < len(dims) else f"dimension {d}"
                return base + f": the {name} dimension was reduced to 1 (keep all of it)"
    if out.numel() == ref.numel():
        return base + ": the right number of values in the wrong arrangement (check the order of dimensions)"
    return base


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().double().flatten()


def _fits(out, ref, match, candidate) -> bool:
    """``match(out, candidate(ref))``, for a candidate that may fail on odd shapes."""
    try:
        return bool(match(out, candidate(ref).to(ref.dtype)))
    except (RuntimeError, ValueError, IndexError):
        return False


def _relative_error(out, ref) -> float:
    o, r = _flat(out), _flat(ref)
    return (o - r).norm().item() / max(r.norm().item(), 1e-12)


def value_hint(out: torch.Tensor, ref: torch.Tensor, match: Callable, inputs: dict | None = None,
               dims: Sequence[str] = ("batch", "channel", "height", "width")) -> str:
    """Why ``out`` does not ``match`` ``ref``: a pattern in the difference (sign, absolute value,
    square, scale, offset, transposed or flipped axes, a factor of one of the ``inputs``, images
    of the batch mixed, where the difference lies), else how far.

    When the answer is one number per image (or one number), no factor, offset or error size is
    named: dividing by it would give the student the reference."""
    # float64 on the CPU for the arithmetic (MPS has no float64); ``match`` gets float32 tensors
    out, ref = out.detach().cpu(), ref.detach().cpu()
    flat_out, flat_ref = _flat(out), _flat(ref)
    few = ref.dim() <= 1  # one number per image: state kinds of mistakes, never numbers
    negated, absolute = match(out, -ref), bool((ref < 0).any()) and match(out, ref.abs())
    if negated and absolute:
        return ("the result has the opposite sign where it should be negative: a sign flipped "
                "(+/-), or an absolute value taken (.abs())")
    if negated:
        return "the result has the opposite sign: check the direction (+/-) of your formula"
    if absolute:
        return "you took the absolute value, but the result should keep its sign (no .abs())"
    if (out < 0).any() and (ref >= 0).all() and match(out.abs(), ref):
        return "the signs are off: the result should be an absolute value (|.|), yours has negative entries"
    if _fits(out, ref, match, torch.square):
        return ("your values are the squares of the expected ones: a square root is missing, or "
                "something is squared that should not be")
    if (ref >= 0).all() and _fits(out, ref, match, lambda r: r.clamp_min(0).sqrt()):
        return "your values are the square roots of the expected ones: a square (or a norm's square) is missing"
    energy = flat_ref.dot(flat_ref).item()
    if energy > 0:
        factor = flat_out.dot(flat_ref).item() / energy
        if abs(factor - 1) > 1e-3 and factor != 0 and match(out, (ref.double() * factor).to(ref.dtype)):
            if few:
                return ("your values are all off by the same factor: a sum where a mean belongs "
                        "(or the reverse), a missing or extra normalization, weight or count")
            if abs(out.abs().max().item() - 1) < 1e-3:
                return ("the result looks normalized (its largest value is 1): return the raw "
                        "values; normalize only for plotting")
            return f"the result is off by a constant factor: about {factor:.3g} times the expected values"
    if ref.numel() > 1:
        offset = (flat_out - flat_ref).mean().item()
        if abs(offset) > 0 and match(out, (ref.double() + offset).to(ref.dtype)):
            return ("your values are all shifted by the same constant: something is added or left "
                    "out (a bias, a mean, a `1 -`, a baseline)")
    if out.dim() >= 2 and not few:
        if out.shape[-1] == out.shape[-2] and out.shape[-1] > 1 and match(out, ref.transpose(-1, -2)):
            return "the result is transposed: height and width are swapped (check .T / .transpose / permute)"
        for d in range(1, out.dim()):
            if out.shape[d] > 1 and match(out, ref.flip(d)):
                name = dims[d] if d < len(dims) else f"dimension {d}"
                return f"the result is flipped along the {name} dimension (a kernel or an index reversed?)"
    for name, value in (inputs or {}).items():
        if value.shape == out.shape and not torch.equal(value, torch.ones_like(value)) and \
                _fits(out, ref, match, lambda r: r * value.detach().cpu()):
            return (f"your result is the expected one multiplied by `{name}`: leave out that "
                    f"factor (or it is multiplied in twice)")
    if out.dim() >= 1 and out.shape[0] > 1:
        hint = _batch_hint(out, ref, match, flat_out, flat_ref, few)
        if hint:
            return hint
    if not few:
        hint = _where_hint(out, ref, match, dims)
        if hint:
            return hint
    error = _relative_error(out, ref)
    if few:
        return ("the values differ from labkit's reference " +
                ("(close, but not within the tolerance)" if error < 0.05 else "(far off)"))
    size = "more than 999%" if error > 9.99 else f"{error:.0%}"
    return _likeness_hint(flat_out, flat_ref, size) or \
        f"the values differ from labkit's reference (relative error {size})"


def _likeness_hint(flat_out, flat_ref, size) -> str | None:
    """How the whole map compares when no single pattern explains it: the same signs with other
    sizes, the opposite direction, or no relation at all."""
    norms = flat_out.norm().item() * flat_ref.norm().item()
    if norms == 0:
        return None
    cosine = flat_out.dot(flat_ref).item() / norms
    nonzero = flat_ref != 0
    agree = (torch.sign(flat_out[nonzero]) == torch.sign(flat_ref[nonzero])).double().mean().item() \
        if nonzero.any() else 0.0
    if cosine >= 0.9 and agree >= 0.9:
        alike = "the same signs, a similar map" if (flat_ref < 0).any() else "a similar map"
        return (f"the pattern is right ({alike}) but the sizes differ from entry "
                f"to entry (relative error {size}): a weighting, normalization or nonlinearity differs, "
                f"per pixel, per channel or per image")
    if cosine <= -0.5:
        return (f"your result points largely the opposite way (relative error {size}): a sign in the "
                f"formula, e.g. a loss where a score belongs, or a step down instead of up")
    if abs(cosine) < 0.2:
        return (f"your result is unrelated to the expected one (relative error {size}): it computes a "
                f"different quantity (another score, class, layer, input or formula)")
    return None


def _batch_hint(out, ref, match, flat_out, flat_ref, few) -> str | None:
    """Images of the batch mixed: only image 0 right, some right, all the same, a factor each."""
    b = out.shape[0]
    good = [match(out[i:i + 1], ref[i:i + 1]) for i in range(b)]
    if good[0] and not all(good):
        return ("only the first image of the batch comes out right: every image needs its own "
                "computation (its own target, its own normalization), not image 0's")
    if any(good) and not all(good):
        return "some images of the batch come out right and others not: is something mixed across the batch?"
    same = all(torch.allclose(out[i], out[0], rtol=1e-4, atol=1e-7) for i in range(1, b))
    if same and not all(torch.allclose(ref[i], ref[0], rtol=1e-3, atol=1e-6) for i in range(1, b)):
        return ("every image of the batch got the same result: something is reduced over the batch "
                "(a mean, max or sum over dim 0) or shared between images instead of computed per image")
    if few:
        return None
    factors = []
    for i in range(b):
        r, o = flat_ref.view(b, -1)[i], flat_out.view(b, -1)[i]
        e = r.dot(r).item()
        factors.append(o.dot(r).item() / e if e > 0 else 0.0)
    if all(f > 0 for f in factors) and max(factors) / min(factors) > 1.01 and all(
            match(out[i:i + 1], (ref[i:i + 1].double() * factors[i]).to(ref.dtype)) for i in range(b)):
        return ("each image is scaled by a different factor: did you normalize each image "
                "(e.g. divide by its maximum)? the expected result is not normalized")
    return None


def _where_hint(out, ref, match, dims) -> str | None:
    """Where the difference lies in a map: some channels, the border, a few entries, the zeros."""
    scale = ref.abs().max().item() or 1.0
    wrong = (out.double() - ref.double()).abs() > 1e-3 * scale + 1e-6
    if out.dim() == 4 and out.shape[1] > 1:
        right = [not wrong[:, c].any().item() for c in range(out.shape[1])]
        if any(right) and not all(right):
            which = ", ".join(str(c) for c, ok in enumerate(right) if ok)
            return (f"channel(s) {which} come out right and the others not: is something taken from "
                    f"one channel only, or computed per channel where it should use all channels?")
    if out.dim() >= 2 and min(out.shape[-2:]) > 2:
        inner = wrong[..., 1:-1, 1:-1]
        if wrong.any() and not inner.any():
            return "the values differ only at the border of the image: check the padding (zeros, one pixel wide)"
    share = wrong.double().mean().item()
    zero_out, zero_ref = out.abs() <= 1e-7 * scale, ref.abs() <= 1e-7 * scale
    if wrong.any() and (zero_out | zero_ref)[wrong].all():
        if zero_out[wrong].all():
            return (f"your result is 0 at {share:.0%} of the entries where the expected one is not: "
                    f"something is masked, clamped or rectified away that should stay")
        if zero_ref[wrong].all():
            return (f"your result is not 0 at {share:.0%} of the entries where the expected one is: "
                    f"a mask, clamp or ReLU is missing")
    if 0 < share < 0.25:
        return (f"most values are right, but {share:.0%} of them differ: a clamp, a mask, a threshold "
                f"or a special case (a value exactly 0, the edge of a range) is handled differently")
    return None


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
    - ``steps``: the name of the argument that sets how many iterations the method runs (PGD,
      gradient ascent), so that a wrong answer is checked for a step too few or too many and
      for a gradient computed once instead of at every step.
    - ``adapter``: the name of an :data:`ADAPTERS` entry when the exercise's answer is not one
      tensor (a ``(lower, upper)`` pair, or a function whose backward pass is the answer): the
      check and the sandboxed grader both compare what the adapter makes of the student's function.
    - ``attached``: for an answer that must stay on the autograd graph (a loss to train with),
      the hint when it does not; the values are compared detached.
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
    steps: str | None = None
    adapter: str | None = None
    attached: str | None = None


class NotAPair:
    """What :func:`stack_pair` got back instead of a ``(lower, upper)`` pair of same-shaped tensors."""

    def __init__(self, out):
        self.out = out


def stack_pair(function):
    """An exercise that returns ``(lower, upper)``: the two stacked into one tensor, which the
    engine compares; anything else comes back as a :class:`NotAPair`."""
    @functools.wraps(function)
    def run(*args, **kwargs):
        out = function(*args, **kwargs)
        if isinstance(out, (tuple, list)) and len(out) == 2 and all(isinstance(t, torch.Tensor) for t in out):
            if out[0].shape == out[1].shape:
                return torch.stack([out[0], out[1]]).detach()
        return NotAPair(out)
    return run


def output_and_gradient(function, attached: list | None = None):
    """``function(x, *rest)`` run as ``run(x, *rest, weights)``: its output stacked with the
    gradient of ``sum(weights * output)`` with respect to ``x``, so a custom backward pass is
    compared too. ``attached`` collects whether each output was still attached to ``x``."""
    @functools.wraps(function)
    def run(x, *rest):
        *rest, weights = rest
        x = x.detach().clone().requires_grad_(True)
        out = function(x, *rest)
        if not isinstance(out, torch.Tensor) or out.shape != x.shape:
            return out
        if attached is not None:
            attached.append(out.requires_grad)
        if not out.requires_grad:
            return torch.stack([out.detach(), torch.zeros_like(x)])
        (grad,) = torch.autograd.grad((weights * out).sum(), x, allow_unused=True)
        return torch.stack([out.detach(), torch.zeros_like(x) if grad is None else grad])
    return run


def value_and_gradient(function, attached: list | None = None):
    """``function(model, x, *rest)`` that returns one value per image, kept on the autograd graph
    (an objective for gradient ascent), run as: ``B x (1 + C*H*W)``, each image's value followed
    by the gradient of the values' sum with respect to its pixels, so the gradient is compared
    too. ``attached`` collects whether each output was still attached to ``x``."""
    @functools.wraps(function)
    def run(model, x, *rest):
        x = x.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            out = function(model, x, *rest)
            if not isinstance(out, torch.Tensor) or out.shape != x.shape[:1]:
                return out.detach() if isinstance(out, torch.Tensor) else out
            if attached is not None:
                attached.append(out.requires_grad)
            grad = torch.autograd.grad(out.sum(), x, allow_unused=True)[0] if out.requires_grad else None
        grad = torch.zeros_like(x) if grad is None else grad
        return torch.cat([out.detach()[:, None], grad.flatten(1)], dim=1)
    return run


class NotImagesAndLabels(NotAPair):
    """What :func:`images_and_labels` got back instead of ``(images, labels)``."""


def images_and_labels(function):
    """An exercise that returns a data set ``(images, labels)`` (``B x C x H x W`` and ``B``
    class indices): one ``B x (C*H*W + 1)`` tensor, each image flattened with its label as the
    last column, which the engine compares; anything else comes back as :class:`NotImagesAndLabels`."""
    @functools.wraps(function)
    def run(*args, **kwargs):
        out = function(*args, **kwargs)
        if (isinstance(out, (tuple, list)) and len(out) == 2 and all(isinstance(t, torch.Tensor) for t in out)
                and out[0].dim() >= 1 and out[1].shape == out[0].shape[:1]):
            return torch.cat([out[0].detach().flatten(1), out[1].detach().to(out[0].dtype)[:, None]], 1)
        return NotImagesAndLabels(out)
    return run


class NotACoordinate(NotAPair):
    """What :func:`coordinate` got back instead of a ``(row, col)`` pair of whole numbers."""


def coordinate(function):
    """An exercise that returns a place ``(row, col)`` (ints, 0-d tensors or a 2-element tensor):
    a LongTensor ``[row, col]``; anything else comes back as :class:`NotACoordinate`."""
    @functools.wraps(function)
    def run(*args, **kwargs):
        out = function(*args, **kwargs)
        try:
            values = [v.item() if isinstance(v, (torch.Tensor, np.generic, np.ndarray)) else v for v in out]
        except (TypeError, ValueError, RuntimeError):
            return NotACoordinate(out)
        if len(values) != 2 or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
            return NotACoordinate(out)
        device = next((a.device for a in args if isinstance(a, torch.Tensor)), None)
        return torch.tensor([int(v) for v in values], device=device)
    return run


# ``Spec.adapter`` names one of these; the sandboxed grader applies it in the sandbox by name
ADAPTERS = {"pair": stack_pair, "output_and_gradient": output_and_gradient,
            "value_and_gradient": value_and_gradient, "images_and_labels": images_and_labels,
            "coordinate": coordinate}


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


# nbgrader sets this in the kernel's environment while it autogrades or validates a notebook
# (documented in its FAQ), so a check cell is a test cell there and nowhere else.
NBGRADER_ENV = "NBGRADER_EXECUTION"
_RAISING = False


@contextlib.contextmanager
def raising():
    """Grading mode, for test cells of graders that fail a cell on an exception or on stderr
    output (nbgrader, otter, pytest): inside, a failing check raises ``AssertionError(hint)``
    after printing its line, and a passing one writes nothing to stderr (warnings or progress
    bars of the code it runs are swallowed). On by itself while nbgrader autogrades or
    validates; a student running the notebook sees the checks print and return as usual."""
    global _RAISING
    previous, _RAISING = _RAISING, True
    try:
        yield
    finally:
        _RAISING = previous


def is_raising() -> bool:
    return _RAISING or os.environ.get(NBGRADER_ENV) in ("autograde", "validate")


def run(spec: Spec, student, seed: int | None = None) -> Result:
    """Check ``student`` against ``spec``; print, record and return the :class:`Result`
    (under :func:`raising`, a failure raises ``AssertionError(hint)`` instead of returning)."""
    seed = _fresh_seed() if seed is None else seed
    grading = is_raising()
    with contextlib.ExitStack() as quiet:
        if grading:  # nbgrader scores a test cell with any stderr output 0
            quiet.enter_context(contextlib.redirect_stderr(io.StringIO()))
        try:
            _check(spec, student, seed)
        except Failure as failure:
            result = record(spec.name, False, str(failure), seed)
        else:
            result = record(spec.name, True, "", seed)
    if grading and not result:
        raise AssertionError(result.hint)
    return result


def _check(spec: Spec, student, seed: int) -> None:
    if not callable(student):
        raise Failure(f"pass your function itself (without calling it), got {type(student).__name__}")
    forbidden = set() if _ACCEPT_REFERENCE else _code_objects([spec.reference, *spec.forbidden])
    if _code_objects([student]) & forbidden:
        raise Failure(REFUSED)
    names = argument_names(spec)
    with case_context(seed):
        for case in cases_for(spec, seed):
            _check_case(spec, student, case, names, forbidden)


def argument_names(spec: Spec) -> list[str]:
    """The names of the exercise's arguments (for hints about a changed input)."""
    return list(inspect.signature(spec.reference).parameters)


@contextlib.contextmanager
def case_context(seed: int):
    """The random state and thread count a check's cases are made and judged under."""
    with _isolated_random_state(seed, get_device()), _one_thread():
        yield


def cases_for(spec: Spec, seed: int) -> list[Case]:
    """The check's fresh inputs for ``seed``, on labkit's device; made inside
    ``case_context(seed)`` they are the same for the same seed."""
    device = get_device()
    cases = spec.cases(torch.Generator().manual_seed(seed))
    for case in cases:
        case.args = tuple(a.to(device) if isinstance(a, (torch.Tensor, nn.Module)) else a
                          for a in case.args)
    return cases


def prepare_case(spec: Spec, case: Case):
    """The reference's answer and the state of the model and inputs before the student's code
    runs: ``(ref, before)`` for :func:`judge_case`."""
    ref = spec.reference(*case.args, **case.kwargs)
    if case.reset is not None:
        case.reset()
    model_before = _model_snapshot(case.model) if case.model is not None else None
    return ref, (model_before, _input_snapshot(case))


def call_student(student, case: Case, forbidden: set = frozenset()):
    """The student's output on ``case``; a :class:`Failure` with the hint (naming the case) when
    their code raises."""
    try:
        return _run_student(student, case, forbidden)
    except Failure as failure:
        if str(failure) in (NOT_IMPLEMENTED, REFUSED) or str(failure).startswith("not implemented"):
            raise
        raise Failure(f"{failure}{_where(case)}") from None


def _where(case: Case) -> str:
    return f" (on {case.describe})" if case.describe else ""


def _check_case(spec: Spec, student, case: Case, names, forbidden) -> None:
    ref, before = prepare_case(spec, case)
    with _counting_rows(case.model if spec.steps else None) as rows:
        out = call_student(student, case, forbidden)
    judge_case(spec, case, ref, before, out, names, student=student, forbidden=forbidden, rows=rows)


def judge_case(spec: Spec, case: Case, ref, before, out, names, *, student=None,
               forbidden: set = frozenset(), rows=None) -> None:
    """Raise a :class:`Failure` with the hint unless ``out``, the student's output on ``case``
    (whose model and inputs are now as the student's code left them), is right.

    ``student`` and ``rows`` (how many images the model saw) allow two more diagnoses: a batch
    that is wrong while each image alone is right (the student's function is called again), and
    a gradient computed once in an iterative method. The sandboxed grader judges outside the
    student's process and passes neither; its hints are then the less specific ones."""
    match = spec.match or (lambda a, b, c: close(a, b))
    where = _where(case)
    model_before, inputs_before = before
    changed = (_model_changes(model_before, case.model) if model_before else None) \
        or _input_changes(inputs_before, case, names)
    if changed:
        raise Failure(changed + where)
    if spec.attached is not None and isinstance(out, torch.Tensor):
        if not out.requires_grad:  # a loss to train with: it must keep its graph
            raise Failure(spec.attached + where)
        out, ref = out.detach(), ref.detach()
    hint = type_hint(out, ref)
    if hint is None and out.shape != ref.shape:
        known = (shape_hint_of(out, ref, case) for shape_hint_of in spec.shape_hints)
        hint = next(filter(None, known), None) or shape_hint(out, ref, spec.dims)
    if hint:
        raise Failure(hint + where)
    if not torch.isfinite(out).all():
        # a known mistake that also gives NaN names the cause (0 / 0 where a sign(0) went wrong)
        for mistake in spec.mistakes:
            wrong = mistake.wrong(*case.args, **case.kwargs)
            if isinstance(wrong, torch.Tensor) and wrong.shape == out.shape and _same_nan(out, wrong):
                raise Failure(mistake.hint + where)
        raise Failure("the result contains NaN or infinite values: usually a division by 0 (0 / 0 "
                      "gives NaN; add a small number or treat 0 separately) or the log of 0" + where)
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
    if spec.steps and rows is not None:
        hint = _steps_hint(spec, case, names, out, match, rows)
        if hint:
            raise Failure(hint + where)
    hint = student is not None and _batch_dependence_hint(spec, student, case, ref, match, forbidden)
    if hint:
        raise Failure(hint + where)
    inputs = {name: arg for name, arg in zip(names, case.args)
              if isinstance(arg, torch.Tensor) and arg.is_floating_point()}
    if spec.delta_from is not None:  # compare the changes (x_adv - x), not the images
        start = spec.delta_from(case)
        out, ref = out - start, ref - start
        inputs = {}
    raise Failure(value_hint(out, ref, lambda a, b: match(a, b, case), inputs, spec.dims) + where)


def _batch_dependence_hint(spec: Spec, student, case: Case, ref, match, forbidden) -> str | None:
    """A batch that comes out wrong although every image alone comes out right: the images are
    mixed (a mean or max over the batch, image 0's target or normalization for all). The
    student's function runs once more per image, on that image's slice of every batched input."""
    batch = ref.shape[0] if ref.dim() >= 1 else 0
    if batch < 2 or spec.expected is not None:
        return None

    def one(value, i):
        if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == batch:
            return value[i:i + 1]
        return value
    for i in range(batch):
        single = Case(tuple(one(a, i) for a in case.args), {k: one(v, i) for k, v in case.kwargs.items()},
                      case.describe)
        try:
            out = _run_student(student, single, forbidden)
        except Failure:
            return None
        if not (isinstance(out, torch.Tensor) and out.shape == ref[i:i + 1].shape
                and match(out.detach(), ref[i:i + 1], single)):
            return None
    return ("each image alone comes out right, but not the batch: your result for one image "
            "depends on the others (a mean, max or norm over the batch, dim=0; image 0's target, "
            "scale or normalization used for all; a B x B index like logits[:, target])")


def _same_nan(a: torch.Tensor, b: torch.Tensor) -> bool:
    """NaN in the same places and the rest equal: a mistake that breaks the same way."""
    bad = ~torch.isfinite(a)
    return bool(torch.equal(bad, ~torch.isfinite(b)) and close(a[~bad], b[~bad]))


@contextlib.contextmanager
def _counting_rows(model: nn.Module | None):
    """Count the images (rows of the batch) ``model`` is called on while the block runs."""
    rows = [0]
    if model is None:
        yield rows
        return
    handle = model.register_forward_pre_hook(lambda module, args: rows.__setitem__(
        0, rows[0] + (len(args[0]) if args and isinstance(args[0], torch.Tensor) and args[0].dim() else 0)))
    try:
        yield rows
    finally:
        handle.remove()


def _steps_hint(spec: Spec, case: Case, names, out, match, rows) -> str | None:
    """An iterative method: the gradient computed once instead of at every step, or a step too
    few or too many (the reference run with ``steps`` -/+ 1)."""
    index = names.index(spec.steps) if spec.steps in names else None
    if spec.steps in case.kwargs:
        steps = case.kwargs[spec.steps]
    elif index is not None and index < len(case.args):
        steps = case.args[index]
    else:
        return None
    for other, words in ((steps - 1, "one step too few"), (steps + 1, "one step too many")):
        if other < 1:
            continue
        if spec.steps in case.kwargs:
            args, kwargs = case.args, {**case.kwargs, spec.steps: other}
        else:
            args, kwargs = case.args[:index] + (other,) + case.args[index + 1:], case.kwargs
        if match(out, spec.reference(*args, **kwargs), case):
            return (f"your loop runs {words}: {spec.steps}={steps} means exactly {steps} updates "
                    f"(for _ in range({spec.steps}))")
    x = next((a for a in case.args if isinstance(a, torch.Tensor)), None)
    if x is not None and steps > 1 and rows[0] < steps * len(x):
        batches = rows[0] // max(len(x), 1)
        if batches <= 1:
            return (f"your function evaluated the model only {'once' if batches else 'never'} for "
                    f"{spec.steps}={steps}: compute the gradient anew at every step, at the current "
                    f"image, not once at the start")
        return (f"your function evaluated the model on {batches} batches for {spec.steps}={steps}: "
                f"every step needs the gradient at the current image")
    return None
