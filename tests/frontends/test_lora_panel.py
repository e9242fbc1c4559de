"""The page's LoRA panel (issue 18, optional part): the LoRA folder's files with weights; only the operator applies
them, only names from the folder's own listing are accepted."""
from __future__ import annotations

import time

import gradio as gr
import pytest
from tests.helpers.loras import make_lora

from sdxl_ui.service import GenerationService
from sdxl_ui.settings import AppSettings
from sdxl_ui.ui import build_ui

OPERATOR = {"host": "127.0.0.1"}  # without a login, the operator is whoever connects from this machine
VISITOR = {"host": "10.1.2.3"}


def handler(demo, name):
    return next(f.fn for f in demo.fns.values() if getattr(f.fn, "__name__", "") == name)


@pytest.fixture
def page(tmp_path):
    from sdxl_ui.models import build_tiny

    folder = tmp_path / "loras"
    base, _ = build_tiny(with_refiner=False)
    make_lora(base.unet, folder, seed=4, scale=0.5, name="ink.safetensors")
    make_lora(base.unet, folder, seed=5, scale=0.5, name="paper.safetensors")
    (folder / "notes.txt").write_text("not a LoRA")
    service = GenerationService(AppSettings(model="tiny", device="cpu", precision="fp32", refiner="none",
                                            lora_dir=folder, outputs=tmp_path / "out"))
    return service, build_ui(service), folder


def test_the_panel_lists_the_folder_with_weights_and_the_operator_applies_them(page):
    service, demo, folder = page
    table = next(c for c in demo.blocks.values() if getattr(c, "elem_id", None) == "loras")
    assert [row[0] for row in table.value["data"]] == ["ink.safetensors", "paper.safetensors"]
    apply = handler(demo, "apply_loras")
    with pytest.raises(gr.Error, match="operator"):
        apply([["ink.safetensors", 1.0]], gr.Request(client=VISITOR))
    with pytest.raises(gr.Error, match="not a file of the LoRA folder"):
        apply([["../../etc/passwd", 1.0]], gr.Request(client=OPERATOR))
    assert service.settings.loras == ()
    _panel, rows = apply([["ink.safetensors", 0.7], ["paper.safetensors", 0]], gr.Request(client=OPERATOR))
    assert [str(spec) for spec in service.settings.loras] == [f"{folder / 'ink.safetensors'}@0.7"]
    assert rows == [["ink.safetensors", 0.7], ["paper.safetensors", 0.0]]
    deadline = time.time() + 120
    while not service.loaded and time.time() < deadline:
        time.sleep(0.2)
    lora_row = next(r for r in service.status()["rows"] if r["name"] == "LoRA adapters")
    assert lora_row["status"] == "active" and "ink × 0.7" in lora_row["detail"]
    apply([["ink.safetensors", 0], ["paper.safetensors", 1]], gr.Request(client=OPERATOR))  # loaded: in place
    lora_row = next(r for r in service.status()["rows"] if r["name"] == "LoRA adapters")
    assert "paper × 1" in lora_row["detail"] and "ink" not in lora_row["detail"]
