"""How labkit's time grows with batch size and with N / steps, and how much memory a row costs.

    python tests/benchmarks/scaling.py [--device cpu|cuda] [--quick] [--threads 1] [--csv PATH]

Time (tests/benchmarks/timing.py's clock, medians after a warm-up) of SmoothGrad, integrated
gradients and PGD L-inf on fmnist-cnn for B = 1, 8, 64 images at N = steps = 50 (PGD: 20 steps),
and for N / steps = 10, 50, 100 at B = 8; ``per row`` divides by the model evaluations.

Memory of one forward + backward pass per input row (a row: one model evaluation; SmoothGrad,
IG and occlusion put ``batch_size`` rows into each pass), measured, not estimated:

* ``saved``: the bytes autograd keeps for the backward pass, counted by
  ``torch.autograd.graph.saved_tensors_hooks`` (each storage once), the difference between
  ``rows`` and 1 row divided by ``rows - 1``, so the weights drop out; device-independent.
* ``peak``: on a CPU the growth of the process's peak RSS from 1 row to ``rows`` rows per row
  (a fresh process per model, so earlier runs leave no high-water mark); on CUDA the growth
  of ``torch.cuda.max_memory_allocated``. It adds the transient buffers of the backward pass.

The knee is the memory budget divided by the peak bytes per row: the largest ``batch_size``
that fits a 16 GB GPU (14 GB left after the CUDA context, the model and the inputs) and a
laptop (2 GB for the computation).
"""
from __future__ import annotations

import argparse
import resource
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import labkit  # noqa: E402
from labkit import attacks  # noqa: E402
from labkit import attribution as A  # noqa: E402
from labkit.models import load  # noqa: E402
from timing import add_arguments, measure, setup, write_csv  # noqa: E402

BUDGETS = {"16 GB GPU": 14e9, "laptop": 2e9}
# name: (image side, rows of the bigger pass: enough to lift the peak RSS well above its noise)
MODELS = {"fmnist-cnn": (28, 256), "imagenet-effnet-lite0": (224, 8)}


def _inputs(name: str, rows: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    if name == "fmnist-cnn":
        x, y = labkit.data.fashion_mnist("test").tensors(slice(0, rows))
    else:
        photos = labkit.data.sample_photos(MODELS[name][0])[0]
        x = photos.repeat(rows // len(photos) + 1, 1, 1, 1)[:rows]
        y = torch.full((rows,), 285)
    return x.to(device), y.to(device)


def saved_bytes(model, x, y) -> int:
    """Bytes of the tensors autograd saves for backward in one forward pass (input gradient of
    the target logits), each storage counted once."""
    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t
    x = x.detach().requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(x).gather(1, y[:, None]).sum()
    torch.autograd.grad(logits, x)
    return sum(storages.values())


def _peak() -> int:
    """Peak resident memory of this process in bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_bytes(model, x, y, device) -> int:
    """Peak memory up to the end of one forward + backward pass: the process's peak RSS on a
    CPU, the peak of allocated CUDA memory during the pass on CUDA."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    A.gradient(model, x, y)
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else _peak()


def memory_row(name: str, device) -> dict:
    """Bytes per row of ``name`` (run in a fresh process on a CPU, see the module docstring)."""
    model = load(name, device=device)
    for p in model.parameters():
        p.requires_grad_(False)
    side, rows = MODELS[name]
    one, many = _inputs(name, 1, device), _inputs(name, rows, device)
    A.gradient(model, *one)  # the first call allocates what any call needs
    baseline = peak_bytes(model, *one, device)  # on a CPU: before any pass of more rows
    peak = (peak_bytes(model, *many, device) - baseline) / (rows - 1)
    saved = (saved_bytes(model, *many) - saved_bytes(model, *one)) / (rows - 1)
    result = {"model": name, "side": side, "rows": rows, "saved_MB_per_row": saved / 1e6,
              "peak_MB_per_row": peak / 1e6}
    for budget, size in BUDGETS.items():
        result[f"knee {budget}"] = int(size // max(peak, saved))
    return result


def memory_rows(device) -> list[dict]:
    if device.type == "cuda":
        return [memory_row(name, device) for name in MODELS]
    rows = []
    for name in MODELS:  # a fresh process each: ru_maxrss only ever grows
        code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import scaling, torch; "
                f"torch.set_num_threads(1); print(repr(scaling.memory_row({name!r}, torch.device('cpu'))))")
        rows.append(eval(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                                        text=True).stdout.strip().splitlines()[-1]))
    return rows


def time_rows(device, quick: bool, repeats: int, clock: str) -> list[dict]:
    model = load("fmnist-cnn", device=device)
    methods = {
        "SmoothGrad": (lambda x, y, n: A.smoothgrad(model, x, y, n_samples=n, progress=False), 50),
        "IG": (lambda x, y, n: A.integrated_gradients(model, x, y, steps=n, progress=False), 50),
        "PGD L-inf": (lambda x, y, n: attacks.pgd(model, x, y, eps=0.1, steps=n), 20),
    }
    batches, counts = ((1, 8), (10, 50)) if quick else ((1, 8, 64), (10, 50, 100))
    settings = [(b, None) for b in batches] + [(8, n) for n in counts]
    rows = []
    for method, (call, default_n) in methods.items():
        for batch, n in settings:
            n = n or default_n
            x, y = _inputs("fmnist-cnn", batch, device)
            seconds, _, runs = measure({"labkit": lambda: call(x, y, n)}, device, repeats, clock, budget_s=1.0)
            rows.append({"method": method, "batch": batch, "N or steps": n, "seconds": seconds["labkit"],
                         "ms per row": 1e3 * seconds["labkit"] / (batch * n), "runs": runs})
    return rows


def table(rows: list[dict]) -> str:
    keys = list(rows[0])
    cell = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)
    return "\n".join(["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
                     + ["| " + " | ".join(cell(r[k]) for k in keys) + " |" for r in rows])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    parser.add_argument("--csv", default="scaling.csv", help="the time table as CSV (memory: *-memory.csv)")
    args = parser.parse_args(argv)
    device, clock = setup(args.threads, args.device, args.clock)
    times, memory = time_rows(device, args.quick, args.repeats, clock), memory_rows(device)
    print(f"device {device}, {torch.get_num_threads()} threads, {clock} time, fmnist-cnn")
    print(table(times))
    print("\nmemory per row (one forward + input backward; `rows` rows against 1), knee = budget / bytes per row")
    print(table(memory))
    for rows, path in ((times, Path(args.csv)), (memory, Path(args.csv).with_name(Path(args.csv).stem + "-memory.csv"))):
        write_csv(rows, path)
        print(f"written: {path}")


if __name__ == "__main__":
    main()
