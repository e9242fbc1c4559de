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


def test_operation_speeds_are_measured_once_and_kept(tmp_path, monkeypatch):
    """The operation classes (linear, conv, attention, vae conv) per dtype are measured at SDXL's shapes once per
    machine and torch version, kept in the cache folder, read back after; ``forget_op_speeds`` (doctor
    --remeasure) drops them; a damaged cache file is measured over."""
    import json

    import torch

    from sdxl_ui import device

    monkeypatch.setenv("SDXL_UI_CACHE_DIR", str(tmp_path))
    calls = []
    real = device._measure_ops

    def counted(torch_module):
        calls.append(1)
        return real(torch_module)

    monkeypatch.setattr(device, "_measure_ops", counted)
    first, note = device.op_speeds(torch, "Some CPU")
    assert calls == [1] and "kept in" not in note and note.startswith("measured ")
    assert set(first) == {"linear", "conv", "attention", "vae conv"}
    for name, speeds in first.items():
        assert speeds["fp32"] > 0, name
    assert {"fp32 cl"} <= set(first["conv"]) and {"fp32 cl"} <= set(first["vae conv"])
    again, note = device.op_speeds(torch, "Some CPU")
    assert calls == [1] and again == first and f"kept in {tmp_path / 'op-speeds.json'}" in note
    kept = json.loads((tmp_path / "op-speeds.json").read_text())
    assert [k for k in kept] == [f"Some CPU | {__import__('platform').machine()} | {torch.get_num_threads()} threads "
                                 f"| torch {torch.__version__}"]
    device.op_speeds(torch, "Another CPU")  # another machine: its own entry
    assert calls == [1, 1] and len(json.loads((tmp_path / "op-speeds.json").read_text())) == 2
    (tmp_path / "op-speeds.json").write_text("{not json")
    device.op_speeds(torch, "Some CPU")
    assert calls == [1, 1, 1]


def test_a_slow_kernel_is_screened_at_a_small_shape_and_the_measurement_keeps_to_its_budget():
    """On a CPU where a dtype's linear is fast but its attention (or a layout's convolution) is emulated, the full
    shape would cost minutes (a CI host took over 300 s): such a case is timed at its small shape only and left out
    by name; past the budget the rest is left out, said, and never run."""
    from sdxl_ui import device

    now = [0.0]
    ran = []
    rates = {("fp32", "attention"): 100e9, ("bf16", "attention"): 5e9,  # bf16 attention: emulated, 5 % of fp32
             ("fp32", "conv"): 100e9, ("bf16", "conv"): 300e9}

    def case(name):
        def build(dtype, small):
            flops = 1e9 if small else 16e9

            def call():
                ran.append((dtype, name, small))
                now[0] += flops / rates[(dtype, name)]
            return call, flops
        return name, "", build

    speeds, left = device._measure_cases([case("attention"), case("conv")], [("fp32", "fp32"), ("bf16", "bf16")],
                                         clock=lambda: now[0])
    assert speeds == {"attention": {"fp32": 100.0}, "conv": {"fp32": 100.0, "bf16": 300.0}}
    assert left == ["bf16 attention (emulated: 5% of fp32 at a small shape)"]
    assert ("bf16", "attention", False) not in ran  # the emulated kernel never ran at the full shape
    # a budget of 0.4 s: fp32 attention (small + full, 0.5 s) spends it, the rest is left out, not run
    now[0], ran[:] = 0.0, []
    speeds, left = device._measure_cases([case("attention"), case("conv")], [("fp32", "fp32"), ("bf16", "bf16")],
                                         clock=lambda: now[0], budget_s=0.4)
    assert speeds == {"attention": {"fp32": 100.0}}
    assert left == [f"{d} {n} (the 0.4 s budget ran out)" for d, n in
                    (("fp32", "conv"), ("bf16", "attention"), ("bf16", "conv"))]
    assert {r[:2] for r in ran} == {("fp32", "attention")}
    # a single call over SLOW_CALL_S is timed once, not again for the best of OP_ROUNDS
    now[0], ran[:] = 0.0, []
    rates[("fp32", "conv")] = 10e9  # 1.6 s at the full shape
    device._measure_cases([case("conv")], [("fp32", "fp32")], clock=lambda: now[0])
    assert ran.count(("fp32", "conv", False)) == 1 and ran.count(("fp32", "conv", True)) == 2


def test_the_probe_carries_the_operation_speeds_and_doctor_remeasure_redoes_them(tmp_path):
    import json
    import os

    env = {**os.environ, "SDXL_UI_CACHE_DIR": str(tmp_path)}

    def doctor(*args):
        proc = subprocess.run([sys.executable, "-m", "sdxl_ui", "doctor", "--model", "demo", *args], cwd=ROOT,
                              env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    first = json.loads(doctor("--json"))["probe"]["cpu"]
    assert first["op_speeds"]["vae conv"]["fp32"] > 0 and "kept in" not in first["op_note"]
    assert "kept in" in json.loads(doctor("--json"))["probe"]["cpu"]["op_note"]
    text = doctor("--remeasure")
    assert "Operation speeds, GFLOP/s (measured " in text and "kept in" not in text.split("Operation speeds")[1][:200]
    assert "vae conv" in text and "channels-last VAE" in text
