"""The CLI as a user runs it: a subprocess, exit codes, one JSON object on stdout."""
import json
import subprocess
import sys

import numpy as np
import pytest
from tests.helpers import PROBES, RELIABILITY, ROOT, cli
from tests.helpers.common import assert_same_picture
from PIL import Image

from sdxl_ui.metadata import parse_parameters, read_parameters


def test_generate_json_acceptance_run_is_reproducible(tmp_path):
    paths = [tmp_path / "a.png", tmp_path / "b.png"]
    outs = []
    for path in paths:
        proc = cli("generate", "--model", "tiny", "--device", "cpu", "--prompt", "a red fox", "--seed", "7", "--out",
                   str(path), "--json")  # the CPU steps policy (50 → 35) is asserted below, on a GPU host too
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
    # The same seed, the same picture within the CPU kernels' rounding: two runs of this test's pair, on a loaded
    # 2-core EPYC (fresh-clone .ci/run with other jobs beside it, 2026-12-02), differed by 1 of 255 in a few values.
    assert_same_picture(a, b)


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


def _this_machine_probe() -> dict:
    proc = cli("doctor", "--json", "--model", "tiny")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)["probe"]


def test_a_device_this_machine_lacks_is_bad_input_in_cli_and_app(tmp_path):
    """Exit 2 with one line naming --device, like every other bad input (it was 1), before any work."""
    probe = _this_machine_probe()
    missing = "cuda" if not probe["cuda"]["available"] else "mps" if not probe["mps"]["available"] else None
    if missing is None:
        pytest.skip("this machine has both CUDA and MPS")  # no such machine exists; kept honest anyway
    proc = cli("generate", "--model", "tiny", "--device", missing, "--prompt", "x")
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: device: "), proc.stderr
    app = subprocess.run([sys.executable, "app.py", "--model", "tiny", "--device", missing, "--outputs",
                          str(tmp_path)], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert app.returncode == 2 and "error: device: " in app.stderr and "Running on" not in app.stdout, app.stderr
    app = subprocess.run([sys.executable, "app.py", "--model", str(tmp_path / "nope"), "--outputs", str(tmp_path)],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert app.returncode == 2 and "error: model: " in app.stderr and "does not exist" in app.stderr, app.stderr
    RELIABILITY["bad_inputs"].add("--device this machine lacks (CLI and app)")


def test_a_failed_save_says_not_saved_once(tmp_path, monkeypatch, capsys):
    import sdxl_ui.saving as service_module  # the atomic PNG write lives there
    from sdxl_ui.cli import main

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(service_module, "save_png", disk_full)
    code = main(["generate", "--model", "tiny", "--device", "cpu", "--prompt", "x", "--steps", "2",
                 "--outputs", str(tmp_path)])
    assert code == 1
    assert capsys.readouterr().out == "not saved: No space left on device\n"
    RELIABILITY["faults"].add("failed save (CLI)")


def test_doctor_json_on_this_machine():
    # The tiny model: the plan then never depends on how much RAM this host has free (SDXL's is checked with the
    # recorded probes below).
    proc = cli("doctor", "--json", "--model", "tiny")
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
    if not probe["cuda"]["available"] and not probe["mps"]["available"]:  # a CPU host
        assert plan["device"] == "cpu" and plan["refiner"] is False and "CPU" in plan["reasons"]["refiner"]
        assert rows["attention slicing"]["status"] == "off" and rows["attention slicing"]["detail"]
        expected_xf = "not_applicable" if probe["xformers"]["version"] else "unavailable"
        assert rows["xformers"]["status"] == expected_xf and rows["xformers"]["detail"]
        dtype, why = plan["dtype"], plan["reasons"]["dtype"]
        cpu, gemm = probe["cpu"], probe["cpu"]["gemm_gflops"]
        if cpu["forced_dtype"]:  # SDXL_UI_CPU_DTYPE (CI runs the suite under each plan dtype)
            assert dtype == {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[cpu["forced_dtype"]]
            assert f"SDXL_UI_CPU_DTYPE={cpu['forced_dtype']}" in why
        else:  # by the measured speed, never by the flags alone (a bf16 Xeon without AMX runs bf16 at ½ fp32)
            best, key = max((gemm.get(k, 0.0), k) for k in ("bf16", "fp16"))
            assert "measured" in why and f"fp32 {gemm['fp32']:g}" in why
            if best >= 1.3 * gemm["fp32"]:
                assert dtype == {"bf16": "bfloat16", "fp16": "float16"}[key] and f"→ {key}" in why
            elif best < 0.8 * gemm["fp32"]:
                assert dtype == "float32" and "→ fp32" in why


EXPECTED = {  # probe file -> (device, dtype, offload, refiner)
    "rtx5090_torch_without_sm120": ("cpu", "bfloat16", "none", False),
    "rtx5090_torch_with_sm120": ("cuda", "float16", "none", True),
    "laptop_rtx4060_8gb": ("cuda", "float16", "model", True),
    "rtx4090_24gb": ("cuda", "float16", "none", True),
    "h100_80gb": ("cuda", "float16", "none", True),
    "apple_m2_pro": ("mps", "float16", "none", True),
    "cpu_avx2_no_bf16": ("cpu", "float32", "none", False),
    "cpu_epyc_avx512_bf16": ("cpu", "bfloat16", "none", False),
    "cpu_xeon_avx512_bf16_no_amx": ("cpu", "float32", "none", False),  # by its measured GEMM, not its flags
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
    assert proc.returncode == 2  # a --device this machine cannot honour: bad input
    assert "sm_120" in proc.stderr and "PyTorch build" in proc.stderr and "Traceback" not in proc.stderr


def test_upscale_command_with_a_builtin_and_the_users_model(tmp_path):
    """``upscale IN OUT``: no model loaded, the parameters chunk kept with A1111's postprocessing one; bad input
    exit 2 naming the field."""
    from PIL import ImageDraw
    from PIL.PngImagePlugin import PngInfo

    from tests.pipeline.test_sr_models import tiny_esrgan

    source = Image.new("RGB", (64, 48), "white")
    ImageDraw.Draw(source).ellipse((8, 8, 56, 40), fill=(200, 20, 20))
    info = PngInfo()
    info.add_text("parameters", "a red circle\nSteps: 4, Seed: 1, Size: 64x48")
    source.save(tmp_path / "in.png", pnginfo=info)
    tiny_esrgan(tmp_path, "2x-tiny", 2)
    proc = cli("upscale", str(tmp_path / "in.png"), str(tmp_path / "out.png"), "--scale", "3", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"ok": True, "path": str(tmp_path / "out.png"), "width": 192, "height": 144}
    out = Image.open(tmp_path / "out.png")
    assert out.info["parameters"].startswith("a red circle") and \
        out.info["postprocessing"] == "Postprocess upscale by: 3, Postprocess upscaler: Lanczos"
    assert np.array_equal(np.asarray(out), np.asarray(source.resize((192, 144), Image.LANCZOS)))
    proc = cli("upscale", str(tmp_path / "in.png"), str(tmp_path / "model.png"), "--upscaler", "2x-tiny",
               "--upscaler-dir", str(tmp_path), "--width", "100", "--height", "100")
    assert proc.returncode == 0, proc.stderr
    assert Image.open(tmp_path / "model.png").size == (100, 100)
    for args, field in ((["--upscaler", "4x-UltraSharp"], "upscaler_1"), (["--scale", "20"], "upscaling_resize"),
                        (["--upscaler-dir", str(tmp_path / "nope")], "upscaler_dir")):
        proc = cli("upscale", str(tmp_path / "in.png"), str(tmp_path / "bad.png"), *args)
        assert proc.returncode == 2 and proc.stderr.startswith(f"error: {field}:"), (args, proc.stderr)
    proc = cli("upscale", str(tmp_path / "missing.png"), str(tmp_path / "bad.png"))
    assert proc.returncode == 2 and "input: no such file" in proc.stderr
