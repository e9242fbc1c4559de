"""The CLI as a user runs it: a subprocess, exit codes, one JSON object on stdout."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import PROBES, ROOT
from PIL import Image

from sdxl_ui.metadata import parse_parameters, read_parameters


def cli(*args, check_json=True):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "sdxl_ui", *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=300)
    return proc


def test_generate_json_acceptance_run_is_reproducible(tmp_path):
    paths = [tmp_path / "a.png", tmp_path / "b.png"]
    outs = []
    for path in paths:
        proc = cli("generate", "--model", "tiny", "--prompt", "a red fox", "--seed", "7", "--out", str(path),
                   "--json")
        assert proc.returncode == 0, proc.stderr
        outs.append(json.loads(proc.stdout))
    data = outs[0]
    for key in ("ok", "path", "seed", "model", "device", "dtype", "steps_requested", "steps_run", "refiner",
                "optimizations", "timings"):
        assert key in data
    assert data["ok"] is True and data["seed"] == 7 and data["device"] == "cpu"
    assert (data["steps_requested"], data["steps_run"], data["refiner"]) == (50, 35, False)
    assert set(data["timings"]) >= {"load_s", "generate_s", "total_s"}
    assert {row["status"] for row in data["optimizations"]} <= {"active", "off", "unavailable", "not_applicable"}
    assert "random weights" in data["note"]
    params = parse_parameters(read_parameters(paths[0]))
    assert params["prompt"] == "a red fox" and params["Seed"] == "7"
    a, b = (np.asarray(Image.open(p)) for p in paths)
    assert np.array_equal(a, b)


@pytest.mark.parametrize("args,field", [
    (["--prompt", "  "], "prompt"),
    (["--prompt", "x", "--width", "100"], "width"),
    (["--prompt", "x", "--steps", "0"], "steps"),
    (["--prompt", "x", "--guidance", "nan"], "guidance"),
    (["--prompt", "x", "--seed", "-3"], "seed"),
    (["--prompt", "x", "--quality", "best"], "quality"),
    (["--prompt", "x", "--out", "/no/such/dir/x.png"], "output_path"),
    (["--prompt", "x", "--out", "picture.jpg"], "output_path"),
])
def test_bad_input_exits_2_with_one_line_naming_the_field(args, field):
    proc = cli("generate", "--model", "tiny", *args)
    assert proc.returncode == 2
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: {field}:"), proc.stderr


def test_bad_model_path_exits_2():
    proc = cli("generate", "--model", "/no/such/model", "--prompt", "x", "--json")
    assert proc.returncode == 2
    assert json.loads(proc.stdout)["error"].startswith("model:")


def test_doctor_json_on_this_machine():
    proc = cli("doctor", "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    probe, plan = data["probe"], data["plan"]
    for key in ("torch_version", "cuda", "mps", "cpu", "xformers"):
        assert key in probe
    for key in ("available", "device_name", "capability", "arch_list", "kernel_ok", "kernel_error", "vram_total_gb"):
        assert key in probe["cuda"]
    for key in ("physical_cores", "flags", "ram_total_gb", "ram_available_gb"):
        assert key in probe["cpu"]
    for key in ("device", "dtype", "reason", "attention", "offload", "refiner", "steps_factor", "threads"):
        assert key in plan
    rows = {r["name"]: r for r in data["optimizations"]}
    if not probe["cuda"]["available"]:
        assert plan["device"] == "cpu" and plan["refiner"] is False and "CPU" in plan["reasons"]["refiner"]
        assert rows["attention slicing"]["status"] == "off" and rows["attention slicing"]["detail"]
        expected_xf = "not_applicable" if probe["xformers"]["version"] else "unavailable"
        assert rows["xformers"]["status"] == expected_xf and rows["xformers"]["detail"]
        if "avx512_bf16" in probe["cpu"]["flags"]:
            assert plan["dtype"] == "bfloat16" and "avx512_bf16" in plan["reasons"]["dtype"]


EXPECTED = {  # probe file -> (device, dtype, offload, refiner)
    "rtx5090_torch_without_sm120": ("cpu", "bfloat16", "none", False),
    "rtx5090_torch_with_sm120": ("cuda", "float16", "none", True),
    "laptop_rtx4060_8gb": ("cuda", "float16", "model", True),
    "rtx4090_24gb": ("cuda", "float16", "none", True),
    "h100_80gb": ("cuda", "float16", "none", True),
    "apple_m2_pro": ("mps", "float16", "none", True),
    "cpu_avx2_no_bf16": ("cpu", "float32", "none", False),
    "cpu_epyc_avx512_bf16": ("cpu", "bfloat16", "none", False),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_doctor_replays_recorded_probes(name):
    proc = cli("doctor", "--json", "--probe-json", str(PROBES / f"{name}.json"))
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)["plan"]
    assert (plan["device"], plan["dtype"], plan["offload"], plan["refiner"]) == EXPECTED[name]
    assert plan["attention"] == "sdpa" and plan["reason"]


def test_doctor_forced_cuda_on_failed_kernel_is_an_error():
    proc = cli("doctor", "--device", "cuda", "--probe-json", str(PROBES / "rtx5090_torch_without_sm120.json"))
    assert proc.returncode == 1
    assert "sm_120" in proc.stderr and "PyTorch build" in proc.stderr and "Traceback" not in proc.stderr
