"""The Inspector in a real JupyterLab page, driven as a person would: type a prompt and a
subject, run, edit, undo. The test starts JupyterLab on a free loopback port with its own
token and config folders, and shuts it (and its kernel) down afterwards."""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT = 180  # s: JupyterLab start on a busy machine
RUN_TIMEOUT_MS = 420_000  # kernel start, model load and the first trace or edit, on a busy 2-core machine


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _notebook(path: Path) -> None:
    import nbformat

    source = ("import workbench as wb\n"
              "from workbench.widgets import Inspector\n"
              "model = wb.load_model('toy-facts', device='cpu')\n"
              "inspector = Inspector(model, wb.load_facts('toy-facts')[:5], samples=3)\n"
              "inspector")
    book = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(source)])
    book.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(book, path)


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    pytest.importorskip("jupyterlab")
    from workbench.loading import ModelLoadError, bundled_path

    try:
        bundled_path()
    except ModelLoadError:
        pytest.skip("bundled model not built yet")
    base = tmp_path_factory.mktemp("lab")
    root = base / "root"
    root.mkdir()
    _notebook(root / "inspector.ipynb")
    port, token = _free_port(), secrets.token_hex(16)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", JUPYTER_CONFIG_DIR=str(base / "config"),
               JUPYTERLAB_WORKSPACES_DIR=str(base / "workspaces"), JUPYTER_RUNTIME_DIR=str(base / "runtime"),
               JUPYTERLAB_SETTINGS_DIR=str(base / "settings"))
    log = open(base / "lab.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", f"--port={port}", "--ServerApp.port_retries=0",
         "--ServerApp.ip=127.0.0.1", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
         "--LabApp.news_url=", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
         "--LabApp.extension_manager=readonly", "--ServerApp.terminals_enabled=False",
         *(["--allow-root"] if hasattr(os, "geteuid") and os.geteuid() == 0 else [])],
        cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                with urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"JupyterLab did not start: {(base / 'lab.log').read_text()[-2000:]}")
            time.sleep(1)
        yield {"url": url, "token": token, "log": base / "lab.log", "root": root}
    finally:
        try:  # shuts down the kernels, then the server
            req = urllib.request.Request(f"{url}/api/shutdown", method="POST",
                                         headers={"Authorization": f"token {token}"})
            urllib.request.urlopen(req, timeout=10)
        except OSError:
            pass
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()


def _fact():
    """A fact outside the Inspector's five examples, typed by hand."""
    import workbench as wb

    facts = wb.load_facts("toy-facts")
    seen = {f.subject for f in facts[:5]}
    return next(f for f in facts[5:] if f.subject not in seen and f.target_new)


def _field(inspector, label: str):
    return inspector.locator(f"div.widget-text:has(> label:text-is('{label}')) input")


def _no_horizontal_scroll(locator) -> dict:
    return locator.evaluate("""el => {
        const out = el.closest('.jp-OutputArea-output') || el.parentElement;
        const plot = el.getBoundingClientRect(), area = out.getBoundingClientRect();
        const scrolls = [];
        for (let e = el; e && !e.classList.contains('jp-Notebook'); e = e.parentElement) {
            if (e.scrollWidth > e.clientWidth + 1 && getComputedStyle(e).overflowX !== 'visible') {
                const wide = Array.from(e.querySelectorAll('*')).filter(c => c.getBoundingClientRect().right >
                    e.getBoundingClientRect().right + 1).map(c => c.className).slice(0, 3);
                scrolls.push([e.className, e.scrollWidth, e.clientWidth, wide]);
            }
        }
        return {plot_right: plot.right, area_right: area.right, plot_width: plot.width, area_width: area.width, scrolls};
    }""")


def _wait_done(page, finished: str, shot) -> None:
    """Wait until the Inspector's progress label says the run finished, or its status shows an error
    (then fail at once with that error and a screenshot)."""
    page.wait_for_function(
        """re => { const t = Array.from(document.querySelectorAll('.workbench-inspector .widget-html'));
                   return t.some(e => new RegExp(re).test(e.textContent)) ||
                          !!document.querySelector(".workbench-inspector span[style*='color:#b00']:not(:empty)"); }""",
        arg=finished, timeout=RUN_TIMEOUT_MS)
    error = page.locator(".workbench-inspector span[style*='color:#b00']")
    if error.count() and "edit failed" not in error.first.text_content():
        page.screenshot(path=str(shot))
        raise AssertionError(f"the Inspector shows an error: {error.first.text_content()}")


def _run_first_cell(page, scope, key: str) -> None:
    """Run the first cell under ``scope`` (the page or one notebook panel) with ``key``; a key press that
    lands before the editor is ready is lost, so press again until the cell's prompt shows it ran."""
    prompt = scope.locator(".jp-Cell .jp-InputPrompt").first
    for _ in range(3):
        scope.locator(".jp-Cell .cm-content").first.click()
        page.keyboard.press(key)
        try:
            page.wait_for_function("e => /\\[(\\*|\\d+)\\]/.test(e.textContent)", arg=prompt.element_handle(),
                                   timeout=20_000)
            return
        except Exception:  # noqa: BLE001 - playwright's TimeoutError: try the key again
            continue


def test_inspector_in_jupyterlab(lab, page, shots):
    fact = _fact()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(f"{lab['url']}/lab/tree/inspector.ipynb?token={lab['token']}")
    page.wait_for_selector(".jp-NotebookPanel .jp-Cell .cm-content", timeout=RUN_TIMEOUT_MS)
    # the kernel is up when the status bar says so
    page.locator(".jp-StatusBar-Widget", has_text="Idle").first.wait_for(timeout=RUN_TIMEOUT_MS)
    _run_first_cell(page, page, "Shift+Enter")
    inspector = page.locator(".workbench-inspector")
    inspector.wait_for(timeout=RUN_TIMEOUT_MS)
    # JupyterLab's "get notified about news?" toast (exact name: "No" is also inside the token "␣Bruno")
    news = page.locator(".Toastify").get_by_role("button", name="No", exact=True)
    if news.count():
        news.first.click()
    assert page.locator(".workbench-inspector .widget-toggle-buttons button.mod-active").first.text_content() \
        == "subject"

    # ---- trace a typed prompt
    _field(inspector, "prompt").fill(fact.prompt)
    _field(inspector, "prompt").press("Enter")
    _field(inspector, "subject").fill(fact.subject)
    _field(inspector, "subject").press("Enter")
    inspector.get_by_role("button", name="Run trace").click()
    _wait_done(page, "traced in", shots / "inspector_trace_failed.png")
    title = inspector.locator(".js-plotly-plot .gtitle", has_text=fact.prompt)
    title.wait_for(timeout=RUN_TIMEOUT_MS)
    plot = inspector.locator(".js-plotly-plot").first
    page.wait_for_timeout(500)
    plot.scroll_into_view_if_needed()
    page.screenshot(path=str(shots / "inspector_trace.png"))
    fit = _no_horizontal_scroll(plot)
    assert fit["plot_right"] <= fit["area_right"] + 1 and not fit["scrolls"], fit
    assert plot.evaluate("g => g.data.length") == 3  # the three panels

    # ---- edit that fact
    inspector.locator(".lm-TabBar-tab", has_text="Edit").click()
    assert fact.prompt in inspector.locator(".widget-html", has_text="Edits the fact").first.text_content()
    _field(inspector, "new object").fill(fact.target_new)
    _field(inspector, "new object").press("Enter")
    inspector.get_by_role("button", name="Apply edit").click()
    _wait_done(page, "edited in|edit failed in", shots / "inspector_edit_failed.png")
    badge = page.locator(".workbench-badge")
    badge.wait_for(timeout=10_000)
    table = inspector.locator(".widget-output table", has_text=fact.prompt)
    table.wait_for(timeout=RUN_TIMEOUT_MS)
    after = inspector.locator(".js-plotly-plot .gtitle", has_text="before and after")
    after.wait_for(timeout=RUN_TIMEOUT_MS)
    assert fact.prompt in after.text_content()
    table_text = table.text_content()
    assert "before" in table_text and "after" in table_text and f"P({fact.target_new})" in table_text
    status = inspector.locator(".widget-html", has_text="edit").all_text_contents()
    assert any(("applied the" in s) or ("edit failed" in s) for s in status), status
    edited_plot = inspector.locator(".js-plotly-plot", has=page.locator(".gtitle", has_text="before and after"))
    edited_plot.scroll_into_view_if_needed()
    page.wait_for_timeout(500)
    page.screenshot(path=str(shots / "inspector_edit.png"))
    fit = _no_horizontal_scroll(edited_plot)
    assert fit["plot_right"] <= fit["area_right"] + 1 and not fit["scrolls"], fit

    # ---- undo: the outputs and the badge go
    inspector.get_by_role("button", name="Undo").click()
    badge.wait_for(state="detached", timeout=60_000)
    page.wait_for_function("() => !document.querySelector('.workbench-inspector .widget-output table')",
                           timeout=60_000)
    assert inspector.locator(".js-plotly-plot .gtitle", has_text="before and after").count() == 0
    assert inspector.locator(".widget-html", has_text="reverted").count() >= 1
    page.screenshot(path=str(shots / "inspector_undo.png"))
    assert not [e for e in errors if "workbench" in e.lower()], errors


TABS_NOTEBOOK = ("import workbench as wb\n"
                 "from workbench.widgets import Inspector\n"
                 "model = wb.load_model('toy-facts', device='cpu')\n"
                 "facts = wb.load_facts('toy-facts')[:40]\n"
                 "inspector = Inspector(model, facts, samples=2)\n"
                 "inspector.run_trace()\n"
                 "inspector.new_object.value = facts[0].target_new\n"
                 "inspector.apply_edit()\n"
                 "inspector",
                 "again = Inspector(model, facts, samples=2)  # the cell run again: the model is still edited\n"
                 "again")


def _plot_sizes(inspector) -> list[dict]:
    """Width and height of every figure in the inspector's visible tab, and of its output area."""
    return inspector.evaluate("""el => Array.from(el.querySelectorAll('.js-plotly-plot'))
        .filter(g => g.offsetParent !== null)
        .map(g => { const r = g.getBoundingClientRect();
                    const out = g.closest('.widget-output') || g.parentElement;
                    const svg = g.querySelector('.main-svg');
                    return {width: r.width, height: r.height, svg_height: svg ? svg.getBoundingClientRect().height : 0,
                            area: out.getBoundingClientRect().width}; })""")


def test_inspector_tabs_and_a_recreated_inspector(lab, browser, shots):
    """Issue 22 problems 3 and 1 in JupyterLab at 1000 px with the file browser open: every map keeps
    its height after each tab switch and fits its output area; an Inspector created again on the
    edited model shows the badge and undoes the edit."""
    import nbformat

    root = Path(lab["root"])
    book = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(src) for src in TABS_NOTEBOOK])
    book.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(book, root / "tabs.ipynb")
    context = browser.new_context(viewport={"width": 1000, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(60_000)
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    try:
        page.goto(f"{lab['url']}/lab/tree/tabs.ipynb?token={lab['token']}")
        # JupyterLab may restore notebooks opened earlier in this server: use the visible one only
        panel = page.locator(".jp-NotebookPanel >> visible=true").filter(has_text="again = Inspector")
        panel.locator(".jp-Cell .cm-content").first.wait_for(timeout=RUN_TIMEOUT_MS)
        page.locator(".jp-StatusBar-Widget", has_text="Idle").first.wait_for(timeout=RUN_TIMEOUT_MS)
        if not page.locator(".jp-FileBrowser").first.is_visible():  # JupyterLab's file browser, open
            page.keyboard.press("Control+Shift+F")
        _run_first_cell(page, panel, "Control+Enter")
        first = panel.locator(".workbench-inspector").first
        first.wait_for(timeout=RUN_TIMEOUT_MS)
        first.locator(".js-plotly-plot").first.wait_for(timeout=RUN_TIMEOUT_MS)
        panel.locator(".jp-Cell").nth(1).locator(".cm-content").click()
        page.keyboard.press("Control+Enter")
        second = panel.locator(".workbench-inspector").nth(1)
        second.wait_for(timeout=RUN_TIMEOUT_MS)
        news = page.locator(".Toastify").get_by_role("button", name="No", exact=True)
        if news.count():
            news.first.click()

        def check(tab: str, n: int, name: str) -> None:
            first.locator(".lm-TabBar-tab", has_text=tab).first.click()
            page.wait_for_timeout(1500)  # the kernel redraws the tab's figures
            first.scroll_into_view_if_needed()
            sizes = _plot_sizes(first)
            first.screenshot(path=str(shots / f"inspector_tabs_{name}.png"))
            assert len(sizes) == n, sizes
            for s in sizes:
                assert s["height"] > 100 and s["svg_height"] > 100, (name, sizes)
                assert s["width"] <= s["area"] + 1, (name, sizes)

        check("Edit", 1, "1_edit")  # the before/after maps
        check("Trace", 1, "2_trace")  # the map traced before the edit
        check("Edit", 1, "3_edit_again")
        check("Trace", 1, "4_trace_again")

        badge = second.locator(".workbench-badge")
        assert "edited model: 1 edit(s) applied" in badge.text_content()
        second.scroll_into_view_if_needed()
        page.screenshot(path=str(shots / "inspector_recreated.png"))
        second.locator(".lm-TabBar-tab", has_text="Edit").first.click()
        undo = second.get_by_role("button", name="Undo")
        assert undo.is_enabled()
        undo.click()
        badge.wait_for(state="detached", timeout=60_000)
        assert second.locator(".widget-html", has_text="reverted the rome edit; 0 edit(s) applied").count() == 1
        assert not [e for e in errors if "workbench" in e.lower()], errors
    finally:
        context.close()
