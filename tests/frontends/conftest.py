"""Fixtures shared by the front-end tests: the tiny service and the app (bad input, faults, load, security
defaults) and the Chromium browser (test_app.py, test_screenshot.py)."""
from __future__ import annotations

from pathlib import Path

import pytest
from tests.helpers import App

from sdxl_ui.service import GenerationService
from sdxl_ui.settings import AppSettings

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update"]


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    """One loaded tiny model per test module (bad input, faults)."""
    svc = GenerationService(AppSettings(model="tiny", outputs=tmp_path_factory.mktemp("rel-out"), device="cpu"))
    svc.ensure_loaded()
    return svc


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """app.py with the tiny model and a 12-job queue, one per test module (load, security defaults);
    test_app.py and test_security.py start their own."""
    running = App("--model", "tiny", "--outputs", str(tmp_path_factory.mktemp("load-out")), "--queue-size", "12")
    try:
        running.wait_for("Model loaded")
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: `apt-get install -y chromium` (.ci/run does this)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        yield b
        b.close()
