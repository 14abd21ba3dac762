"""Browser fixtures: Chromium from the system's packages driven by Playwright.

No browser is downloaded: the tests use the ``chromium`` executable on ``PATH`` (Debian's
``chromium`` package; ``.ci/run`` installs it when it is missing) and skip, saying why,
where it or Playwright is absent. Set ``WORKBENCH_SHOTS`` to a folder to keep screenshots.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

VIEWPORT = {"width": 1400, "height": 1000}
"""The window size the issue's problems were seen at (JupyterLab with its file browser open)."""


def chromium_path() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.fixture(scope="session")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed (pip install -e .[dev])")
    exe = chromium_path()
    if exe is None:
        pytest.skip("no chromium on PATH (apt-get install chromium; .ci/run installs it)")
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=exe, headless=True,
                               args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        try:
            yield b
        finally:
            b.close()


@pytest.fixture()
def page(browser):
    context = browser.new_context(viewport=VIEWPORT)
    pg = context.new_page()
    pg.set_default_timeout(60_000)
    try:
        yield pg
    finally:
        context.close()


@pytest.fixture(scope="session")
def shots(tmp_path_factory) -> Path:
    """Where screenshots go: ``$WORKBENCH_SHOTS`` when set, else a temporary folder."""
    folder = Path(os.environ.get("WORKBENCH_SHOTS") or tmp_path_factory.mktemp("shots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder
