"""The tiny decoder (issue 18, part 4) on the tiny model with a random AutoencoderTiny: --decoder tiny decodes the
final image with it (the report's row says so and that it changes the picture); a tiny decoder that is present
draws the live previews either way and leaves the full VAE's image untouched; one that is asked for and missing
is an error naming it, never a silent fall-back."""
from __future__ import annotations

import numpy as np
import pytest
from tests.helpers import run

from sdxl_ui.schema import GenerationRequest, ValidationError
from sdxl_ui.service import GenerationService
from sdxl_ui.settings import AppSettings

REQUEST = dict(prompt="a red circle", steps=4, seed=5, width=64, height=64, quality="fast",
               techniques={"feature_cache": "off"})


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    import torch
    from diffusers import AutoencoderTiny

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-decoder")
    AutoencoderTiny(encoder_block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8)) \
        .save_pretrained(folder)
    return folder


def service(tmp_path, **settings):
    base = dict(model="tiny", device="cpu", precision="fp32", refiner="none", outputs=tmp_path / "out")
    return GenerationService(AppSettings(**{**base, **settings}))


def generate(svc):
    out = run(svc, GenerationRequest(**REQUEST))
    assert not out["errors"], [e.message for e in out["errors"]]
    return out


def rows(svc):
    return {r.name: r for r in svc.current_report().rows}


def test_decoder_tiny_decodes_the_final_image_and_its_last_preview_is_that_image(tmp_path, tiny_folder):
    full = generate(service(tmp_path))
    svc = service(tmp_path, decoder="tiny", tiny_decoder=str(tiny_folder))
    out = generate(svc)
    image = np.asarray(out["results"][0].image, dtype=int)
    assert not np.array_equal(image, np.asarray(full["results"][0].image, dtype=int))
    last_preview = np.asarray(out["progress"][-1].preview, dtype=int)
    assert last_preview.shape == image.shape and np.abs(last_preview - image).max() <= 1
    row = rows(svc)["tiny decoder"]
    assert row.status.value == "active" and "decodes the final image" in row.detail
    assert "changes the picture" in row.detail
    assert any(f"tiny decoder {tiny_folder.name} " in line and "previews and the final image" in line
               for line in out["logs"])
    assert not any(str(tiny_folder) in line for line in out["logs"] + [row.detail])  # no server path on the page


def test_a_present_tiny_decoder_draws_the_previews_and_leaves_the_vaes_image_untouched(tmp_path, tiny_folder):
    plain = generate(service(tmp_path))
    svc = service(tmp_path, tiny_decoder=str(tiny_folder))
    out = generate(svc)
    assert np.array_equal(np.asarray(out["results"][0].image), np.asarray(plain["results"][0].image))
    assert not np.array_equal(np.asarray(out["progress"][-1].preview), np.asarray(plain["progress"][-1].preview))
    row = rows(svc)["tiny decoder"]
    assert row.status.value == "off" and "draws the previews —" in row.detail and "decodes the final image —" not in row.detail


def test_without_a_tiny_decoder_previews_stay_approximate_and_the_row_says_so(tmp_path):
    svc = service(tmp_path)
    generate(svc)
    row = rows(svc)["tiny decoder"]
    assert row.status.value == "off" and "none loaded: previews by the latent approximation" in row.detail


@pytest.mark.parametrize("settings, named", [
    (dict(decoder="tiny"), "madebyollin/taesdxl"),  # auto: TAESDXL, not in this offline cache
    (dict(tiny_decoder="/nonexistent/tiny-decoder"), "/nonexistent/tiny-decoder"),
])
def test_a_tiny_decoder_asked_for_and_missing_is_an_error_naming_it(tmp_path, monkeypatch, settings, named):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = run(service(tmp_path, **settings), GenerationRequest(**REQUEST))
    assert not out["results"] and len(out["errors"]) == 1
    message = out["errors"][0].message
    assert message.startswith("tiny_decoder: ") and named in message and "--decoder full" in message


def test_bad_decoder_settings_name_the_field_and_the_value(tmp_path):
    from tests.helpers.cli import cli

    with pytest.raises(ValidationError, match="decoder.*'huge'"):
        AppSettings(decoder="huge")
    with pytest.raises(ValidationError, match="tiny_decoder"):
        AppSettings(tiny_decoder=" ")
    assert AppSettings.from_env({"SDXL_UI_DECODER": "TINY"}).decoder == "tiny"
    proc = cli("generate", "--model", "tiny", "--prompt", "x", "--decoder", "huge", "--out", str(tmp_path / "a.png"))
    assert proc.returncode == 2 and "--decoder" in proc.stderr and "huge" in proc.stderr
