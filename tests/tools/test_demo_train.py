"""train-demo and eval-demo as commands: a seconds-long smoke training writes a diffusers folder that loads
through the ordinary local-folder path and generates; eval-demo reports per attribute (the full training and
the adherence figures are measured by hand, see README "Demo model")."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import ROOT


def _run(*args, timeout=240):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "sdxl_ui", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def smoke_model(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke") / "model"
    proc = _run("train-demo", "--out", str(out), "--smoke", "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out, json.loads(proc.stdout)


def test_smoke_training_writes_a_loadable_sdxl_folder(smoke_model, tmp_path):
    from sdxl_ui.models import folder_native_size, resolve_source
    from sdxl_ui.schema import GenerationRequest, ResultEvent
    from sdxl_ui.service import GenerationService
    from sdxl_ui.settings import AppSettings

    out, report = smoke_model
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    assert json.loads((out / "refiner" / "model_index.json").read_text())["_class_name"] == \
        "StableDiffusionXLImg2ImgPipeline"
    assert json.loads((out / "unet" / "config.json").read_text())["addition_embed_type"] == "text_time"
    assert report["smoke"] is True and report["vae"]["steps"] == 3 and report["base"]["steps"] == 2
    assert folder_native_size(out) == 128
    assert resolve_source(str(out)).kind == "folder"
    # Progress lines with loss and ETA went to stderr (not asserted on the fixture: see the CLI test below).
    service = GenerationService(AppSettings(model=str(out), refiner=str(out / "refiner"), use_refiner="on",
                                            outputs=tmp_path))
    events = list(service.generate(GenerationRequest.from_raw(prompt="a red circle", steps="4", seed="1")))
    results = [e for e in events if isinstance(e, ResultEvent)]
    assert len(results) == 1 and results[0].image.size == (128, 128) and results[0].refiner is True


def test_train_demo_rejects_bad_input(tmp_path):
    proc = _run("train-demo", "--out", str(tmp_path / "m"), "--minutes", "0")
    assert proc.returncode == 2 and "minutes" in proc.stderr
    afile = tmp_path / "file"
    afile.write_text("x")
    proc = _run("train-demo", "--out", str(afile), "--smoke")
    assert proc.returncode == 2 and "out:" in proc.stderr


def test_eval_demo_reports_each_attribute_and_the_held_out_pairs(smoke_model):
    out, _ = smoke_model
    proc = _run("eval-demo", "--model", str(out), "--quality", "fast", "--steps", "2", "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    assert result["adherence"]["n"] == 48 and result["held_out"]["n"] == 6
    assert set(result["adherence"]["rate"]) == {"color", "background", "shape", "position", "size"}
    assert result["adherence"]["s_per_image_median"] > 0
    proc = _run("eval-demo", "--quality", "best")
    assert proc.returncode == 2 and "quality" in proc.stderr
