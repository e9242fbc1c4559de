import asyncio
import logging
import threading
import time

from sdxl_ui import ImageService


def test_seed_api_returns_true_writes_the_file_and_logs_seed_style_lines(tmp_path, caplog):
    service = ImageService(model="tiny", outputs=tmp_path, device="cpu")  # CPU lines below, on a GPU host too
    target = tmp_path / "landscape.png"

    async def main():
        ticks = 0

        async def ticker():  # the event loop must keep running while the image is generated
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.01)

        task = asyncio.create_task(ticker())
        ok = await service.generate_image(prompt="A beautiful landscape", output_path=str(target),
                                          num_inference_steps=50, high_quality=True)
        task.cancel()
        return ok, ticks

    with caplog.at_level(logging.INFO, logger="sdxl_ui"):
        ok, ticks = asyncio.run(main())
    assert ok is True and target.is_file()
    assert ticks > 5
    text = caplog.text
    assert "🎨 Generating image for prompt: 'A beautiful landscape'" in text
    assert "Mode: HIGH QUALITY (base steps=35, guidance=8)" in text
    assert "Refinement: DISABLED (CPU mode)" in text
    assert "✓ PyTorch SDPA attention" in text
    assert f"✅ Image saved to {target}" in text


def test_seed_api_returns_false_on_a_bad_path(tmp_path, caplog):
    service = ImageService(model="tiny", outputs=tmp_path)
    with caplog.at_level(logging.ERROR, logger="sdxl_ui"):
        ok = asyncio.run(service.generate_image(prompt="x", output_path=str(tmp_path / "missing" / "x.png")))
    assert ok is False
    assert "output_path" in service.last_error and "does not exist" in caplog.text


def test_seed_api_selects_tiny_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("SDXL_UI_MODEL", "tiny")
    assert ImageService(outputs=tmp_path).service.settings.is_tiny


def test_seed_api_selects_the_demo_model_by_name_or_environment(monkeypatch, tmp_path):
    from sdxl_ui.settings import DEMO_MODEL_DIR

    assert ImageService(model="demo", outputs=tmp_path).service.source.location == str(DEMO_MODEL_DIR)
    monkeypatch.setenv("SDXL_UI_MODEL", "demo")
    service = ImageService(outputs=tmp_path).service
    assert service.settings.is_demo and service.source.label == "demo" and service.native_size() == 128


def test_seed_api_returns_only_after_its_worker_has_finished_even_on_an_error(tmp_path, monkeypatch):
    """A script may exit as soon as generate_image returns; a worker thread still running then can take the
    process down with it (Python 3.11 ends daemon threads at exit). So False comes after the worker is done, too."""
    from sdxl_ui.service import GenerationService

    real_run = GenerationService._run

    def run_then_linger(self, *args, **kwargs):  # the worker's last instructions, after its error event
        real_run(self, *args, **kwargs)
        time.sleep(0.5)

    monkeypatch.setattr(GenerationService, "_run", run_then_linger)
    (tmp_path / "empty").mkdir()
    service = ImageService(model=str(tmp_path / "empty"), outputs=tmp_path)
    assert asyncio.run(service.generate_image(prompt="a fox", output_path=str(tmp_path / "x.png"))) is False
    assert "no model_index.json" in service.last_error
    assert not [t for t in threading.enumerate() if t.name == "sdxl-generate"], "returned while its worker ran"
