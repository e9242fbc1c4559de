"""The VAE's memory layout (``placement.VaeLayout``): channels-last on a CPU where the probe measured the VAE's
convolutions ≥ 1.15× faster so in the VAE's dtype, the default layout elsewhere, each with the measured figures
as its reason; the layout read back from the live weights; the picture the same."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from sdxl_ui.optimizations.placement import CHANNELS_LAST_MIN_GAIN, decide_vae_layout, is_channels_last
from sdxl_ui.schema import CpuInfo, HardwareProbe

AMX = {"vae conv": {"fp32": 357.8, "fp32 cl": 409.2, "bf16": 922.5, "bf16 cl": 2436.8}}  # the Xeon with AMX


def probe(speeds) -> HardwareProbe:
    return HardwareProbe(torch_version="2.13.0", cpu=CpuInfo(op_speeds=speeds))


def test_channels_last_where_measured_faster_in_the_vaes_dtype():
    on, why = decide_vae_layout(probe(AMX), "cpu", "bfloat16")
    assert on and "922.5 GFLOP/s in the default layout, 2436.8 channels-last (2.64×)" in why
    off, why = decide_vae_layout(probe(AMX), "cpu", "float32")  # fp32 here: 1.14×, under the bar
    assert not off and "1.14×" in why and f"not ≥ {CHANNELS_LAST_MIN_GAIN:g}× faster" in why
    assert decide_vae_layout(probe({}), "cpu", "bfloat16") == (False, "the VAE's convolutions in bf16 were not "
                                                                      "measured in this probe (doctor measures them)")
    assert not decide_vae_layout(probe(AMX), "cuda", "float16")[0]


def test_the_plan_follows_the_probe():
    from sdxl_ui.policy import make_plan
    from sdxl_ui.settings import AppSettings

    bf16 = dataclasses.replace(probe(AMX), cpu=CpuInfo(op_speeds=AMX, gemm_gflops={"fp32": 400, "bf16": 1300},
                                                       flags=("avx512_bf16", "amx_bf16"), ram_available_gb=20))
    plan = make_plan(bf16, AppSettings(model="tiny", device="cpu"), "tiny", 64, 64, True)
    assert plan.vae_dtype == "bfloat16" and plan.vae_channels_last
    plan = make_plan(bf16, AppSettings(model="tiny", device="cpu", precision="fp32"), "tiny", 64, 64, True)
    assert not plan.vae_channels_last and "1.14×" in plan.reasons["vae_channels_last"]


@pytest.mark.parametrize("dtype,bound", [("float32", 80.0), ("bfloat16", 40.0)])
def test_the_demo_vaes_picture_is_the_same_in_either_layout(dtype, bound):
    """The demo model's VAE decoding the same latents in both layouts: PSNR above the bound (measured on the Xeon
    with AMX, 2026-12-03: the full VAE at 1024², random weights, against fp32: 92 dB fp32, 47.1 dB bf16 in both
    layouts)."""
    import torch

    from sdxl_ui.models import load_models, resolve_source

    models = load_models(resolve_source("demo"), None, dtype, dtype, False)
    vae = models.base.vae
    latents = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0)).to(getattr(torch, dtype))
    with torch.inference_mode():
        plain = vae.decode(latents).sample.float()
        assert not is_channels_last(vae)
        vae.to(memory_format=torch.channels_last)
        assert is_channels_last(vae)
        laid = vae.decode(latents).sample.float()
    mse = float((((plain.clamp(-1, 1) - laid.clamp(-1, 1)) / 2) ** 2).mean())
    psnr = 10 * np.log10(1 / max(mse, 1e-20))
    assert psnr > bound, psnr


def test_a_run_lays_out_the_vae_and_the_tiny_decoder_as_the_plan_says(tmp_path):
    """Through the service on the demo model with its tiny decoder: the layout read back from the live weights of
    the VAE and the decoder beside it is the plan's (channels-last on a CPU that measured it faster), and the
    report's row says so."""
    from sdxl_ui.optimizations import hooks
    from sdxl_ui.schema import GenerationRequest
    from sdxl_ui.service import GenerationService
    from sdxl_ui.settings import AppSettings
    from tests.helpers import run

    service = GenerationService(AppSettings(model="demo", device="cpu", decoder="tiny", outputs=tmp_path))
    out = run(service, GenerationRequest(prompt="a red circle", steps=2, seed=1))
    assert not out["errors"], out["errors"]
    base, plan = service.models.base, service.host.applied_plan
    (decoder,) = hooks.modules(base)
    assert is_channels_last(base.vae) == is_channels_last(decoder) == plan.vae_channels_last
    row = next(r for r in service.current_report().rows if r.name == "channels-last VAE")
    assert (row.status.value == "active") == plan.vae_channels_last
    if plan.vae_channels_last:
        assert "and 1 decoder(s) beside it" in row.detail
