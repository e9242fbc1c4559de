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
