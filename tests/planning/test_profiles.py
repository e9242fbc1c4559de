"""Model profiles (issue 18, part 1): the table, the detection from a model's and a LoRA's files, --profile, and the
decisions that read the family (steps policy, refiner, feature cache, guidance interval). Pure: no weights."""
from __future__ import annotations

import json

import pytest
from tests.helpers import load_probe
from tests.helpers.loras import save

from sdxl_ui.adapters import few_step_lora, profile_evidence
from sdxl_ui.models import ModelSource
from sdxl_ui.optimize import expected_report
from sdxl_ui.policy import make_plan
from sdxl_ui.profiles import PROFILES, detect, from_name, from_scheduler_config
from sdxl_ui.schema import ValidationError
from sdxl_ui.settings import AppSettings, LoraSpec

CPU = "cpu_avx2_no_bf16"
GPU = "rtx4090_24gb"


def test_every_family_is_in_the_table_with_its_source():
    expected = {"sdxl", "turbo", "lcm", "tcd", *(f"lightning-{n}" for n in (1, 2, 4, 8)),
                *(f"hyper-{n}" for n in (1, 2, 4, 8))}
    assert set(PROFILES) == expected
    for profile in PROFILES.values():
        assert profile.source.startswith("https://"), profile.name
        if profile.few_step:
            high, fast = profile.steps
            assert 1 <= fast <= high <= 8 and profile.scheduler and profile.sampler_label
            assert not profile.refiner and not profile.feature_cache
    assert PROFILES["lightning-1"].overrides["prediction_type"] == "sample"
    assert PROFILES["lightning-4"].overrides == {"timestep_spacing": "trailing"} and PROFILES["lightning-4"].steps == (4, 4)
    assert PROFILES["turbo"].steps == (4, 1) and PROFILES["turbo"].guidance == 0.0 and PROFILES["turbo"].native_size == 512
    assert PROFILES["tcd"].options == {"eta": 0.3} and PROFILES["hyper-2"].scheduler == "DDIMScheduler"
    assert PROFILES["lcm"].guidance_free and not PROFILES["sdxl"].guidance_free


@pytest.mark.parametrize("name, family", [
    ("stabilityai/sdxl-turbo", "turbo"), ("sd_xl_turbo_1.0_fp16.safetensors", "turbo"),
    ("ByteDance/SDXL-Lightning:sdxl_lightning_4step_lora.safetensors", "lightning-4"),
    ("sdxl_lightning_8step_unet.safetensors", "lightning-8"), ("sdxl_lightning_1step_unet_x0.safetensors", "lightning-1"),
    ("latent-consistency/lcm-lora-sdxl", "lcm"), ("latent-consistency/lcm-sdxl", "lcm"), ("lcm_lora_sdxl.safetensors", "lcm"),
    ("ByteDance/Hyper-SD:Hyper-SDXL-2steps-lora.safetensors", "hyper-2"), ("Hyper-SDXL-1step-lora.safetensors", "hyper-1"),
    ("Hyper-SDXL-8steps-CFG-lora.safetensors", None),  # the CFG variants keep guidance: not these profiles
    ("h1t/TCD-SDXL-LoRA", "tcd"), ("stabilityai/stable-diffusion-xl-base-1.0", None), ("my_style.safetensors", None),
])
def test_the_families_are_known_by_their_hub_ids_and_file_names(name, family):
    assert from_name(name) == family


def test_the_scheduler_config_a_checkpoint_ships_names_its_family():
    assert from_scheduler_config({"_class_name": "LCMScheduler"})[0] == "lcm"
    assert from_scheduler_config({"_class_name": "TCDScheduler"})[0] == "tcd"
    assert from_scheduler_config({"_class_name": "EulerAncestralDiscreteScheduler",
                                  "timestep_spacing": "trailing"})[0] == "turbo"
    assert from_scheduler_config({"_class_name": "EulerDiscreteScheduler", "timestep_spacing": "trailing",
                                  "prediction_type": "sample"})[0] == "lightning-1"
    # The demo model's own config (trailing, v-prediction, zero terminal SNR) is plain SDXL, not a distillation.
    demo = json.loads(open("assets/demo-model/scheduler/scheduler_config.json").read())
    assert from_scheduler_config(demo) is None
    assert detect("demo-model", demo)[0] == "sdxl"


def test_a_loras_name_or_metadata_wins_over_the_model(tmp_path):
    import torch

    plain = save({"x": torch.zeros(1)}, tmp_path / "style.safetensors",
                 metadata={"ss_output_name": "Hyper-SDXL-4steps-lora"})
    source = ModelSource("hub", "stabilityai/sdxl-turbo")
    assert profile_evidence(source)[0] == "turbo"
    family, why = profile_evidence(source, [LoraSpec(str(plain))])
    assert family == "hyper-4" and "metadata" in why
    family, why = profile_evidence(source, [LoraSpec("latent-consistency/lcm-lora-sdxl", 1.0)])
    assert family == "lcm" and "lcm-lora-sdxl" in why


def test_the_few_step_lora_beside_a_model_folder_is_found_by_its_name_or_metadata(tmp_path):
    import torch

    spec, family, name = few_step_lora(ModelSource("folder", "assets/demo-model"))
    assert (family, name) == ("lcm", "lcm-lora") and spec.source.endswith("lcm-lora") and spec.weight == 1.0
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"unet": ["diffusers", "UNet2DConditionModel"]}))
    (folder / "unet").mkdir()
    save({"x": torch.zeros(1)}, folder / "unet" / "lcm-lora-sdxl.safetensors")  # a component: never a LoRA
    (folder / "style").mkdir()
    save({"x": torch.zeros(1)}, folder / "style" / "a.safetensors", metadata={"ss_output_name": "watercolour"})
    assert few_step_lora(ModelSource("folder", str(folder))) is None
    (folder / "speed").mkdir()
    save({"x": torch.zeros(1)}, folder / "speed" / "b.safetensors", metadata={"ss_output_name": "TCD-SDXL-LoRA"})
    assert few_step_lora(ModelSource("folder", str(folder)))[1:] == ("tcd", "speed")
    assert few_step_lora(ModelSource("hub", "stabilityai/stable-diffusion-xl-base-1.0")) is None
    assert few_step_lora(ModelSource("folder", str(tmp_path / "missing"))) is None


def test_a_folders_scheduler_config_and_name(tmp_path):
    folder = tmp_path / "my-model"
    (folder / "scheduler").mkdir(parents=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps({"_class_name": "LCMScheduler"}))
    assert profile_evidence(ModelSource("folder", str(folder))) == ("lcm", "detected: its scheduler config is an "
                                                                          "LCMScheduler")
    # Only the folder's own name counts, not the folders above it.
    nested = tmp_path / "sdxl-turbo-experiments" / "base"
    nested.mkdir(parents=True)
    assert profile_evidence(ModelSource("folder", str(nested)))[0] == "sdxl"


def test_profile_and_lora_settings_from_flags_and_environment():
    settings = AppSettings.from_env({"SDXL_UI_PROFILE": "Lightning-4", "SDXL_UI_LORA": "a.safetensors@0.5,org/x:f"})
    assert settings.profile == "lightning-4"
    assert settings.loras == (LoraSpec("a.safetensors", 0.5), LoraSpec("org/x:f", 1.0))
    assert [spec.name for spec in settings.loras] == ["a", "f"]
    assert AppSettings(loras=["/p/my@style.safetensors"]).loras[0].source == "/p/my@style.safetensors"
    for bad in ({"profile": "fast"}, {"loras": ["x@lots"]}, {"loras": ["@1"]}, {"loras": ["x@99"]}):
        with pytest.raises(ValidationError):
            AppSettings(**bad)


def plan(profile="auto", detected=None, probe=CPU, high=True, **switches):
    return make_plan(load_probe(probe), AppSettings(model="tiny", profile=profile), "tiny", 256, 256, high,
                     profile=detected, **switches)


def test_sdxl_keeps_todays_decisions():
    sdxl, before = plan(), plan(detected=("sdxl", "no few-step family"))
    assert sdxl.profile == before.profile == "sdxl" and sdxl.steps_factor == 0.7
    assert plan(high=False).feature_cache == 3 and plan(high=False).guidance_interval == (0.0, 0.6)


@pytest.mark.parametrize("name", ["turbo", "lightning-4", "lcm", "hyper-8", "tcd"])
def test_a_few_step_profile_turns_off_what_does_not_apply_and_says_why(name):
    for high in (True, False):
        chosen = plan(detected=(name, "detected: test"), high=high, feature_cache="on", guidance_interval="on")
        assert chosen.profile == name and chosen.steps_factor == 1.0  # never below the family's counts on CPU
        assert "distilled for" in chosen.reasons["steps_factor"]
        assert chosen.feature_cache == 1 and chosen.reasons["feature_cache"].startswith("not applicable")
        assert chosen.guidance_interval == (0.0, 1.0) and "not applicable" in chosen.reasons["guidance_interval"]
        assert "without a negative prompt" in chosen.reasons["guidance_interval"]
        gpu = plan(detected=(name, "detected: test"), probe=GPU, high=high)
        assert gpu.refiner is False and gpu.reasons["refiner"].startswith("not applicable")
    rows = {r.name: r for r in expected_report(chosen, load_probe(CPU)).rows}
    assert rows["model profile"].status.value == "active" and "detected: test" in rows["model profile"].detail


def test_profile_flag_overrides_the_detection_both_ways():
    forced = plan("lcm", ("sdxl", "no few-step family"))
    assert forced.profile == "lcm" and "set by --profile lcm (detection said: sdxl)" in forced.reasons["profile"]
    back = plan("sdxl", ("turbo", "detected: the model is named as SDXL Turbo"))
    assert back.profile == "sdxl" and back.steps_factor == 0.7 and "detection said: turbo" in back.reasons["profile"]
