"""Red team: hostile submissions against the sandboxed grader, one per attack class.

One run of ``python -m labkit.grade`` (``--jobs 2``) grades honest notebooks next to the
attackers: a small stand-in lesson (``90_tiny``: one ``check_gradient`` exercise, no data, no
big model) for most attacks, and the real lesson 01 for the wrapper forgery and the solution.
Each test asserts the attacker's row and that the honest rows are exactly what they are when
graded alone (pass where correct, not-implemented fails for the untouched notebook), and after
the run that nothing outside the grader's outputs changed: the submissions, labkit's files,
the gradebook after the grader exited, no process left. Two more runs kill the grader (SIGTERM,
SIGKILL) in the middle: the previous gradebook stays, no sandbox outlives it.

Needs bubblewrap (``scripts/env.sh`` installs it with the test setup); skipped without it.
"""
from __future__ import annotations

import csv
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from labkit import grade, sandbox
from labkit.notebooks import student_notebook

ROOT = Path(__file__).resolve().parents[1]
LESSON_01 = ROOT / "solutions" / "01_gradient_saliency.ipynb"
TIMEOUT = 40
MEMORY_MB = 1536
TMPFS_MB = 256
MARKER = "labkit-redteam-leftover"  # in the command line of every process an attacker leaves behind

pytestmark = [pytest.mark.grading,
              pytest.mark.skipif(sandbox.bwrap_works() is not None,
                                 reason=f"no sandbox here: {sandbox.bwrap_works()}")]

SOLUTION = """\
def gradient(model, x, target):
    ### BEGIN SOLUTION
    x = x.detach().clone().requires_grad_(True)
    logits = model(x)
    (grad,) = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), x)
    return grad
    ### END SOLUTION"""


def tiny_lesson() -> nbformat.NotebookNode:
    return new_notebook(cells=[
        new_markdown_cell("# 90 A tiny lesson for the red team"),
        new_code_cell("import torch\nimport labkit\nfrom labkit.checks import check_gradient"),
        new_code_cell(SOLUTION),
        new_code_cell("check_gradient(gradient)"),
    ], metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}})


def tiny_lesson_using_labkit() -> nbformat.NotebookNode:
    """The tiny lesson whose notebook itself calls labkit's ``attribution.gradient`` after the
    exercise, so the sandbox's copy must keep it: it is withheld only while the grader calls the
    student's functions."""
    nb = tiny_lesson()
    nb.cells[0].source = "# 91 A tiny lesson that uses labkit's own gradient"
    nb.cells.append(new_code_cell("from labkit import attribution\n"
                                  "demo = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))\n"
                                  "print(attribution.gradient(demo, torch.ones(1, 1, 2, 2), 1).shape)"))
    return nb


def attack(source: str, solution: bool = True) -> nbformat.NotebookNode:
    """The tiny lesson's solution (or its student version) followed by the attacker's cell."""
    nb = tiny_lesson() if solution else student_notebook(tiny_lesson())
    nb.cells.append(new_code_cell(textwrap.dedent(source)))
    return nb


def attacks(secrets: dict) -> dict[str, nbformat.NotebookNode]:
    """``{student: notebook}``: the attackers of the tiny lesson; ``secrets`` are the grader's
    paths and a port it listens on, which no sandbox may reach."""
    paths = [str(p) for p in secrets["paths"]]
    return {
        # ---- forging a pass from inside the kernel (none of these has its own gradient)
        "forge_wrapper": attack("""\
            from labkit import attribution
            gradient = lambda model, x, target: attribution.gradient(model, x, target)
            """, solution=False),
        "forge_private_helper": attack("""\
            from labkit.attribution import gradients
            def gradient(model, x, target):
                return gradients._logit_gradient(model, x, target)
            """, solution=False),
        "forge_thread": attack("""\
            import threading
            from labkit import attribution
            def gradient(model, x, target):
                box = []
                worker = threading.Thread(target=lambda: box.append(attribution.gradient(model, x, target)))
                worker.start(); worker.join()
                return box[0]
            """, solution=False),
        "forge_source": attack("""\
            import inspect, labkit.attribution.gradients as module
            namespace = {"__name__": module.__name__, "__package__": module.__package__}
            exec(inspect.getsource(module), namespace)   # labkit's own source, as the sandbox has it
            gradient = lambda model, x, target: namespace["gradient"](model, x, target)
            """, solution=False),
        "forge_subclass": attack("""\
            class Always(torch.Tensor):
                @classmethod
                def __torch_function__(cls, func, types, args=(), kwargs=None):
                    if func.__name__ in ("allclose", "equal", "__eq__", "isclose", "le", "__le__"):
                        return True
                    return super().__torch_function__(func, types, args, kwargs or {})
            def gradient(model, x, target):
                return torch.zeros_like(x).as_subclass(Always)
            """, solution=False),
        "forge_profiler_and_frames": attack("""\
            import sys
            stolen = {}
            def spy(frame, event, arg):   # when the checks' functions run, take the expected answer
                if event == "call" and frame.f_code.co_name in ("kernel_main", "call_student", "_run_student",
                                                                "judge_case", "_check_case", "gradient"):
                    caller = frame
                    while caller is not None:
                        for name in ("ref", "expected", "reference", "out"):
                            if isinstance(caller.f_locals.get(name), torch.Tensor):
                                stolen["ref"] = caller.f_locals[name]
                        caller = caller.f_back
            sys.setprofile(spy)
            threading_profile = __import__("threading").setprofile(spy)
            def gradient(model, x, target):
                return stolen.get("ref", torch.zeros_like(x)).clone()
            """, solution=False),
        "forge_patch_engine_and_files": attack("""\
            import json, os, threading, time
            import labkit.checks._engine as engine
            engine.judge_case = lambda *a, **k: None
            engine.close = lambda *a, **k: True
            def fake():  # keep claiming passes wherever results could go
                while True:
                    for folder in ("/labkit-out", "/tmp", "."):
                        try:
                            with open(os.path.join(folder, "result.json"), "w") as f:
                                json.dump([{"check": "check_gradient", "passed": True, "hint": ""}], f)
                        except OSError:
                            pass
                    time.sleep(0.01)
            threading.Thread(target=fake, daemon=True).start()
            print("✅ check_gradient: passed")
            """, solution=False),
        "forge_channel": attack("""\
            import os
            for pid in os.listdir("/proc"):   # write a fake answer into every pipe of the sandbox
                if pid.isdigit() and int(pid) != os.getpid():
                    for fd in os.listdir(f"/proc/{pid}/fd"):
                        try:
                            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("pipe:"):
                                with open(f"/proc/{pid}/fd/{fd}", "wb") as out:
                                    out.write(b"\\x00\\x00\\x00\\x02{}" * 100)
                        except OSError:
                            pass
            """, solution=False),
        # ---- reading what it must not (a cell error names what it could read)
        "read_secrets": attack(f"""\
            import os, socket
            found = [p for p in {paths!r} if os.path.exists(p)]
            assert not found, f"could read {{found}}"
            assert "{secrets['env']}" not in os.environ, "the grader's environment is visible"
            try:
                socket.create_connection(("127.0.0.1", {secrets['port']}), timeout=2).close()
                reached = True
            except OSError:
                reached = False
            assert not reached, "reached the grader's network"
            """),
        # ---- writing what it must not
        "write_outside": attack(f"""\
            import os, glob
            import labkit
            targets = [*glob.glob(os.path.dirname(labkit.__file__) + "/**/*.py", recursive=True),
                       *{paths!r}, "/usr/lib/evil", "/etc/passwd", "/evil", "/dev/evil", "/labkit-io/evil",
                       "/labkit-io/manifest.json", "/opt/labkit-view/evil"]
            written = []
            for path in targets:
                try:
                    with open(path, "a") as f:
                        f.write("# tampered")
                    written.append(path)
                except OSError:
                    pass
            assert not written, f"could write {{written[:3]}}"
            """),
        # ---- leaving processes behind
        "leave_processes": attack(f"""\
            import os, subprocess, sys
            subprocess.Popen(["{MARKER}", "600"], executable="sleep", start_new_session=True)
            if os.fork() == 0:   # a double-forked daemon
                os.setsid()
                if os.fork() == 0:
                    os.execvp("sleep", ["{MARKER}", "601"])
                os._exit(0)
            """),
        # ---- exhausting resources
        "memory_many_processes": attack("""\
            import subprocess, sys
            hog = "b = bytearray(600 * 2**20)\\nfor i in range(0, len(b), 4096): b[i] = 1\\nimport time; time.sleep(5)"
            children = [subprocess.Popen([sys.executable, "-c", hog]) for _ in range(4)]
            for child in children:
                child.wait()
            """),
        "memory_dev_shm": attack(f"""\
            chunk = b"x" * 2**20
            with open("/dev/shm/hog", "wb") as f:
                for _ in range({TMPFS_MB + 64}):
                    f.write(chunk)
            """),
        "disk_tmp": attack(f"""\
            chunk = b"x" * 2**20
            with open("fill.bin", "wb") as f:   # the working copy lives on /tmp
                for _ in range({TMPFS_MB + 64}):
                    f.write(chunk)
            """),
        "processes_fork_bomb": attack("""\
            import subprocess
            children = []
            try:
                while True:
                    children.append(subprocess.Popen(["sleep", "600"]))
            finally:
                for child in children:
                    child.kill()
                    child.wait()
            """),
        "output_flood": attack("""\
            from IPython.display import display
            handle = display("start", display_id=True)
            for i in range(3000):
                handle.update("u" * 2000)
            display({"text/plain": "m"}, raw=True, metadata={"big": "x" * 3_000_000})
            from ipykernel.comm import Comm
            comm = Comm(target_name="labkit-redteam", data={"state": {"v": "s" * 100_000}})
            for _ in range(50):
                comm.send({"state": {"v": "s" * 100_000}, "method": "update"})
            for _ in range(300):
                print("p" * 100_000)
            """),
        "time_in_function": attack("""\
            def gradient(model, x, target):
                while True:
                    pass
            """),
        # ---- the walls themselves, and the zygote (the fast runner's pre-warmed process)
        "walls": attack("""\
            import ctypes, os, socket
            status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines())
            for key in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
                assert int(status[key], 16) == 0, f"{key} = {status[key].strip()}"
            assert status["NoNewPrivs"].strip() == "1", "no_new_privs is not set"
            assert socket.gethostname() == "sandbox", socket.gethostname()
            libc = ctypes.CDLL(None, use_errno=True)
            assert libc.mount(b"none", b"/tmp", b"tmpfs", 0, None) != 0, "could mount"
            assert libc.unshare(0x00020000) != 0, "could make a mount namespace"
            """),
        "zygote_hunt": attack(f"""\
            import os, signal
            me = os.getpid()
            visible = {{int(p) for p in os.listdir("/proc") if p.isdigit()}}
            # the sandbox's own processes only (bwrap's, the runner or placeholder, this one)
            assert len(visible) <= 6, f"sees {{len(visible)}} processes"
            for pid in visible - {{me}}:
                command = open(f"/proc/{{pid}}/cmdline", "rb").read()
                assert b"_zygote" not in command and b"labkit.grade" not in command, command[:200]
            reachable = []
            for pid in range(1, 1 << 16):   # a process outside the PID namespace has no number here
                try:
                    os.kill(pid, 0)
                    reachable.append(pid)
                except OSError:
                    pass
            tasks = {{int(t) for p in visible for t in os.listdir(f"/proc/{{p}}/task")}}   # threads too
            assert set(reachable) <= tasks, f"can signal {{sorted(set(reachable) - tasks)[:5]}}"
            shared = [line for line in open("/proc/self/maps") if line.split()[1][1:4:2] == "ws"]
            assert not shared, f"memory shared writable with another process: {{shared[:2]}}"
            import re   # the grader's environment as a process's environment block holds it
            secret = re.compile(rb"{secrets['env'][:-1]}[{secrets['env'][-1]}]=")   # (not itself a match)
            found = []
            with open("/proc/self/maps") as maps, open("/proc/self/mem", "rb", 0) as mem:
                for line in maps:   # every writable page this process has (copied from its parent)
                    span, perms = line.split()[:2]
                    if perms[:2] != "rw":
                        continue
                    start, end = (int(v, 16) for v in span.split("-"))
                    try:
                        mem.seek(start)
                        if secret.search(mem.read(end - start)):
                            found.append(line.strip())
                    except (OSError, OverflowError, ValueError):
                        pass
            assert not found, f"the grader's secret is in this process's memory: {{found[:2]}}"
            """),
        # ---- attacking the grader process
        "kill_grader": attack("""\
            import os, signal
            visible = [p for p in os.listdir("/proc") if p.isdigit()]
            for pid in visible:
                try:
                    if b"labkit.grade" in open(f"/proc/{pid}/cmdline", "rb").read():
                        os.kill(int(pid), signal.SIGTERM)
                except OSError:
                    pass
            os.kill(os.getppid(), signal.SIGTERM)
            os.kill(-1, signal.SIGKILL)   # everything this process may signal
            """),
    }


def real_lesson_wrapper() -> nbformat.NotebookNode:
    """Lesson 01's solution with its gradient replaced by a call of labkit's own."""
    nb = nbformat.read(LESSON_01, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code" and cell.source.startswith("def gradient("):
            cell.source = ("def gradient(model, x, target):\n"
                           "    return attribution.gradient(model, x, target)")
    return nb


def digest_tree(folder: Path) -> dict:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*"))
            if p.is_file() and "__pycache__" not in p.parts}


def leftovers() -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if MARKER.encode() in (entry / "cmdline").read_bytes():
                    found.append(entry.name)
            except OSError:
                pass
    return found


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("redteam")
    lessons, subs = folder / "lessons", folder / "submissions"
    lessons.mkdir()
    nbformat.write(tiny_lesson(), lessons / "90_tiny.ipynb")
    nbformat.write(tiny_lesson_using_labkit(), lessons / "91_tiny_uses.ipynb")
    shutil.copy(LESSON_01, lessons / LESSON_01.name)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    out = folder / "out" / "grades.csv"
    env_secret, env_value = "LABKIT_REDTEAM_SECRET", "hunter2-" + os.urandom(8).hex()
    secrets = {"paths": [lessons / "90_tiny.ipynb", LESSON_01, ROOT / "solutions", out.parent,
                         subs / "honest" / "90_tiny.ipynb", Path(grade.__file__), folder, Path.home() / ".cache"],
               "env": env_secret, "env_value": env_value, "port": listener.getsockname()[1]}
    notebooks = {"honest": tiny_lesson(), "honest_untouched": student_notebook(tiny_lesson()),
                 "fair_global_state": attack("""\
                     import os
                     torch.set_grad_enabled(False)          # state a notebook may leave behind
                     torch.set_default_dtype(torch.float64)
                     torch.set_num_threads(3)
                     torch.manual_seed(123)
                     os.makedirs("/tmp/elsewhere", exist_ok=True)
                     os.chdir("/tmp/elsewhere")
                     """),
                 **attacks(secrets)}
    for student, nb in notebooks.items():
        (subs / student).mkdir(parents=True)
        nbformat.write(nb, subs / student / "90_tiny.ipynb")
    for student, nb in {"real_solution": nbformat.read(LESSON_01, as_version=4),
                        "real_wrapper": real_lesson_wrapper()}.items():
        (subs / student).mkdir(parents=True)
        nbformat.write(nb, subs / student / LESSON_01.name)
    wrapper = student_notebook(tiny_lesson_using_labkit())
    wrapper.cells.append(new_code_cell("bound_early = attribution.gradient   # a name taken before grading\n"
                                       "gradient = lambda model, x, target: bound_early(model, x, target)"))
    for student, nb in {"uses_honest": tiny_lesson_using_labkit(), "uses_wrapper": wrapper}.items():
        (subs / student).mkdir(parents=True)
        nbformat.write(nb, subs / student / "91_tiny_uses.ipynb")
    (subs / "honest" / ".hidden.ipynb").write_text("{}")
    (subs / "honest" / "notes.txt").write_text("not a notebook")
    (subs / "linked.ipynb").symlink_to(LESSON_01)
    before = {"submissions": digest_tree(subs), "labkit": digest_tree(ROOT / "labkit")}
    out.parent.mkdir()
    out.write_text("the previous gradebook\n")
    command = [sys.executable, "-m", "labkit.grade", str(subs), "--lessons", str(lessons), "--out", str(out),
               "--summary", str(folder / "out" / "summary"), "--executed", str(folder / "out" / "executed"),
               "--jobs", "2", "--timeout", str(TIMEOUT), "--memory", str(MEMORY_MB), "--tmpfs", str(TMPFS_MB),
               "--pids", "128", "--max-output", "256", "--no-progress", "--sandbox", "bwrap"]
    started = time.monotonic()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=900,
                              env={**os.environ, env_secret: env_value})
    finally:
        listener.close()
    assert done.returncode == 0, done.stderr[-3000:]
    gradebook = out.read_bytes()
    time.sleep(3)  # anything left behind would have a moment to change the files
    with open(out, newline="", encoding="utf-8") as file:
        rows = {row["student"]: row for row in csv.DictReader(file)}
    return SimpleNamespace(rows=rows, folder=folder, log=done.stderr, before=before, subs=subs, out=out,
                           gradebook=gradebook, seconds=time.monotonic() - started,
                           executed=folder / "out" / "executed")


def assert_passes(row, score="1.000"):
    assert row["check_gradient"] == "pass" and row["score"] == score, row


def test_global_state_left_by_a_notebook_does_not_fail_a_correct_function(run):
    row = run.rows["fair_global_state"]
    assert row["status"] == "ok", row
    assert_passes(row)


def test_honest_rows_are_unchanged_by_the_attackers_next_to_them(run):
    assert_passes(run.rows["honest"])
    assert run.rows["honest"]["status"] == "ok", run.rows["honest"]
    untouched = run.rows["honest_untouched"]
    assert untouched["check_gradient"] == "fail" and untouched["status"] in ("ok", "cell errors")
    real = run.rows["real_solution"]
    assert (real["check_gradient"], real["check_gradient_x_input"], real["check_saliency_map"],
            real["status"]) == ("pass", "pass", "pass", "ok"), real
    assert (run.executed / "honest.ipynb").is_file()


@pytest.mark.parametrize("student", ["forge_wrapper", "forge_private_helper", "forge_thread", "forge_source",
                                     "forge_subclass", "forge_profiler_and_frames",
                                     "forge_patch_engine_and_files", "forge_channel"])
def test_forging_from_inside_the_kernel_fails(run, student):
    row = run.rows[student]
    assert row["check_gradient"] != "pass" and row["score"] == "0.000", row


def test_wrapping_labkits_function_in_the_real_lesson_01_fails(run):
    row = run.rows["real_wrapper"]
    assert row["check_gradient"] == "fail", row
    summary = (run.folder / "out" / "summary" / "real_wrapper.md").read_text(encoding="utf-8")
    assert "not available while lesson 01_gradient_saliency is graded" in summary


def test_a_labkit_function_the_lesson_itself_uses_is_withheld_while_the_student_is_called(run):
    assert_passes(run.rows["uses_honest"])
    assert run.rows["uses_honest"]["status"] == "ok", run.rows["uses_honest"]
    row = run.rows["uses_wrapper"]
    assert row["check_gradient"] == "fail" and row["score"] == "0.000", row
    summary = (run.folder / "out" / "summary" / "uses_wrapper.md").read_text(encoding="utf-8")
    assert "not available while the grader calls your functions" in summary
    assert "lesson 91_tiny_uses uses labkit's" in run.log


def test_nothing_of_the_grader_is_readable_or_reachable(run):
    row = run.rows["read_secrets"]
    assert row["status"] == "ok" and row["error"] == "", row
    assert_passes(row)


def test_nothing_outside_the_scratch_folder_is_writable(run):
    row = run.rows["write_outside"]
    assert row["status"] == "ok" and row["error"] == "", row
    assert_passes(row)
    assert digest_tree(run.subs) == run.before["submissions"]
    assert digest_tree(ROOT / "labkit") == run.before["labkit"]
    assert run.out.read_bytes() == run.gradebook  # nothing rewrote it after the grader exited


def test_no_process_outlives_its_row(run):
    row = run.rows["leave_processes"]
    assert row["status"] == "ok", row
    assert_passes(row)
    assert leftovers() == []


@pytest.mark.parametrize("student", ["memory_many_processes"])
def test_memory_of_all_processes_together_is_capped(run, student):
    row = run.rows[student]
    assert row["status"] == "memory limit", row


def test_dev_shm_and_disk_are_capped(run):
    for student in ("memory_dev_shm", "disk_tmp"):
        row = run.rows[student]
        assert row["status"] == "cell errors" and "No space left on device" in row["error"], row
        assert_passes(row)


def test_process_count_is_capped(run):
    row = run.rows["processes_fork_bomb"]
    assert row["status"] == "cell errors" and "Resource temporarily unavailable" in row["error"], row
    assert_passes(row)


def test_output_display_updates_metadata_and_comms_are_capped(run):
    row = run.rows["output_flood"]
    assert row["status"] == "ok", row
    assert_passes(row)
    executed = run.executed / "output_flood.ipynb"
    assert executed.stat().st_size < 512 * 1024  # --max-output 256 KB; the notebook sent over 30 MB
    assert "[labkit.grade: output truncated" in executed.read_text(encoding="utf-8")


def test_a_function_that_never_returns_times_out_alone(run):
    row = run.rows["time_in_function"]
    assert row["status"] == "timeout" and "the checks did not finish" in row["error"], row
    assert row["check_gradient"] in ("", "fail")


def test_signalling_the_grader_costs_only_its_own_row(run):
    row = run.rows["kill_grader"]
    assert row["status"] in ("kernel died", "sandbox died"), row
    assert "labkit.grade" not in row["error"]


def test_the_walls_hold_no_capability_no_mount_and_the_sandbox_hostname(run):
    row = run.rows["walls"]
    assert row["status"] == "ok" and row["error"] == "", row
    assert_passes(row)


def test_the_zygote_is_out_of_sight_and_its_memory_has_no_secret(run):
    """Nothing outside the sandbox can be signalled (the zygote, its child, the grader), and the
    memory the submission's process inherited holds none of the grader's environment, and none
    of it is shared writable with another process (the zygote, whose next children it would reach)."""
    row = run.rows["zygote_hunt"]
    assert row["status"] == "ok" and row["error"] == "", row
    assert_passes(row)


def test_skipped_files_are_listed(run):
    for name in (".hidden.ipynb", "notes.txt", "linked.ipynb"):
        assert f"skipped {run.subs}" in run.log and name in run.log, run.log[-2000:]
    assert "linked" not in run.rows


def test_every_row_carries_the_hash_of_what_was_handed_in(run):
    for student, row in run.rows.items():
        expected = hashlib.sha256(Path(row["notebook"]).read_bytes()).hexdigest()
        assert row["sha256"] == expected, student


def grade_one(tmp_path, nb, *flags) -> dict:
    """The row of ``nb`` (a submission of the tiny lesson) graded alone with ``flags``."""
    subs = tmp_path / "subs"
    subs.mkdir()
    nbformat.write(nb, subs / "90_tiny.ipynb")
    nbformat.write(tiny_lesson(), tmp_path / "90_tiny.ipynb")
    done = subprocess.run([sys.executable, "-m", "labkit.grade", str(subs), "--lessons", str(tmp_path / "90_tiny.ipynb"),
                           "--out", str(tmp_path / "g.csv"), "--no-progress", "--sandbox", "bwrap",
                           "--memory", str(MEMORY_MB), "--timeout", str(TIMEOUT), *flags],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    with open(tmp_path / "g.csv", newline="", encoding="utf-8") as file:
        return next(csv.DictReader(file))


def test_without_cgroups_the_watchdog_caps_memory_of_all_processes(tmp_path):
    hog = attacks({"paths": [], "env": "X", "env_value": "x", "port": 1})["memory_many_processes"]
    row = grade_one(tmp_path, hog, "--no-cgroups")
    assert row["status"] == "memory limit", row


POISON = f"""\
import builtins, os, signal, subprocess, sys, numpy, torch
torch.nn.functional.relu = lambda *args, **kwargs: 0      # modules the zygote had imported
torch.labkit_poison = numpy.labkit_poison = builtins.labkit_poison = True
sys.modules["labkit_poison"] = numpy
os.environ["LABKIT_POISON"] = "1"
open("/tmp/labkit_poison", "w").write("x")
open("/dev/shm/labkit_poison", "w").write("x")
subprocess.Popen(["{MARKER}", "600"], executable="sleep", start_new_session=True)
for pid in range(2, 1 << 16):   # every process it can signal, its own sandbox's included
    if pid != os.getpid():
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
"""

VICTIM = f"""\
import builtins, os, sys, numpy, torch
assert not any(hasattr(m, "labkit_poison") for m in (torch, numpy, builtins)), "poisoned modules"
assert "labkit_poison" not in sys.modules and "LABKIT_POISON" not in os.environ
assert torch.nn.functional.relu(torch.tensor([-1.0, 2.0])).tolist() == [0.0, 2.0]
assert not os.path.exists("/tmp/labkit_poison") and not os.path.exists("/dev/shm/labkit_poison")
for pid in (p for p in os.listdir("/proc") if p.isdigit()):
    assert b"{MARKER}" not in open(f"/proc/{{pid}}/cmdline", "rb").read(), "a process of the row before"
"""


@pytest.mark.parametrize("runner", ["zygote", "kernel"])
def test_nothing_of_one_row_reaches_the_next(tmp_path, runner):
    """One after the other (--jobs 1): a row that patches modules, sets the environment, leaves
    files, a process and signals whatever it can, then an honest row that checks for all of it."""
    subs = tmp_path / "subs"
    for student, nb in (("a_poison", attack(POISON)), ("b_victim", attack(VICTIM))):
        (subs / student).mkdir(parents=True)
        nbformat.write(nb, subs / student / "90_tiny.ipynb")
    nbformat.write(tiny_lesson(), tmp_path / "90_tiny.ipynb")
    done = subprocess.run([sys.executable, "-m", "labkit.grade", str(subs), "--lessons", str(tmp_path / "90_tiny.ipynb"),
                           "--out", str(tmp_path / "g.csv"), "--no-progress", "--sandbox", "bwrap", "--jobs", "1",
                           "--runner", runner, "--memory", str(MEMORY_MB), "--timeout", str(TIMEOUT)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    with open(tmp_path / "g.csv", newline="", encoding="utf-8") as file:
        rows = {row["student"]: row for row in csv.DictReader(file)}
    assert rows["a_poison"]["status"] in ("kernel died", "sandbox died"), rows["a_poison"]
    victim = rows["b_victim"]
    assert victim["status"] == "ok" and victim["error"] == "", victim
    assert_passes(victim)
    assert leftovers() == []


def test_dev_shm_counts_in_the_memory_limit(tmp_path):
    """/dev/shm larger than the memory limit: filling it hits the cgroup's limit, not the disk."""
    filler = attack("""\
        chunk = b"x" * 2**20
        with open("/dev/shm/hog", "wb") as f:
            for _ in range(3000):
                f.write(chunk)
        """)
    row = grade_one(tmp_path, filler, "--tmpfs", "4096")
    assert row["status"] == "memory limit", row


# ---------------------------------------------------------------- killing the grader

def _start_and_kill(tmp_path, how: signal.Signals):
    subs = tmp_path / "subs"
    subs.mkdir()
    nbformat.write(attack(f"import subprocess\nsubprocess.Popen(['{MARKER}', '600'], executable='sleep')\n"
                          "while True:\n    pass"), subs / "90_tiny.ipynb")
    lessons = tmp_path / "90_tiny.ipynb"
    nbformat.write(tiny_lesson(), lessons)
    out = tmp_path / "grades.csv"
    out.write_text("the previous gradebook\n")
    grader = subprocess.Popen([sys.executable, "-m", "labkit.grade", str(subs), "--lessons", str(lessons),
                               "--out", str(out), "--no-progress", "--sandbox", "bwrap", "--timeout", "300",
                               "--summary", str(tmp_path / "summary")],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while not leftovers() and time.monotonic() < deadline:  # the notebook is running
        time.sleep(0.5)
    assert leftovers(), "the notebook did not start"
    grader.send_signal(how)
    log = grader.communicate(timeout=60)[0]
    deadline = time.monotonic() + 20
    while leftovers() and time.monotonic() < deadline:
        time.sleep(0.5)
    return grader.returncode, log, out


def test_sigterm_to_the_grader_keeps_the_previous_gradebook(tmp_path):
    code, log, out = _start_and_kill(tmp_path, signal.SIGTERM)
    assert code == 130 and "nothing was written" in log, log
    assert out.read_text() == "the previous gradebook\n"
    assert not (tmp_path / "summary").exists()
    assert leftovers() == []


def test_sigkill_of_the_grader_leaves_no_sandbox_and_the_previous_gradebook(tmp_path):
    code, log, out = _start_and_kill(tmp_path, signal.SIGKILL)
    assert code == -signal.SIGKILL
    assert out.read_text() == "the previous gradebook\n"
    assert leftovers() == []


# ---------------------------------------------------------------- without the grader's processes

def test_csv_cells_that_look_like_formulas_are_escaped(tmp_path):
    lesson = grade.Lesson("90_tiny", (grade.CheckCall("check_gradient", "gradient"),))
    row = grade.Row("=HYPERLINK(\"http://x\")", "+evil.ipynb", lesson, sha256="ab", status="cell errors",
                    error="-1+1 @SUM(A1)", results={"check_gradient": (False, "")})
    grade.write_gradebook([row], tmp_path / "g.csv")
    with open(tmp_path / "g.csv", newline="", encoding="utf-8") as file:
        written = next(csv.DictReader(file))
    assert written["student"] == "'=HYPERLINK(\"http://x\")"
    assert written["notebook"] == "'+evil.ipynb" and written["error"] == "'-1+1 @SUM(A1)"
    assert all(not value.startswith(("=", "+", "-", "@")) for value in written.values())


def test_the_sandbox_copy_of_labkit_has_no_reference_of_the_lesson(tmp_path):
    specs = grade.check_specs()
    removed, kept = sandbox.plan_view([specs["check_gradient"]], [])
    assert {q for _, q in removed} == {"gradient", "_logit_gradient"} and not kept
    view = sandbox.build_view(tmp_path / "view", removed, "90_tiny")
    source = (view / "attribution" / "gradients.py").read_text()
    assert "not available while lesson 90_tiny is graded" in source
    assert "autograd.grad" not in (view / "_core.py").read_text()
    assert sorted(p.name for p in (view / "checks").glob("*.py")) == ["__init__.py", "_cases.py", "_engine.py"]


def test_the_environment_is_mounted_after_the_private_tmp(tmp_path):
    """A virtual environment under /tmp (a CI clone, a throwaway venv) stays visible: bwrap mounts
    in order, and a bind made before the sandbox's empty /tmp would be hidden by it."""
    command = sandbox.bwrap_command(tmp_path / "view", tmp_path / "io", 1 << 20, ["true"])
    private_tmp = next(i for i in range(len(command) - 1) if command[i:i + 2] == ["--tmpfs", "/tmp"])
    prefix = str(Path(sys.prefix).resolve())
    binds = [i for i in range(len(command) - 2) if command[i] == "--ro-bind" and command[i + 1] == prefix]
    assert binds and all(i > private_tmp for i in binds)


def test_an_installed_labkit_under_a_mounted_folder_is_hidden(tmp_path, monkeypatch):
    """Installed with pip (a container), the grader's labkit lies in the mounted environment: the
    sandbox sees an empty read-only folder there, while the rest of that folder stays readable."""
    data = tmp_path / "mounted"
    (data / "labkit").mkdir(parents=True)
    (data / "labkit" / "references.py").write_text("ANSWER = 42\n")
    (data / "other.txt").write_text("visible\n")
    monkeypatch.setenv("LABKIT_DATA", str(data))
    monkeypatch.setattr(sandbox, "LABKIT_DIR", data / "labkit")
    (tmp_path / "view").mkdir()
    (tmp_path / "io").mkdir()
    script = (f"cat {data}/other.txt; ls -A {data}/labkit | wc -l; "
              f"touch {data}/labkit/x 2>/dev/null && echo writable || echo read-only")
    command = sandbox.bwrap_command(tmp_path / "view", tmp_path / "io", 1 << 20, ["/bin/sh", "-c", script])
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.stdout.split() == ["visible", "0", "read-only"], (done.stdout, done.stderr)
