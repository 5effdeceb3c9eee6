"""The README's first command: ``make lab`` starts JupyterLab on the lesson notebooks, as root
(containers, CI: JupyterLab refuses root without ``--allow-root``, which scripts/env.sh adds) and
as a normal user. Each run starts ``make lab`` headless (``--no-browser``, loopback, a free port,
a random token, temporary Jupyter folders), asks the server's contents API for the notebooks it
serves, compares them with ``notebooks/*.ipynb``, and stops it.

``make lab`` runs with ``LABKIT_PYTHON`` set to the interpreter running these tests: the
environment ``make test`` has just set up is used as it is, never installed into.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOBODY = 65534  # uid and gid of Debian's nobody / nogroup
pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs make")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=5) as reply:
        return json.load(reply)


def as_nobody(command: list[str]) -> list[str]:
    return ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *command]


def start_make_lab(home: Path, port: int, token: str, user: str) -> subprocess.Popen:
    args = (f"--no-browser --ServerApp.ip=127.0.0.1 --ServerApp.port={port} "
            f"--ServerApp.port_retries=0 --IdentityProvider.token={token} "
            f"--ServerApp.terminals_enabled=False --LabApp.news_url= "
            f"--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate")
    env = dict(os.environ, LABKIT_PYTHON=sys.executable, HOME=str(home),
               JUPYTER_CONFIG_DIR=str(home / "config"), JUPYTER_RUNTIME_DIR=str(home / "runtime"),
               JUPYTER_DATA_DIR=str(home / "data"), JUPYTERLAB_SETTINGS_DIR=str(home / "settings"),
               JUPYTERLAB_WORKSPACES_DIR=str(home / "workspaces"), IPYTHONDIR=str(home / "ipython"))
    command = ["make", "--no-print-directory", "lab", f"ARGS={args}"]
    if user == "normal user":
        command = as_nobody(command)
    log = open(home / "make-lab.log", "w")
    # its own process group: make, bash and JupyterLab are stopped together
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)


def stop(server: subprocess.Popen) -> None:
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGTERM)
    try:
        server.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()


@pytest.mark.parametrize("user", ["this user", "normal user"])
def test_make_lab_serves_the_lessons(user):
    if user == "normal user":
        if os.geteuid() != 0 or shutil.which("setpriv") is None:
            pytest.skip("running as a normal user already (or no setpriv to become one)")
        readable = subprocess.run(as_nobody(["test", "-r", str(ROOT / "Makefile"), "-a", "-x", sys.executable]))
        if readable.returncode != 0:
            pytest.skip(f"the user nobody cannot read {ROOT} or run {sys.executable}")
    home = Path(tempfile.mkdtemp(prefix="labkit-make-lab-"))
    if user == "normal user":
        os.chown(home, NOBODY, NOBODY)
    port, token = free_port(), os.urandom(16).hex()
    server = start_make_lab(home, port, token, user)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline, listing = time.monotonic() + 50, None
        while listing is None and time.monotonic() < deadline:
            if server.poll() is not None:
                break
            try:
                listing = get_json(f"{url}/api/contents?token={token}")
            except OSError:
                time.sleep(0.5)
        log = (home / "make-lab.log").read_text()
        assert listing is not None, f"`make lab` did not serve within 50 s (exit {server.poll()}):\n{log[-3000:]}"
        served = sorted(item["name"] for item in listing["content"] if item["type"] == "notebook")
        assert served == sorted(p.name for p in (ROOT / "notebooks").glob("*.ipynb")), log[-3000:]
        assert len(served) >= 11
        with pytest.raises(urllib.error.HTTPError):  # the token is required
            get_json(f"{url}/api/contents")
    finally:
        stop(server)
        shutil.rmtree(home, ignore_errors=True)
    assert server.returncode is not None
