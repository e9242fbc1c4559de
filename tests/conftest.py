"""Shared fixtures (the tiny random-weight model, built offline in about a second) and the suite's hooks: the
reliability summary line. Helpers that tests import live in tests/helpers."""
from __future__ import annotations

import logging
import os

import pytest

from tests.helpers import RELIABILITY

# Tests never touch the network: hub lookups fail fast instead of waiting on timeouts.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
logging.getLogger("xformers").setLevel(logging.ERROR)


@pytest.fixture(scope="session")
def tiny_service(tmp_path_factory):
    """One loaded tiny model for the whole session, on the CPU (pinned: its steps policy, 50 → 35, is what these
    tests check, on a GPU host too), with this machine's real probe."""
    from sdxl_ui.service import GenerationService
    from sdxl_ui.settings import AppSettings

    outputs = tmp_path_factory.mktemp("outputs")
    service = GenerationService(AppSettings(model="tiny", outputs=outputs, device="cpu"))
    service.ensure_loaded()
    return service


@pytest.fixture(scope="module")
def tiny():
    """The tiny base and refiner pipelines, built once per test module, for tests that work on the pipelines."""
    from sdxl_ui.models import build_tiny

    base, refiner = build_tiny()
    return {"base": base, "refiner": refiner}


def pytest_terminal_summary(terminalreporter):
    r = RELIABILITY
    if r["bad_inputs"] or r["faults"] or r["jobs"]:
        terminalreporter.write_line(
            f"reliability: {len(r['bad_inputs'])} bad inputs, {len(r['faults'])} faults, "
            f"{r['jobs']} jobs under load, {r['lost']} lost")
        terminalreporter.write_line(f"reliability faults survived: {', '.join(sorted(r['faults']))}")
