"""The user's own super-resolution models (``sr_models``, ``upscalers``): a tiny ESRGAN-architecture model with random
weights, saved as .safetensors and .pth, found in the upscaler folder by its name, loaded by spandrel (without
torchvision), run tile by tile, and refused by name when a file is not an upscaler. No weights are downloaded."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdxl_ui import sr_models
from sdxl_ui.schema import ValidationError
from sdxl_ui.upscalers import available, find, upscale_picture


def tiny_esrgan(folder: Path, name: str, scale: int, suffix: str = ".safetensors", seed: int = 0) -> Path:
    """An ESRGAN (RRDBNet, spandrel's own class) with 8 filters and one block, random weights, saved to ``folder``."""
    import safetensors.torch

    sr_models.spandrel()
    from spandrel.architectures.ESRGAN import ESRGAN

    torch.manual_seed(seed)
    state = ESRGAN(in_nc=3, out_nc=3, num_filters=8, num_blocks=1, scale=scale).state_dict()
    path = folder / f"{name}{suffix}"
    if suffix == ".safetensors":
        safetensors.torch.save_file(state, str(path))
    else:
        torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    where = tmp_path_factory.mktemp("upscalers")
    tiny_esrgan(where, "2x-tiny", 2)
    tiny_esrgan(where, "RealESRGAN_x4plus-tiny", 4, ".pth")
    (where / "notes.txt").write_text("not a model")
    (where / "broken.pth").write_bytes(b"not a pickle at all")
    import safetensors.torch

    safetensors.torch.save_file({"weight": torch.zeros(3, 3)}, str(where / "Lanczos.safetensors"))  # a built-in's name
    safetensors.torch.save_file({"some.layer.weight": torch.zeros(4, 4)}, str(where / "other.safetensors"))
    return where


def test_spandrel_is_imported_without_torchvision_and_leaves_none_behind():
    module = sr_models.spandrel()
    assert module.__version__ == "0.4.2"
    assert not any(name == "torchvision" or name.startswith("torchvision.") for name in sys.modules)
    assert importlib.util.find_spec("torchvision") is None  # transformers' probe still says "not installed"
    from spandrel.architectures.LaMa.__arch import LaMa  # the one architecture that used torchvision's rotate

    with pytest.raises(RuntimeError, match="needs torchvision"):
        LaMa.rotate(torch.zeros(1, 3, 8, 8), 0.0)


def test_the_folders_models_are_listed_by_name_with_the_scale_their_name_states(folder):
    listed = available(folder)
    assert [u.name for u in listed] == ["None", "Lanczos", "Nearest", "2x-tiny", "broken", "other",
                                        "RealESRGAN_x4plus-tiny"]  # "Lanczos.safetensors": the built-in wins
    models = {u.name: u for u in listed if u.kind == "model"}
    assert models["2x-tiny"].scale == 2 and models["RealESRGAN_x4plus-tiny"].scale == 4
    assert models["other"].scale is None
    assert find("2X-TINY", folder).path == folder / "2x-tiny.safetensors"
    assert find("lanczos", folder).kind == "pixels"
    assert available(None) == available(folder / "missing")  # no folder: the built-ins only
    with pytest.raises(ValidationError, match="2x-tiny") as caught:
        find("4x-UltraSharp", folder, "upscaler_1")
    assert caught.value.field == "upscaler_1" and caught.value.value == "4x-UltraSharp"


@pytest.mark.parametrize("name,scale", [("2x-tiny", 2), ("RealESRGAN_x4plus-tiny", 4)])
def test_a_tiny_esrgan_loads_from_safetensors_and_pth_and_upscales_by_its_scale(folder, name, scale):
    model = sr_models.load(find(name, folder).path)
    assert model.architecture.name == "ESRGAN" and model.scale == scale and model.purpose == "SR"
    picture = Image.new("RGB", (40, 30), (200, 30, 30))
    result = sr_models.upscale_once(picture, find(name, folder).path)
    assert result.size == (40 * scale, 30 * scale) and result.mode == "RGB"
    # The same weights as the model's own forward pass on the whole picture (one tile covers it).
    pixels = torch.from_numpy(np.asarray(picture, dtype=np.float32) / 255).permute(2, 0, 1)[None]
    with torch.inference_mode():
        expected = (model(pixels)[0].clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    assert (np.asarray(result) == expected).all()


def test_files_that_are_not_upscalers_are_refused_by_name(folder):
    for name, reason in (("broken", "could not be read as a model"), ("other", "not a model architecture")):
        with pytest.raises(ValidationError, match=reason) as caught:
            sr_models.load(find(name, folder).path, field="hr_upscaler")
        assert caught.value.field == "hr_upscaler" and caught.value.value == name


def test_tiles_cover_every_pixel_once_blended():
    """A model without neighbourhood (nearest ×2) gives the same picture tiled or whole, to the last bit: the
    tiles' places, the blend weights and their normalisation are right. A real model's seams stay small."""
    image = torch.rand(1, 3, 70, 90)

    def nearest(x):
        return torch.nn.functional.interpolate(x, scale_factor=2, mode="nearest")

    whole = nearest(image)
    for tile, overlap in ((32, 8), (24, 4), (64, 16), (200, 16)):
        assert torch.allclose(sr_models.tiled(nearest, image, 2, tile, overlap), whole, atol=1e-6), (tile, overlap)
    assert sr_models.positions(70, 32, 8) == [0, 24, 38] and sr_models.positions(20, 32, 8) == [0]
    calls = []
    sr_models.tiled(nearest, image, 2, 32, 8, on_tile=lambda done, total: calls.append((done, total)))
    assert calls[-1] == (12, 12)  # 3 rows × 4 columns


def test_a_real_models_tiled_result_is_close_to_the_whole(folder):
    model = sr_models.load(find("2x-tiny", folder).path)
    image = torch.rand(1, 3, 70, 90)
    with torch.inference_mode():
        whole = model(image)
    # Measured (Xeon with AMX, 2026-12-03): tile 48 overlap 16: max 0.0034, mean 7e-5 on a 0-1 scale.
    tiled = sr_models.tiled(model, image, 2, 48, 16)
    assert (tiled - whole).abs().max() < 0.02 and (tiled - whole).abs().mean() < 1e-3


def test_the_model_runs_until_the_size_is_reached_then_resizes_to_it(folder):
    upscaler = find("2x-tiny", folder)
    picture = Image.new("RGB", (50, 40), (20, 120, 200))
    calls = []
    result = upscale_picture(picture, upscaler, (150, 120), on_tile=lambda done, total: calls.append(done))
    assert result.size == (150, 120) and len(calls) == 2  # two passes (×4), then Lanczos down to ×3
    assert upscale_picture(picture, upscaler, (100, 80)).size == (100, 80)
