"""Page handlers that need no browser: the status panel's fallback to the demo model."""
import time

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
    assert "could not load" in panel and "--model tiny" in panel
    assert button["visible"] is True
    handler(demo, "use_demo_model")()
    deadline = time.time() + 60
    while not service.loaded and time.time() < deadline:
        time.sleep(0.2)
    assert service.settings.is_tiny and service.loaded and service.load_error is None
    panel, button, _timer = handler(demo, "refresh_status")()
    assert "demo model" in panel and button["visible"] is False
