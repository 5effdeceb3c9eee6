"""What crosses the sandbox wall when a submission is graded: plain numbers only.

The grader (outside) makes a check's inputs and *encodes* them: tensors become ``.npy`` arrays,
models a JSON description of their layers plus their weights as arrays, other arguments JSON.
Inside the sandbox, after the notebook has run, :func:`kernel_main` rebuilds the inputs, calls
the student's functions on them and writes what came out the same way: the output tensor, the
model and inputs as the call left them (mode, hooks, ``.grad``, weights, values) and, for a
:class:`~labkit.checks._cases.Recording` model, the batches it was called on. The grader reads
the arrays with ``np.load(allow_pickle=False)`` and JSON, puts that state back on its own copy
of the case (:func:`apply_observation`) and judges it with its own labkit. No pickle, no
tensor subclass and no Python object of the student's crosses back.
"""
from __future__ import annotations

import contextlib
import inspect
import json
import math
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

MANIFEST = "manifest.json"
RESULT = "result.json"
MAX_ARRAY_BYTES = 64 * 2**20  # one array the sandbox sends back; the checks' tensors are tiny


class Unsendable(TypeError):
    """A check argument this module cannot describe as plain numbers."""


# ---------------------------------------------------------------- arrays in a folder

class Arrays:
    """Numbered ``.npy`` files in ``folder``: ``put`` on the writing side, ``get`` on the reading side."""

    def __init__(self, folder: Path):
        self.folder, self.count = Path(folder), 0

    def put(self, tensor: torch.Tensor) -> str:
        tensor = torch.Tensor.detach(tensor)  # the plain method: a subclass's override is not called
        array = torch.Tensor.numpy(torch.Tensor.cpu(tensor.float() if tensor.dtype == torch.bfloat16 else tensor))
        name = f"{self.count}.npy"
        self.count += 1
        np.save(self.folder / name, array.copy(order="C"), allow_pickle=False)  # 0-d stays 0-d
        return name

    def get(self, name, dtype: torch.dtype | None = None) -> torch.Tensor:
        if not isinstance(name, str) or not name.endswith(".npy") or not name[:-4].isdigit():
            raise ValueError(f"not an array name: {name!r}")
        path = self.folder / name
        if path.is_symlink() or path.stat().st_size > MAX_ARRAY_BYTES:
            raise ValueError(f"array {name} is a link or too large")
        array = np.load(path, allow_pickle=False)
        if array.dtype.kind not in "biuf":
            raise ValueError(f"array {name} has dtype {array.dtype}, expected numbers")
        tensor = torch.from_numpy(np.array(array))
        return tensor.to(dtype) if dtype is not None else tensor


_DTYPES = {str(d): d for d in (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int8,
                               torch.uint8, torch.int16, torch.int32, torch.int64, torch.bool)}


# ---------------------------------------------------------------- models as layers + weights

def _init_arguments(module: nn.Module) -> dict:
    """The constructor arguments of a torch.nn layer, read back from its attributes."""
    arguments = {}
    for name, parameter in inspect.signature(type(module).__init__).parameters.items():
        if name in ("self", "device", "dtype") or parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        if name == "bias" and parameter.default is True:
            arguments[name] = module.bias is not None
        elif hasattr(module, name):
            value = getattr(module, name)
            value = list(value) if isinstance(value, tuple) else value
            if isinstance(value, torch.Tensor):  # a buffer given to the constructor (Normalize's mean)
                value = value.flatten().tolist()
            if not isinstance(value, (bool, int, float, str, list, type(None))):
                raise Unsendable(f"{type(module).__name__}.{name} is a {type(value).__name__}")
            arguments[name] = value
        elif parameter.default is parameter.empty:
            raise Unsendable(f"{type(module).__name__} has no attribute for its argument {name!r}")
    return arguments


def _describe(module: nn.Module) -> dict:
    from .checks import _cases
    kind = type(module)
    if kind is _cases.Recording:
        return {"type": "Recording", "inner": _describe(module.model)}
    if kind is _cases.Cubic:
        return {"type": "Cubic", "features": module.cubic.shape[1], "classes": module.cubic.shape[0]}
    if kind in (nn.Sequential, nn.ModuleList):
        return {"type": kind.__name__, "children": [[name, _describe(child)] for name, child in module.named_children()]}
    if kind.__module__.startswith("torch.nn.modules.") and getattr(nn, kind.__name__, None) is kind:
        if any(True for _ in module.children()):
            raise Unsendable(f"{kind.__name__} with submodules")
        return {"type": kind.__name__, "init": _init_arguments(module)}
    from . import models
    if getattr(models, kind.__name__, None) is kind:  # labkit's own architectures (FashionCNN, ...)
        return {"type": "labkit.models." + kind.__name__, "init": _init_arguments(module)}
    raise Unsendable(f"a model of type {kind.__name__}")


def _build(description: dict) -> nn.Module:
    from .checks import _cases
    kind = description["type"]
    if kind == "Recording":
        return _cases.Recording(_build(description["inner"]))
    if kind == "Cubic":
        return _cases.Cubic((int(description["features"]), 1, 1), int(description["classes"]), torch.Generator())
    if kind in ("Sequential", "ModuleList"):
        children = [(str(name), _build(child)) for name, child in description["children"]]
        if kind == "ModuleList":
            return nn.ModuleList([child for _, child in children])
        from collections import OrderedDict
        return nn.Sequential(OrderedDict(children))
    if kind.startswith("labkit.models."):
        from . import models
        cls = getattr(models, kind.rsplit(".", 1)[1])
    else:
        cls = getattr(nn, kind)
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise ValueError(f"not a layer: {kind}")
    init = {key: tuple(value) if isinstance(value, list) else value for key, value in description["init"].items()}
    return cls(**init)


def _model_state(model: nn.Module, arrays: Arrays) -> dict:
    from ._core import HOOK_DICTS
    return {
        "training": [m.training for m in model.modules()],
        "hooks": sum(len(getattr(m, name)) for m in model.modules() for name in HOOK_DICTS if hasattr(m, name)),
        "grads": [p.grad is not None for p in model.parameters()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "state": {key: arrays.put(value) for key, value in model.state_dict().items()},
    }


def _load_model_state(model: nn.Module, state: dict, arrays: Arrays, hooks: bool = False) -> None:
    modules, parameters = list(model.modules()), list(model.parameters())
    reference = model.state_dict()
    if set(state["state"]) != set(reference) or len(state["training"]) != len(modules) \
            or len(state["grads"]) != len(parameters) or len(state["requires_grad"]) != len(parameters):
        raise ValueError("the model's state does not fit its layers")
    loaded = {}
    for key, name in state["state"].items():
        value = arrays.get(name, reference[key].dtype)
        if value.shape != reference[key].shape:
            raise ValueError(f"{key} has shape {tuple(value.shape)}, expected {tuple(reference[key].shape)}")
        loaded[key] = value
    model.load_state_dict(loaded)
    for module, training in zip(modules, state["training"]):
        module.training = bool(training)
    for parameter, grad, requires_grad in zip(parameters, state["grads"], state["requires_grad"]):
        parameter.requires_grad_(bool(requires_grad))
        parameter.grad = torch.zeros_like(parameter) if grad else None
    if hooks:  # hooks the student's code left behind: as many no-op hooks on the grader's copy
        from ._core import HOOK_DICTS
        present = sum(len(getattr(m, name)) for m in modules for name in HOOK_DICTS if hasattr(m, name))
        for _ in range(min(max(0, int(state["hooks"]) - present), 100)):  # a count from the sandbox: capped
            model.register_forward_hook(lambda *args: None)


# ---------------------------------------------------------------- the grader's side: inputs out

def _encode(value, arrays: Arrays):
    if isinstance(value, torch.Tensor):
        return {"tensor": arrays.put(value), "dtype": str(value.dtype), "requires_grad": value.requires_grad}
    if isinstance(value, nn.Module):
        return {"module": _describe(value), **_model_state(value, arrays)}
    if value is None or isinstance(value, (bool, int, float, str)):
        return {"value": value}
    if isinstance(value, (tuple, list)):
        return {"items": [_encode(v, arrays) for v in value], "tuple": isinstance(value, tuple)}
    raise Unsendable(f"an argument of type {type(value).__name__}")


def encode_cases(cases, arrays: Arrays) -> list[dict]:
    """Each case's arguments as JSON, its tensors and weights written by ``arrays``."""
    return [{"args": [_encode(a, arrays) for a in case.args],
             "kwargs": {k: _encode(v, arrays) for k, v in case.kwargs.items()}} for case in cases]


def _decode(encoded, arrays: Arrays):
    if "tensor" in encoded:
        tensor = arrays.get(encoded["tensor"], _DTYPES[encoded["dtype"]])
        return tensor.requires_grad_(True) if encoded["requires_grad"] else tensor
    if "module" in encoded:
        model = _build(encoded["module"])
        _load_model_state(model, encoded, arrays)
        return model
    if "items" in encoded:
        items = [_decode(v, arrays) for v in encoded["items"]]
        return tuple(items) if encoded["tuple"] else items
    return encoded["value"]


# ---------------------------------------------------------------- inside the sandbox

def reset_global_state() -> None:
    """Undo what a notebook may have left behind that would fail a correct function: gradients
    switched off, another default dtype or device, anomaly detection, many threads."""
    torch.set_grad_enabled(True)
    torch.set_default_dtype(torch.float32)
    if hasattr(torch, "set_default_device"):
        torch.set_default_device(None)
    torch.autograd.set_detect_anomaly(False)
    torch.use_deterministic_algorithms(False)
    torch.set_num_threads(1)


def _observe(out, case_args, arrays: Arrays) -> dict:
    if isinstance(out, torch.Tensor):
        encoded = {"kind": "tensor", "tensor": arrays.put(out), "dtype": str(out.dtype),
                   "device": str(out.device), "requires_grad": bool(out.requires_grad)}
    elif out is None:
        encoded = {"kind": "none"}
    else:
        encoded = {"kind": "other", "type": type(out).__name__[:100],
                   "ndarray": isinstance(out, np.ndarray), "sequence": isinstance(out, (tuple, list))}
    from .checks import _cases
    observation = {"out": encoded, "inputs": [], "model": None, "seen": []}
    for index, arg in enumerate(case_args):
        if isinstance(arg, nn.Module) and observation["model"] is None:
            observation["model"] = _model_state(arg, arrays)
            if isinstance(arg, _cases.Recording):
                observation["seen"] = [arrays.put(s) for s in arg.seen]
        elif isinstance(arg, torch.Tensor):
            observation["inputs"].append({"index": index, "tensor": arrays.put(arg),
                                          "requires_grad": arg.requires_grad, "grad": arg.grad is not None})
    return observation


def kernel_main(namespace: dict, inbox: str, outbox: str, workdir: str) -> None:
    """Runs in the submission's kernel after its cells: every check call of the lesson, on the
    grader's inputs in ``inbox``; what came out goes to ``outbox``."""
    from .checks import _engine
    manifest = json.loads((Path(inbox) / MANIFEST).read_text(encoding="utf-8"))
    inputs, outputs = Arrays(inbox), Arrays(outbox)
    results = []
    for call in manifest["calls"]:
        reset_global_state()
        os.chdir(workdir)
        entry = {"check": call["check"], "cases": []}
        results.append(entry)
        try:
            student = eval(f"(lambda *a, **k: a[0] if len(a) == 1 and not k else None)({call['arguments']})",
                           namespace)
        except BaseException as err:
            entry["unavailable"] = (f"`{call['arguments']}` could not be evaluated at the end of the "
                                    f"notebook ({type(err).__name__}: {str(err)[:200]}): did the cell that "
                                    f"defines it run without an error?")
            continue
        if call.get("question"):  # a concept question: the answer itself, as plain JSON
            entry["answer"] = plain_answer(student)
            continue
        if not callable(student):
            entry["unavailable"] = (f"`{call['arguments']}` is a {type(student).__name__} at the end of "
                                    f"the notebook: the check needs your function itself")
            continue
        adapter = _engine.ADAPTERS.get(call.get("adapter"))
        if adapter is not None:  # the answer is not one tensor: compared as the check compares it
            student = adapter(student)
        for encoded in call["cases"]:
            reset_global_state()
            args = tuple(_decode(a, inputs) for a in encoded["args"])
            kwargs = {k: _decode(v, inputs) for k, v in encoded["kwargs"].items()}
            torch.manual_seed(manifest["seed"])
            try:
                with withheld(manifest.get("withheld", ())):
                    out = _engine.call_student(student, _engine.Case(args, kwargs))
            except _engine.Failure as failure:
                entry["cases"].append({"raised": str(failure)[:1000]})
                break  # as the check itself: the first failing case decides
            entry["cases"].append(_observe(out, args, outputs))
    (Path(outbox) / RESULT).write_text(json.dumps(results), encoding="utf-8")


@contextlib.contextmanager
def withheld(keys):
    """While the student's functions run on the grader's inputs, labkit's functions that compute
    the lesson's exercises but that the lesson notebook itself uses (so the sandbox's copy keeps
    them) raise: a wrapper around them does not pass. Their code object is swapped, so names
    the notebook bound to them earlier (``m = featvis.maximize``) raise as well."""
    import importlib
    swapped = []
    try:
        for relative, qualname in keys:
            module = "labkit." + relative[:-3].replace("/", ".").removesuffix(".__init__")
            function = importlib.import_module(module)
            for part in qualname.split("."):
                function = getattr(function, part)
            function = getattr(function, "__func__", function)
            if not hasattr(function, "__code__") or function.__code__.co_freevars:
                continue  # a closure's code cannot be swapped; none of labkit's exercises is one
            message = (f"labkit's {qualname} is not available while the grader calls your functions: "
                       f"it computes one of the lesson's exercises; write your own")
            stub = {}
            exec(f"def stub(*args, **kwargs):\n    raise RuntimeError({message!r})", stub)
            swapped.append((function, function.__code__))
            function.__code__ = stub["stub"].__code__
        yield
    finally:
        for function, code in swapped:
            function.__code__ = code


def plain_answer(value) -> dict:
    """A concept question's answer as JSON: a short string, a finite number, None, or the name of
    its type (whatever else it is, nothing of it but the name crosses the wall)."""
    if value is None or isinstance(value, str):
        return {"value": value if value is None else value[:100]}
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:
        value = value.item()
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return {"value": value}
    return {"type": type(value).__name__[:50]}


def answer_value(encoded: dict):
    """The answer :func:`plain_answer` sent, as :meth:`Question.judge` takes it."""
    if "type" in encoded:
        return type(str(encoded["type"])[:50], (_Returned,), {})()
    value = encoded["value"]
    if value is not None and not isinstance(value, (str, int, float)) or isinstance(value, bool):
        raise ValueError("an answer is a string, a number or None")
    return value


# ---------------------------------------------------------------- back in the grader

class _Returned:
    """Stands for a returned value that was not a tensor, for the type hint (its name only)."""


def returned_value(encoded: dict, arrays: Arrays, device):
    """The student's output as the grader judges it: a plain tensor, None, or a stand-in of the
    returned type (the type hints only look at the type)."""
    kind = encoded.get("kind")
    if kind == "tensor":
        dtype = _DTYPES.get(encoded.get("dtype"))
        if dtype is None:
            return type(str(encoded.get("dtype"))[:50], (_Returned,), {})()
        out = arrays.get(encoded["tensor"], dtype).to(device)
        if encoded.get("requires_grad") and out.is_floating_point():
            out.requires_grad_(True)
        return out
    if kind == "none":
        return None
    if encoded.get("ndarray"):
        return np.zeros(0)
    if encoded.get("sequence"):
        return ()
    return type(str(encoded.get("type", "object"))[:100], (_Returned,), {})()


def apply_observation(case, observation: dict, arrays: Arrays) -> None:
    """Leave ``case``'s model and inputs (the grader's copies) as the student's call left theirs."""
    model = case.model
    if model is not None:
        _load_model_state(model, observation["model"], arrays, hooks=True)
        if hasattr(model, "seen"):
            model.seen[:] = [arrays.get(name).to(model_device_of(model)) for name in observation["seen"]]
    for entry in observation["inputs"]:
        index = int(entry["index"])
        arg = case.args[index]
        if not isinstance(arg, torch.Tensor):
            raise ValueError(f"argument {index} is not a tensor")
        value = arrays.get(entry["tensor"], arg.dtype)
        if value.shape != arg.shape:
            raise ValueError(f"argument {index} changed its shape")
        with torch.no_grad():
            arg.copy_(value)
        if arg.is_floating_point():
            arg.requires_grad_(bool(entry["requires_grad"]))
            if entry["grad"]:
                arg.grad = torch.zeros_like(arg)


def model_device_of(model: nn.Module):
    from ._core import model_device
    return model_device(model)
