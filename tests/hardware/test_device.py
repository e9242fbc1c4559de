"""probe_hardware() on this machine, and the rule that only device.py asks torch about hardware."""
import subprocess
import sys

from tests.helpers import ROOT

from sdxl_ui.device import probe_hardware


def test_probe_on_this_machine_is_complete_and_round_trips():
    from sdxl_ui.schema import HardwareProbe

    probe = probe_hardware()
    assert probe.torch_version and probe.cpu.physical_cores >= 1 and probe.cpu.ram_total_gb > 0
    assert "math" in probe.sdpa_backends["cpu"]  # SDPA's reference backend always runs
    if not probe.cuda.available:
        assert probe.cuda.kernel_ok is None and probe.cuda.device_name is None
    assert HardwareProbe.from_dict(probe.to_dict()) == probe


def test_only_device_py_asks_torch_about_hardware():
    needles = ("cuda.is_available", "get_device_properties", "mps.is_available", "/proc/cpuinfo", "mem_get_info")
    offenders = []
    for path in (ROOT / "sdxl_ui").rglob("*.py"):
        if path.name == "device.py" or path.name == "bench.py":
            continue
        text = path.read_text()
        offenders += [f"{path.name}: {n}" for n in needles if n in text]
    assert not offenders


def test_importing_the_package_and_the_ui_does_not_import_torch():
    code = "import sys, sdxl_ui, sdxl_ui.schema, sdxl_ui.settings, sdxl_ui.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.stdout.strip() == "False", out.stderr
