"""--lora and --profile as the user gives them (issue 18): the CLI, app.py, SDXL_UI_* and the Python API. A bad
LoRA is bad input (exit 2) naming the file and the reason."""
from __future__ import annotations

import json

import pytest
from tests.helpers import cli
from tests.helpers.loras import save


def test_cli_refuses_a_missing_lora_file_before_any_work(tmp_path):
    missing = tmp_path / "nowhere.safetensors"
    proc = cli("generate", "--model", "tiny", "--prompt", "x", "--lora", f"{missing}@0.8", "--json")
    assert proc.returncode == 2, proc.stderr
    error = json.loads(proc.stdout)
    assert error["kind"] == "model" and str(missing) in error["error"] and "does not exist" in error["error"]


def test_cli_refuses_a_lora_for_another_architecture_with_exit_2(tmp_path):
    import torch

    sd15 = save({"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora.down.weight": torch.randn(4, 768),
                 "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora.up.weight": torch.randn(320, 4)},
                tmp_path / "sd15_style.safetensors")
    proc = cli("generate", "--model", "tiny", "--device", "cpu", "--prompt", "x", "--steps", "1", "--width", "64",
               "--height", "64", "--lora", str(sd15), "--outputs", str(tmp_path), "--json")
    assert proc.returncode == 2, proc.stderr
    error = json.loads(proc.stdout)
    assert "sd15_style.safetensors" in error["error"] and "SD 1.5" in error["error"]
    assert not list(tmp_path.rglob("*.png"))


def test_cli_profile_must_be_a_known_family():
    proc = cli("generate", "--model", "tiny", "--prompt", "x", "--profile", "speedy", "--json")
    assert proc.returncode == 2 and "profile" in json.loads(proc.stdout)["error"]


def test_app_reads_lora_and_profile_flags_and_names_a_bad_one(monkeypatch):
    import app as app_module

    monkeypatch.delenv("SDXL_UI_LORA", raising=False)
    args = app_module.parse_args(["--lora", "a.safetensors@0.5", "--lora", "org/x:f.safetensors", "--profile", "tcd"])
    settings = app_module._settings(args)
    assert [str(spec) for spec in settings.loras] == ["a.safetensors@0.5", "org/x:f.safetensors@1"]
    assert settings.profile == "tcd"
    with pytest.raises(app_module.BadFlag, match="^--lora: "):
        app_module._settings(app_module.parse_args(["--lora", "a@strong"]))
    monkeypatch.setenv("SDXL_UI_LORA", "b@heavy")
    with pytest.raises(app_module.BadFlag, match="^SDXL_UI_LORA: "):
        app_module._settings(app_module.parse_args([]))


def test_python_api_takes_loras(monkeypatch):
    from sdxl_ui import ImageService
    from sdxl_ui.settings import LoraSpec

    monkeypatch.delenv("SDXL_UI_LORA", raising=False)
    service = ImageService(model="tiny", loras=["style.safetensors@0.6"], profile="lcm")
    assert service.service.settings.loras == (LoraSpec("style.safetensors", 0.6),)
    assert service.service.settings.profile == "lcm"


def test_the_page_offers_the_profiles_steps_and_guidance_for_each_quality(tmp_path):
    from sdxl_ui.service import GenerationService
    from sdxl_ui.settings import AppSettings
    from sdxl_ui.ui import build_ui

    service = GenerationService(AppSettings(model="tiny", device="cpu", profile="turbo", outputs=tmp_path))
    demo = build_ui(service)
    steps = next(c for c in demo.blocks.values() if getattr(c, "elem_id", None) == "steps")
    assert steps.value == 4  # High quality: Turbo's larger count
    on_quality = next(f.fn for f in demo.fns.values() if getattr(f.fn, "__name__", "") == "on_quality")
    fast_steps, fast_guidance, note = on_quality("Fast")
    assert fast_steps["value"] == 1 and fast_guidance["value"] == 0.0 and note == ""  # no × 0.7 note on CPU
    plain = GenerationService(AppSettings(model="tiny", device="cpu", outputs=tmp_path))
    from sdxl_ui.schema import Quality

    assert plain.quality_defaults(Quality.FAST) == (20, 6.0)
