"""The rooms of docs/architecture.md, checked on the code: the host, the run and the service stay small; the
techniques that join a run through hooks (the tiny decoder, offload) are named by no room of the run path; the
tiny decoder's code lives in its mechanism and its unit only."""
from __future__ import annotations

import ast

from tests.packaging.test_architecture import PACKAGE, imports, modules

ROOMS = {"host.py": 300, "run.py": 300, "image_run.py": 300, "hires_run.py": 300, "service.py": 300}  # lines: "each part well under 300"
RUN_PATH = ("denoise.py", "models.py", "service.py", "run.py", "image_run.py", "hires_run.py", "host.py")
# Names by which a room would reach for a hooked technique itself instead of through hooks.*
TECHNIQUE_NAMES = {"tiny_decoder", "attach_tiny_decoder", "claim_offload", "release_offload", "OffloadRun",
                   "Attached"}  # (diffusers' own pipeline calls, e.g. maybe_free_model_hooks, are not ours)


def test_the_host_the_run_and_the_service_stay_small():
    for name, limit in ROOMS.items():
        lines = len((PACKAGE / name).read_text().splitlines())
        assert lines < limit, f"sdxl_ui/{name}: {lines} lines (the doc says under {limit})"


def _names(path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Name):
            found.add(node.id)
        elif isinstance(node, ast.Attribute):
            found.add(node.attr)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            found.update(part for alias in node.names for part in alias.name.split("."))
            found.update((getattr(node, "module", None) or "").split("."))
    return found


def test_no_room_of_the_run_path_names_a_hooked_technique():
    for name in RUN_PATH:
        named = _names(PACKAGE / name) & TECHNIQUE_NAMES
        assert not named, f"sdxl_ui/{name} names {sorted(named)}: a technique joins a run through its hooks"


def test_the_tiny_decoder_is_imported_by_its_unit_alone():
    """Its places: the mechanism (optimizations/tiny_decoder.py), its unit (TinyDecoder in less_work.py), its tests;
    the bench and the demo's tools measure or train it without importing it."""
    importers = {importer for importer, target, _, _ in imports(modules())
                 if target == "sdxl_ui.optimizations.tiny_decoder"}
    assert importers == {"sdxl_ui.optimizations.less_work"}, importers


def test_the_checks_catch_a_room_that_names_a_technique(tmp_path):
    room = tmp_path / "denoise.py"
    room.write_text("from .optimizations import tiny_decoder\n\ndef f(pipe):\n    return claim_offload(pipe)\n")
    assert _names(room) & TECHNIQUE_NAMES == {"tiny_decoder", "claim_offload"}
