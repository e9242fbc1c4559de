"""Capabilities are declared, never probed (issue 26, part 3): the front ends read ``backend.capabilities``
(``sdxl_ui.jobs.Capabilities``) and never ask a backend or service object ``hasattr`` or ``getattr(…, default)``.
The front-end modules are parsed with ``ast``, not imported."""
from __future__ import annotations

import ast
import re
from pathlib import Path

from tests.helpers import ROOT

from sdxl_ui.jobs import LOCAL_SERVICE, Capabilities, capabilities_of

FRONT_ENDS = ["sdxl_ui/ui", "sdxl_ui/a1111", "sdxl_ui/bench", "sdxl_ui/demo", "sdxl_ui/cli.py", "sdxl_ui/api.py",
              "sdxl_ui/commandline.py", "sdxl_ui/selftest.py", "sdxl_ui/__init__.py", "sdxl_ui/__main__.py", "app.py"]
BACKEND_NAME = re.compile(r"service|backend|svc|pool", re.I)  # how the front ends name what they hold


def front_end_files() -> list[Path]:
    out = []
    for entry in FRONT_ENDS:
        path = ROOT / entry
        out += sorted(path.rglob("*.py")) if path.is_dir() else [path]
    return out


def probes(source: str, filename: str = "<src>") -> list[str]:
    """``file:line: call`` for each ``hasattr(x, …)`` or ``getattr(x, …, default)`` whose ``x`` names a backend."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.args):
            continue
        probe = node.func.id == "hasattr" or (node.func.id == "getattr" and len(node.args) + len(node.keywords) >= 3)
        if probe and BACKEND_NAME.search(ast.unparse(node.args[0])):
            found.append(f"{filename}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_the_front_ends_never_probe_a_backend():
    files = front_end_files()
    assert len(files) > 20 and all(f.exists() for f in files), files
    found = [p for f in files for p in probes(f.read_text(), str(f.relative_to(ROOT)))]
    assert not found, "read backend.capabilities (sdxl_ui.jobs.Capabilities) instead:\n" + "\n".join(found)


def test_the_probe_finder_finds_probes():
    assert probes('hasattr(service, "start")\ngetattr(self._backend, "concurrency", 1)\n') == [
        "<src>:1: hasattr(service, 'start')", "<src>:2: getattr(self._backend, 'concurrency', 1)"]
    assert probes('hasattr(image, "convert")\ngetattr(self._backend, name)\n') == []  # not a backend; forwarding


def test_the_ray_backend_declares_its_capabilities():
    from sdxl_ui.backends.ray_serve import RayBackend  # imports ray only when one is made

    caps = RayBackend.capabilities
    assert isinstance(caps, Capabilities) and caps.start and not caps.local_files
    assert not caps.loras and not caps.quality_defaults  # the page then offers the presets and no LoRA panel
    assert hasattr(RayBackend, "start") and not hasattr(RayBackend, "set_loras")
    assert not hasattr(RayBackend, "quality_defaults")


def test_the_local_service_has_what_local_service_declares():
    from sdxl_ui.service import GenerationService

    for capability, method in (("quality_defaults", "quality_defaults"), ("loras", "set_loras"), ("start", "start")):
        assert getattr(LOCAL_SERVICE, capability) == hasattr(GenerationService, method), capability


def test_a_wrapped_backend_passes_its_capabilities_on():
    from sdxl_ui.a1111.jobs import DeviceQueue, QueuedBackend

    class Remote:
        capabilities = Capabilities(start=True, local_files=False)

    assert capabilities_of(QueuedBackend(Remote(), DeviceQueue(lambda: 1, 1))) is Remote.capabilities


def test_the_local_service_declares_its_capabilities_and_typed_state(tmp_path):
    from sdxl_ui.jobs import Backend
    from sdxl_ui.schema import ServiceState
    from sdxl_ui.service import GenerationService
    from sdxl_ui.settings import AppSettings

    service = GenerationService(AppSettings(model="tiny", device="cpu", outputs=tmp_path))
    assert GenerationService.capabilities is LOCAL_SERVICE and isinstance(service, Backend)  # the whole protocol
    assert service.status()["state"] is ServiceState.NOT_LOADED
