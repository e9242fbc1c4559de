"""Recorded probes -> plans. Each case asserts device, dtype, attention, offload, refiner and the reason text."""
from dataclasses import replace

import pytest
from tests.helpers import load_probe

from sdxl_ui.policy import PlanError, adjust_plan, estimate_memory, make_plan
from sdxl_ui.settings import AppSettings

DEFAULT = AppSettings()


def plan_for(name, settings=DEFAULT, **kw):
    return make_plan(load_probe(name), settings, **kw)


def test_rtx5090_on_torch_without_sm120_falls_back_to_cpu_with_the_fix():
    plan = plan_for("rtx5090_torch_without_sm120")
    assert (plan.device, plan.dtype, plan.attention, plan.offload, plan.refiner) == (
        "cpu", "bfloat16", "sdpa", "none", False)
    for must in ("falling back to CPU", "RTX 5090", "sm_120", "sm_90", "no kernel image", "cu128"):
        assert must in plan.reason
    assert "CPU mode" in plan.reasons["refiner"]
    assert plan.steps_factor == 0.7 and plan.steps_for(50) == 35


def test_rtx5090_on_torch_with_sm120_uses_the_gpu():
    plan = plan_for("rtx5090_torch_with_sm120")
    assert (plan.device, plan.dtype, plan.vae_dtype) == ("cuda", "float16", "float32")
    assert (plan.attention, plan.attention_slicing, plan.offload, plan.refiner) == ("sdpa", False, "none", True)
    assert "kernel test passed" in plan.reason and "sm_120" in plan.reason
    assert "everything fits" in plan.reasons["offload"]
    assert plan.steps_factor == 1.0 and plan.threads is None


def test_8gb_laptop_gpu_uses_model_offload():
    plan = plan_for("laptop_rtx4060_8gb")
    assert (plan.device, plan.dtype, plan.attention, plan.offload) == ("cuda", "float16", "sdpa", "model")
    assert plan.attention_slicing is False and "offload makes room" in plan.reasons["attention_slicing"]
    assert "7.3 GB VRAM free" in plan.reasons["offload"]
    assert plan.refiner is True


def test_24gb_gpu_fits_everything_and_leaves_working_xformers_off_by_default():
    plan = plan_for("rtx4090_24gb")
    assert (plan.device, plan.dtype, plan.attention, plan.offload, plan.refiner) == (
        "cuda", "float16", "sdpa", "none", True)
    xf = make_plan(load_probe("rtx4090_24gb"), AppSettings(attention="xformers"))
    assert xf.attention == "xformers" and "kernel test passed" in xf.reasons["attention"]


def test_h100_80gb_no_offload_no_slicing_refiner_on():
    plan = plan_for("h100_80gb")
    assert (plan.device, plan.dtype, plan.attention, plan.attention_slicing, plan.offload, plan.refiner) == (
        "cuda", "float16", "sdpa", False, "none", True)
    assert "78.6 GB VRAM free" in plan.reasons["offload"]


def test_h100_with_broken_xformers_refuses_to_force_it():
    with pytest.raises(PlanError, match="kernels do not run"):
        make_plan(load_probe("h100_80gb"), AppSettings(attention="xformers"))


def test_apple_silicon_uses_mps_fp16_with_fp32_vae():
    plan = plan_for("apple_m2_pro")
    assert (plan.device, plan.dtype, plan.vae_dtype, plan.attention, plan.offload) == (
        "mps", "float16", "float32", "sdpa", "none")
    assert "MPS" in plan.reason


def test_cpu_without_bf16_uses_fp32():
    plan = plan_for("cpu_avx2_no_bf16")
    assert (plan.device, plan.dtype, plan.attention, plan.offload, plan.refiner) == (
        "cpu", "float32", "sdpa", "none", False)
    assert "neither avx512_bf16 nor AMX" in plan.reasons["dtype"]
    assert plan.threads == 6


def test_cpu_with_avx512_bf16_uses_bf16_without_slicing():
    plan = plan_for("cpu_epyc_avx512_bf16")
    assert (plan.device, plan.dtype, plan.vae_dtype, plan.attention, plan.attention_slicing) == (
        "cpu", "bfloat16", "bfloat16", "sdpa", False)
    assert "avx512_bf16" in plan.reasons["dtype"]
    assert "slicing would only slow" in plan.reasons["attention_slicing"]
    assert "CPU mode" in plan.reasons["refiner"]


def test_forcing_cuda_on_a_failed_kernel_is_a_clear_error():
    with pytest.raises(PlanError) as info:
        plan_for("rtx5090_torch_without_sm120", AppSettings(device="cuda"))
    message = str(info.value)
    for must in ("device: 'cuda'", "RTX 5090", "sm_120", "sm_90", "PyTorch build"):
        assert must in message


def test_forcing_cuda_without_a_gpu_is_a_clear_error():
    with pytest.raises(PlanError, match="sees no CUDA GPU"):
        plan_for("cpu_avx2_no_bf16", AppSettings(device="cuda"))


def test_memory_preflight_refuses_with_numbers():
    with pytest.raises(PlanError) as info:
        plan_for("cpu_small_ram")
    assert "needs ~14.7 GB" in str(info.value) and "5.1 GB RAM available" in str(info.value)
    # bf16 halves the weights, but 6.9 GB still do not fit in 5.1 GB: refused again, with the new numbers.
    with pytest.raises(PlanError, match="5.1 GB RAM available"):
        plan_for("cpu_small_ram", AppSettings(precision="bf16"))
    # The tiny demo model fits anywhere.
    assert plan_for("cpu_small_ram", AppSettings(model="tiny"), model_kind="tiny").device == "cpu"


def test_large_sizes_turn_on_vae_tiling():
    plan = plan_for("cpu_epyc_avx512_bf16", width=2048, height=2048)
    assert plan.vae_tiling and "above 1536²" in plan.reasons["vae_tiling"]
    assert not plan_for("cpu_epyc_avx512_bf16").vae_tiling


def test_overrides_are_honoured_and_explained():
    plan = plan_for("cpu_epyc_avx512_bf16", AppSettings(precision="fp32", attention="sliced", threads=1))
    assert (plan.dtype, plan.attention, plan.attention_slicing, plan.threads) == ("float32", "sliced", True, 1)
    assert "forced" in plan.reasons["dtype"] and "forced" in plan.reasons["attention_slicing"]
    on = plan_for("cpu_epyc_avx512_bf16", AppSettings(use_refiner="on"))
    assert on.refiner and "forced on" in on.reasons["refiner"]


def test_fast_quality_uses_no_refiner_on_gpu():
    plan = plan_for("h100_80gb", high_quality=False)
    assert plan.refiner is False and "Fast" in plan.reasons["refiner"]


def test_adjust_plan_keeps_placement_and_takes_size_dependent_choices():
    loaded = plan_for("h100_80gb")
    big = plan_for("h100_80gb", width=2048, height=2048, high_quality=False)
    # A request plan whose placement differs from the load plan's (on this probe both would say cuda/fp16/none,
    # and the assertion below could not tell which one adjust_plan took).
    big = replace(big, device="cpu", dtype="float32", vae_dtype="float32", offload="model", threads=3)
    adjusted = adjust_plan(loaded, big)
    assert (adjusted.device, adjusted.dtype, adjusted.vae_dtype, adjusted.offload, adjusted.threads) == (
        "cuda", "float16", "float32", "none", None)  # the load plan's: the weights are already placed
    assert adjusted.vae_tiling is True and adjusted.refiner is False


def test_memory_estimate_matches_the_measured_gpu_peak():
    # H200, fp16 + SDPA at 1024² measured 10.0 GiB peak (PERFORMANCE-ANCHORS.md).
    est = estimate_memory("sdxl", "float16", "float32", 1024, 1024, "cuda", refiner=False, tiled=False)
    assert 9.5 <= est.total_gb <= 11.5


# ---------------------------------------------------------------- issue 13, finding 3: one attention choice

def test_an_xformers_plan_never_also_slices():
    """adjust_plan used to take the request's slicing beside the load plan's xformers: apply() honoured xformers,
    and the report said "attention slicing off" with the reason "on: … needed"."""
    probe = load_probe("rtx4090_24gb")  # xformers installed, its kernel test passed
    loaded = make_plan(probe, AppSettings(attention="xformers"))
    wants_slicing = make_plan(probe, AppSettings(attention="sliced"))
    adjusted = adjust_plan(loaded, wants_slicing)
    assert (adjusted.attention, adjusted.attention_slicing) == ("xformers", False)
    assert adjusted.reasons["attention_slicing"].startswith("off: xformers")


def test_apple_mps_never_chooses_sliced_attention():
    """Sliced attention produced broken images on MPS (InvokeAI #7049): short memory must not pick it there."""
    import dataclasses

    probe = load_probe("apple_m2_pro")
    short = dataclasses.replace(probe, cpu=dataclasses.replace(probe.cpu, ram_available_gb=9.0))
    plan = make_plan(short, DEFAULT)
    assert plan.device == "mps" and plan.memory_needed_gb > 9.0  # the case in which slicing used to be chosen
    assert (plan.attention, plan.attention_slicing) == ("sdpa", False)
    assert "InvokeAI #7049" in plan.reasons["attention_slicing"]
    forced = make_plan(probe, AppSettings(attention="sliced"))  # the user's explicit choice: honoured, with a warning
    assert forced.attention == "sliced" and "InvokeAI #7049" in forced.reasons["attention"]
    # Elsewhere the same shortage still slices.
    cpu = load_probe("cpu_avx2_no_bf16")
    assert make_plan(dataclasses.replace(cpu, cpu=dataclasses.replace(cpu.cpu, ram_available_gb=8.0)),
                     AppSettings(precision="bf16")).attention == "sliced"


def test_sdpa_reason_names_the_backends_of_the_planned_device_only():
    import dataclasses

    probe = load_probe("apple_m2_pro")  # recorded before the probe tested SDPA on MPS: a CPU list only
    assert "flash" not in make_plan(probe, DEFAULT).reasons["attention"]
    tested = dataclasses.replace(probe, sdpa_backends={**probe.sdpa_backends, "mps": ("math",)})
    assert "on MPS: math" in make_plan(tested, DEFAULT).reasons["attention"]
