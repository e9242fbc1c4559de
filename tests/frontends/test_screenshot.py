"""The README's picture (assets/screenshot.png): the page after a run with the offline demo model, in a real browser.

The picture in the page's image pane is judged by the scene reader (sdxl_ui/demo/scenes.py), the same judge as the
demo-model tests: it is fetched by the browser from the displayed <img>'s src, decoded, and must show the scene the
prompt asks for, so a page that shows noise (a random-weight model, a broken decode) fails here. The page's text
must not show a server path (the outputs folder, the repository, the model folder).
``SDXL_UI_UPDATE_SCREENSHOT=1 python -m pytest tests/frontends/test_screenshot.py`` refreshes the README's picture; otherwise
the shot goes to a temp file.
"""
from __future__ import annotations

import base64
import io
import os
import re

import numpy as np
import pytest
from PIL import Image
from tests.helpers import ROOT, launched

from sdxl_ui.demo import scenes as S
from sdxl_ui.settings import DEMO_MODEL_DIR

SCENE = S.Scene("red", "blue", "circle", "center", "large")
NAMED = ("size", "color", "shape", "background")  # what the prompt asks for; the position is left to the model
PROMPT = S.prompt_for(SCENE, NAMED)  # "a large red circle on a blue background"
SEED = 1

# The displayed image's bytes, fetched by the page itself from the <img>'s src (what the user's browser shows).
FETCH_SHOWN_IMAGE = """async () => {
    const img = document.querySelector('#output img');
    const blob = await (await fetch(img.src)).blob();
    return await new Promise((done) => {
        const reader = new FileReader();
        reader.onload = () => done(reader.result.split(',')[1]);
        reader.readAsDataURL(blob);
    });
}"""


def judge(png: bytes, scene: S.Scene, attributes=NAMED) -> list[str]:
    """What the scene reader finds wrong in a picture (PNG bytes): [] when it shows the scene's attributes."""
    image = Image.open(io.BytesIO(png)).convert("RGB")
    reading = S.read_scene(image)
    return [f"{a}: wanted {getattr(scene, a)}, read {getattr(reading, a)}"
            for a, right in reading.matches(scene, attributes).items() if not right]


def test_the_judge_refuses_noise_and_passes_a_drawn_scene():
    def png(array) -> bytes:
        out = io.BytesIO()
        Image.fromarray(array).save(out, format="PNG")
        return out.getvalue()

    assert judge(png(S.render(SCENE, np.random.default_rng(0))[0]), SCENE) == []
    noise = np.random.default_rng(1).integers(0, 256, size=(256, 256, 3), dtype=np.uint8)
    assert judge(png(noise), SCENE) != []


@pytest.fixture(scope="module")
def demo_app(tmp_path_factory):
    with launched(tmp_path_factory.mktemp("shot-outputs"), "--model", "demo") as running:
        yield running


def test_readme_screenshot_shows_the_demo_scene_and_no_server_paths(demo_app, browser, tmp_path):  # noqa: F811
    page = browser.new_page(viewport={"width": 1280, "height": 1100})
    page.goto(demo_app.url)
    page.wait_for_function("document.querySelector('#status-panel')?.textContent.includes('loaded')",
                           timeout=30_000)
    page.get_by_label("Prompt", exact=True).fill(PROMPT)
    page.get_by_text("Advanced").click()  # a fixed seed: the same picture on every run
    seed = page.locator("#seed input[type=number]")
    seed.wait_for(state="visible")
    page.wait_for_timeout(300)
    seed.fill(str(SEED))
    seed.blur()
    page.get_by_text("Advanced").click()  # closed again for the picture
    page.wait_for_timeout(500)
    page.locator("#generate").click()
    page.wait_for_function("document.querySelector('#sdxl-step')?.textContent.includes('done')", timeout=120_000)
    page.wait_for_selector("#output img", timeout=10_000)
    page.wait_for_function("document.querySelector('#output img').complete", timeout=10_000)
    assert page.locator("#used-seed input").input_value() == str(SEED)

    shown = base64.b64decode(page.evaluate(FETCH_SHOWN_IMAGE))
    wrong = judge(shown, SCENE)
    assert wrong == [], f"the image pane does not show {PROMPT!r}: {wrong}"

    text = page.locator("body").inner_text()
    log = page.locator("#log").inner_text()
    assert PROMPT in log and "✅ Image saved to outputs/" in log
    assert "simple shapes and colours" in page.locator("#status-panel").inner_text()
    thumbnail = page.locator("#gallery img").first.bounding_box()  # a thumbnail, not one picture across the pane
    assert thumbnail is not None and thumbnail["width"] < 200, thumbnail
    for path in {str(demo_app.outputs), str(demo_app.outputs.resolve()), str(ROOT), str(ROOT.resolve()),
                 str(DEMO_MODEL_DIR), str(DEMO_MODEL_DIR.resolve())}:
        assert path not in text, f"the page shows the server path {path}"
    # Nothing that looks like an absolute path either (a "/" that starts a path, not one inside "outputs/a/b").
    absolute = re.findall(r"(?<![\w.~/-])/[\w.-]+/[\w./-]+", text)
    assert absolute == [], f"the page shows what looks like a server path: {absolute}"

    target = ROOT / "assets" / "screenshot.png" if os.environ.get("SDXL_UI_UPDATE_SCREENSHOT") else tmp_path / "s.png"
    page.screenshot(path=str(target), full_page=True)
    assert target.stat().st_size > 10_000
    page.close()


def test_the_few_step_choice_draws_the_scene_in_4_steps_in_one_click(demo_app, browser):  # noqa: F811
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    page.goto(demo_app.url)
    page.wait_for_function("document.querySelector('#status-panel')?.textContent.includes('loaded')",
                           timeout=30_000)
    page.get_by_label("Prompt", exact=True).fill(PROMPT)
    page.locator("#quality").get_by_text("Few-step (4 steps)").click()  # the demo's lcm-lora/, offered by the page
    page.get_by_text("Advanced").click()
    steps = page.locator("#steps input[type=number]")
    steps.wait_for(state="visible")
    page.wait_for_function("document.querySelector('#steps input[type=number]').value === '4'", timeout=10_000)
    seed = page.locator("#seed input[type=number]")
    seed.fill(str(SEED))
    seed.blur()
    page.wait_for_timeout(300)
    page.locator("#generate").click()
    page.wait_for_function("document.querySelector('#sdxl-step')?.textContent.includes('done')", timeout=120_000)
    page.wait_for_selector("#output img", timeout=10_000)
    page.wait_for_function("document.querySelector('#output img').complete", timeout=10_000)

    log = page.locator("#log").inner_text()
    assert "Mode: FEW-STEP (base steps=4, guidance=1)" in log, log
    assert "Few-step: the few-step LoRA lcm-lora/ beside the model, fused for this job" in log
    shown = base64.b64decode(page.evaluate(FETCH_SHOWN_IMAGE))
    wrong = judge(shown, SCENE, ("color", "shape", "background"))
    assert wrong == [], f"the 4-step picture does not show {PROMPT!r}: {wrong}"
    page.close()
