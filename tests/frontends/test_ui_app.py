"""Page handlers that need no browser: the status panel's fallback to the demo model."""
import time

import gradio as gr

from sdxl_ui.service import GenerationService
from sdxl_ui.settings import DEFAULT_MODEL, AppSettings
from sdxl_ui.ui import build_ui


def handler(demo, name):
    return next(f.fn for f in demo.fns.values() if getattr(f.fn, "__name__", "") == name)


def test_missing_default_model_explains_and_offers_the_demo_model(tmp_path):
    service = GenerationService(AppSettings(model=DEFAULT_MODEL, outputs=tmp_path))
    demo = build_ui(service)
    service.preload_in_background().join(60)  # what app.py does at start (offline: fails fast)
    panel, button, _timer = handler(demo, "refresh_status")()
    assert "could not load" in panel and "--model demo" in panel
    assert button["visible"] is True
    *_, quality, decoder = handler(demo, "use_demo_model")(gr.Request(client={"host": "127.0.0.1"}))  # the operator
    assert quality["choices"][-1] == "Few-step (4 steps)" and decoder["visible"] is True  # the demo's own offers
    deadline = time.time() + 60
    while not service.loaded and time.time() < deadline:
        time.sleep(0.2)
    assert service.settings.is_demo and service.loaded and service.load_error is None
    panel, button, _timer = handler(demo, "refresh_status")()
    assert "simple shapes and colours" in panel and button["visible"] is False
    assert service.native_size() == 128


def test_size_presets_follow_the_models_native_size():
    import pytest

    from sdxl_ui.schema import ValidationError
    from sdxl_ui.ui.app import _size, _size_choices

    demo = _size_choices(128)
    assert demo[0] == "Native (128×128)" and "144×112" in demo and demo[-1] == "Custom"
    assert not any(s.startswith(("1024", "1152")) for s in demo)
    assert _size("144×112", None, None, 128) == (144, 112)
    assert _size(demo[0], None, None, 128) == (128, 128)
    sdxl = _size_choices(1024)
    assert sdxl[:3] == ["Native (1024×1024)", "1152×896", "896×1152"]
    with pytest.raises(ValidationError, match="size"):
        _size("1152×896", None, None, 128)  # an SDXL preset is not offered for the 128-px demo model


def _component(demo, elem_id):
    return next(block for block in demo.blocks.values() if getattr(block, "elem_id", None) == elem_id)


def test_the_quality_radio_offers_few_step_where_the_model_has_one_and_the_decoder_where_a_tiny_one_is(tmp_path):
    from sdxl_ui.schema import Quality
    from sdxl_ui.ui.app import _request_fields, quality_of

    demo = build_ui(GenerationService(AppSettings(model="demo", outputs=tmp_path)))  # nothing loads
    labels = [label for label, _ in _component(demo, "quality").choices]
    assert labels == ["High quality", "Fast", "Few-step (4 steps)"]
    assert _component(demo, "decoder").visible is True
    assert quality_of("Few-step (4 steps)") is Quality.FEW_STEP and quality_of("Ultra") is None
    fields = _request_fields("Few-step (4 steps)", None, None, 1, 1, "auto", None, "tiny", {})
    assert fields["quality"] is Quality.FEW_STEP and fields["decoder"] == "tiny"
    steps, guidance = handler(demo, "on_quality")("Few-step (4 steps)")[:2]
    assert (steps["value"], guidance["value"]) == (4, 1.0)  # the LCM family's own, not the Fast preset's

    tiny = build_ui(GenerationService(AppSettings(model="tiny", outputs=tmp_path)))
    assert [label for label, _ in _component(tiny, "quality").choices] == ["High quality", "Fast"]
    assert _component(tiny, "decoder").visible is False
