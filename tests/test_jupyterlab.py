"""The labs in JupyterLab, driven like a student: the server `make lab` starts, in headless Chromium.

Lab 24 is opened, its outputs cleared, and its `%load_ext helpers`, `%%sandbox` and monitor-widget
cells run from the page; what they print must appear there, and the monitor's numbers must move
while the container burns CPU. Then the kernel and the server are shut down from the menus and
nothing may be left. The notebook on disk is not changed (autosave is off for the test).
"""
import json
import os
import re
import secrets
import signal
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from helpers._core import names, procfs, wait
import leaktool
from test_book import SCREENSHOTS, chromium

ROOT = Path(__file__).resolve().parent.parent
LAB = ROOT / "labs" / "24-container-from-scratch.ipynb"

pytestmark = pytest.mark.requires("browser", "root")


def leaks() -> set[str]:
    """What the workplace's own leak check lists (empty where it is not installed)."""
    if leaktool.LEAKS is None:
        return set()
    return {line for line in leaktool.run(timeout=120).splitlines() if line.startswith("LEAK ")}


def sessions() -> set[Path]:
    """The folders scripts/lab.sh makes for a session's own settings."""
    return set(Path(tempfile.gettempdir()).glob("cnlab-jupyterlab-*"))


def cell_index(starts: str) -> int:
    cells = json.loads(LAB.read_text())["cells"]
    return next(i for i, c in enumerate(cells) if "".join(c["source"]).startswith(starts))


@pytest.fixture
def server(tmp_path):
    """scripts/lab.sh (what `make lab` runs) on a free loopback port with a known token."""
    port, token = names.free_port(), secrets.token_hex(16)
    settings = tmp_path / "user-settings"
    # the test clears the notebook's outputs in the page: it must never be saved over the lab
    docmanager = settings / "@jupyterlab" / "docmanager-extension" / "plugin.jupyterlab-settings"
    docmanager.parent.mkdir(parents=True)
    docmanager.write_text(json.dumps({"autosave": False}))
    env = {**os.environ, "JUPYTER_TOKEN": token, "JUPYTERLAB_SETTINGS_DIR": str(settings),
           "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime")}
    log = (tmp_path / "server.log").open("w")
    before, folders = LAB.read_bytes(), sessions()
    proc = subprocess.Popen(["bash", ROOT / "scripts" / "lab.sh", "--port", str(port), "--no-browser"],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"

    def up():
        try:
            with urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2) as r:
                return r.status == 200
        except OSError:
            return proc.poll() is not None and pytest.fail((tmp_path / "server.log").read_text()[-3000:])
    try:
        wait.until(up, 60, "JupyterLab to answer", interval=0.2)
        yield base, token, proc, tmp_path, folders
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        log.close()
        if LAB.read_bytes() != before:
            LAB.write_bytes(before)
            pytest.fail("the test changed labs/24 on disk (restored)")


def api(base, token, path):
    with urllib.request.urlopen(f"{base}{path}?token={token}", timeout=10) as r:
        return json.loads(r.read())


def menu(page, top, item):
    page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(f"^{top}$")).click()
    page.locator(".lm-Menu-itemLabel", has_text=re.compile(f"^{re.escape(item)}$")).first.click()


def run(page, index):
    """Run cell ``index`` as a student does (click into it, Shift+Enter); return its locator."""
    cell = page.locator(".jp-Notebook .jp-Cell").nth(index)
    cell.scroll_into_view_if_needed()
    cell.locator(".jp-InputArea-editor").click()
    page.keyboard.press("Shift+Enter")
    return cell


def finished(cell, timeout=60):
    """Wait until the cell's prompt shows an execution count, not [*]."""
    cell.locator(".jp-InputPrompt", has_text=re.compile(r"\[\d+\]")).wait_for(timeout=timeout * 1000)
    return cell


def test_lab24_in_jupyterlab(server):
    base, token, proc, tmp, sessions_before = server
    before = leaks()
    started = time.monotonic()
    with chromium() as browser:
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        try:
            kernel = drive(page, base, token, proc, errors)
        except Exception:
            SCREENSHOTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=SCREENSHOTS / "jupyterlab-failed.png")
            raise
        page.close()
    print(f"\nJupyterLab: started, lab 24 run and shut down in {time.monotonic() - started:.0f} s")
    assert proc.returncode == 0
    assert not list(procfs.processes(kernel)), "the kernel outlived the server"
    with pytest.raises(ProcessLookupError):
        os.killpg(proc.pid, 0)  # nothing of the server's process group is alive
    assert not list((tmp / "runtime").glob("*.json")), "connection or server files left behind"
    assert sessions() <= sessions_before, "the session's settings folder outlived the server"
    left = leaks() - before
    assert not left, f"left behind: {left}"


def drive(page, base, token, proc, errors):
    """What the student does, from opening the lab to File > Shut Down; returns a matcher for
    the kernel's processes."""
    page.goto(f"{base}/lab/tree/{LAB.name}?token={token}")
    page.locator(".jp-Notebook .jp-Cell").first.wait_for(timeout=60000)
    page.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']").wait_for(timeout=60000)
    menu(page, "Edit", "Clear Outputs of All Cells")
    assert page.locator(".jp-Notebook .jp-OutputArea-output").count() == 0

    finished(run(page, cell_index("import os")))
    finished(run(page, cell_index("%load_ext helpers")))
    sandboxed = finished(run(page, cell_index("%%sandbox --memory 64M")))
    text = sandboxed.locator(".jp-OutputArea-output").inner_text()
    assert "box: I am PID 1;" in text and "proc" in text.split(), text

    # the monitor: its labels, read from the page while the container works and burns CPU
    monitor = run(page, cell_index("with sandbox.Sandbox(memory=\"64M\", cpus=0.5) as busy_box"))
    labels = monitor.locator(".jp-OutputArea-output .widget-label")
    seen = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        texts = labels.all_inner_texts()
        if texts and (not seen or texts != seen[-1]):
            seen.append(texts)
        if monitor.locator(".jp-InputPrompt", has_text=re.compile(r"\[\d+\]")).count():
            break
        time.sleep(0.05)
    finished(monitor)
    monitor.get_by_text(re.compile("^ended: peak memory")).wait_for(timeout=10000)
    readings = lambda unit: [float(m.group(1)) for texts in seen for t in texts
                             if (m := re.fullmatch(rf"([\d.]+) of {unit}", t))]
    memory, cpu = readings("64 MiB"), readings(r"0\.5 cores")
    assert len(set(memory)) >= 3 and max(memory) > 8, f"the memory label hardly moved: {seen}"
    assert len(set(cpu)) >= 2 and max(cpu) >= 0.25, f"the CPU label did not show the burn: {seen}"

    # no news pop-up: the course's settings turn the question off
    # (overrides become the schema's defaults; the session's own settings leave them alone)
    notification = api(base, token, "/lab/api/settings/@jupyterlab/apputils-extension:notification")
    assert notification["schema"]["properties"]["fetchNews"]["default"] == "false"
    assert "fetchNews" not in notification["settings"]
    assert page.get_by_text("official Jupyter news").count() == 0
    assert not errors, errors

    kernels = api(base, token, "/api/kernels")
    assert len(kernels) == 1
    kernel = lambda p: any(kernels[0]["id"] in a for a in p.argv)
    assert list(procfs.processes(kernel))
    menu(page, "Kernel", "Shut Down Kernel")
    wait.until(lambda: not api(base, token, "/api/kernels"), 30, "the kernel to shut down")
    menu(page, "File", "Shut Down")
    page.locator(".jp-Dialog .jp-mod-accept").click()
    proc.wait(timeout=60)
    return kernel
