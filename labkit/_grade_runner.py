"""Runs inside a submission's sandbox (``python .../labkit/_grade_runner.py``, not imported by labkit):
execute the notebook in a fresh kernel, then the grader's cell that calls the student's
functions on the grader's inputs (:func:`labkit._exchange.kernel_main`), and stream the result
to stdout, the grader's pipe, as frames (4-byte big-endian length, then the bytes): a JSON
header, then ``name``/``bytes`` pairs of the files the grader's cell wrote.

Everything this process sends is untrusted: it runs next to the student's code. The grader
parses it as JSON and ``.npy`` numbers only, with its own size limits, and judges it itself.
"""
import asyncio
import io
import json
import math
import os
import signal
import struct
import subprocess
import sys
import threading
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


def read_notebook(options: dict):
    """The submission (its copy in the sandbox's inputs), also written to the working folder as
    the notebook's own file, with its old outputs removed."""
    for folder in (options["workdir"], options["outbox"], os.environ.get("MPLCONFIGDIR", "/tmp")):
        Path(folder).mkdir(parents=True, exist_ok=True)
    source = Path(options["notebook"]).read_bytes().decode("utf-8")
    (Path(options["workdir"]) / options["name"]).write_text(source, encoding="utf-8")
    nb = nbformat.reads(source, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    return nb


def send_result(channel, header: dict, nb, options: dict) -> None:
    """The header, then the files the grader's cell wrote to the outbox, as frames."""
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


def main() -> None:
    options = json.loads(sys.argv[1])
    channel = os.fdopen(os.dup(1), "wb")
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)  # nothing else this process prints may reach the grader's pipe
    os.dup2(devnull, 2)
    nb = read_notebook(options)
    header = asyncio.run(execute(nb, options))
    send_result(channel, header, nb, options)


# ---------------------------------------------------------------- in-process (the zygote's child)

class GradeTimeout(BaseException):
    """Raised in the notebook's code at the time limit (as the kernel's interrupt is)."""


GradeTimeout.__name__ = TIMED_OUT_REPLY["ename"]


class Outputs:
    """A cell's outputs as nbclient keeps them, with the same cap on their total size: every
    stream write, display, update and result counts (its JSON content), past ``max_output``
    bytes they are dropped and one note says so."""

    def __init__(self, max_output: int):
        self.max_output, self.total, self.truncated = max_output, 0, False
        self.cell = []
        self.displays = {}  # display_id -> the outputs showing it
        self.lock = threading.RLock()

    def _over(self, content) -> bool:
        self.total += _content_size(content)
        if self.total <= self.max_output:
            return False
        if not self.truncated:
            self.truncated = True
            self.cell.append(nbformat.v4.new_output("stream", name="stderr", text=(
                f"\n[labkit.grade: output truncated, this notebook printed more than "
                f"{self.max_output // 1024} KB]\n")))
        return True

    def stream(self, name: str, text: str) -> None:
        with self.lock:
            if not text or self._over({"name": name, "text": text}):
                return
            if self.cell and self.cell[-1].get("output_type") == "stream" and self.cell[-1].get("name") == name:
                self.cell[-1]["text"] += text
            else:
                self.cell.append(nbformat.v4.new_output("stream", name=name, text=text))

    def display(self, output_type: str, data, metadata=None, transient=None, update=False, **extra) -> None:
        with self.lock:
            data, metadata = _jsonable(data), _jsonable(metadata)
            content = {"data": data, "metadata": metadata, "transient": transient or {}, **extra}
            if self._over(content):
                return
            display_id = (transient or {}).get("display_id")
            if update:
                for output in self.displays.get(display_id, []):
                    output["data"], output["metadata"] = data, metadata or {}
                return
            output = nbformat.from_dict({"output_type": output_type, "data": data, "metadata": metadata, **extra})
            self.cell.append(output)
            if display_id is not None:
                self.displays.setdefault(display_id, []).append(output)

    def error(self, ename: str, evalue: str, traceback: list) -> None:
        with self.lock:
            content = {"ename": ename, "evalue": evalue, "traceback": traceback}
            if not self._over(content):
                self.cell.append(nbformat.v4.new_output("error", **content))

    def clear(self) -> None:
        with self.lock:
            self.cell.clear()


def _jsonable(bundle) -> dict:
    """A display's data or metadata as ipykernel sends it: bytes (a PNG) base64-encoded, the rest JSON."""
    import base64
    cleaned = {}
    for key, value in (bundle if isinstance(bundle, dict) else {}).items():
        if isinstance(value, (bytes, bytearray)):
            value = base64.b64encode(value).decode("ascii")
        cleaned[str(key)] = value
    return json.loads(json.dumps(cleaned, default=str))


class _Stream(io.TextIOBase):
    def __init__(self, outputs: Outputs, name: str):
        self.outputs, self.name_ = outputs, name

    def writable(self):
        return True

    def write(self, text):
        if not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        self.outputs.stream(self.name_, text)
        return len(text)

    @property
    def encoding(self):
        return "utf-8"

    def isatty(self):
        return False


def shell_class():
    from IPython.core.displayhook import DisplayHook
    from IPython.core.displaypub import DisplayPublisher
    from IPython.core.interactiveshell import InteractiveShell

    class Hook(DisplayHook):
        """A cell's value as an ``execute_result`` output (as ipykernel's hook sends it)."""
        def write_output_prompt(self):
            pass

        def write_format_data(self, format_dict, md_dict=None):
            self.shell.outputs.display("execute_result", format_dict, md_dict,
                                       execution_count=self.shell.execution_count)

        def log_output(self, format_dict):
            pass

        def finish_displayhook(self):
            pass

    class Publisher(DisplayPublisher):
        def publish(self, data, metadata=None, source=None, *, transient=None, update=False, **kwargs):
            self.shell.outputs.display("display_data", data, metadata, transient, update)

        def clear_output(self, wait=False):
            self.shell.outputs.clear()

    class Shell(InteractiveShell):
        """IPython without a terminal: outputs into :class:`Outputs`, errors as error outputs,
        ``exit()`` ends the run as it ends a kernel."""
        outputs = None

        def init_displayhook(self):
            self.displayhook = Hook(shell=self, cache_size=self.cache_size)
            self.configurables.append(self.displayhook)
            self.display_trap = __import__("IPython.core.display_trap", fromlist=["x"]).DisplayTrap(hook=self.displayhook)

        def init_display_pub(self):
            self.display_pub = Publisher(shell=self, parent=self)
            self.configurables.append(self.display_pub)

        def _showtraceback(self, etype, evalue, stb):
            self.outputs.error(getattr(etype, "__name__", str(etype)), str(evalue), stb)

        def ask_exit(self):
            self.exit_now = True

        def enable_gui(self, gui=None):
            pass

    return Shell


def run_in_process(nb, options: dict) -> dict:
    """Run the notebook's cells and the grader's cell here; the same header as :func:`execute`."""
    from traitlets.config import Config
    header = {"problems": [], "cell_errors": []}
    outputs = Outputs(options["max_output"])
    config = Config()
    config.HistoryManager.enabled = False
    config.InteractiveShell.colors = "nocolor"
    config.InteractiveShell.xmode = "Context"
    shell = shell_class().instance(config=config)  # the instance: IPython.display looks for it
    shell.outputs = outputs
    sys.stdout, sys.stderr = _Stream(outputs, "stdout"), _Stream(outputs, "stderr")
    clock = {"armed": False, "fired": False}

    def alarm(signum, frame):
        if clock["armed"]:
            clock["fired"] = True
            raise GradeTimeout("interrupted at the time limit")

    signal.signal(signal.SIGALRM, alarm)

    def run(source: str, seconds: float, store_history: bool = True):
        """(result, timed out); the alarm repeats every half second until the cell ends."""
        clock["fired"] = False
        started = _now()
        signal.setitimer(signal.ITIMER_REAL, max(0.01, seconds), 0.5)
        clock["armed"] = True
        try:
            result = shell.run_cell(source, store_history=store_history, silent=False)
        finally:
            clock["armed"] = False
            signal.setitimer(signal.ITIMER_REAL, 0)
        timing["shell.execute_reply.started"], timing["shell.execute_reply"] = started, _now()
        return result, clock["fired"]

    def note(result, number: int) -> None:
        err = result.error_before_exec or result.error_in_exec
        if err is not None and not isinstance(err, GradeTimeout):
            message = f"{type(err).__name__}: {err}".strip()
            header["cell_errors"].append((number, message.splitlines()[0][:200] if message else ""))

    deadline = time.monotonic() + options["timeout"]
    count, timing = 0, {}
    for index, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        outputs.cell = cell.outputs
        count += 1
        cell.execution_count = count
        timing = cell.metadata.setdefault("execution", {})  # as nbclient records it
        result, timed_out = run(cell.source, deadline - time.monotonic())
        if shell.exit_now:  # exit() ends a kernel, and nbclient's run with it
            header["problems"].append((KERNEL_DIED, f"the kernel died in cell {index + 1} (a crash, exit() "
                                                    f"or the memory limit)"))
            break
        if timed_out:
            header["problems"].append((TIMEOUT, f"timeout: stopped after {options['timeout']} s, in cell {index + 1}"))
            break
        note(result, index + 1)
    if not shell.exit_now:  # the grader's cell, also after a cell that ran out of time (as with nbclient)
        cell = nbformat.v4.new_code_cell(grader_cell(options["io"], options["outbox"], options["workdir"]))
        nb.cells.append(cell)
        outputs.cell = cell.outputs
        timing = cell.metadata.setdefault("execution", {})
        result, timed_out = run(cell.source, options["timeout"], store_history=False)
        if timed_out:
            header["problems"].append((TIMEOUT, f"timeout: the checks did not finish within {options['timeout']} s"))
        elif result.error_before_exec or result.error_in_exec:
            note(result, len(nb.cells))
            if header["cell_errors"]:
                number, message = header["cell_errors"].pop()
                header["problems"].append(("grader error", f"the grader's cell raised {message}"))
    sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
    header["truncated"] = outputs.truncated
    return header


def _now() -> str:
    import datetime
    return datetime.datetime.now(datetime.timezone.utc).isoformat().replace("+00:00", "Z")


def main_in_process(options: dict, channel) -> None:
    """The zygote's child, inside the sandbox: what :func:`main` does, without a kernel."""
    nb = read_notebook(options)
    os.chdir(options["workdir"])  # where the kernel starts (bwrap's --chdir for the kernel runner)
    import tempfile
    tempfile.tempdir = None
    tempfile.gettempdir()  # chosen now, as a kernel does when it starts: later /tmp may be full
    header = run_in_process(nb, options)
    send_result(channel, header, nb, options)


if __name__ == "__main__":
    main()
