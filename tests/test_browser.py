"""A real browser drives notebook 01's interactive feature explorer in JupyterLab.

Chromium (headless, through Playwright) opens a *copy* of notebook 01 with small parameters injected
after its parameter cell, runs every cell from the Run menu, then changes the ``block`` dropdown and
the ``t`` slider of the ``feature_explorer`` panel and checks that each change redraws the figure
(the PNG inside the panel's Output changes) within a few seconds. Screenshots go to
``$DIFFSEG_RESULTS/browser/`` (a temporary folder under pytest, see ``conftest.py``).

Needs ``playwright`` (the Python package only: the system's Chromium is used, nothing is downloaded),
a ``chromium`` binary (Debian's ``apt-get install chromium``; or set ``DIFFSEG_CHROMIUM`` to another
Chromium/Chrome) and ``jupyterlab``; it is skipped, with the reason, when one is missing. ``.ci/run``
installs all three.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from diffseg_utils.registry import REPO_ROOT

NOTEBOOK = REPO_ROOT / "notebooks" / "01_representation_analysis.ipynb"
# small enough to run in well under a minute on 2 CPU cores; N_TRAIN >= 6 because section 1 shows six
# training images, N_TEST >= 2 because section 4 shows test image 1
PARAMS = dict(N_TRAIN=6, N_VAL=4, N_TEST=4, TIMESTEPS=[25, 100, 500], PER_CLASS=200)
RUN_TIMEOUT_S = 240        # Run All -> the widget is on the page (the notebook itself runs in ~20-60 s)
REDRAW_LIMIT_S = 10.0      # one widget change -> new figure; measured 0.4-3 s by hand, generous for CI
SERVER_START_S = 60

playwright_sync = pytest.importorskip(
    "playwright.sync_api", reason="playwright is not installed (pip install playwright; .ci/run installs it)")
pytest.importorskip("jupyterlab", reason="jupyterlab is not installed (pip install -e '.[notebooks]')")


@pytest.fixture
def chromium() -> str:
    """The Chromium executable: ``$DIFFSEG_CHROMIUM`` or the first of the usual names on PATH."""
    names = [os.environ["DIFFSEG_CHROMIUM"]] if os.environ.get("DIFFSEG_CHROMIUM") else [
        "chromium", "chromium-browser", "google-chrome", "google-chrome-stable"]
    for name in names:
        if shutil.which(name):
            return shutil.which(name)
    pytest.skip(f"no Chromium found (tried {', '.join(names)}): apt-get install chromium, or set DIFFSEG_CHROMIUM; "
                ".ci/run installs it")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get_json(url: str):
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


def _small_copy(dest: Path) -> Path:
    """Notebook 01 with ``PARAMS`` in a cell after its parameter cell (tagged ``injected-parameters``, as
    papermill does); the repository's notebook is only read."""
    import nbformat

    nb = nbformat.read(NOTEBOOK, as_version=4)
    at = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    source = "\n".join(f"{k} = {v!r}" for k, v in PARAMS.items())
    nb.cells.insert(at + 1, nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]}))
    for cell in nb.cells:  # a fresh, unexecuted notebook: what a reader opens after clearing outputs
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    nb.metadata.pop("widgets", None)
    path = dest / NOTEBOOK.name
    nbformat.write(nb, path)
    return path


def _lab_settings(settings_dir: Path) -> None:
    """Fresh JupyterLab user settings: every cell stays in the DOM (no virtual scrolling), no news pop-ups."""
    for plugin, values in {
        "@jupyterlab/notebook-extension/tracker": {"windowingMode": "none"},
        "@jupyterlab/apputils-extension/notification": {"fetchNews": "false", "checkForUpdates": False},
    }.items():
        pkg, name = plugin.rsplit("/", 1)
        f = settings_dir / pkg / f"{name}.jupyterlab-settings"
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(json.dumps(values))


@pytest.fixture
def lab(tmp_path):
    """A JupyterLab server on a free loopback port, no token, serving ``tmp_path``; yields its URL."""
    root = tmp_path / "root"
    root.mkdir()
    _lab_settings(tmp_path / "settings")
    port = _free_port()
    env = dict(os.environ, JUPYTERLAB_SETTINGS_DIR=str(tmp_path / "settings"),
               JUPYTERLAB_WORKSPACES_DIR=str(tmp_path / "workspaces"), JUPYTER_RUNTIME_DIR=str(tmp_path / "runtime"))
    # the kernel inherits this environment: MPLBACKEND=Agg (set by .ci/run) would keep ipykernel from
    # choosing its inline backend, and the Output widget would never receive a figure
    env.pop("MPLBACKEND", None)
    log = open(tmp_path / "jupyterlab.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", f"--port={port}", "--ServerApp.port_retries=0",
         "--ServerApp.ip=127.0.0.1", "--IdentityProvider.token=", "--PasswordIdentityProvider.hashed_password=",
         f"--ServerApp.root_dir={root}", "--LabApp.news_url=None", "--allow-root"],  # CI runs as root
        stdout=log, stderr=subprocess.STDOUT, env=env, cwd=root)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            try:
                _get_json(f"{url}/api/status")
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.flush()
                    pytest.fail(f"JupyterLab did not start:\n{(tmp_path / 'jupyterlab.log').read_text()[-3000:]}")
                time.sleep(0.3)
        yield url, root
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()


def _kernel_idle(url: str) -> bool:
    sessions = _get_json(f"{url}/api/sessions")
    return bool(sessions) and all(s["kernel"]["execution_state"] == "idle" for s in sessions)


def _kmeans_panel(src: str):
    """The right-most quarter of the explorer's figure (the k-means panel) as an (H, W, 3) uint8 array.

    The k-means clustering is seeded, so this panel depends only on (block, t, image); the PCA panel
    beside it does not serve: ``pca_rgb`` (``torch.pca_lowrank``) can colour the same view differently
    on every redraw, so a changed PNG alone would not prove that the figure follows the widgets.
    """
    import base64
    import io

    from PIL import Image

    png = base64.b64decode(src.split(",", 1)[1])
    rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    return rgb[:, rgb.shape[1] * 3 // 4:]


def _wait_redraw(page, img_selector: str, old_src: str, what: str) -> tuple[str, float]:
    """Wait until the panel's figure is a different PNG than ``old_src``; returns it and the seconds taken."""
    t0 = time.perf_counter()
    try:
        page.wait_for_function(
            """([sel, old]) => { const i = document.querySelector(sel);
                                 return i !== null && i.complete && i.naturalWidth > 0 && i.src !== old; }""",
            arg=[img_selector, old_src], timeout=REDRAW_LIMIT_S * 1000, polling=50)
    except playwright_sync.TimeoutError:
        pytest.fail(f"after {what}: the figure was not redrawn within {REDRAW_LIMIT_S} s")
    dt = time.perf_counter() - t0
    src = page.locator(img_selector).get_attribute("src")
    assert src.startswith("data:image/png;base64,"), f"after {what}: the panel shows no PNG figure"
    return src, dt


@pytest.mark.slow
def test_feature_explorer_redraws_in_a_real_browser(chromium, lab, tmp_path):
    url, root = lab
    nb_path = _small_copy(root)
    shots = Path(os.environ.get("DIFFSEG_RESULTS", tmp_path / "results")) / "browser"
    shots.mkdir(parents=True, exist_ok=True)
    timings = {}

    with playwright_sync.sync_playwright() as pw:
        # /dev/shm is small in containers; Playwright already runs Chromium without its sandbox (CI is root)
        browser = pw.chromium.launch(executable_path=chromium, headless=True, args=["--disable-dev-shm-usage"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(f"{url}/lab/tree/{nb_path.name}", timeout=60_000)
            page.locator(".jp-Notebook .jp-CodeCell").first.wait_for(timeout=60_000)
            deadline = time.monotonic() + 60
            while not _kernel_idle(url):  # the kernel has started and is ready
                assert time.monotonic() < deadline, "the notebook's kernel did not start"
                time.sleep(0.3)

            # Run -> Run All Cells, as a reader would
            t0 = time.perf_counter()
            page.locator(".lm-MenuBar-item", has_text=re.compile(r"^Run$")).click()
            run_all = page.locator(".lm-Menu-itemLabel", has_text=re.compile(r"^Run All Cells$"))
            page.locator(".lm-Menu-item", has=run_all).click()
            # the explorer: its figure as an ordinary image output, its controls below it in the same cell
            panel = page.locator(".jp-OutputArea-output .widget-hbox").filter(has=page.locator(".widget-dropdown"))
            img_sel = ".jp-CodeCell:has(.widget-dropdown) .jp-OutputArea-output img"
            deadline = time.monotonic() + RUN_TIMEOUT_S
            while page.locator(img_sel).count() == 0:
                prompts = page.locator(".jp-CodeCell .jp-InputPrompt").all_inner_texts()
                stopped = _kernel_idle(url) and not any("*" in p for p in prompts)
                if stopped and time.perf_counter() - t0 > 3:  # ran, and stopped before the widget
                    outs = page.locator(".jp-OutputArea-output").all_inner_texts()
                    tb = [o for o in outs if "Error" in o or "Traceback" in o]
                    page.screenshot(path=shots / "failed_run.png")
                    pytest.fail("the notebook stopped before the feature explorer appeared:\n" + "\n".join(tb)[-3000:])
                assert time.monotonic() < deadline, f"the widget did not appear within {RUN_TIMEOUT_S} s"
                time.sleep(0.5)
            timings["run all -> widget"] = time.perf_counter() - t0
            deadline = time.monotonic() + 60
            while not _kernel_idle(url):  # the cells after the widget have run too
                assert time.monotonic() < deadline, "the kernel stayed busy after the widget appeared"
                time.sleep(0.3)
            prompts = page.locator(".jp-CodeCell .jp-InputPrompt").all_inner_texts()
            assert all(re.search(r"\[\d+\]", p) for p in prompts), f"not every cell ran: {prompts}"
            tracebacks = page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']",
                                      has_text=re.compile("Traceback")).all_inner_texts()
            assert not tracebacks, f"a cell raised: {tracebacks[0][-2000:]}"

            panel.scroll_into_view_if_needed()
            page.screenshot(path=shots / "01_widget.png")
            cell = page.locator(".jp-CodeCell").filter(has=page.locator(".widget-dropdown"))
            cell.screenshot(path=shots / "01_panel.png")
            src0 = page.locator(img_sel).get_attribute("src")
            assert src0.startswith("data:image/png;base64,")

            # the block dropdown: pick another block
            select = panel.locator(".widget-dropdown select")
            options = select.locator("option").all_inner_texts()
            current = select.evaluate("s => s.options[s.selectedIndex].text")
            other = next(o for o in options if o != current)
            select.select_option(label=other)
            src1, timings["block redraw"] = _wait_redraw(page, img_sel, src0, f"block {current} -> {other}")
            assert not np.array_equal(_kmeans_panel(src0), _kmeans_panel(src1)), \
                f"block {current} -> {other}: the figure was redrawn but shows the same clustering"
            cell.screenshot(path=shots / "02_panel_block.png")

            # the t slider: one step by keyboard (right, or left from the last timestep)
            slider = panel.locator(".widget-hslider").filter(
                has=page.locator("label.widget-label", has_text=re.compile(r"^t$")))
            readout = slider.locator(".widget-readout")
            t_before = readout.inner_text().strip()
            slider.locator(".noUi-handle").focus()
            page.keyboard.press("ArrowLeft" if t_before == str(PARAMS["TIMESTEPS"][-1]) else "ArrowRight")
            src2, timings["t redraw"] = _wait_redraw(page, img_sel, src1, f"t {t_before} -> next")
            t_after = readout.inner_text().strip()
            assert t_after != t_before and t_after in map(str, PARAMS["TIMESTEPS"]), (t_before, t_after)
            assert not np.array_equal(_kmeans_panel(src1), _kmeans_panel(src2)), \
                f"t {t_before} -> {t_after}: the figure was redrawn but shows the same clustering"
            cell.screenshot(path=shots / "03_panel_t.png")
            page.screenshot(path=shots / "03_widget.png")
            assert not errors, f"JavaScript errors on the page: {errors}"
        finally:
            browser.close()

    print(f"\nfeature explorer in {Path(chromium).name} (screenshots in {shots}): "
          + ", ".join(f"{k} {v:.2f} s" for k, v in timings.items())
          + f"; block {current} -> {other}, t {t_before} -> {t_after}")
    for what in ("block redraw", "t redraw"):
        assert timings[what] < REDRAW_LIMIT_S
