"""Paths, recorded hardware probes, the event collector and the reliability counts."""
from __future__ import annotations

import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository root
PROBES = ROOT / "tests" / "probes"

# Counts filled in by the reliability tests (tests/frontends: bad input, faults, load, security; the CLI and Ray
# tests add theirs); conftest.py prints them as one summary line at the end of the run.
RELIABILITY = {"bad_inputs": set(), "faults": set(), "jobs": 0, "lost": 0}


def load_probe(name: str):
    from sdxl_ui.schema import HardwareProbe

    return HardwareProbe.from_dict(json.loads((PROBES / f"{name}.json").read_text()))


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
