"""The report is read back from the live pipeline: change the pipeline, the report follows."""
import os
from pathlib import Path

import pytest
from tests.helpers import load_probe

from sdxl_ui.models import load_models, resolve_source
from sdxl_ui.optimize import apply, expected_report, report
from sdxl_ui.optimizations.speed import compile_unet, keep_compiled_graphs
from sdxl_ui.policy import make_plan
from sdxl_ui.settings import AppSettings


def loaded(precision="auto", **settings):
    probe = load_probe("cpu_epyc_avx512_bf16")
    s = AppSettings(model="tiny", precision=precision, **settings)
    plan = make_plan(probe, s, "tiny", 256, 256)
    models = load_models(resolve_source("tiny"), s.refiner_source, plan.dtype, plan.vae_dtype, plan.refiner)
    apply(plan, models)
    return models, plan, probe


def status(rep, name):
    return rep.get(name).status.value


def test_report_follows_attention_slicing_flipped_on_the_pipeline():
    models, plan, probe = loaded()
    rep = report(models, plan, probe)
    assert rep.source == "pipeline"
    assert status(rep, "attention slicing") == "off" and status(rep, "PyTorch SDPA attention") == "active"
    models.base.enable_attention_slicing()  # behind the plan's back
    rep = report(models, plan, probe)
    assert status(rep, "attention slicing") == "active"
    assert status(rep, "PyTorch SDPA attention") == "off"
    assert "SlicedAttnProcessor" in rep.get("PyTorch SDPA attention").detail
    apply(plan, models)  # re-applying the plan restores SDPA
    assert status(report(models, plan, probe), "attention slicing") == "off"


def test_report_reads_module_dtypes():
    models, plan, probe = loaded()
    assert "bf16 UNet" in report(models, plan, probe).get("precision").detail
    models32, plan32, _ = loaded(precision="fp32")
    detail = report(models32, plan32, probe).get("precision").detail
    assert detail.startswith("fp32 UNet") and "unet fp32@cpu" in detail
    import torch

    torch.nn.Module.to(models32.base.unet, dtype=torch.bfloat16)  # change only the UNet
    assert "unet bf16@cpu" in report(models32, plan32, probe).get("precision").detail


def test_report_reads_vae_tiling_threads_and_refiner():
    models, plan, probe = loaded()
    rep = report(models, plan, probe)
    assert status(rep, "VAE tiling") == "off" and status(rep, "Refinement") == "off"
    models.base.vae.enable_tiling()
    tiling = report(models, plan, probe).get("VAE tiling")
    # Enabled behind the plan's back: diffusers sizes the tiles from the VAE config (the tiny VAE: 256 px).
    assert tiling.status == "active" and "256-px tiles" in tiling.detail


def test_vae_tiling_tiles_a_1024_image():
    """diffusers sizes SDXL's tiles from the config (1024 px): the plan's tiling must split a 1024² decode."""
    import dataclasses

    import torch

    models, plan, probe = loaded()
    apply(dataclasses.replace(plan, vae_tiling=True), models)
    vae = models.base.vae
    assert vae.use_tiling and vae.tile_sample_min_size == 512 and vae.tile_latent_min_size == 64
    calls = []
    vae.decoder.register_forward_hook(lambda module, args, out: calls.append(tuple(out.shape[-2:])))
    with torch.inference_mode():
        vae.decode(torch.zeros(1, 4, 128, 128, dtype=vae.dtype))
    assert len(calls) > 1 and max(max(c) for c in calls) <= 512  # several tiles, none larger than 512 px
    assert "512-px tiles" in report(models, plan, probe).get("VAE tiling").detail
    import torch

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert "torch uses 1" in report(models, plan, probe).get("CPU threads").detail
    finally:
        torch.set_num_threads(before)
    with_refiner, plan_r, _ = loaded(use_refiner="on")
    assert status(report(with_refiner, plan_r, probe), "Refinement") == "active"


def test_xformers_is_reported_not_applicable_on_cpu_and_unavailable_when_absent():
    models, plan, probe = loaded()
    row = report(models, plan, probe).get("xformers")
    assert row.status.value == "not_applicable" and "CUDA-only" in row.detail
    absent = load_probe("cpu_avx2_no_bf16")
    assert report(models, plan, absent).get("xformers").status.value == "unavailable"


@pytest.mark.parametrize("name,offload,refiner", [
    ("h100_80gb", "off", "active"),  # everything fits in 80 GB
    ("laptop_rtx4060_8gb", "active", "active"),  # model offload on 8 GB
    ("rtx5090_torch_without_sm120", "not_applicable", "off"),  # no sm_120 kernels: the CPU plan
])
def test_expected_report_rows_for_recorded_probes(name, offload, refiner):
    probe = load_probe(name)
    rep = expected_report(make_plan(probe, AppSettings()), probe)
    assert rep.source == "plan"
    assert (status(rep, "CPU offload"), status(rep, "Refinement"), status(rep, "attention slicing")) == (
        offload, refiner, "off")


def test_log_lines_are_seed_style():
    models, plan, probe = loaded()
    lines = report(models, plan, probe).log_lines()
    assert any(l.startswith("✓ PyTorch SDPA attention: CPU flash kernel") for l in lines)
    assert any(l.startswith("– xformers not applicable: ") and "not applicable on CPU" in l for l in lines)
    assert any(l.startswith("– attention slicing off:") and "slicing would only slow" in l for l in lines)


def test_report_reads_torch_compile_state(monkeypatch, tmp_path):
    monkeypatch.setenv("SDXL_UI_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    models, plan, probe = loaded()
    assert status(report(models, plan, probe), "torch.compile") == "off"
    assert "TORCHINDUCTOR_CACHE_DIR" not in os.environ  # nothing is pointed anywhere without --compile
    compiled, plan_c, _ = loaded(compile=True)  # wrapped now, compiled lazily at the first step
    row = report(compiled, plan_c, probe).get("torch.compile")
    assert row.status.value == "active" and "on (--compile)" in plan_c.reasons["compile"]
    # Its compiled graphs are kept in sdxl_ui's cache root, so a later start loads them; the row says where.
    kept = str(tmp_path / "inductor")
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == kept and kept in row.detail


def test_a_cpu_compiles_an_exact_unet_with_freezing_and_keeps_the_graphs(monkeypatch, tmp_path):
    monkeypatch.setenv("SDXL_UI_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    asked = []

    class Torch:  # records what torch.compile is asked for
        @staticmethod
        def compile(module, options=None):
            asked.append(options)
            return module

    assert compile_unet(Torch, "unet", "cpu") == ("unet", True)
    assert compile_unet(Torch, "unet", "cpu", int8=True) == ("unet", False)  # int8 layers: no freezing
    assert compile_unet(Torch, "unet", "cuda") == ("unet", False)
    assert asked == [{"freezing": True}, None, None]
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "inductor")


def test_compiled_graphs_go_to_the_cache_root_unless_the_user_chose_a_folder(tmp_path):
    env = {"SDXL_UI_CACHE_DIR": str(tmp_path)}
    assert keep_compiled_graphs(env) == tmp_path / "inductor"
    assert env["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "inductor")
    assert keep_compiled_graphs({"XDG_CACHE_HOME": str(tmp_path)}) == tmp_path / "sdxl_ui" / "inductor"
    mine = {"SDXL_UI_CACHE_DIR": str(tmp_path), "TORCHINDUCTOR_CACHE_DIR": "/srv/inductor"}
    assert keep_compiled_graphs(mine) == Path("/srv/inductor") and mine["TORCHINDUCTOR_CACHE_DIR"] == "/srv/inductor"
    # Inductor's own /tmp default, written into the variable once anything asked for its folder, is not a choice.
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    tmp = {"SDXL_UI_CACHE_DIR": str(tmp_path), "TORCHINDUCTOR_CACHE_DIR": default_cache_dir()}
    assert keep_compiled_graphs(tmp) == tmp_path / "inductor" == Path(tmp["TORCHINDUCTOR_CACHE_DIR"])


def test_mps_sdpa_row_is_not_built_from_the_cpu_probe():
    import dataclasses

    probe = load_probe("apple_m2_pro")  # SDPA tested on the CPU only (flash, math)
    row = expected_report(make_plan(probe, AppSettings()), probe).get("PyTorch SDPA attention")
    assert "flash" not in row.detail and "untested" in row.detail
    tested = dataclasses.replace(probe, sdpa_backends={**probe.sdpa_backends, "mps": ("math",)})
    row = expected_report(make_plan(tested, AppSettings()), tested).get("PyTorch SDPA attention")
    assert row.detail.endswith("MPS: math")


def test_a_row_whose_live_state_departs_from_the_plan_says_so():
    models, plan, probe = loaded()
    models.base.vae.enable_tiling()  # not by the plan (256², no tiling needed)
    detail = report(models, plan, probe).get("VAE tiling").detail
    assert "not as planned" in detail and "(plan: not needed" in detail


def test_an_active_xformers_row_says_its_kernel_ran():
    from sdxl_ui.optimize import xformers_row as _xformers_row

    row = _xformers_row(load_probe("rtx4090_24gb"), "cuda", active=True)
    assert row.status.value == "active" and "kernel test passed" in row.detail
