"""Upscale-only jobs (``upscale_run``, ``GenerationService.upscale``): A1111's extras rules — by a scale or to a
size (cropped to it, or not), a second upscaler blended in at its visibility, ``None`` first leaves the picture —
on the host's device under its device lock, without loading the model; bad input refused by name first."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from PIL import Image, ImageDraw

from sdxl_ui.edits import Upscale
from sdxl_ui.jobs import CancelToken
from sdxl_ui.run import Cancelled
from sdxl_ui.schema import ValidationError
from sdxl_ui.service import GenerationService
from sdxl_ui.settings import AppSettings
from tests.pipeline.test_sr_models import tiny_esrgan


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    folder = tmp_path_factory.mktemp("upscalers")
    tiny_esrgan(folder, "2x-tiny", 2)
    return GenerationService(AppSettings(model="demo", device="cpu", upscaler_dir=folder))


def picture(width=64, height=48):
    image = Image.new("RGB", (width, height), "white")
    ImageDraw.Draw(image).ellipse((8, 8, width - 8, height - 8), fill=(220, 20, 20))
    return image


def test_by_a_scale_and_to_a_size_with_and_without_the_crop(service):
    source = picture()
    by = service.upscale([source], Upscale(upscaler="Lanczos", scale=2.5))[0]
    assert by.size == (160, 120)
    assert np.array_equal(np.asarray(by), np.asarray(source.resize((160, 120), Image.LANCZOS)))
    cropped = service.upscale([source], Upscale(upscaler="Lanczos", width=128, height=128))[0]
    assert cropped.size == (128, 128)  # covered (×2.67 → 171×128), the centre cut out
    kept = service.upscale([source], Upscale(upscaler="Lanczos", width=128, height=128, crop=False))[0]
    assert kept.size == (171, 128)
    assert np.array_equal(np.asarray(cropped), np.asarray(kept)[:, 21:149])
    assert not service.loaded  # no SDXL model was loaded for any of it


def test_the_second_upscaler_is_blended_in_at_its_visibility_and_none_keeps_the_picture(service):
    source = picture()
    lanczos, nearest = (service.upscale([source], Upscale(upscaler=name, scale=2))[0] for name in ("Lanczos", "Nearest"))
    mixed = service.upscale([source], Upscale(upscaler="Lanczos", scale=2, upscaler_2="Nearest", visibility_2=0.3))[0]
    assert np.array_equal(np.asarray(mixed), np.asarray(Image.blend(lanczos, nearest, 0.3)))
    assert not np.array_equal(np.asarray(mixed), np.asarray(lanczos))
    assert service.upscale([source], Upscale(upscaler="None", scale=2))[0].size == source.size  # A1111's extras


def test_the_users_model_runs_through_the_same_path(service):
    result = service.upscale([picture(), picture(40, 40)], Upscale(upscaler="2x-tiny", scale=2))
    assert [r.size for r in result] == [(128, 96), (80, 80)]
    assert not np.array_equal(np.asarray(result[0]), np.asarray(picture().resize((128, 96), Image.LANCZOS)))


@pytest.mark.parametrize("spec,pictures,field", [
    (dict(upscaler="ESRGAN_4x"), None, "upscaler_1"),
    (dict(upscaler="Lanczos", upscaler_2="nope", visibility_2=0.5), None, "upscaler_2"),
    (dict(upscaler="Lanczos", scale=8), [picture(2048, 1024)], "upscaling_resize"),
    (dict(upscaler="Lanczos"), [picture(4100, 64)], "image"),
    (dict(upscaler="Lanczos"), [], "image"),
])
def test_bad_input_is_refused_by_name_before_the_device(service, spec, pictures, field):
    with pytest.raises(ValidationError) as caught:
        service.upscale([picture()] if pictures is None else pictures, Upscale(**spec))
    assert caught.value.field == field


@pytest.mark.parametrize("fields,field", [(dict(scale=9), "upscaling_resize"), (dict(scale="x"), "upscaling_resize"),
                                          (dict(width=512), "upscaling_resize_h"), (dict(width=32, height=32),
                                                                                   "upscaling_resize_w"),
                                          (dict(visibility_2=2), "extras_upscaler_2_visibility"),
                                          (dict(upscaler=""), "upscaler_1"), (dict(crop="yes"), "upscaling_crop")])
def test_bad_upscale_fields_are_named(fields, field):
    with pytest.raises(ValidationError) as caught:
        Upscale(**fields)
    assert caught.value.field == field


def test_an_upscale_waits_for_the_device_and_can_be_cancelled_there(service):
    service.host.device_lock.acquire()
    cancel, outcome = CancelToken(), []

    def upscale():
        try:
            service.upscale([picture()], Upscale(upscaler="Lanczos"), cancel)
        except Cancelled:
            outcome.append("cancelled")

    worker = threading.Thread(target=upscale)
    worker.start()
    time.sleep(0.3)
    assert worker.is_alive()  # waiting: a generation holds the device
    cancel.cancel()
    worker.join(5)
    service.host.device_lock.release()
    assert outcome == ["cancelled"]
