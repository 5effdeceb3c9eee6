"""The walls around one graded submission: bubblewrap, cgroup limits, and labkit's view inside.

A submission's notebook runs in ``bwrap`` (bubblewrap, Debian package ``bubblewrap``) with new
PID, network, IPC, UTS, mount and user-or-cgroup namespaces, ``--die-with-parent``,
``--new-session`` and every capability dropped. It sees, read-only: ``/usr`` (and the
``/bin``, ``/lib`` links), a few files of ``/etc``, the Python environment, the Fashion-MNIST
and labkit caches, and :func:`build_view`'s copy of labkit; writable: a private ``/tmp`` and
``/dev/shm`` (tmpfs, size-capped), nothing else. The instructor's tree (``solutions/``, other
submissions, the gradebook, output folders, the grader's labkit) is not mounted.

Memory and processes are capped for the whole sandbox with cgroups v1 where the grader may
create them (:class:`Limits`): ``memory.limit_in_bytes`` counts every process of it and its
tmpfs pages (``/tmp``, ``/dev/shm``); ``pids.max`` caps its processes and threads. Without
them (no cgroup v1 hierarchy we may write to) the fallback is each kernel's ``RLIMIT_AS``, the
tmpfs ``size=`` caps, and a watchdog in the grader that sums the resident memory and counts the
processes of the sandbox every half second and kills it past the limits.

The fast runner (:class:`Zygote`, :mod:`labkit._zygote`) keeps all of this: bwrap builds each
sandbox the same way around a placeholder, and a process forked from a pre-warmed zygote joins
its cgroups and namespaces (``setns``), drops every capability and runs the notebook there.
"""
from __future__ import annotations

import ast
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

LABKIT_DIR = Path(__file__).resolve().parent
VIEW_ROOT = "/opt/labkit-view"  # where labkit's copy appears inside the sandbox
IO_DIR = "/labkit-io"  # the grader's inputs, read-only inside
WORK_DIR = "/tmp/work"
OUT_DIR = "/labkit-out"  # a tmpfs of its own: a notebook that fills /tmp still gets its answers out
OUT_BYTES = 64 * 2**20
CACHE_ROOT = "/opt/labkit-cache"
ETC_FILES = ("passwd", "group", "hosts", "nsswitch.conf", "ld.so.cache", "ld.so.conf", "ld.so.conf.d",
             "localtime", "fonts", "ssl/certs", "alternatives", "mime.types")


def bwrap_path() -> str | None:
    return shutil.which("bwrap")


def bwrap_works() -> str | None:
    """None when bubblewrap can build a sandbox here, else why not."""
    import subprocess
    path = bwrap_path()
    if path is None:
        return "bubblewrap (bwrap) is not installed"
    try:
        done = subprocess.run([path, "--ro-bind", "/", "/", "--unshare-all", "--die-with-parent",
                               "--cap-drop", "ALL", "--", "true"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as err:
        return f"bwrap could not run: {err}"
    return None if done.returncode == 0 else f"bwrap cannot create namespaces here: {done.stderr.strip()[:200]}"


# ---------------------------------------------------------------- what the sandbox may see

def _mounts() -> list[str]:
    """bwrap arguments for the system, the Python environment and the data, all read-only."""
    args = ["--ro-bind", "/usr", "/usr"]
    for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        path = Path("/") / name
        if path.is_symlink():
            args += ["--symlink", os.readlink(path), str(path)]
        elif path.is_dir():
            args += ["--ro-bind", str(path), str(path)]
    for name in ETC_FILES:
        args += ["--ro-bind-try", f"/etc/{name}", f"/etc/{name}"]
    prefixes = {Path(sys.prefix).resolve(), Path(sys.base_prefix).resolve(), Path(sys.exec_prefix).resolve()}
    for prefix in sorted(prefixes):
        if not str(prefix).startswith("/usr"):
            args += ["--ro-bind", str(prefix), str(prefix)]
    executable = Path(sys.executable)
    if not any(executable.is_relative_to(p) for p in prefixes) and not str(executable).startswith("/usr"):
        args += ["--ro-bind", str(executable.parent), str(executable.parent)]
    for path in _data_dirs():
        args += ["--ro-bind-try", str(path), str(path)]
    cache = _labkit_cache()
    if cache is not None:  # at a path of its own: the grader's home folder does not appear
        args += ["--ro-bind", str(cache), f"{CACHE_ROOT}/labkit"]
    args += ["--ro-bind-try", "/var/lib/dpkg", "/var/lib/dpkg"]  # labkit.data asks dpkg where the data are
    # The grader's own labkit (references, checks) must not be importable inside. Installed with
    # pip (not editable, as in a container) it lies in the environment mounted above: an empty
    # read-only folder goes over it.
    if any(LABKIT_DIR.is_relative_to(args[i + 1]) for i in range(len(args) - 1) if args[i].startswith("--ro-bind")):
        args += ["--tmpfs", str(LABKIT_DIR), "--remount-ro", str(LABKIT_DIR)]
    # A bind below /tmp (a venv in a CI clone) makes bwrap create its parent folders in the private
    # /tmp; without write permission there (capabilities are dropped) no file lands beside them.
    binds = {Path(args[i + 2]) for i in range(len(args) - 2) if args[i].startswith("--ro-bind")}
    parents = {parent for path in binds if path.is_relative_to("/tmp") for parent in path.parents
               if parent != Path("/tmp") and parent.is_relative_to("/tmp")}
    for parent in sorted(parents, key=lambda p: len(p.parts), reverse=True):
        args += ["--chmod", "0555", str(parent)]
    return args


def _data_dirs() -> list[Path]:
    """Fashion-MNIST where ``$LABKIT_DATA`` puts it (the Debian package's is under /usr)."""
    return [Path(os.environ["LABKIT_DATA"]).resolve()] if os.environ.get("LABKIT_DATA") else []


def _labkit_cache() -> Path | None:
    """labkit's cache of decoded data (``labkit.data``), which notebooks read."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "labkit"
    return cache.resolve() if cache.is_dir() else None


def sandbox_env(threads: int) -> dict:
    """The environment inside: nothing of the grader's but the paths Python and the data need."""
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/local/bin:/usr/bin:/bin",
           "HOME": "/tmp/home", "TMPDIR": "/tmp", "LANG": "C.UTF-8", "PYTHONPATH": VIEW_ROOT,
           "PYTHONDONTWRITEBYTECODE": "1", "MPLBACKEND": "agg", "MPLCONFIGDIR": "/tmp/home/matplotlib",
           "JUPYTER_RUNTIME_DIR": "/tmp/home/jupyter", "IPYTHONDIR": "/tmp/home/ipython",
           "XDG_CACHE_HOME": CACHE_ROOT, "CUDA_VISIBLE_DEVICES": "", "LABKIT_DEVICE": "cpu",
           "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "MALLOC_ARENA_MAX": "2",
           "PYDEVD_DISABLE_FILE_VALIDATION": "1"}
    if os.environ.get("LABKIT_DATA"):
        env["LABKIT_DATA"] = str(Path(os.environ["LABKIT_DATA"]).resolve())
    if os.environ.get("VIRTUAL_ENV"):
        env["VIRTUAL_ENV"] = os.environ["VIRTUAL_ENV"]
    return env


def bwrap_command(view: Path, io: Path, tmpfs_bytes: int, command: list[str],
                  info_fd: int | None = None) -> list[str]:
    """The bwrap command line that runs ``command`` in the sandbox (``info_fd``: where bwrap
    writes the pid of the sandbox's first process and its namespaces, as JSON)."""
    return [bwrap_path(), "--unshare-all", "--die-with-parent", "--new-session", "--cap-drop", "ALL",
            "--hostname", "sandbox", *(["--info-fd", str(info_fd)] if info_fd is not None else []),
            "--proc", "/proc", "--dev", "/dev",
            "--size", str(tmpfs_bytes), "--tmpfs", "/tmp",
            "--size", str(tmpfs_bytes), "--tmpfs", "/dev/shm",
            "--size", str(OUT_BYTES), "--tmpfs", OUT_DIR,
            # after the private /tmp: a virtual environment or data folder under /tmp (a CI clone,
            # a throwaway venv) must stay visible, not be hidden by the empty tmpfs
            *_mounts(),
            "--ro-bind", str(view), VIEW_ROOT, "--ro-bind", str(io), IO_DIR,
            "--dir", WORK_DIR, "--dir", "/tmp/home",
            # the root and /dev are tmpfs that bwrap made: read-only once the mounts are in place
            "--remount-ro", "/dev", "--remount-ro", "/",
            "--chdir", WORK_DIR, "--", *command]


# ---------------------------------------------------------------- labkit as the sandbox sees it

CHECKS_STUB = '''"""labkit.checks while a submission is graded: the checks run in the grader, outside this
kernel, on the functions this notebook defines; here they only say so."""


def __getattr__(name):
    if name.startswith("check_"):
        def check(*args, **kwargs):
            print(f"{name}: graded by labkit.grade, outside this kernel")
        check.__name__ = name
        return check
    raise AttributeError(f"module 'labkit.checks' has no attribute {name!r}")


def results():
    return []


def clear_results():
    pass
'''


def _functions(tree: ast.Module):
    """``(qualname, node)`` of the module's functions and its classes' methods."""
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node.name, node
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    yield f"{node.name}.{item.name}", item


def _names_used(node: ast.AST) -> set[str]:
    """Global names and attribute names ``node`` uses. Its parameters and the names it assigns are
    local: ``attack(model, x)`` on a parameter called ``attack`` is not a call of ``explore.attack``."""
    local = {a.arg for n in ast.walk(node) if isinstance(n, ast.arguments)
             for a in (*n.posonlyargs, *n.args, *n.kwonlyargs, n.vararg, n.kwarg) if a is not None}
    local |= {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
    return ({n.id for n in ast.walk(node) if isinstance(n, ast.Name)} - local) | \
           {n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute)}


def _call_graph(root: Path):
    """Over labkit's own files (not the checks): ``{(file, qualname): (node, names it uses)}``
    and ``{simple name: {(file, qualname)}}``; calls are matched by name (an over-approximation)."""
    functions, by_name = {}, {}
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root).as_posix()
        if relative.startswith("checks/"):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for qualname, node in _functions(tree):
            functions[(relative, qualname)] = (node, _names_used(node))
            by_name.setdefault(qualname.rsplit(".", 1)[-1], set()).add((relative, qualname))
    return functions, by_name


def _closure(start, functions, by_name, mentioned=None) -> set:
    """The functions ``start`` reaches, calls matched by name. Given ``mentioned`` (the names the
    caller's own code uses), a method ``Class.method`` counts only once ``Class`` is named on the
    way (rapid type analysis): ``fit`` calls ``adversary.loss``, which reaches
    ``PGDAdversary.loss`` only for code that names ``PGDAdversary``."""
    classes_needed = mentioned is not None
    mentioned = set(mentioned or ()) | {key[1].split(".")[0] for key in start}
    seen, parked, todo = set(start), set(), list(start)
    while todo:
        for name in functions[todo.pop()][1] - mentioned:
            mentioned.add(name)
            parked |= by_name.get(name, set()) - seen
        ready = {key for key in parked if not classes_needed or "." not in key[1]
                 or key[1].split(".")[0] in mentioned}
        parked -= ready
        seen |= ready
        todo += ready
    return seen


def _computes_gradients(node: ast.AST) -> bool:
    source = ast.unparse(node)
    return "autograd.grad(" in source or ".backward(" in source


def labkit_names_used(sources: list[str]) -> set[str]:
    """The labkit functions a lesson notebook uses by name: ``attribution.sanity_check``,
    ``labkit.plot.heatmap``, ``from labkit.attribution import gradient`` (their last names)."""
    trees = []
    for source in sources:
        # IPython magics and shell lines are not Python: blank them so the rest of the cell counts
        plain = "\n".join("" if line.lstrip().startswith(("%", "!")) else line for line in source.splitlines())
        try:
            trees.append(ast.parse(plain))
        except SyntaxError:
            continue
    names, aliases = set(), {"labkit"}  # an import in one cell names labkit's modules in every later cell
    for tree in trees:
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "labkit":
                for alias in node.names:
                    aliases.add(alias.asname or alias.name)
                    names.add(alias.name)
            elif isinstance(node, ast.Import):
                aliases.update(a.asname or a.name for a in node.names if a.name.split(".")[0] == "labkit")
    for tree in trees:
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute):
                base = node.value
                while isinstance(base, ast.Attribute):
                    base = base.value
                if isinstance(base, ast.Name) and base.id in aliases:
                    names.add(node.attr)
    return names


def reference_functions(specs) -> set:
    """``(file relative to labkit, qualname)`` of the graded references that live outside the checks."""
    keys = set()
    for spec in specs:
        function = getattr(spec.reference, "__func__", spec.reference)
        try:
            path = Path(function.__code__.co_filename).resolve()
            relative = path.relative_to(LABKIT_DIR).as_posix()
        except (AttributeError, ValueError):
            continue
        if not relative.startswith("checks/"):
            keys.add((relative, function.__qualname__))
    return keys


def _function(key):
    import importlib
    relative, qualname = key
    module = importlib.import_module("labkit." + relative[:-3].replace("/", ".").removesuffix(".__init__"))
    function = module
    for part in qualname.split("."):
        function = getattr(function, part)
    return function


def _gives_the_answer(function, spec) -> bool:
    """Whether ``function`` called on a check's inputs returns the reference's answer (itself
    or as the first item it returns): a labkit helper the reference merely wraps."""
    from .checks import _engine
    with _engine.case_context(0):
        for case in _engine.cases_for(spec, 0)[:1]:
            try:
                expected = spec.reference(*case.args, **case.kwargs)
                out = function(*case.args, **case.kwargs)
            except Exception:
                return False
            out = out[0] if isinstance(out, tuple) and out else out
            return bool(_engine.torch.is_tensor(out) and _engine.close(out, expected))
    return False


def _returned_calls(reference, by_name) -> set:
    """The labkit functions (outside the checks) whose call a reference written in the checks
    returns, give or take ``torch.stack(...)`` and ``.detach()``, on its own inputs: the
    function that computes the exercise (``return attribution.gradcam(model, x, target,
    layer=layer)``). A call on the result of another labkit function (``to_heatmap(gradient(...))``)
    is not one: the outer function is a tool the exercise may use."""
    import inspect
    import textwrap
    function = getattr(reference, "__func__", reference)
    try:
        if not function.__module__.startswith("labkit.checks"):
            return set()
        node = ast.parse(textwrap.dedent(inspect.getsource(function))).body[0]
    except (AttributeError, OSError, TypeError, SyntaxError, IndexError):
        return set()
    returned = [n.value for n in ast.walk(node) if isinstance(n, ast.Return) and n.value is not None]
    keys = set()
    while returned:
        call = returned.pop()
        if isinstance(call, (ast.List, ast.Tuple)):
            returned += call.elts
            continue
        if not isinstance(call, ast.Call):
            continue
        func = call.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
        if name in ("stack", "detach"):  # torch.stack([...]) / (...).detach(): look inside
            returned += call.args if name == "stack" else [func.value]
            continue
        computed = [a for a in ast.walk(call) if a is not call and isinstance(a, ast.Call)
                    and (a.func.attr if isinstance(a.func, ast.Attribute) else getattr(a.func, "id", ""))
                    in by_name and a is not getattr(func, "value", None)]
        if computed:
            continue
        owner = func.value if isinstance(func, ast.Attribute) else None
        if isinstance(owner, ast.Call):  # Adversary(...).loss(...): that class's method only
            cls = owner.func.attr if isinstance(owner.func, ast.Attribute) else getattr(owner.func, "id", "")
            keys |= {key for key in by_name.get(name, ()) if key[1] == f"{cls}.{name}"}
        else:
            keys |= by_name.get(name, set())
    return keys


def plan_view(specs, notebook_sources: list[str], root: Path = LABKIT_DIR):
    """Which labkit functions the sandbox's copy leaves out for a lesson: ``(removed, kept)``.

    Removed: the references of the lesson's checks, and every labkit function they reach that
    takes a gradient and, called on a check's inputs, returns the reference's answer
    (``attribution.gradients._logit_gradient`` for ``attribution.gradient``); for a reference
    written in the checks, the labkit function whose call it returns (:func:`_returned_calls`):
    what a "wrapper around labkit's own function" would call. Kept although they would be
    removed: those the lesson notebook itself uses, or reaches through what it uses (the
    student's notebook must run); the grader withholds those while the student's functions run.
    """
    functions, by_name = _call_graph(root)
    answers = set()
    for spec in specs:
        references = {key for key in reference_functions([spec]) if key in functions}
        answers |= references
        for key in _closure(references, functions, by_name) - references:
            if _computes_gradients(functions[key][0]) and _gives_the_answer(_function(key), spec):
                answers.add(key)
        # A reference written in the checks (``lesson08.lrp_epsilon``) is a thin call of labkit's
        # own functions (``attribution.lrp`` with ``Epsilon``): with the right options they compute
        # the exercise, so they go too, and so does any helper of theirs that gives the answer.
        callees = _returned_calls(spec.reference, by_name)
        answers |= callees
        for key in _closure(callees, functions, by_name) - callees:
            if key not in answers and _gives_the_answer(_function(key), spec):
                answers.add(key)
    names = labkit_names_used(notebook_sources)
    used = {key for name in names for key in by_name.get(name, ())}
    needed = _closure(used, functions, by_name, mentioned=names)
    return answers - needed, answers & needed


class _Stub(ast.NodeTransformer):
    def __init__(self, qualnames: set[str], lesson: str):
        self.qualnames, self.lesson, self.prefix = qualnames, lesson, []

    def visit_ClassDef(self, node):
        self.prefix.append(node.name)
        self.generic_visit(node)
        self.prefix.pop()
        return node

    def visit_FunctionDef(self, node):
        qualname = ".".join([*self.prefix, node.name])
        if qualname in self.qualnames:
            message = (f"labkit's {qualname} is not available while lesson {self.lesson} is graded: "
                       f"it computes one of the lesson's exercises; write your own")
            node.body = [ast.Raise(ast.Call(ast.Name("RuntimeError", ast.Load()), [ast.Constant(message)], []), None)]
            node.decorator_list = [d for d in node.decorator_list if not _is_contextmanager(d)]
        return node

    visit_AsyncFunctionDef = visit_FunctionDef


def _is_contextmanager(decorator: ast.expr) -> bool:
    return ast.unparse(decorator).endswith("contextmanager")


def build_view(folder: Path, removed: set, lesson: str) -> Path:
    """A copy of labkit under ``folder/labkit`` for the sandbox: the checks replaced by
    :data:`CHECKS_STUB` (no references, no mistakes; only the engine and the case builders that
    rebuild the grader's inputs), and the ``removed`` functions replaced by a ``RuntimeError``."""
    target = folder / "labkit"
    shutil.copytree(LABKIT_DIR, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for path in (target / "checks").glob("*.py"):
        if path.name not in ("_engine.py", "_cases.py"):
            path.unlink()
    (target / "checks" / "__init__.py").write_text(CHECKS_STUB, encoding="utf-8")
    by_file = {}
    for relative, qualname in removed:
        by_file.setdefault(relative, set()).add(qualname)
    for relative, qualnames in by_file.items():
        path = target / relative
        tree = _Stub(qualnames, lesson).visit(ast.parse(path.read_text(encoding="utf-8")))
        path.write_text(ast.unparse(ast.fix_missing_locations(tree)) + "\n", encoding="utf-8")
    import compileall  # bytecode made here, once: each sandbox would compile labkit again (about 0.07 CPU s)
    compileall.compile_dir(target, quiet=1)
    for path in [folder, *folder.rglob("*")]:  # read-only for everyone, also outside the sandbox
        path.chmod(0o555 if path.is_dir() else 0o444)
    return target


# ---------------------------------------------------------------- memory and process caps

def _own_cgroup(controller: str) -> Path | None:
    """Our cgroup v1 directory for ``controller`` when we may create children in it."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controller in controllers.split(","):
            directory = Path("/sys/fs/cgroup") / controller / path.lstrip("/")
            if directory.is_dir() and os.access(directory, os.W_OK):
                return directory
    return None


class Limits:
    """A memory and a pids cgroup (v1) for one sandbox, or the watchdog's numbers without them."""

    def __init__(self, name: str, memory_bytes: int, pids: int, use_cgroups: bool = True):
        self.memory_bytes, self.pids, self.groups = memory_bytes, pids, []
        if not use_cgroups:
            return
        try:
            for controller, settings in (("memory", {"memory.limit_in_bytes": memory_bytes,
                                                     "memory.memsw.limit_in_bytes": memory_bytes,
                                                     "memory.swappiness": 0}),
                                         ("pids", {"pids.max": pids})):
                parent = _own_cgroup(controller)
                if parent is None:
                    raise OSError(f"no writable {controller} cgroup")
                group = parent / name
                group.mkdir()
                self.groups.append(group)
                for setting, value in settings.items():
                    if memory_bytes <= 0 and setting.startswith("memory."):
                        continue
                    try:
                        (group / setting).write_text(str(value))
                    except OSError:
                        if setting == "memory.limit_in_bytes" or setting == "pids.max":
                            raise
        except OSError:
            self.close()
            self.groups = []

    @property
    def cgroups(self) -> bool:
        return len(self.groups) == 2

    def wrap(self, command: list[str]) -> list[str]:
        """``command`` started inside the cgroups (a shell moves itself in, then execs)."""
        if not self.cgroups:
            return command
        script = 'for g in "$@"; do [ "$g" = -- ] && break; echo $$ > "$g/cgroup.procs" || exit 97; done; ' \
                 'while [ "$1" != -- ]; do shift; done; shift; exec "$@"'
        return ["/bin/sh", "-c", script, "sh", *map(str, self.groups), "--", *command]

    def hit_memory(self) -> bool:
        """Whether the kernel killed a process of the sandbox for memory (``oom_kill`` in
        ``memory.oom_control``; ``failcnt`` stays 0 on some kernels) or an allocation failed."""
        for group in self.groups:
            if "memory" not in group.parts:
                continue
            try:
                control = dict(line.split() for line in (group / "memory.oom_control").read_text().splitlines())
                if int(control.get("oom_kill", 0)) > 0 or int((group / "memory.failcnt").read_text()) > 0:
                    return True
            except (OSError, ValueError):
                pass
        return False

    def kill_all(self) -> None:
        for group in self.groups:
            for _ in range(20):
                try:
                    pids = [int(p) for p in (group / "cgroup.procs").read_text().split()]
                except (OSError, ValueError):
                    break
                if not pids:
                    break
                for pid in pids:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except OSError:
                        pass
                time.sleep(0.05)

    def close(self) -> None:
        self.kill_all()
        for group in self.groups:
            for _ in range(50):
                try:
                    group.rmdir()
                    break
                except OSError:
                    time.sleep(0.05)


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (from /proc), for the watchdog."""
    children = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                children.setdefault(int(fields[1]), []).append(int(entry.name))
            except (OSError, IndexError, ValueError):
                pass
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo += children.get(current, [])
    return found


def usage(pid: int) -> tuple[int, int]:
    """(resident bytes, tasks) of ``pid`` and its descendants: the watchdog's measure."""
    page, resident, tasks = os.sysconf("SC_PAGE_SIZE"), 0, 0
    for process in descendants(pid):
        try:
            resident += int(Path(f"/proc/{process}/statm").read_text().split()[1]) * page
            tasks += len(os.listdir(f"/proc/{process}/task"))
        except (OSError, IndexError, ValueError):
            pass
    return resident, tasks


# ---------------------------------------------------------------- the zygote (the fast runner)

# What bwrap runs when the zygote's child does the work: it says the sandbox is built, then waits.
PLACEHOLDER = ["/bin/sh", "-c", "echo ready; exec sleep 2147483647 </dev/null >/dev/null 2>&1"]

ZYGOTE_BOOT = """\
import json, socket, sys
control = socket.socket(fileno=0)
hello = json.loads(control.recv(1 << 16))
sys.path.insert(0, hello["dir"])
import _zygote
del sys.path[0]
_zygote.serve(control, hello)
"""


class Zygote:
    """The grader's handle on :mod:`labkit._zygote`: one process with the libraries imported,
    asked over a socket pair to fork a submission's process into a sandbox bwrap has built.

    It runs with exactly the sandbox's environment ``env``, in ``home`` (a private folder of the
    grader, for matplotlib's font cache); it dies with the grader (``PR_SET_PDEATHSIG``)."""

    def __init__(self, env: dict, home: Path, startup_timeout: float = 300):
        self.lock, self.env, self.home, self.startup_timeout = threading.Lock(), env, home, startup_timeout
        self._start()

    def _start(self) -> None:
        env, home, startup_timeout = self.env, self.home, self.startup_timeout
        self.control, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        home.mkdir(parents=True, exist_ok=True)
        try:
            self.process = subprocess.Popen([sys.executable, "-c", ZYGOTE_BOOT], stdin=theirs,
                                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                            env=env, cwd=str(home), start_new_session=True)
        finally:
            theirs.close()
        self.control.settimeout(startup_timeout)
        try:
            self.control.sendall(json.dumps({"dir": str(LABKIT_DIR), "home": str(home),
                                             "grader": os.getpid()}).encode())
            reply = json.loads(self.control.recv(1 << 16) or b"{}")
        except (OSError, ValueError) as err:
            self.close()
            raise RuntimeError(f"the zygote did not start: {err}") from None
        if not reply.get("ready"):
            self.close()
            raise RuntimeError("the zygote did not start (it exited)")
        self.preloaded = reply.get("preloaded", [])
        self.control.settimeout(60)

    def alive(self) -> bool:
        return self.process.poll() is None

    def spawn(self, sandbox_pid: int, namespaces: dict, cgroups: list, options: str, channel: int,
              probe: bool = False) -> int:
        """Fork a process into the sandbox whose first process is ``sandbox_pid`` (in ``cgroups``,
        reading its options from ``options`` inside, writing to the pipe ``channel``); its pid."""
        request = {"sandbox_pid": sandbox_pid, "namespaces": namespaces, "cgroups": [str(g) for g in cgroups],
                   "options": options, "probe": probe}
        with self.lock:
            if not self.alive():  # killed from outside (the OOM killer): a new one for the next rows
                self.close()
                self._start()
            socket.send_fds(self.control, [json.dumps(request).encode()], [channel])
            reply = json.loads(self.control.recv(1 << 16) or b"{}")
        if "pid" not in reply:
            raise RuntimeError(f"the zygote could not fork: {reply.get('error', 'it exited')}")
        return int(reply["pid"])

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.control.close()
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


def read_info(fd: int, timeout: float = 60) -> dict:
    """bwrap's ``--info-fd`` JSON (``child-pid`` and the namespaces' numbers), read to its end."""
    import select
    data, deadline = b"", time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                break
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            data += chunk
    finally:
        os.close(fd)
    info = json.loads(data.decode() or "{}")
    if not isinstance(info.get("child-pid"), int):
        raise RuntimeError("bubblewrap did not report its sandbox's pid")
    return info


def namespaces_of(info: dict) -> dict:
    return {key.removesuffix("-namespace"): value for key, value in info.items()
            if key.endswith("-namespace") and isinstance(value, int)}
