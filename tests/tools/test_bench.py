"""The benchmark command's plumbing, on the tiny architecture (its timings are checked by running it, not here)."""
import json

import pytest
import torch
from tests.helpers import ROOT, cli

from sdxl_ui import bench
from sdxl_ui.assembly import build_full


def test_bench_runs_end_to_end_with_the_high_quality_path(tmp_path):
    proc = cli("bench", "--arch", "tiny", "--res", "128", "--steps", "1", "--hq", "--use-refiner", "on", "--target",
               "cpu", "--json")  # on the CPU (its 50 → 35 steps policy is asserted below), on a GPU host too
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    for name in ("baseline", "plan"):
        row = data[name]
        assert row["s_per_step"] > 0 and row["gflops"] > 0 and row["peak_rss_gb"] > 0
        assert row["matmul_peak_gflops"] > 0 and row["projected_1024_hq_s"] > 0
        assert row["hq"]["image_ok"] and row["hq"]["refiner"] and row["hq"]["total_s"] > row["hq"]["base_s"] > 0
    assert data["baseline"]["dtype"] == "float32" and data["ratio"] > 0 and data["peak_gflops"] > 0
    # Stock runs the seed's two stages (its refiner pipeline decodes); the plan runs the service's own path
    # with this device's steps policy (CPU: 50 → 35) and, forced on here, its refiner.
    assert data["baseline"]["hq"]["steps"] == 50 and "refiner_and_decode_s" in data["baseline"]["hq"]
    assert data["plan"]["hq"]["steps"] == 35 and data["plan"]["hq"]["refiner_s"] > 0
    assert data["plan"]["params"]["refiner_unet"] > 0
    assert data["hq_ratio"] == round(data["baseline"]["hq"]["total_s"] / data["plan"]["hq"]["total_s"], 2)
    assert {r["name"] for r in data["plan"]["report"]} >= {"precision", "PyTorch SDPA attention"}
    assert "progress" not in proc.stdout and "warm-up" in proc.stderr  # progress on stderr, JSON alone on stdout
    assert "HQ timed: refiner step" in proc.stderr
    # Per image: stock diffusers (50 fp32 guided steps) and each preset from its real schedule on this CPU, written
    # out by hand here: High quality 35 Euler steps, CFG for the first 60 % (21 guided, 14 conditional only); Fast
    # 14 DPM++ steps, a full UNet call every 3rd call, CFG for the first 9 steps.
    presets = data["presets"]
    assert presets["stock"]["steps"] == 50 and presets["stock"]["image_s"] > 0
    assert presets["high"]["schedule"]["calls"] == ["F2"] * 21 + ["F1"] * 14
    assert presets["fast"]["schedule"]["calls"] == ("F2 C2 C2 F2 C2 C2 F2 C2 C2 F1 C1 C1 F1 C1").split()
    kinds = data["plan"]["kinds"]
    assert set(kinds) == {"full_guided", "full_cond", "cached_guided", "cached_cond"}
    fast = presets["fast"]
    assert fast["counts"] == {"full_guided": 3, "cached_guided": 6, "full_cond": 2, "cached_cond": 3}
    assert fast["ratio"] == round(presets["stock"]["image_s"] / fast["image_s"], 2)
    check = data["check"]  # the one real Fast image, against the same computation
    assert check["steps"] == 8 and check["measured_s"] > 0 and check["computed_s"] > 0
    assert sum(check["counts"].values()) == 8 and check["counts"]["cached_guided"] > 0
    assert set(data["dtype_peaks"]["gflops"]) >= {"fp32"}
    if "int8" in data["dtype_peaks"]["gflops"]:
        assert data["int8_step"]["s_per_step"] > 0 and 0 < data["int8_step"]["noise_pred_rel_rms_diff"] < 0.1
    # The LCM profile at its High-quality 4 steps, recorded through the same path: its own LCMScheduler, guidance
    # 1.0 (no negative branch: conditional-only calls), no feature cache.
    lcm = presets["lcm-4"]["schedule"]
    assert lcm["calls"] == ["F1"] * 4 and lcm["scheduler"] == "LCMScheduler" and lcm["guidance"] == 1.0
    assert lcm["profile"] == "lcm" and lcm["feature_cache"] == 1 and lcm["steps"] == 4
    # Its tiny-decoder row: the same UNet and text seconds, the decode swapped for AutoencoderTiny's (pixel-scaled).
    full, tiny, decodes = presets["lcm-4"], presets["lcm-4 tiny"], data["decode_1024"]
    assert data["plan"]["tiny_decode_s"] > 0 and data["plan"]["tiny_decode_ok"]
    assert decodes["tiny_decoder_s"] == pytest.approx(data["plan"]["tiny_decode_s"] * (1024 / 128) ** 2, rel=1e-3)
    assert decodes["full_vae_s"] == pytest.approx(data["plan"]["vae_decode_s"] * (1024 / 128) ** 2, rel=1e-3)
    assert tiny["unet_s"] == full["unet_s"] and tiny["decoder"] == "tiny" and full["decoder"] == "full"
    assert full["decode_s"] - tiny["decode_s"] == pytest.approx(decodes["full_vae_s"] - decodes["tiny_decoder_s"])
    assert full["image_s"] - tiny["image_s"] == pytest.approx(decodes["full_vae_s"] - decodes["tiny_decoder_s"],
                                                              abs=0.011)  # each image_s is rounded to 0.01 s
    assert tiny["ratio"] == round(presets["stock"]["image_s"] / tiny["image_s"], 2)
    # The peer: stock diffusers' own fp32 steps (its conditional-only step, timed) on the same LCM schedule, with its
    # text encoding and full VAE decode: 4 × the step (FLOP-scaled) + text + decode, and lcm-4's ratio to it.
    peer, base = presets["lcm-4 peer"], data["baseline"]
    assert base["full_cond_s"] > 0 and peer["peer_of"] == "lcm-4" and peer["dtype"] == "float32"
    scale = full["unet_s"] / (4 * data["plan"]["kinds"]["full_cond"])  # the FLOP ratio 1024² / 128² lcm-4 used
    assert peer["unet_s"] == pytest.approx(4 * base["full_cond_s"] * scale, rel=0.01, abs=0.011)
    assert peer["image_s"] == pytest.approx(peer["unet_s"] + base["text_encode_s"] + peer["decode_s"], abs=0.011)
    assert full["vs_peer"] == round(peer["image_s"] / full["image_s"], 2) and "vs_peer" not in presets["high"]
    # Where this CPU has an int8 GEMM the int8 child ran: the same LCM schedule on its own step kinds, with the
    # plan's decodes (the VAE is not int8), and its ratio to the peer.
    if "int8" in data["dtype_peaks"]["gflops"]:
        i8, i8_tiny, kinds = presets["lcm-4 int8"], presets["lcm-4 int8 tiny"], data["int8"]["kinds"]
        assert i8["schedule_of"] == i8_tiny["schedule_of"] == "lcm-4" and i8["int8"] and i8["dtype"].startswith("int8")
        assert i8["unet_s"] == i8_tiny["unet_s"] == pytest.approx(
            sum(kinds[bench.KIND_NAMES[c]] for c in lcm["calls"]) * scale, rel=0.01, abs=0.011)
        assert i8["decode_s"] == full["decode_s"] and i8_tiny["decode_s"] == tiny["decode_s"]
        assert i8["vs_peer"] == round(peer["image_s"] / i8["image_s"], 2) and "vs_peer" not in i8_tiny
    saved = tmp_path / "bench.json"
    saved.write_text(proc.stdout)
    table = cli("bench", "--from-json", str(saved))
    assert table.returncode == 0 and "per guided step, plan vs stock diffusers" in table.stdout
    assert "High-quality image, stock ÷ plan" in table.stdout and "refiner + decode" in table.stdout
    assert "Per 1024² image" in table.stdout and "Check: one real Fast image" in table.stdout
    lines = table.stdout.splitlines()
    full_row = [line for line in lines
                if line.startswith("   lcm-4 ") and not line.startswith(("   lcm-4 tiny", "   lcm-4 peer", "   lcm-4 int8"))]
    tiny_row = [line for line in lines if line.startswith("   lcm-4 tiny ")]
    assert len(full_row) == 1 and len(tiny_row) == 1, table.stdout
    assert f"{tiny['image_s']:.2f} s" in tiny_row[0] and f"{tiny['ratio']:.2f}× stock" in tiny_row[0]
    assert f"{full['image_s']:.2f} s" in full_row[0] and "LCMScheduler" in full_row[0]
    assert f"{full['vs_peer']:.2f}× its peer" in full_row[0]
    assert any(line.startswith("   lcm-4 peer ") and "stock diffusers fp32, the same 4-step LCMScheduler" in line
               and "FastSD CPU's PyTorch path" in line for line in lines), table.stdout
    assert (f"decode per 1024² image: full VAE {decodes['full_vae_s']:.3f} s, tiny decoder "
            f"{decodes['tiny_decoder_s']:.3f} s") in table.stdout
    # The dtype each operation class ran in, per configuration, read from its own report.
    assert "dtype per operation class:" in table.stdout
    assert f"   plan       {bench.report.op_dtypes(data['plan'])}" in lines
    assert "   baseline   everything fp32 (stock diffusers)" in lines


def _rows(dtype, vae, channels_last, int8):
    """A configuration's saved report, the three rows op_dtypes reads."""
    return {"dtype": dtype, "report": [
        {"name": "precision", "status": "active", "detail": f"bf16 UNet/text encoders, {vae} VAE (unet bf16@cpu)"},
        {"name": "channels-last VAE", "status": "active" if channels_last else "off", "detail": ""},
        {"name": "int8 layers", "status": "active" if int8 else "off",
         "detail": "743 UNet linear layers int8, 47 convolutions int8" if int8 else "opt-in only"}]}


@pytest.mark.parametrize("row, expected", [
    (_rows("bfloat16", "fp32", True, True), "linear layers int8, convolutions int8 (47 of them, the rest bf16), "
                                            "attention bf16 (SDPA), VAE fp32 channels-last"),
    (_rows("float32", "fp32", False, False), "linear layers fp32, convolutions fp32, attention fp32 (SDPA), VAE fp32"),
    ({"dtype": "float32"}, "everything fp32 (stock diffusers)"),
])
def test_the_dtype_per_operation_class_is_read_from_the_configurations_report(row, expected):
    assert bench.report.op_dtypes(row) == expected


def test_replay_of_a_result_saved_before_the_few_step_presets():
    """The saved EPYC result has no few-step schedule and no tiny decoder: its table prints what it has."""
    table = cli("bench", "--from-json", str(ROOT / "assets" / "bench-epyc-512.json"))
    assert table.returncode == 0, table.stderr
    assert "Per 1024² image" in table.stdout and "   high " in table.stdout and "   fast " in table.stdout
    assert "lcm" not in table.stdout and "tiny decoder" not in table.stdout and "peer" not in table.stdout
    assert "decode per 1024² image: full VAE " in table.stdout


def test_full_architecture_matches_the_published_parameter_counts():
    """Built on the meta device (no memory, no compute): base, both text encoders, VAE and the refiner UNet.
    The counts are written out here (SDXL 1.0 base and refiner as published), not read from bench.py."""
    pipe, refiner = build_full(torch, torch.float16, "meta", with_refiner=True)
    params = bench.param_counts(pipe, refiner)
    assert params == {"unet": 2_567_463_684, "text_encoder": 123_060_480, "text_encoder_2": 694_659_840,
                      "vae": 83_653_863, "refiner_unet": 2_259_526_660}
    assert refiner.text_encoder_2 is pipe.text_encoder_2 and refiner.vae is pipe.vae  # shared, as the service loads
