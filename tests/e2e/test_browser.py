"""poolmagic's displays in a real JupyterLab, seen through a real (headless) Chromium.

One JupyterLab server (127.0.0.1 only, a random port and token, every network
feature off) and one browser serve the module. The notebook runs a ~6 s map;
while it runs the test reads the live card from the DOM, then it checks what
stays once the map is done (one card per map: the bar became the summary in
place; the timeline), a --keep-going map with failures whose counts agree, a
--tune chart, measures the WCAG contrast of every piece of text poolmagic
shows (tune chart and timeline included) in the light and the dark theme, and
takes screenshots of the output.

Needs chromium, chromedriver (Debian packages), selenium and jupyterlab
(``pip install -e .[browser]``; ``.ci/install-browser`` installs all of it).
Without them the module is skipped, saying what is missing; with them every
problem fails.

``POOLMAGIC_SCREENSHOTS=docs/img pytest tests/e2e/test_browser.py`` also
writes the screenshots the README shows (docs/img/poolmagic-{light,dark}.png).
"""
from __future__ import annotations

import base64
import importlib.util
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nbformat
import psutil
import pytest

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = os.environ.get("POOLMAGIC_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("POOLMAGIC_CHROMEDRIVER", "/usr/bin/chromedriver")
INSTALL = "run .ci/install-browser (apt-get install chromium chromium-driver; pip install -e .[browser])"


def _missing() -> list[str]:
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    missing += [m for m in ("selenium", "jupyterlab") if importlib.util.find_spec(m) is None]
    return missing


if _missing():
    pytest.skip(f"the browser test needs {', '.join(_missing())}: {INSTALL}", allow_module_level=True)

from selenium import webdriver
from selenium.common.exceptions import (
    StaleElementReferenceException,
    WebDriverException,
)
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

NOTEBOOK = "poolmagic-browser.ipynb"
ITEMS = 24  # 0.5 s each, one per chunk: ~6 s on two workers
KEEP_GOING = (
    "squares = _poolmap.results\n"
    "try:\n"
    "    get_ipython().run_cell_magic('poolmap', '--keep-going -c 1 range(8)',\n"
    "        'import time\\ndef odd_fails(x):\\n    time.sleep(0.2)\\n    if x % 4 == 3:\\n'\n"
    "        '        raise ValueError(x)\\n    return x\\n')\n"
    "except Exception as exc:\n"
    "    print('the map failed:', type(exc).__name__)"
)
CELLS = [
    "%load_ext poolmagic\n%poolsize 2\nimport sys, poolmagic\nprint(sys.executable)\nprint(poolmagic.__file__)",
    f"%%poolmap -c 1 range({ITEMS})\nimport time\n\n\ndef slow_square(x):\n    time.sleep(0.5)\n    return x * x",
    KEEP_GOING,
    "%%poolmap -q range(40)\ndef quick(x):\n    time.sleep(0.01)\n    return x",
    "%poolsize --tune --budget 2",
    "%poolsize 2\nprint(squares[:3])",
]
MIN_CONTRAST = 4.5  # WCAG 2 AA, normal text
THEMES = {"light": "JupyterLab Light", "dark": "JupyterLab Dark"}

# The kernel: this test process's Python (ipywidgets may be installed: poolmagic
# draws HTML through a display id either way).
KERNEL_CODE = "from ipykernel.kernelapp import launch_new_instance; launch_new_instance()"


# --------------------------------------------------------------------------- waiting


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, every: float = 0.05,
             detail: Callable[[], str] | None = None) -> Any:
    """Poll ``predicate`` until it returns something true; TimeoutError after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            extra = f"; {detail()}" if detail else ""
            raise TimeoutError(f"{what}: not within {timeout} s{extra}")
        time.sleep(every)


# --------------------------------------------------------------------------- processes


def _tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _stop(procs: list[psutil.Process], graceful: Callable[[], None], within: float) -> list[str]:
    """Run ``graceful``, wait up to ``within`` s for ``procs`` to end, kill the rest.

    Returns the processes that had to be killed (empty when shutdown was clean).
    """
    try:
        graceful()
    except (OSError, WebDriverException):  # already gone
        pass
    deadline = time.monotonic() + within
    while any(_alive(p) for p in procs) and time.monotonic() < deadline:
        time.sleep(0.05)
    leaked = []
    for p in procs:
        if _alive(p):
            try:
                leaked.append(f"{p.pid} {' '.join(p.cmdline())[:100]}")
                p.kill()
            except psutil.Error:
                pass
    psutil.wait_procs(procs, timeout=5)
    return leaked


# --------------------------------------------------------------------------- the server


@dataclass
class Lab:
    url: str
    token: str
    root: Path
    proc: subprocess.Popen
    log: Path

    def log_tail(self, n: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-n:]

    def kernel_processes(self) -> list[psutil.Process]:
        return [p for p in _tree(self.proc.pid)[1:] if "launch_new_instance" in " ".join(p.cmdline())]


def _write_settings(settings: Path) -> None:
    """User settings: no news, no update checks, the light theme to start with."""
    files = {
        "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {
            "fetchNews": "false", "checkForUpdates": False, "doNotDisturbMode": True,
        },
        "@jupyterlab/apputils-extension/themes.jupyterlab-settings": {
            "theme": THEMES["light"], "adaptive-theme": False,
        },
    }
    for rel, data in files.items():
        (settings / rel).parent.mkdir(parents=True, exist_ok=True)
        (settings / rel).write_text(json.dumps(data))


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    base = tmp_path_factory.mktemp("lab")
    dirs = {k: base / k for k in ("root", "path", "data", "config", "runtime", "settings", "workspaces", "home")}
    for d in dirs.values():
        d.mkdir()
    spec = dirs["path"] / "kernels" / "python3"
    spec.mkdir(parents=True)
    spec.joinpath("kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-c", KERNEL_CODE, "-f", "{connection_file}"],
        "display_name": "Python 3 (poolmagic browser test)",
        "language": "python",
        "interrupt_mode": "signal",
        "env": {"PYTHONUNBUFFERED": "1"},
    }))
    _write_settings(dirs["settings"])
    env = {
        **os.environ,
        "JUPYTER_PATH": str(dirs["path"]),  # searched first: our python3 kernelspec wins
        "JUPYTER_DATA_DIR": str(dirs["data"]),
        "JUPYTER_CONFIG_DIR": str(dirs["config"]),
        "JUPYTER_RUNTIME_DIR": str(dirs["runtime"]),
        "IPYTHONDIR": str(dirs["home"] / ".ipython"),
        "JUPYTER_PLATFORM_DIRS": "1",
    }
    token = secrets.token_hex(24)
    log = base / "server.log"
    cmd = [
        sys.executable, "-m", "jupyterlab",
        "--no-browser",
        "--ServerApp.ip=127.0.0.1",
        "--ServerApp.port=0",  # a free one; read back from the server's info file
        "--ServerApp.port_retries=0",
        f"--IdentityProvider.token={token}",
        f"--ServerApp.root_dir={dirs['root']}",
        "--ServerApp.allow_remote_access=False",
        "--ServerApp.terminals_enabled=False",
        "--LabApp.news_url=None",
        "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
        "--LabApp.extension_manager=readonly",
        f"--LabApp.user_settings_dir={dirs['settings']}",
        f"--LabApp.workspaces_dir={dirs['workspaces']}",
        "--LabApp.expose_app_in_browser=True",  # window.jupyterapp: commands, the kernel's state
        # the same server serves Notebook 7 (the `notebook` package) at /notebooks/
        "--JupyterNotebookApp.expose_app_in_browser=True",
    ]
    if os.geteuid() == 0:  # CI runs as root
        cmd.append("--allow-root")
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=env, cwd=dirs["root"], stdin=subprocess.DEVNULL,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    server = None
    try:
        def info() -> dict | None:
            if proc.poll() is not None:
                raise RuntimeError(f"jupyter lab exited {proc.returncode}:\n{log.read_text()[-3000:]}")
            for f in dirs["runtime"].glob(f"jpserver-{proc.pid}.json"):
                try:
                    return json.loads(f.read_text())
                except ValueError:  # being written
                    return None
            return None

        port = wait_for(info, 60, "jupyter lab's server info", every=0.1)["port"]
        url = f"http://127.0.0.1:{port}"

        def up() -> bool:
            try:
                with urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2) as r:
                    return r.status == 200
            except (urllib.error.URLError, OSError):
                return False

        wait_for(up, 60, "jupyter lab answering", every=0.1, detail=lambda: log.read_text()[-2000:])
        server = Lab(url, token, dirs["root"], proc, log)
        yield server
    finally:
        procs = _tree(proc.pid)  # the server and its kernels

        # SIGTERM: jupyter server stops at once and shuts its kernels down (SIGINT would ask first)
        leaked = _stop(procs, lambda: proc.send_signal(signal.SIGTERM), 20)
        assert not leaked, f"killed after the server's shutdown: {leaked}\n{log.read_text()[-2000:]}"


# --------------------------------------------------------------------------- the browser


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    profile = tmp_path_factory.mktemp("chromium-profile")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--no-first-run", "--no-default-browser-check", "--disable-extensions",
        "--disable-features=Translate,MediaRouter,OptimizationHints",
        f"--user-data-dir={profile}", "--window-size=1280,1000", "--force-device-scale-factor=1",
        "--lang=en-US",
    ):
        opts.add_argument(arg)
    service = Service(CHROMEDRIVER, log_output=str(profile.parent / "chromedriver.log"))
    driver = webdriver.Chrome(service=service, options=opts)
    procs = _tree(service.process.pid)
    try:
        yield driver
    finally:
        procs = {p.pid: p for p in procs + _tree(service.process.pid)}.values()
        leaked = _stop(list(procs), driver.quit, 15)
        assert not leaked, f"killed after the browser quit: {leaked}"


# --------------------------------------------------------------------------- the page

TEXTS_JS = """
// Every rendered element inside poolmagic's displays (matching arguments[0]) that holds text
// itself, with its text colour and the background colours and opacities from it up to the page.
function describe(e) {
  const cls = typeof e.className === 'string' ? e.className.trim().split(/\\s+/).filter(Boolean) : [];
  return [e.tagName.toLowerCase(), ...cls.slice(0, 2)].join('.');
}
const found = [];
for (const root of document.querySelectorAll(arguments[0])) {
  root.scrollIntoView({block: 'center'});  // each display in view in turn: none under the status bar
  for (const el of [root, ...root.querySelectorAll('*')]) {
    if (el.closest('title')) continue;  // SVG tooltips are not drawn
    const folded = el.closest('details');  // a folded timeline is not drawn (Chrome still lays it out)
    if (folded && !folded.open && !el.closest('summary')) continue;
    const text = Array.from(el.childNodes).filter(n => n.nodeType === 3).map(n => n.textContent).join('').trim();
    if (!text || el.getClientRects().length === 0) continue;
    const layers = [];
    for (let e = el; e; e = e.parentElement) {
      const s = getComputedStyle(e);
      layers.push([s.backgroundColor, parseFloat(s.opacity), describe(e)]);
    }
    const s = getComputedStyle(el);
    const svg = el instanceof SVGElement;
    // what is drawn on top at the text's centre: poolmagic's own output, not an overlay
    el.scrollIntoView({block: 'center'});  // (in view: not under the status bar or off the page)
    const r = el.getBoundingClientRect();
    const hit = document.elementFromPoint(r.left + r.width / 2, r.top + r.height / 2);
    const covered = hit === null ? null : !root.contains(hit) && !hit.contains(root);
    found.push({text: text.slice(0, 80), color: svg ? s.fill : s.color, layers: layers,
                covered: covered ? describe(hit) : null});
  }
}
return {theme: document.body.dataset.jpThemeName, texts: found};
"""

OVERLAY_JS = """
return Array.from(document.querySelectorAll('#jupyterlab-splash, .jp-Dialog')).map(e => e.id || e.className);
"""

PROGRESS_JS = """
const e = document.querySelector('.poolmagic-summary');
return e && e.checkVisibility() ? e.innerText : null;
"""

KERNEL_STATE_JS = """
const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;
if (!w || !w.sessionContext || !w.context || w.context.path !== arguments[0]) return null;
const k = w.sessionContext.session && w.sessionContext.session.kernel;
return k ? k.status : null;
"""

OUTPUT_TEXT_JS = """
// textContent, not innerText: cells scrolled out of view are not rendered (content-visibility)
return Array.from(document.querySelectorAll('.jp-Notebook .jp-CodeCell')).map(c => {
  const o = c.querySelector('.jp-OutputArea');
  return o ? o.textContent : '';
});
"""

BACKGROUND_JS = """
// The backgrounds from the %%poolmap cell's output area up to the page.
const layers = [];
for (let e = document.querySelector('.poolmagic-summary').closest('.jp-OutputArea'); e; e = e.parentElement) {
  const s = getComputedStyle(e);
  layers.push([s.backgroundColor, parseFloat(s.opacity), e.tagName]);
}
return layers;
"""

DISPLAYS_RECT_JS = """
// The rectangle around poolmagic's outputs (cards, tune chart), on the page.
const shown = Array.from(document.querySelectorAll('.poolmagic-summary, .poolmagic-tune'));
shown[0].closest('.jp-OutputArea-child').scrollIntoView({block: 'start'});
const rects = shown.map(e => e.getBoundingClientRect());
const pad = 8;  // none above: the cell's input border is right there
const x = Math.max(0, Math.min(...rects.map(r => r.left)) - pad);
const y = Math.min(...rects.map(r => r.top));
return {x: x, y: y, width: Math.max(...rects.map(r => r.right)) + pad - x,
        height: Math.max(...rects.map(r => r.bottom)) + pad - y, scale: 1};
"""


@dataclass
class Run:
    """The executed notebook in the browser, and what was seen while it ran."""

    driver: Any
    readings: list[tuple[float, str]] = field(default_factory=list)  # (seconds, progress text) while running
    live_texts: dict | None = None  # TEXTS_JS of the live progress display, mid-run
    live_png: bytes = b""  # a picture of it
    seconds: float = 0.0
    app: str = "lab"  # or "notebook": Notebook 7

    def js(self, script: str, *args: Any) -> Any:
        return self.driver.execute_script(script, *args)

    def open_timeline(self) -> Any:
        details = self.driver.find_element(By.CSS_SELECTOR, ".poolmagic-summary details")
        if details.get_attribute("open") is None:
            details.find_element(By.TAG_NAME, "summary").click()
        return wait_for(lambda: _displayed(self.driver, "svg.poolmagic-timeline"), 10, "the timeline shown")

    def set_theme(self, name: str) -> None:
        self.js("return window.jupyterapp.commands.execute('apputils:change-theme', {theme: arguments[0]})", name)
        dark = name != THEMES["light"]

        def applied() -> bool:
            if self.js("return document.body.dataset.jpThemeName") != name or self.js(OVERLAY_JS):
                return False  # the splash screen JupyterLab shows while it switches fades out last
            lum = luminance(effective_background(self.js(BACKGROUND_JS)))
            return lum < 0.2 if dark else lum > 0.8

        wait_for(applied, 20, f"theme {name!r} applied")

    def screenshot(self) -> bytes:
        """poolmagic's outputs (progress bar, summary, timeline) as PNG, cropped from the page."""
        clip = self.js(DISPLAYS_RECT_JS)
        shot = self.driver.execute_cdp_cmd("Page.captureScreenshot", {"format": "png", "clip": clip})
        return base64.b64decode(shot["data"])


def _displayed(driver: Any, css: str) -> Any:
    for el in driver.find_elements(By.CSS_SELECTOR, css):
        try:
            if el.is_displayed():
                return el
        except StaleElementReferenceException:  # replaced while looking: look again
            return None
    return None


def no_traceback(driver: Any) -> list[str]:
    """The cells' output texts; a cell that failed ends the wait at once (run-all stops there)."""
    outs = driver.execute_script(OUTPUT_TEXT_JS)
    failed = [o for o in outs if "Traceback (most recent call last)" in o]
    if failed:
        raise AssertionError(f"a cell failed:\n{failed[0][-3000:]}")
    return outs


@pytest.fixture(scope="module")
def page(lab, browser) -> Run:
    """The notebook, opened in JupyterLab and run top to bottom, watched while it ran."""
    return run_notebook(lab, browser, CELLS, NOTEBOOK)


def run_notebook(lab, browser, cells: list[str], name: str, workspace: str | None = None,
                 app: str = "lab") -> Run:
    """``cells`` as notebook ``name``, run top to bottom, watched while it ran.

    ``workspace``: a JupyterLab workspace of its own, so that the notebooks
    opened before are not restored beside it. ``app``: "lab" (JupyterLab) or
    "notebook" (Notebook 7, served by the same server)."""
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell(src) for src in cells]
    nbformat.write(nb, lab.root / name)

    d = browser
    if app == "notebook":
        d.get(f"{lab.url}/notebooks/{name}?token={lab.token}")
    else:
        where = f"workspaces/{workspace}/tree" if workspace else "tree"
        d.get(f"{lab.url}/lab/{where}/{name}?token={lab.token}")
    run = Run(d, app=app)
    wait_for(lambda: d.execute_script(KERNEL_STATE_JS, name) == "idle", 90,
             "the notebook open with an idle kernel",
             detail=lambda: f"kernel state {d.execute_script(KERNEL_STATE_JS, name)!r}; server log:\n{lab.log_tail()}")
    wait_for(lambda: len(d.find_elements(By.CSS_SELECTOR, ".jp-Notebook .jp-CodeCell")) == len(cells), 20,
             "the notebook's cells shown")

    t0 = time.monotonic()
    # not awaited (a returned promise would be): the test reads the page while the cells run
    d.execute_script("window.jupyterapp.commands.execute('notebook:run-all-cells'); return true")

    # mid-run: the live display, read until it has advanced (or the map is over)
    counted = re.compile(rf"(\d+)/{ITEMS} items")

    def advanced() -> bool:
        no_traceback(d)
        text = d.execute_script(PROGRESS_JS)
        if text is None:
            return False
        if not run.readings or run.readings[-1][1] != text:
            run.readings.append((round(time.monotonic() - t0, 2), text))
        if run.live_texts is None and counted.search(text):
            got = d.execute_script(TEXTS_JS, ".poolmagic-summary")
            if got["texts"] and counted.search(" ".join(t["text"] for t in got["texts"])):
                run.live_texts = got
                run.live_png = run.screenshot()
        counts = {int(m[1]) for _, t in run.readings if (m := counted.search(t))}
        return (len(counts) >= 2 and run.live_texts is not None) or " items in " in text  # (the final card)

    wait_for(advanced, 60, "the live progress display", every=0.05,
             detail=lambda: f"readings {run.readings}; outputs {d.execute_script(OUTPUT_TEXT_JS)}")

    def finished() -> bool:
        outs = no_traceback(d)
        return len(outs) == len(cells) and "[0, 1, 4]" in outs[-1]

    wait_for(finished, 60, "the last cell's output", detail=lambda: f"outputs {d.execute_script(OUTPUT_TEXT_JS)}")
    run.seconds = time.monotonic() - t0
    return run


# --------------------------------------------------------------------------- contrast


def parse_color(css: str) -> tuple[float, float, float, float]:
    """``rgb(1, 2, 3)``, ``rgba(1, 2, 3, 0.5)`` or ``color(srgb 0.1 0.2 0.3 / 0.5)`` as r, g, b (0-255), alpha."""
    css = css.strip()
    m = re.fullmatch(r"rgba?\(\s*([\d.]+)[,\s]+([\d.]+)[,\s]+([\d.]+)(?:\s*[,/]\s*([\d.]+%?))?\s*\)", css)
    if m:
        a = m[4] or "1"
        alpha = float(a[:-1]) / 100 if a.endswith("%") else float(a)
        return float(m[1]), float(m[2]), float(m[3]), alpha
    m = re.fullmatch(r"color\(srgb\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)(?:\s*/\s*([\d.]+))?\s*\)", css)
    if m:
        return float(m[1]) * 255, float(m[2]) * 255, float(m[3]) * 255, float(m[4] or 1)
    raise ValueError(f"unparsed CSS colour {css!r}")


def blend(top: tuple, bottom: tuple) -> tuple[float, float, float]:
    r, g, b, a = top
    return (r * a + bottom[0] * (1 - a), g * a + bottom[1] * (1 - a), b * a + bottom[2] * (1 - a))


def effective_background(layers: list) -> tuple[float, float, float]:
    """The colour behind an element: its own and its ancestors' backgrounds, composited over white."""
    stack = []
    for bg, _opacity, _where in layers:
        c = parse_color(bg)
        if c[3] > 0:
            stack.append(c)
            if c[3] >= 1:
                break
    color = (255.0, 255.0, 255.0)  # the canvas, should nothing be opaque
    for c in reversed(stack):
        color = blend(c, color)
    return color


def luminance(rgb: tuple) -> float:
    """WCAG 2 relative luminance."""
    def lin(c: float) -> float:
        c /= 255
        return c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4

    r, g, b = (lin(c) for c in rgb[:3])
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def contrast(a: tuple, b: tuple) -> float:
    la, lb = sorted((luminance(a), luminance(b)), reverse=True)
    return (la + 0.05) / (lb + 0.05)


@dataclass
class Measured:
    text: str
    where: str
    color: str
    background: tuple[float, float, float]
    ratio: float

    def __str__(self) -> str:
        bg = "#" + "".join(f"{round(c):02x}" for c in self.background)
        return f"{self.text!r} {self.ratio:.2f}:1 ({self.color} on {bg}, in {self.where})"


def contrasts(texts: list[dict]) -> list[Measured]:
    """Each text's WCAG contrast ratio against what is behind it.

    The text's own alpha and the opacity of the element and its ancestors
    below the opaque background fade it into that background: the drawn colour
    is blended before the ratio is taken.
    """
    out = []
    for t in texts:
        fg = parse_color(t["color"])
        bg = effective_background(t["layers"])
        opacity = 1.0
        for css, op, _where in t["layers"]:
            if parse_color(css)[3] >= 1:
                break
            opacity *= op
        drawn = blend((fg[0], fg[1], fg[2], fg[3] * opacity), bg)
        where = " < ".join(w for _, _, w in t["layers"][:3])
        out.append(Measured(t["text"], where, t["color"], bg, contrast(drawn, bg)))
    return out


# --------------------------------------------------------------------------- tests


@pytest.mark.timeout(180)  # includes starting JupyterLab and Chromium and the ~6 s run
def test_live_progress_then_summary_and_timeline(page, lab, tmp_path):
    d = page.driver
    (tmp_path / "poolmagic-live.png").write_bytes(page.live_png)
    # the kernel is this venv's interpreter running this checkout
    first = d.execute_script(OUTPUT_TEXT_JS)[0]
    assert sys.executable in first and str(REPO / "src" / "poolmagic") in first, first
    kernels = lab.kernel_processes()
    assert len(kernels) == 1 and kernels[0].cmdline()[0] == sys.executable, [k.cmdline() for k in kernels]

    check_progress_summary_timeline(page)


def check_progress_summary_timeline(page: Run) -> None:
    """What a person saw: the live bar advancing, then the completed bar, the summary,
    the timeline behind its fold, and the results."""
    d = page.driver
    # mid-run: the live display was visible and its count advanced between readings
    print(f"live progress readings (s after run-all, text): {page.readings}")
    live = [t for _, t in page.readings if re.search(rf"\d+/{ITEMS} items", t)]
    assert live, f"no live .poolmagic-progress seen while the map ran; readings {page.readings}"
    counts = [int(re.search(rf"(\d+)/{ITEMS} items", t)[1]) for t in live]
    assert len(set(counts)) >= 2 and counts == sorted(counts), f"progress did not advance: {page.readings}"
    assert all(t.startswith("poolmagic") and "items/s" in t and "progress" in t for t in live), live  # labelled

    # after: one card per map, the live bar turned into the summary in place
    cells = d.find_elements(By.CSS_SELECTOR, ".jp-Notebook .jp-CodeCell")
    cards = cells[1].find_elements(By.CSS_SELECTOR, ".poolmagic-summary")
    assert len(cards) == 1 and not d.find_elements(By.CSS_SELECTOR, ".poolmagic-progress"), [c.text for c in cards]
    summary = cards[0]
    assert summary.is_displayed()
    text = summary.text
    assert "slow_square" in text and f"{ITEMS} items" in text and "speedup ≈" in text, text
    assert "ETA" not in text and "running" not in text, text
    assert re.search(r"time: function .* · transport .* · idle ", text), text
    assert re.search(r"2 workers / \d+ cores?", text), text

    # the timeline is collapsed until its <summary> is clicked
    details = summary.find_element(By.TAG_NAME, "details")
    if details.get_attribute("open") is not None:  # another test opened it
        details.find_element(By.TAG_NAME, "summary").click()
        wait_for(lambda: not _displayed(d, "svg.poolmagic-timeline"), 10, "the timeline folded")
    assert not _displayed(d, "svg.poolmagic-timeline")
    svg = page.open_timeline()
    labels = [t.text for t in svg.find_elements(By.TAG_NAME, "text")]
    rows = [t for t in labels if re.fullmatch(r"worker \d+", t)]
    assert len(rows) >= 2 and {"worker 0", "worker 1"} <= set(rows), labels
    assert len(svg.find_elements(By.CSS_SELECTOR, "rect title")) == ITEMS  # one bar per chunk

    if len(cells) < 6:  # (the dask notebook has the first map only)
        return
    # a --keep-going map with failures: one card, its counts agree, no speedup and no success colour
    failed = cells[2].find_elements(By.CSS_SELECTOR, ".poolmagic-summary")
    assert len(failed) == 1, [c.text for c in failed]
    ftext = failed[0].text
    assert "8 items (6 ok, 2 failed)" in ftext and "failed" in ftext and "speedup" not in ftext, ftext
    assert "success" not in (failed[0].get_attribute("style") or ""), failed[0].get_attribute("style")
    # the quiet map shows nothing; --tune shows its chart
    assert not cells[3].find_elements(By.CSS_SELECTOR, ".poolmagic-summary")
    tune = cells[4].find_elements(By.CSS_SELECTOR, ".poolmagic-tune")
    assert len(tune) == 1 and "samples per size" in tune[0].text and tune[0].find_elements(By.TAG_NAME, "svg")

    outs = d.execute_script(OUTPUT_TEXT_JS)
    assert outs[-1].strip().endswith("[0, 1, 4]"), outs[-1]
    # the map's value, every result, under the summary
    assert str([x * x for x in range(ITEMS)]).replace(" ", "") in re.sub(r"\s", "", outs[1]), outs[1]


@pytest.mark.timeout(90)
@pytest.mark.parametrize("theme", list(THEMES))
def test_contrast_and_screenshot(page, theme, tmp_path, record_property):
    check_contrast(page, theme, tmp_path, record_property)


def check_contrast(page: Run, theme: str, tmp_path: Path, record_property: Callable) -> None:
    """Every text poolmagic drew, in ``theme``: WCAG contrast at least MIN_CONTRAST, nothing covered."""
    page.set_theme(THEMES[theme])
    page.open_timeline()
    assert not page.js(OVERLAY_JS)

    # screenshots first, so that a failure leaves a picture of it
    shot = tmp_path / f"poolmagic-{theme}.png"
    shot.write_bytes(page.screenshot())
    assert 1_000 < shot.stat().st_size < 300_000, shot.stat().st_size
    target = os.environ.get("POOLMAGIC_SCREENSHOTS")
    if target and page.app == "lab":
        folder = Path(target) if Path(target).is_absolute() else REPO / target
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, folder / shot.name)

    got = page.js(TEXTS_JS, ".poolmagic-summary, .poolmagic-tune")
    assert got["theme"] == THEMES[theme]
    covered = [(t["text"], t["covered"]) for t in got["texts"] if t["covered"]]
    assert not covered, f"text drawn under something else (see {shot}): {covered}"
    measured = contrasts(got["texts"])
    texts = " ".join(m.text for m in measured)
    # everything poolmagic writes was measured: bar, summary, time line, timeline labels
    for must in ("poolmagic", "slow_square", "time: function", "timeline", "worker 0", "worker 1", "chunk ran",
                 "slowest:", "workers busy", "odd_fails", "6 ok, 2 failed", "--tune", "1 worker", "samples per size"):
        assert must in texts, f"{must!r} not among the measured texts: {[m.text for m in measured]}"
    # the live bar, measured while the map ran (in the theme the notebook was run in)
    live = page.live_texts
    if live is not None and live["theme"] == THEMES[theme]:
        measured += [Measured(f"(live) {m.text}", m.where, m.color, m.background, m.ratio)
                     for m in contrasts(live["texts"])]
    (tmp_path / "contrast.json").write_text(json.dumps([m.__dict__ for m in measured], indent=1, ensure_ascii=False))

    worst = min(measured, key=lambda m: m.ratio)
    print(f"contrast [{page.app} {theme}]: min {worst.ratio:.2f}:1 over {len(measured)} texts; lowest {worst}")
    record_property(f"min_contrast_{page.app}_{theme}", round(worst.ratio, 2))
    low = [m for m in measured if m.ratio < MIN_CONTRAST]
    assert not low, f"below {MIN_CONTRAST}:1 in the {theme} theme (see {shot}): " + "; ".join(map(str, low))


# Last in the module: it opens another notebook, and the tests above read the page
# of the first one.
DASK_CELLS = [CELLS[0].replace("%poolsize 2", "%poolsize 2\n%poolsize --backend dask"), CELLS[1],
              "print(_poolmap.results[:3])"]


@pytest.mark.timeout(180)
def test_live_progress_then_summary_and_timeline_on_dask(lab, browser, tmp_path):
    """The same cells on a dask LocalCluster: the same displays, drawn from the same events."""
    pytest.importorskip("distributed")
    run = run_notebook(lab, browser, DASK_CELLS, "poolmagic-browser-dask.ipynb", "dask")
    (tmp_path / "poolmagic-live-dask.png").write_bytes(run.live_png)
    status = browser.execute_script(OUTPUT_TEXT_JS)[0]
    assert "dask LocalCluster started by poolmagic" in status, status
    check_progress_summary_timeline(run)


@pytest.mark.timeout(300)
def test_notebook7_one_card_per_map_and_contrast(lab, browser, tmp_path, record_property):
    """The same notebook in Notebook 7 (the `notebook` package, on the same server): the live
    bar, one card per map, the timeline, and every text's contrast in the light and dark theme."""
    if importlib.util.find_spec("notebook") is None:
        pytest.skip(f"Notebook 7 is not installed (the 'browser' extra has it): {INSTALL}")
    run = run_notebook(lab, browser, CELLS, "poolmagic-notebook7.ipynb", app="notebook")
    assert run.js("return window.jupyterapp && window.jupyterapp.name") == "Jupyter Notebook"
    check_progress_summary_timeline(run)
    for theme in THEMES:
        check_contrast(run, theme, tmp_path, record_property)
