import json

import numpy as np
import pytest
from tests.helpers import load_probe, run

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
    ("not a model id", "is not 'demo', 'tiny'"),
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
    # A recorded CPU probe: the plan must not depend on the RAM this host happens to have free.
    probe = load_probe("cpu_epyc_avx512_bf16")
    service_folder = GenerationService(AppSettings(model=str(folder), outputs=tmp_path, precision="fp32",
                                                   refiner="none"), probe=probe)
    service_tiny = GenerationService(AppSettings(model="tiny", outputs=tmp_path, precision="fp32"), probe=probe)
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


# ---------------------------------------------------------------- issue 13, finding 5: single-file checkpoints

XL_BASE_KEY = "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias"  # diffusers' xl_base marker
XL_REFINER_KEY = "conditioner.embedders.0.model.transformer.resblocks.9.mlp.c_proj.bias"


def _checkpoint(path, keys):
    import torch
    from safetensors.torch import save_file

    save_file({k: torch.zeros(shape) for k, shape in keys.items()}, str(path))
    return str(path)


@pytest.fixture
def fake_from_single_file(monkeypatch):
    """Record what from_single_file is asked for instead of building a pipeline."""
    from diffusers import StableDiffusionXLPipeline

    calls = []

    def fake(cls, location, **kwargs):
        calls.append(kwargs)
        raise OSError("recorded, not loaded")

    monkeypatch.setattr(StableDiffusionXLPipeline, "from_single_file", classmethod(fake))
    return calls


def test_single_file_honours_local_files_only(tmp_path, monkeypatch, fake_from_single_file):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # only the flag says "offline" here
    path = _checkpoint(tmp_path / "xl.safetensors", {XL_BASE_KEY: (4,), "model.diffusion_model.out.2.bias": (4,)})
    with pytest.raises(ModelLoadError):
        load_models(resolve_source(path), None, "float32", "float32", False, local_files_only=True)
    assert fake_from_single_file[0]["local_files_only"] is True


@pytest.mark.parametrize("keys,field,needle", [
    # Stable Diffusion 1.5: UNet under model.diffusion_model., CLIP under cond_stage_model (no SDXL conditioner).
    ({"model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
      "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight": (77, 8)},
     "model", "holds Stable Diffusion 1.x weights"),
    ({XL_REFINER_KEY: (4,), "model.diffusion_model.out.2.bias": (4,)}, "model", "pass it as --refiner"),
])
def test_single_file_check_accepts_only_sdxl(tmp_path, fake_from_single_file, keys, field, needle):
    from sdxl_ui.models import check_source

    path = _checkpoint(tmp_path / "m.safetensors", keys)
    with pytest.raises(ModelLoadError) as info:
        check_source(resolve_source(path), field)
    assert str(info.value).startswith(f"{field}: ") and needle in str(info.value)
    with pytest.raises(ModelLoadError, match=needle):
        load_models(resolve_source(path), None, "float32", "float32", False)
    assert fake_from_single_file == []  # refused before any loading
    base = _checkpoint(tmp_path / "xl.safetensors", {XL_BASE_KEY: (4,), "model.diffusion_model.out.2.bias": (4,)})
    check_source(resolve_source(base), "model")  # an SDXL base passes
