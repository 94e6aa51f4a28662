"""The pattern explorer in a real JupyterLab, driven by headless Chromium through Playwright.

Starts JupyterLab on 127.0.0.1 (a free port, token auth, temporary root, config, data and
runtime folders), opens a small notebook written at test time that builds the pattern explorer,
runs it, moves the window slider with the keyboard, and checks that the figure's pixels and the
density readout change. Screenshots go to ``$WORKBENCH_ARTIFACTS_DIR`` (default: a temporary
folder; the path is printed). Needs Debian's ``chromium`` at /usr/bin/chromium, which
``scripts/setup.sh`` installs; skipped without it.
"""

from __future__ import annotations

import io
import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]
SERVER_START_S = 30.0
KERNEL_READY_S = 45.0  # kernel start, importing torch and workbench, first draw
UPDATE_S = 20.0
KERNEL_IDLE = ("() => window.jupyterapp.shell.currentWidget.sessionContext.session.kernel.status"
               " === 'idle'")
EXPLORER_CELL = """\
import workbench as wb

explorer = wb.viz.pattern_explorer(seq_len=128, block_size=16, window=8)
explorer"""

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(),
                       reason=f"needs Debian's chromium at {CHROMIUM}; `bash scripts/setup.sh` "
                              "installs it (apt-get install chromium)"),
]


@dataclass(frozen=True)
class LabServer:
    url: str
    token: str
    root: Path


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _write_notebook(path: Path) -> None:
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(EXPLORER_CELL)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    nbformat.write(nb, path)


def _wait_until(condition: Callable[[], bool], timeout: float, what: str,
                interval: float = 0.25) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(interval)
    raise TimeoutError(f"gave up after {timeout:.0f} s waiting for {what}")


def _responds(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


@pytest.fixture
def artifacts() -> Path:
    folder = Path(os.environ.get("WORKBENCH_ARTIFACTS_DIR")
                  or tempfile.mkdtemp(prefix="workbench-browser-"))
    folder.mkdir(parents=True, exist_ok=True)
    print(f"browser test artifacts: {folder}")
    return folder


@pytest.fixture
def lab_server(tmp_path: Path, artifacts: Path) -> Iterator[LabServer]:
    """JupyterLab on a free loopback port with its own token and folders; always shut down."""
    root = tmp_path / "root"
    root.mkdir()
    _write_notebook(root / "explorer.ipynb")
    port, token = _free_port(), secrets.token_hex(16)
    env = {**os.environ}
    for name in ("config", "data", "runtime", "ipython"):
        (tmp_path / name).mkdir()
    env.update(JUPYTER_CONFIG_DIR=str(tmp_path / "config"),
               JUPYTER_DATA_DIR=str(tmp_path / "data"),
               JUPYTER_RUNTIME_DIR=str(tmp_path / "runtime"),
               IPYTHONDIR=str(tmp_path / "ipython"), JUPYTER_PLATFORM_DIRS="1")
    command = [
        sys.executable, "-m", "jupyterlab", "--no-browser",
        "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
        f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
        "--LabApp.expose_app_in_browser=True", "--LabApp.news_url=None",
        "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
        f"--LabApp.workspaces_dir={tmp_path / 'workspaces'}",
        f"--LabApp.user_settings_dir={tmp_path / 'settings'}",
        "--LabApp.extension_manager=readonly", "--ServerApp.terminals_enabled=False",
    ]
    if os.geteuid() == 0:  # CI and these machines run as root
        command.append("--allow-root")
    log = (artifacts / "jupyterlab.log").open("w")
    server = subprocess.Popen(command, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        status = f"{url}/api/status?token={token}"
        _wait_until(lambda: server.poll() is not None or _responds(status), SERVER_START_S,
                    "JupyterLab to answer")
        if server.poll() is not None:
            raise RuntimeError(f"JupyterLab exited with {server.returncode}; see {log.name}")
        yield LabServer(url, token, root)
    finally:
        _shut_down(server, url, token)
        log.close()


def _shut_down(server: subprocess.Popen, url: str, token: str) -> None:
    """Ask the server to stop its kernels and exit; terminate, then kill, if it does not."""
    if server.poll() is None:
        request = urllib.request.Request(f"{url}/api/shutdown?token={token}", method="POST",
                                         data=b"")
        try:
            urllib.request.urlopen(request, timeout=5).close()
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
    for stop in (None, server.terminate, server.kill):
        if stop is not None:
            stop()
        try:
            server.wait(timeout=10)
            return
        except subprocess.TimeoutExpired:
            continue


def _pixels(png: bytes) -> np.ndarray:
    import matplotlib.image

    return matplotlib.image.imread(io.BytesIO(png), format="png")


def _settled(canvas, before: np.ndarray) -> Callable[[], bool]:
    """A condition: the canvas differs from ``before`` and is the same in two shots in a row."""
    shots: list[np.ndarray] = []

    def condition() -> bool:
        shots.append(_pixels(canvas.screenshot()))
        return (len(shots) > 1 and not np.array_equal(shots[-1], before)
                and np.array_equal(shots[-1], shots[-2]))

    return condition


def test_pattern_explorer_redraws_when_the_window_slider_moves(lab_server, artifacts, tmp_path):
    from playwright.sync_api import sync_playwright

    started = time.monotonic()
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            user_data_dir=str(tmp_path / "chromium-profile"), executable_path=str(CHROMIUM),
            headless=True, args=CHROMIUM_ARGS, viewport={"width": 1400, "height": 1100})
        page = context.new_page()
        try:
            page.goto(f"{lab_server.url}/lab/tree/explorer.ipynb?token={lab_server.token}")
            page.wait_for_function("() => window.jupyterapp && window.jupyterapp.shell"
                                   ".currentWidget && window.jupyterapp.shell.currentWidget"
                                   ".sessionContext", timeout=KERNEL_READY_S * 1000)
            page.evaluate("""async () => {
                const panel = window.jupyterapp.shell.currentWidget;
                await panel.context.ready;
                await panel.sessionContext.ready;
                await window.jupyterapp.commands.execute('notebook:run-all-cells');
            }""")
            readout = page.locator(".wb-pattern-readout")
            readout.filter(has_text="density").wait_for(timeout=KERNEL_READY_S * 1000)
            canvas = page.locator(".wb-pattern-figure .jupyter-matplotlib-canvas-div")
            canvas.wait_for(timeout=UPDATE_S * 1000)
            _wait_until(lambda: _pixels(canvas.screenshot()).std() > 0.05, UPDATE_S,
                        "the figure to be drawn")
            before_text, before = readout.inner_text(), _pixels(canvas.screenshot())
            page.screenshot(path=str(artifacts / "pattern_explorer_before.png"), full_page=True)

            handle = page.locator(".wb-pattern-window .noUi-handle")
            handle.focus()
            for _ in range(8):
                handle.press("ArrowRight")

            _wait_until(lambda: readout.inner_text() != before_text, UPDATE_S,
                        "the density readout to change")
            _wait_until(lambda: page.evaluate(KERNEL_IDLE), UPDATE_S, "the kernel to finish")
            _wait_until(_settled(canvas, before), UPDATE_S, "the figure to change and settle")
            after_text = readout.inner_text()
            page.screenshot(path=str(artifacts / "pattern_explorer_after.png"), full_page=True)
            slider_text = page.locator(".wb-pattern-window .widget-readout").inner_text()
        except Exception:
            page.screenshot(path=str(artifacts / "pattern_explorer_failure.png"), full_page=True)
            raise
        finally:
            context.close()
    (artifacts / "pattern_explorer_readouts.json").write_text(json.dumps(
        {"before": before_text, "after": after_text, "window": slider_text}, indent=1))
    assert slider_text.strip() == "16"
    assert "useful" in before_text and "useful" in after_text
    print(f"browser test took {time.monotonic() - started:.1f} s in the browser")


@pytest.fixture
def docs_site(tmp_path: Path) -> Iterator[str]:
    """The docs site built into a temporary folder and served on a free loopback port."""
    pytest.importorskip("sphinx")
    pytest.importorskip("myst_nb")
    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "html"
    subprocess.run([sys.executable, "-m", "sphinx", "-q", "-b", "html", "-c", str(repo / "docs"),
                    str(repo), str(out)], check=True, cwd=repo, timeout=600,
                   capture_output=True)
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "http.server", "--bind", "127.0.0.1",
                               "--directory", str(out), str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_until(lambda: _responds(url + "/index.html"), SERVER_START_S, "the docs server")
        yield url
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_a_built_lesson_page_shows_its_figures(docs_site, artifacts, tmp_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                             args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        try:
            page.goto(f"{docs_site}/notebooks/01_sparsity_patterns.html")
            page.wait_for_load_state("load")
            images = page.locator("img")
            assert images.count() > 0
            first = images.first
            first.scroll_into_view_if_needed()
            width = page.evaluate("img => img.complete ? img.naturalWidth : 0",
                                  first.element_handle())
            page.screenshot(path=str(artifacts / "docs_lesson_01.png"), full_page=False)
            title = page.title()
        finally:
            browser.close()
    assert width > 100, "the lesson's first figure did not load"
    assert "Sparsity patterns" in title or "sparsity" in title.lower()
