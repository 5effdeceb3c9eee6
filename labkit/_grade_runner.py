"""Runs inside a submission's sandbox (``python .../labkit/_grade_runner.py``, not imported by labkit):
execute the notebook in a fresh kernel, then the grader's cell that calls the student's
functions on the grader's inputs (:func:`labkit._exchange.kernel_main`), and stream the result
to stdout, the grader's pipe, as frames (4-byte big-endian length, then the bytes): a JSON
header, then ``name``/``bytes`` pairs of the files the grader's cell wrote.

Everything this process sends is untrusted: it runs next to the student's code. The grader
parses it as JSON and ``.npy`` numbers only, with its own size limits, and judges it itself.
"""
import asyncio
import json
import math
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import nbformat

TIMED_OUT_REPLY = {"ename": "LabkitGradeTimeout", "evalue": "interrupted at the time limit", "traceback": []}
OK, TIMEOUT, KERNEL_DIED = "ok", "timeout", "kernel died"

# The kernel: no core files, an address-space limit when asked, then ipykernel as usual.
KERNEL_LAUNCHER = """\
import resource, runpy, sys
limit = int(sys.argv.pop(1))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
if limit > 0:
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
runpy.run_module("ipykernel_launcher", run_name="__main__", alter_sys=True)
"""


def _content_size(content) -> int:
    """What a message adds to the notebook: all of its content (text, data, metadata, comm state)."""
    return len(json.dumps(content, default=str))


def client_class():
    from nbclient import NotebookClient

    class CappedClient(NotebookClient):
        """nbclient's client that keeps at most ``max_output`` bytes of outputs (display data,
        updates, metadata and widget comm messages all count) and notes every cell error."""

        def __init__(self, nb, max_output: int, **kw):
            super().__init__(nb, **kw)
            self.max_output, self.output_bytes, self.cell_errors = max_output, 0, []
            self.running_cell, self.timed_out, self.truncated = "startup", False, False
            self.on_cell_error = self._note_error

        def _over(self, msg) -> bool:
            self.output_bytes += _content_size(msg.get("content", {})) + sum(
                len(buffer) for buffer in msg.get("buffers") or ())
            return self.output_bytes > self.max_output

        def output(self, outs, msg, display_id, cell_index):
            if not self._over(msg):
                return super().output(outs, msg, display_id, cell_index)
            if not self.truncated:
                self.truncated = True
                outs.append(nbformat.v4.new_output("stream", name="stderr", text=(
                    f"\n[labkit.grade: output truncated, this notebook printed more than "
                    f"{self.max_output // 1024} KB]\n")))
            return None

        def handle_comm_msg(self, outs, msg, cell_index):
            if not self._over(msg):
                return super().handle_comm_msg(outs, msg, cell_index)
            return None

        def _update_display_id(self, display_id, msg):
            # an update replaces outputs already kept: it counts here (a new display counts in output())
            over = self._over(msg) if msg["msg_type"] == "update_display_data" else self.output_bytes > self.max_output
            if not over:
                return super()._update_display_id(display_id, msg)
            return None

        def _note_error(self, cell, cell_index, execute_reply):
            content = execute_reply["content"]
            if content.get("ename") == TIMED_OUT_REPLY["ename"]:
                self.timed_out = True
                return
            message = f"{content.get('ename', 'Error')}: {content.get('evalue', '')}".strip()
            self.cell_errors.append((cell_index + 1, message.splitlines()[0][:200] if message else ""))

    return CappedClient


def kernel_manager(memory_bytes: int):
    from jupyter_client import AsyncKernelManager
    from jupyter_client.kernelspec import KernelSpec, KernelSpecManager

    class GraderKernel(KernelSpecManager):
        """Always this Python with the limits, whatever a notebook's metadata names."""
        def get_kernel_spec(self, kernel_name):
            return KernelSpec(argv=[sys.executable, "-c", KERNEL_LAUNCHER, str(memory_bytes), "-f",
                                    "{connection_file}", "--HistoryManager.hist_file=:memory:"],
                              display_name="labkit grader", language="python", interrupt_mode="signal")

    return AsyncKernelManager(kernel_name="labkit-grader", kernel_spec_manager=GraderKernel())


async def run_cells(client, deadline: float):
    for index, cell in enumerate(client.nb.cells):
        client.timeout = max(1, math.ceil(deadline - time.monotonic()))
        client.running_cell, client.timed_out = f"cell {index + 1}", False
        await client.async_execute_cell(cell, index, execution_count=client.code_cells_executed + 1)
        if client.timed_out:
            return index + 1
    return None


def grader_cell(io: str, outbox: str, workdir: str) -> str:
    return ("import importlib as _labkit_importlib\n"
            f"_labkit_importlib.import_module('labkit._exchange').kernel_main(globals(), {io!r}, {outbox!r}, {workdir!r})\n")


async def execute(nb, options: dict) -> dict:
    from nbclient.exceptions import DeadKernelError
    header = {"problems": [], "cell_errors": []}
    client = client_class()(nb, km=kernel_manager(options["memory_bytes"]), max_output=options["max_output"],
                            allow_errors=True, shutdown_kernel="immediate", startup_timeout=120,
                            interrupt_on_timeout=True, error_on_timeout=TIMED_OUT_REPLY)
    env = dict(os.environ)
    try:
        async with client.async_setup_kernel(cleanup_kc=True, cwd=options["workdir"], env=env,
                                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL):
            interrupted = await run_cells(client, time.monotonic() + options["timeout"])
            if interrupted:
                header["problems"].append((TIMEOUT, f"timeout: stopped after {options['timeout']} s, "
                                                    f"in cell {interrupted}"))
            nb.cells.append(nbformat.v4.new_code_cell(grader_cell(options["io"], options["outbox"],
                                                                  options["workdir"])))
            client.timeout, client.running_cell = options["timeout"], "the grader's checks"
            await client.async_execute_cell(nb.cells[-1], len(nb.cells) - 1, store_history=False)
            if client.timed_out:
                header["problems"].append((TIMEOUT, f"timeout: the checks did not finish within "
                                                    f"{options['timeout']} s"))
            elif client.cell_errors and client.cell_errors[-1][0] == len(nb.cells):
                number, message = client.cell_errors.pop()
                header["problems"].append(("grader error", f"the grader's cell raised {message}"))
    except DeadKernelError:
        header["problems"].append((KERNEL_DIED, f"the kernel died in {client.running_cell} (a crash, "
                                                f"exit() or the memory limit)"))
    finally:
        if client.km is not None and client.km.has_kernel:
            await client.km.shutdown_kernel(now=True)
    header["cell_errors"] = client.cell_errors
    header["truncated"] = client.truncated
    return header


def send(stream, data: bytes) -> None:
    stream.write(struct.pack(">I", len(data)) + data)


def main() -> None:
    options = json.loads(sys.argv[1])
    channel = os.fdopen(os.dup(1), "wb")
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)  # nothing else this process prints may reach the grader's pipe
    os.dup2(devnull, 2)
    for folder in (options["workdir"], options["outbox"], os.environ.get("MPLCONFIGDIR", "/tmp")):
        Path(folder).mkdir(parents=True, exist_ok=True)
    source = Path(options["notebook"]).read_bytes().decode("utf-8")
    (Path(options["workdir"]) / options["name"]).write_text(source, encoding="utf-8")
    nb = nbformat.reads(source, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    header = asyncio.run(execute(nb, options))
    if options.get("keep_executed"):
        header["executed"] = nbformat.writes(nb)
    outbox = Path(options["outbox"])
    files = [p for p in sorted(outbox.iterdir()) if p.is_file() and not p.is_symlink()] if outbox.is_dir() else []
    header["files"] = [p.name for p in files]
    send(channel, json.dumps(header).encode())
    for path in files:
        send(channel, path.name.encode())
        send(channel, path.read_bytes())
    channel.flush()


if __name__ == "__main__":
    main()
