"""End to end in a real browser: JupyterLab on 127.0.0.1 (temporary config, runtime, settings and
workspace folders; token auth), headless Debian ``chromium`` driven by Playwright. Opens the
student notebook 00 and the solution notebook 01 (copies, in a temporary folder), runs all
cells, asserts that no cell failed, moves the explorer's ε slider with the mouse and asserts
that the displayed prediction changes. Screenshots go to ``test-artifacts/browser/`` (or
``$LABKIT_ARTIFACTS/browser``).

Skipped when Playwright or chromium is missing (``bash scripts/env.sh setup`` installs both).
Playwright's own browser downloads are never used: it launches ``/usr/bin/chromium``.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
NOTEBOOKS = {"00_setup_and_tour.ipynb": ROOT / "notebooks", "01_gradient_saliency.ipynb": ROOT / "solutions"}
RUN_TIMEOUT_S = 240  # per notebook: run all cells on a busy 2-core CPU

pytestmark = [pytest.mark.browser, pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH "
                                                       "(Debian: apt-get install chromium)")]
sync_api = pytest.importorskip("playwright.sync_api", reason="needs the Python package playwright")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def artifacts() -> Path:
    folder = Path(os.environ.get("LABKIT_ARTIFACTS", ROOT / "test-artifacts")) / "browser"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A JupyterLab server on a free loopback port, serving copies of the two notebooks;
    stopped at the end. Yields (base url, token, folder it serves)."""
    home = tmp_path_factory.mktemp("jupyter")
    served = home / "notebooks"
    served.mkdir()
    for name, folder in NOTEBOOKS.items():
        shutil.copy(folder / name, served / name)
    settings = home / "settings" / "@jupyterlab" / "notebook-extension"
    settings.mkdir(parents=True)
    # every cell in the DOM (no virtual scrolling), so the page shows all outputs
    (settings / "tracker.jupyterlab-settings").write_text(json.dumps({"windowingMode": "none"}))
    notifications = settings.parent / "apputils-extension"
    notifications.mkdir()  # no "get Jupyter news?" pop-up over the screenshots
    (notifications / "notification.jupyterlab-settings").write_text(
        json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    port, token = free_port(), os.urandom(16).hex()
    env = dict(os.environ, JUPYTER_CONFIG_DIR=str(home / "config"), JUPYTER_RUNTIME_DIR=str(home / "runtime"),
               OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), JUPYTER_PLATFORM_DIRS="1")
    command = [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ServerApp.ip=127.0.0.1",
               f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
               f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={served}",
               f"--LabApp.user_settings_dir={home / 'settings'}",
               f"--LabApp.workspaces_dir={home / 'workspaces'}",
               "--LabApp.expose_app_in_browser=True",
               "--ServerApp.terminals_enabled=False", "--LabApp.extension_manager=readonly",
               "--LabApp.news_url=", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
    if os.geteuid() == 0:  # containers and CI run as root
        command.append("--allow-root")
    log = open(home / "jupyterlab.log", "w")
    server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=served)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_server(url, token, server, home / "jupyterlab.log")
        yield url, token, served
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


def wait_for_server(url: str, token: str, server: subprocess.Popen, log: Path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"JupyterLab exited with status {server.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=5) as reply:
                if reply.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"JupyterLab did not answer within {timeout} s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        # Every host name but the loopback address fails to resolve: the page can reach
        # nothing but the local JupyterLab.
        chromium = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True,
            args=["--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"])
        try:
            yield chromium
        finally:
            chromium.close()


# Progress of "run all" read from the notebook model (JupyterLab's app, exposed for tests).
RUN_STATE = """() => {
  const panel = window.jupyterapp.shell.currentWidget;
  const cells = Array.from(panel.content.model.cells).filter(c => c.type === 'code');
  const errors = cells.flatMap(c => c.outputs.toJSON()).filter(o => o.output_type === 'error');
  return {cells: cells.length, done: cells.filter(c => c.executionCount !== null).length,
          busy: panel.sessionContext.session?.kernel?.status !== 'idle',
          errors: errors.map(e => e.ename + ': ' + e.evalue)};
}"""


# Types each concept question's answer into its answer cell, as a student does before "run all"
# (an unanswered question stops the run there: predict before you run).
ANSWER_QUESTIONS = """(answers) => {
  const panel = window.jupyterapp.shell.currentWidget;
  let typed = 0;
  for (const cell of Array.from(panel.content.model.cells)) {
    if (cell.id in answers) { cell.sharedModel.setSource(answers[cell.id]); typed += 1; }
  }
  return typed;
}"""


def question_answers() -> dict:
    from labkit.checks._questions import QUESTIONS
    return {f"q-{q.name}-answer": f"{q.name} = {q.answer!r}" for q in QUESTIONS}


def open_and_run_all(page, url: str, token: str, name: str, answer_questions: bool = False) -> dict:
    """Open a notebook, wait for its kernel, (answer its concept questions,) run all cells and wait
    until they have run (or one failed). Returns the last run state."""
    page.goto(f"{url}/lab/tree/{name}?token={token}")
    page.wait_for_function("() => window.jupyterapp && window.jupyterapp.shell.currentWidget"
                           " && window.jupyterapp.shell.currentWidget.sessionContext"
                           "?.session?.kernel?.status === 'idle'", timeout=120_000)
    # the workspace may restore a notebook of an earlier test as the current tab: bring this one forward
    page.evaluate("(path) => window.jupyterapp.commands.execute('docmanager:open', {path})", name)
    page.wait_for_function("(path) => window.jupyterapp.shell.currentWidget?.context?.path === path"
                           " && window.jupyterapp.shell.currentWidget.sessionContext"
                           "?.session?.kernel?.status === 'idle'", arg=name, timeout=120_000)
    if answer_questions:
        assert page.evaluate(ANSWER_QUESTIONS, question_answers()) >= 2, "no question cells found"
    page.evaluate("() => window.jupyterapp.commands.execute('notebook:run-all-cells')")
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while time.monotonic() < deadline:
        state = page.evaluate(RUN_STATE)
        if state["errors"] or (state["done"] == state["cells"] and not state["busy"]):
            return state
        time.sleep(1)
    pytest.fail(f"{name}: cells still running after {RUN_TIMEOUT_S} s: {state}")


def predictions(page) -> list[str]:
    return page.locator(".widget-label").filter(has_text="standard:").all_inner_texts()


def test_lesson_00_runs_and_the_explorer_reacts(lab, browser, artifacts):
    url, token, _ = lab
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    state = open_and_run_all(page, url, token, "00_setup_and_tour.ipynb", answer_questions=True)
    page.screenshot(path=artifacts / "00_after_run_all.png")
    assert state["errors"] == [], state["errors"]
    explorer = page.locator(".widget-vbox").filter(has=page.locator(".widget-image")).last
    explorer.scroll_into_view_if_needed()
    slider = explorer.locator(".widget-hslider").filter(has_text="ε")
    sync_api.expect(slider).to_have_count(1)
    explorer.screenshot(path=artifacts / "00_explorer_eps_0.png")
    before = predictions(page)
    assert before and before[0].startswith("standard: ")
    handle, track = slider.locator(".noUi-handle"), slider.locator(".noUi-target")
    box, start = track.bounding_box(), handle.bounding_box()
    page.mouse.move(start["x"] + start["width"] / 2, start["y"] + start["height"] / 2)
    page.mouse.down()
    page.mouse.move(box["x"] + 0.7 * box["width"], start["y"] + start["height"] / 2, steps=10)
    page.mouse.up()
    page.wait_for_function("""(before) => {
        const labels = Array.from(document.querySelectorAll('.widget-label'))
            .map(l => l.innerText).filter(t => t.startsWith('standard:'));
        return labels.length > 0 && labels[0] !== before;
    }""", arg=before[0], timeout=60_000)
    after = predictions(page)
    readout = slider.locator(".widget-readout").inner_text()
    explorer.screenshot(path=artifacts / "00_explorer_eps_moved.png")
    assert float(readout) > 0.1, readout
    assert after[0] != before[0], (before, after)
    assert explorer.locator(".widget-label").filter(has_text="Error").count() == 0


def test_solution_01_runs_without_errors(lab, browser, artifacts):
    url, token, _ = lab
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    state = open_and_run_all(page, url, token, "01_gradient_saliency.ipynb")
    page.locator(".jp-NotebookPanel:visible .jp-CodeCell").last.scroll_into_view_if_needed()
    page.screenshot(path=artifacts / "01_after_run_all.png")
    assert state["errors"] == [], state["errors"]
    assert state["done"] == state["cells"]
    images = page.locator(".jp-RenderedImage img")
    assert images.count() > 0, "no figure was displayed"
    assert all(page.evaluate("(img) => img.naturalWidth > 0", img.element_handle())
               for img in images.all()), "a figure failed to load"
