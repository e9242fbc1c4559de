"""The running app: gradio_client, a real browser (Debian's Chromium via Playwright), and --share offline."""
from __future__ import annotations

import re
import time

import pytest
from tests.helpers import App, launched

from sdxl_ui.metadata import parse_parameters, read_parameters


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    with launched(tmp_path_factory.mktemp("app-outputs"), "--model", "tiny") as running:
        yield running


GENERATE_ARGS = dict(negative_text="", quality_label="High quality", n_steps=10, cfg=8.0, n_images=1,
                     size_label="Native (256×256)", w=256, h=256, sched="auto")


def test_gradio_client_generate_returns_png_with_parameters_and_log(app):
    from gradio_client import Client

    client = Client(app.url, verbose=False)
    result = client.predict(prompt_text="a red fox", seed_value=7, api_name="/generate", **GENERATE_ARGS)
    log_html, progress_html, image, used_seed = result[:4]  # the preview is drawn in the image pane
    assert used_seed == 7
    params = parse_parameters(read_parameters(image))
    assert params["prompt"] == "a red fox" and params["Seed"] == "7" and params["Steps"] == "7"
    assert "✓ PyTorch SDPA attention" in log_html
    assert "xformers not applicable" in log_html or "xformers unavailable: not installed" in log_html
    assert re.search(r"step 7/7 · 100 % · [\d.]+ s/step · ETA 0 s", log_html)
    assert "Mode: HIGH QUALITY (base steps=7, guidance=8)" in log_html


def test_bad_input_through_the_page_handler_is_one_clear_line(app):
    from gradio_client import Client

    client = Client(app.url, verbose=False)
    args = {**GENERATE_ARGS, "size_label": "Custom", "w": 100}
    log_html = client.predict(prompt_text="x", seed_value=None, api_name="/generate", **args)[0]
    assert "❌ width: must be a multiple of 8 (got 100)" in log_html and "Traceback" not in log_html
    ok = client.predict(prompt_text="a fox", seed_value=1, api_name="/generate", **GENERATE_ARGS)
    assert ok[3] == 1  # the next request succeeds (its used seed)


def test_two_clients_are_served_one_after_the_other_each_with_its_own_image(app):
    from gradio_client import Client

    jobs = []
    for seed in (101, 202):
        client = Client(app.url, verbose=False)
        jobs.append(client.submit(prompt_text="a fox", seed_value=seed, api_name="/generate",
                                  **{**GENERATE_ARGS, "n_steps": 100}))
    waited = []  # (first job's state, second job's state, rank) while both were unfinished
    while not all(job.done() for job in jobs):
        first, second = jobs[0].status(), jobs[1].status()
        waited.append((first.code.name, second.code.name, second.rank))
        time.sleep(0.05)
    seeds = [job.result()[3] for job in jobs]
    images = [job.result()[2] for job in jobs]
    assert seeds == [101, 202]
    assert parse_parameters(read_parameters(images[0]))["Seed"] == "101"
    assert parse_parameters(read_parameters(images[1]))["Seed"] == "202"
    assert [job.result()[4] for job in jobs][0] != [job.result()[4] for job in jobs][1]  # separate galleries
    # The second job waited in gradio's queue, first in line, while the first one ran; it never reached the
    # service while the device was busy (the service would have logged "Waiting for the device").
    running = ("PROCESSING", "ITERATING", "PROGRESS")
    assert any(a in running and b == "IN_QUEUE" and rank == 0 for a, b, rank in waited), waited
    assert "Waiting for the device" not in jobs[1].result()[0]


def set_steps(page, value: int, note: str) -> None:
    """Type into the Steps slider's box like a person (who does not type while the accordion is still opening),
    and wait until the page shows the CPU steps policy for the new value, i.e. the server has it."""
    box = page.locator("#steps input[type=number]")
    for _ in range(3):
        box.wait_for(state="visible")
        page.wait_for_timeout(300)
        box.fill(str(value))
        box.blur()
        try:
            page.wait_for_function(f"document.querySelector('#steps-note')?.textContent.includes('{note}')",
                                   timeout=5_000)
            return
        except Exception:  # noqa: BLE001 - retried below, then reported
            continue
    raise AssertionError(f"steps box did not take {value}: note shows {page.locator('#steps-note').inner_text()!r}")


def start_long_run(page) -> None:
    """Open Advanced, ask for 4 images × 150 steps (× 0.7 on CPU = 420 steps, ~13 s on 2 cores), click Generate."""
    page.get_by_text("Advanced").click()
    set_steps(page, 150, "150 → 105")
    page.wait_for_timeout(300)
    page.locator("#images input[type=number]").fill("4")
    page.locator("#images input[type=number]").blur()
    page.wait_for_timeout(300)
    page.locator("#generate").click()


def test_browser_generate_shows_steps_preview_and_image_then_stop_cancels(app, browser):
    page = browser.new_page(viewport={"width": 1280, "height": 1100})
    page.goto(app.url)
    page.get_by_label("Prompt", exact=True).fill("a red fox <b>not bold</b>")
    page.locator("#generate").click()
    page.wait_for_function("document.querySelector('#sdxl-step')?.textContent.includes('step 1/35')",
                           timeout=30_000)
    # The live preview is drawn in the image pane before the run ends (every 5 steps).
    page.wait_for_function("document.querySelector('#output img') && "
                           "!document.querySelector('#sdxl-step')?.textContent.includes('done')", timeout=60_000)
    page.wait_for_function("document.querySelector('#sdxl-step')?.textContent.includes('done')", timeout=60_000)
    page.wait_for_selector("#output img", timeout=60_000)  # now the saved picture
    log = page.locator("#log").inner_text()
    assert "step 35/35" in log
    assert "a red fox <b>not bold</b>" in log  # shown as text, not markup
    assert "✓ PyTorch SDPA attention" in log and "ETA" in log and "✅ Image saved to" in log
    assert page.locator("#log b").count() == 0
    assert page.locator("#status-panel").inner_text().count("random weights") == 1
    # The README's picture is taken with the demo model: tests/test_screenshot.py.

    # A longer run: 4 images × (150 × 0.7) steps; Stop after it has started.
    start_long_run(page)
    page.wait_for_function("/step [0-9]+\\/[0-9]+/.test(document.querySelector('#sdxl-step')?.textContent)"
                           " && !document.querySelector('#sdxl-step').textContent.includes('35/35')",
                           timeout=30_000)
    page.locator("#stop").click()
    page.wait_for_function("document.querySelector('#log')?.textContent.includes('cancelled at step')",
                           timeout=20_000)
    cancelled = re.search(r"cancelled at step (\d+)/(\d+)", page.locator("#log").inner_text())
    assert cancelled and int(cancelled.group(2)) == 4 * 105 and int(cancelled.group(1)) < 4 * 105
    # The device is free: the next run completes.
    set_steps(page, 10, "10 → 7")
    page.locator("#generate").click()
    page.wait_for_function("document.querySelector('#sdxl-step')?.textContent.includes('done')",
                           timeout=60_000)
    page.close()


def test_the_prompt_generate_and_the_picture_are_above_the_fold(app, browser):
    """At 1280×800 the prompt, the quality, Generate and the image pane are on the first screen; the status is one
    line with the optimization report folded beneath it (opened by a click)."""
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    page.goto(app.url)
    page.wait_for_selector("#generate")
    for element in ("#prompt", "#quality", "#generate", "#output"):
        box = page.locator(element).bounding_box()
        assert box is not None and box["y"] >= 0 and box["y"] + min(box["height"], 60) <= 800, (element, box)
    assert not page.locator("#sdxl-report table").is_visible()  # folded
    page.locator("#sdxl-report summary").click()
    assert page.locator("#sdxl-report table").is_visible()
    assert "active" in page.locator("#sdxl-report summary").inner_text()
    page.close()


def test_two_browser_sessions_each_see_only_their_own_images(app, browser):
    pages = [browser.new_context().new_page() for _ in range(2)]
    for i, page in enumerate(pages):
        page.goto(app.url)
        page.get_by_label("Prompt", exact=True).fill(f"session {i}")
    for page in pages:
        page.locator("#generate").click()
    for page in pages:
        page.wait_for_function("document.querySelector('#sdxl-step')?.textContent.includes('done')",
                               timeout=90_000)
    seeds = [page.locator("#used-seed input").input_value() for page in pages]
    assert seeds[0] != seeds[1]
    for i, page in enumerate(pages):
        assert f"session {i}" in page.locator("#log").inner_text()
        assert f"session {1 - i}" not in page.locator("#log").inner_text()
        assert page.locator("#gallery img").count() >= 1
        page.context.close()


# Reports, for every write that carries the share login, whether that one write is a whole line. Two writes (the
# text, then its newline: what print() does) let another thread's log line land between them, as the probe saw
# (issue 12); one write of a whole line, under the logging handler's lock, cannot be split.
WHOLE_LINE_WRITES = """
import sys
class _Writes:
    def __init__(self, stream):
        self._stream = stream
    def write(self, text):
        if "Share login" in text:
            self._stream.write(f"SHARE-LOGIN-WRITE whole_line={text.endswith(chr(10))}" + chr(10))
        return self._stream.write(text)
    def __getattr__(self, name):
        return getattr(self._stream, name)
sys.stdout, sys.stderr = _Writes(sys.stdout), _Writes(sys.stderr)
"""


def test_share_without_auth_prints_generated_credentials_and_keeps_serving_offline(tmp_path):
    import urllib.request

    running = App("--model", "tiny", "--share", "--outputs", str(tmp_path), prelude=WHOLE_LINE_WRITES)
    try:
        running.wait_for("Serving locally only", timeout=120)
        out = running.output
        # One whole line of its own, written at once: the password never runs into the next line.
        creds = re.search(r"^\* Share login — user: (\S+)  password: ([A-Za-z0-9_-]{16})$", out, re.M)
        assert creds, out
        assert re.findall(r"SHARE-LOGIN-WRITE whole_line=\w+", out) == ["SHARE-LOGIN-WRITE whole_line=True"], out
        assert "Share link could not be created" in out
        with urllib.request.urlopen(running.url, timeout=10) as response:  # still serving, behind a login
            assert response.status == 200
        assert running.proc.poll() is None
    finally:
        running.stop()


def test_closing_the_tab_mid_run_frees_the_device(app, browser):
    first = browser.new_context().new_page()
    first.goto(app.url)
    first.get_by_label("Prompt", exact=True).fill("a long run")
    start_long_run(first)
    first.wait_for_function("/step [0-9]+\\/420/.test(document.querySelector('#sdxl-step')?.textContent)",
                            timeout=30_000)
    first.context.close()  # the tab goes away mid-run (420 steps ≈ 13 s on 2 cores)
    second = browser.new_context().new_page()
    second.goto(app.url)
    second.get_by_label("Prompt", exact=True).fill("after the tab closed")
    start = time.time()
    second.locator("#generate").click()
    second.wait_for_function("document.querySelector('#sdxl-step')?.textContent.includes('done')",
                             timeout=60_000)
    assert time.time() - start < 9, "the closed tab's run kept the device busy"
    second.context.close()
