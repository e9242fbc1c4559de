"""Shared fixtures: the tiny random-weight model (built offline in about a second) and recorded hardware probes."""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import pytest

PROBES = Path(__file__).parent / "probes"
ROOT = Path(__file__).resolve().parent.parent

# Tests never touch the network: hub lookups fail fast instead of waiting on timeouts.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
logging.getLogger("xformers").setLevel(logging.ERROR)


def load_probe(name: str):
    from sdxl_ui.schema import HardwareProbe

    return HardwareProbe.from_dict(json.loads((PROBES / f"{name}.json").read_text()))


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


def run(service, request, **kwargs):
    """Collect a generation's events into (results, errors, logs, progress)."""
    from sdxl_ui.schema import ErrorEvent, LogEvent, ProgressEvent, ResultEvent

    out = {"results": [], "errors": [], "logs": [], "progress": [], "t": []}  # t: (time, event type) of each
    for event in service.generate(request, **kwargs):
        out["t"].append((time.time(), type(event).__name__))
        if isinstance(event, ResultEvent):
            out["results"].append(event)
        elif isinstance(event, ErrorEvent):
            out["errors"].append(event)
        elif isinstance(event, LogEvent):
            out["logs"].append(event.message)
        elif isinstance(event, ProgressEvent):
            out["progress"].append(event)
    return out


@pytest.fixture(scope="module")
def tiny():
    """The tiny base and refiner pipelines, built once per test module, for tests that work on the pipelines."""
    from sdxl_ui.models import build_tiny

    base, refiner = build_tiny()
    return {"base": base, "refiner": refiner}


def pytest_configure(config):
    config.addinivalue_line("markers", "ray: starts Ray instances or clusters (slow; `-m 'not ray'` skips them)")


# Counts filled in by test_reliability.py; printed as one summary line at the end of the run.
RELIABILITY = {"bad_inputs": set(), "faults": set(), "jobs": 0, "lost": 0}


def pytest_terminal_summary(terminalreporter):
    r = RELIABILITY
    if r["bad_inputs"] or r["faults"] or r["jobs"]:
        terminalreporter.write_line(
            f"reliability: {len(r['bad_inputs'])} bad inputs, {len(r['faults'])} faults, "
            f"{r['jobs']} jobs under load, {r['lost']} lost")
        terminalreporter.write_line(f"reliability faults survived: {', '.join(sorted(r['faults']))}")
