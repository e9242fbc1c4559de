"""Fixtures shared by the front-end tests of bad input, faults, load and security defaults."""
from __future__ import annotations

import pytest
from tests.helpers import App

from sdxl_ui.service import GenerationService
from sdxl_ui.settings import AppSettings


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
