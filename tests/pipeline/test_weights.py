"""The memory preflight counts a model's parameters from its own files (sdxl_ui/weights.py): a small
SDXL-architecture folder with its refiner fits on a host where full SDXL in fp32 would not, and full SDXL is still
refused there with its numbers."""
from __future__ import annotations

import json
import struct

import pytest
from tests.helpers import load_probe

from sdxl_ui.models import resolve_source
from sdxl_ui.optimizations.memory import SDXL_SIZE
from sdxl_ui.policy import PlanError, make_plan
from sdxl_ui.settings import DEFAULT_REFINER, AppSettings
from sdxl_ui.weights import folder_params, model_size, safetensors_params

# The recorded Intel Xeon with AVX512-BF16 and no AMX: 22.5 GB of RAM available and an fp32 plan (its bf16 GEMM
# measured at half of fp32), where full SDXL with its refiner needs ~23.7 GB.
PROBE = "cpu_xeon_avx512_bf16_no_amx"


@pytest.fixture(scope="module")
def small_folder(tmp_path_factory):
    """The tiny model saved as an ordinary diffusers folder, its refiner beside it (a few MB)."""
    from sdxl_ui.models import build_tiny

    folder = tmp_path_factory.mktemp("small-sdxl")
    base, refiner = build_tiny()
    base.save_pretrained(folder)
    refiner.save_pretrained(folder / "refiner")
    return folder, base, refiner


def numel(module) -> int:
    return sum(p.numel() for p in module.state_dict().values())


def test_the_counts_are_the_modules_own(small_folder):
    folder, base, refiner = small_folder
    size = resolve_source(str(folder)).size(str(folder / "refiner"))
    assert size.unet_params == numel(base.unet) and size.vae_params == numel(base.vae)
    assert size.base_params == sum(numel(getattr(base, n)) for n in ("unet", "text_encoder", "text_encoder_2", "vae"))
    assert size.refiner_params == numel(refiner.unet)
    assert "counted from the safetensors headers" in size.how and str(folder.parent) not in size.how


def test_a_small_sdxl_folder_and_its_refiner_fit_where_full_sdxl_in_fp32_does_not(small_folder):
    folder, _, _ = small_folder
    probe = load_probe(PROBE)
    settings = AppSettings(model=str(folder), refiner=str(folder / "refiner"), use_refiner="on", device="cpu")
    plan = make_plan(probe, settings, resolve_source(str(folder)).size(settings.refiner_source), 128, 128, True)
    assert plan.dtype == "float32" and plan.refiner is True
    assert plan.memory_needed_gb < 1 and "counted from the safetensors headers" in plan.reasons["memory"]
    with pytest.raises(PlanError, match=r"needs ~23\.7 GB \(float32 weights \+ refiner\), 22\.5 GB RAM available"):
        make_plan(probe, settings, "sdxl", 1024, 1024, True)  # SDXL 1.0's own counts: refused as before
    assert model_size("hub", "someone/not-in-the-cache", DEFAULT_REFINER) == SDXL_SIZE  # nothing to read: SDXL's


def test_variants_and_shards_are_counted_once(tmp_path):
    def write(path, shapes):
        header = json.dumps({f"t{i}": {"dtype": "F16", "shape": s, "data_offsets": [0, 0]}
                             for i, s in enumerate(shapes)}).encode()
        path.write_bytes(struct.pack("<Q", len(header)) + header)

    unet = tmp_path / "unet"
    unet.mkdir()
    write(unet / "diffusion_pytorch_model-00001-of-00002.safetensors", [[10, 10]])
    write(unet / "diffusion_pytorch_model-00002-of-00002.safetensors", [[5]])
    write(unet / "diffusion_pytorch_model.fp16-00001-of-00002.safetensors", [[10, 10]])
    write(unet / "diffusion_pytorch_model.fp16-00002-of-00002.safetensors", [[5]])
    assert safetensors_params(unet / "diffusion_pytorch_model-00002-of-00002.safetensors") == 5
    assert folder_params(unet) == 105  # two variants of the same 105 weights, in two shards each
    (unet / "empty.safetensors").write_bytes(b"")  # an interrupted copy: the estimate falls back, no traceback
    fallback = model_size("folder", str(tmp_path), None)
    assert (fallback.base_params, fallback.how) == (SDXL_SIZE.base_params, SDXL_SIZE.how)
    (unet / "broken.safetensors").write_bytes(b"\xff" * 16)  # not a safetensors file: the estimate falls back
    fallback = model_size("folder", str(tmp_path), None)
    assert (fallback.base_params, fallback.how) == (SDXL_SIZE.base_params, SDXL_SIZE.how)
