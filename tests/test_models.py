import json

import numpy as np
import pytest
from conftest import run

from sdxl_ui.models import ModelLoadError, build_tiny, load_models, resolve_source
from sdxl_ui.schema import GenerationRequest
from sdxl_ui.service import GenerationService
from sdxl_ui.settings import AppSettings


def test_resolve_source_kinds(tmp_path):
    assert resolve_source("tiny").kind == "tiny"
    assert resolve_source("stabilityai/stable-diffusion-xl-base-1.0").kind == "hub"
    assert resolve_source(str(tmp_path)).kind == "folder"
    ckpt = tmp_path / "m.safetensors"
    ckpt.write_bytes(b"x")
    assert resolve_source(str(ckpt)).kind == "single_file"


@pytest.mark.parametrize("spec,needle", [
    ("/no/such/folder", "does not exist"),
    ("/no/such/model.safetensors", "does not exist"),
    ("not a model id", "is not 'tiny'"),
])
def test_bad_model_specs_name_the_field(spec, needle):
    with pytest.raises(ModelLoadError) as info:
        resolve_source(spec)
    assert str(info.value).startswith("model:") and needle in str(info.value)


def test_tiny_model_is_sdxl_architecture_and_deterministic():
    base, refiner = build_tiny()
    assert type(base).__name__ == "StableDiffusionXLPipeline"
    assert type(refiner).__name__ == "StableDiffusionXLImg2ImgPipeline"
    assert base.vae_scale_factor == 8
    assert base.unet.config.addition_embed_type == "text_time"
    assert refiner.text_encoder is None and refiner.config.requires_aesthetics_score
    assert type(base.tokenizer).__name__ == "CLIPTokenizer"
    again, _ = build_tiny(with_refiner=False)
    for (n, p), (_, q) in zip(base.unet.named_parameters(), again.unet.named_parameters()):
        assert np.array_equal(p.detach().numpy(), q.detach().numpy()), n


def test_local_diffusers_folder_loads_through_the_real_code_path(tmp_path):
    base, _ = build_tiny(with_refiner=False)
    folder = tmp_path / "tiny-sdxl"
    base.save_pretrained(folder, safe_serialization=True)
    models = load_models(resolve_source(str(folder)), None, "float32", "float32", want_refiner=False)
    assert type(models.base).__name__ == "StableDiffusionXLPipeline"
    # Same weights -> same pixels as the in-memory tiny model.
    service_folder = GenerationService(AppSettings(model=str(folder), outputs=tmp_path, precision="fp32",
                                                   refiner="none"))
    service_tiny = GenerationService(AppSettings(model="tiny", outputs=tmp_path, precision="fp32"))
    req = GenerationRequest(prompt="a fox", steps=3, seed=1, width=256, height=256)
    a = run(service_folder, req)["results"][0].image
    b = run(service_tiny, req)["results"][0].image
    assert np.array_equal(np.asarray(a), np.asarray(b))


def test_folder_that_is_not_sdxl(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(ModelLoadError, match="not Stable Diffusion XL"):
        load_models(resolve_source(str(tmp_path)), None, "float32", "float32", False)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match="no model_index.json"):
        load_models(resolve_source(str(empty)), None, "float32", "float32", False)


def test_corrupt_safetensors_file(tmp_path):
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"\x00garbage, not a safetensors header")
    with pytest.raises(ModelLoadError, match="not a valid .safetensors file"):
        load_models(resolve_source(str(bad)), None, "float32", "float32", False)


def test_uncached_hub_model_offline_says_what_was_tried_and_the_ways_out():
    with pytest.raises(ModelLoadError) as info:
        load_models(resolve_source("stabilityai/stable-diffusion-xl-base-1.0"), None, "bfloat16", "bfloat16", False)
    message = str(info.value)
    assert "local Hugging Face cache" in message and "offline" in message
    assert "(1) download" in message and "(2) point at a local copy" in message and "(3)" in message
