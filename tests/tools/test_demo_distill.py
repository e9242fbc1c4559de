"""train-demo --distill (issue 18, parts 3 and 4): a seconds-long smoke distillation writes files that load through
the app's own paths: the LCM-LoRA through --lora (detected as lcm), the tiny decoder through --tiny-decoder. The
real runs (their figures in README "Few-step models and LoRAs") are measured by hand; the shipped results are
judged in tests/tools/test_demo_few_step.py."""
from __future__ import annotations

import json

import pytest
from tests.helpers import run
from tests.helpers.cli import cli

from sdxl_ui.demo.distill import LCM_FILE, distill
from sdxl_ui.schema import GenerationRequest
from sdxl_ui.service import GenerationService
from sdxl_ui.settings import DEMO_MODEL_DIR, AppSettings


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill")
    lcm = distill("lcm", DEMO_MODEL_DIR, root / "my-distilled", 1, smoke=True, rank=4)
    decoder = distill("decoder", DEMO_MODEL_DIR, root / "small", 1, smoke=True)
    return root, lcm, decoder


def test_the_smoke_lcm_lora_is_a_diffusers_lora_that_loads_and_is_detected_as_lcm(smoke, tmp_path):
    from sdxl_ui.adapters import metadata

    root, report, _ = smoke
    path = root / "my-distilled" / LCM_FILE
    assert report["lcm"]["steps"] == 2 and report["lcm"]["rank"] == 4 and report["bytes"] == path.stat().st_size
    assert metadata(path)["sdxl_ui_profile"] == "lcm"
    assert json.loads((root / "my-distilled" / "training.json").read_text())["distill"] == "lcm"
    # The folder's name says nothing: the family comes from the file's own metadata.
    svc = GenerationService(AppSettings(model="demo", loras=(str(root / "my-distilled"),), outputs=tmp_path))
    out = run(svc, GenerationRequest(prompt="a red circle", seed=1))
    assert not out["errors"], out["errors"]
    assert svc.plan.profile == "lcm" and out["results"][0].steps_run == 4  # LCM High quality: 4 steps
    rows = {r.name: r for r in svc.current_report().rows}
    assert "my-distilled" in rows["LoRA adapters"].detail and rows["model profile"].detail.startswith("lcm")


def test_the_smoke_tiny_decoder_is_an_autoencoder_tiny_that_decodes_the_final_image(smoke, tmp_path):
    root, _, report = smoke
    folder = root / "small"
    assert json.loads((folder / "config.json").read_text())["_class_name"] == "AutoencoderTiny"
    assert report["decoder"]["steps"] == 2 and report["bytes"] < 1_000_000
    svc = GenerationService(AppSettings(model="demo", decoder="tiny", tiny_decoder=str(folder), outputs=tmp_path))
    out = run(svc, GenerationRequest(prompt="a red circle", seed=1, steps=4))
    assert not out["errors"], out["errors"]
    assert out["results"][0].image.size == (128, 128)
    row = {r.name: r for r in svc.current_report().rows}["tiny decoder"]
    assert row.status.value == "active" and "small (AutoencoderTiny)" in row.detail
    assert "decodes the final image" in row.detail and str(folder) not in row.detail  # no server path


def test_distill_rejects_bad_input(tmp_path):
    proc = cli("train-demo", "--distill", "lcm", "--from", str(tmp_path), "--out", str(tmp_path / "o"))
    assert proc.returncode == 2 and "from:" in proc.stderr and "model_index.json" in proc.stderr
    proc = cli("train-demo", "--distill", "lcm", "--rank", "0", "--out", str(tmp_path / "o"))
    assert proc.returncode == 2 and "rank:" in proc.stderr
    proc = cli("train-demo", "--from", str(DEMO_MODEL_DIR), "--out", str(tmp_path / "o"))
    assert proc.returncode == 2 and "from: only with --distill" in proc.stderr
