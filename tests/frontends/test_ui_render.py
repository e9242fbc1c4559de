"""Pure rendering of the page's HTML parts: user text is always escaped."""
from sdxl_ui.ui.render import log_html, progress_html, status_html


def test_log_escapes_markup():
    out = log_html(["🎨 Generating image for prompt: '<script>alert(1)</script>'", "a & b"])
    assert "<script>" not in out and "&lt;script&gt;alert(1)&lt;/script&gt;" in out and "a &amp; b" in out


def test_progress_bar_is_clamped_and_escaped():
    assert 'width:100.0%' in progress_html(3.0, "x") and 'width:0.0%' in progress_html(-1, "x")
    assert "&lt;b&gt;" in progress_html(0.5, "<b>")


def test_status_panel_shows_demo_note_rows_and_escapes():
    html = status_html({"model": "<tiny>", "note": "demo model — random weights", "device": "cpu",
                        "dtype": "bfloat16", "state": "loaded", "message": "<img src=x onerror=alert(1)>",
                        "source": "pipeline", "rows": [{"name": "xformers", "status": "not_applicable",
                                                       "detail": "CUDA-only <kernels>"}]})
    assert "&lt;tiny&gt;" in html and "demo model — random weights" in html
    assert "<img" not in html and "read back from the loaded pipeline" in html
    assert "CUDA-only &lt;kernels&gt;" in html


def test_status_panel_shows_the_state_s_label():
    from sdxl_ui.schema import ServiceState

    for state in ServiceState:
        assert f"<b>State</b> {state.label}</div>" in status_html({"model": "tiny", "state": state})
    assert "<b>State</b> loading…</div>" in status_html({"model": "tiny", "state": "loading…"})  # read back as text


def test_a_load_failure_is_one_sentence_and_the_ways_out_with_the_details_folded():
    message = ("model: 'stabilityai/stable-diffusion-xl-base-1.0' is not in the local Hugging Face cache and the "
               "hub cannot be reached. We couldn't connect to 'https://huggingface.co' to load the files, and "
               "couldn't find them in the cached files. Check your internet connection or see how to run the "
               "library in offline mode. We couldn't connect to 'https://huggingface.co' … (the same again)\n"
               "Ways out: (1) download it while online; (2) point at a local copy; (3) try the app offline with "
               "the demo model: --model demo")
    html = status_html({"model": "sdxl", "state": "error", "message": message})
    shown = html.split('<details class="sdxl-details">')[0]
    assert "is not in the local Hugging Face cache and the hub cannot be reached." in shown
    assert "Ways out: (1) download it while online" in shown and "--model demo" in shown
    assert "couldn&#x27;t find them" not in shown and "couldn&#x27;t find them" in html  # folded, still there
    short = status_html({"model": "sdxl", "state": "ready", "message": "CPU fallback: the GPU failed."})
    assert "sdxl-details" not in short and "CPU fallback: the GPU failed." in short


def test_the_report_is_folded_under_a_line_naming_the_active_techniques():
    rows = [{"name": "precision", "status": "active", "detail": "bf16"},
            {"name": "VAE tiling", "status": "off", "detail": "not needed"},
            {"name": "channels-last VAE", "status": "active", "detail": "measured"}]
    html = status_html({"model": "demo", "state": "ready", "rows": rows, "source": "pipeline"})
    assert '<details id="sdxl-report"><summary>Optimizations (read back from the loaded pipeline): 2 active — ' \
           'precision, channels-last VAE</summary>' in html
    assert "<details open" not in html and "VAE tiling" in html
