"""The default hub path on real files, offline (issue 18, item 7): the shipped demo model laid out as a Hugging Face
cache under the default base and refiner ids (the fp16-variant file names the SDXL repos ship, float16 tensors in
them, as a download on a GPU leaves them), the demo's own LCM-LoRA under ``latent-consistency/lcm-lora-sdxl``,
and ``python -m sdxl_ui generate`` with ``HF_HOME`` pointing at it and ``HF_HUB_OFFLINE=1``: the loading code users
hit (variant choice, the default refiner id, a LoRA from a hub id, profile detection) runs without a network."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from tests.helpers import ROOT
from tests.helpers.hub import (BASE_ID, LCM_LORA_ID, REFINER_ID, add_diffusers_folder, add_file, hub_env, snapshot,
                               variant_name)

DEMO = ROOT / "assets" / "demo-model"
UNET_FP16 = variant_name("unet/diffusion_pytorch_model.safetensors", "fp16")
PROMPT = "a large red circle on a blue background"


def _cache(home: Path, refiner: bool = True, lora: Path | None = None) -> Path:
    add_diffusers_folder(home, BASE_ID, DEMO)
    if refiner:  # the demo's refiner/ folder is what the refiner repo's root holds
        add_diffusers_folder(home, REFINER_ID, DEMO / "refiner")
    if lora is not None:
        add_file(home, LCM_LORA_ID, "pytorch_lora_weights.safetensors", lora.read_bytes())
    return home


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """(HF_HOME, the LoRA's file in the cache): base, refiner and the LoRA, fp16 files only."""
    root = tmp_path_factory.mktemp("hub")
    home = _cache(root / "home", lora=DEMO / "lcm-lora" / "pytorch_lora_weights.safetensors")
    return home, snapshot(home, LCM_LORA_ID) / "pytorch_lora_weights.safetensors"


def _generate(home: Path, outputs: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    proc = subprocess.run(
        [sys.executable, "-m", "sdxl_ui", "generate", "--model", BASE_ID, "--prompt", PROMPT, "--seed", "1",
         "--width", "128", "--height", "128", "--outputs", str(outputs), "--json", *args],
        capture_output=True, text=True, env=hub_env(home), cwd=ROOT, timeout=600)
    data = json.loads(proc.stdout) if proc.stdout.strip().startswith("{") else {}
    if data.get("kind") == "settings" and str(data.get("error", "")).startswith("memory:"):
        pytest.skip(f"this machine's memory preflight refuses an SDXL-sized hub model: {data['error']}")
    return proc, data


def _row(data: dict, name: str) -> str:
    return next(r["detail"] for r in data["optimizations"] if r["name"] == name)


def test_the_default_model_with_the_lcm_lora_from_the_hub_cache_runs_offline(hub, tmp_path):
    from PIL import Image
    from sdxl_ui.adapters import file_hash
    from sdxl_ui.demo.scenes import read_scene
    from sdxl_ui.metadata import parse_parameters

    home, lora = hub
    proc, data = _generate(home, tmp_path, "--lora", LCM_LORA_ID)
    assert proc.returncode == 0 and data["ok"], proc.stdout + proc.stderr[-3000:]
    assert data["model"] == BASE_ID and data["note"] is None  # the hub id, not a stand-in
    profile = _row(data, "model profile")
    assert profile.startswith("lcm: ") and "4 (High quality) / 2 (Fast) steps" in profile, profile
    assert f"LoRA {LCM_LORA_ID!r}" in profile and "LCMScheduler" in profile
    assert data["steps_requested"] == data["steps_run"] == 4  # the profile's High quality steps
    lora_hash = file_hash(lora)
    assert f"lcm-lora-sdxl × 1 (hash {lora_hash})" in _row(data, "LoRA adapters")
    path = Path(data["path"])
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as image:
        assert image.size == (128, 128)
        params = parse_parameters(image.info["parameters"])
        reading = read_scene(image.convert("RGB"))
    # The demo's LCM-LoRA through the hub id draws the prompt in 4 steps without guidance.
    assert (reading.color, reading.shape, reading.background) == ("red", "circle", "blue")
    assert params["Model"] == BASE_ID and params["Profile"] == "lcm" and params["Steps"] == "4"
    assert params["Lora hashes"] == f"lcm-lora-sdxl: {lora_hash}" and params["Lora weights"] == "lcm-lora-sdxl: 1"


def test_the_default_refiner_id_loads_from_the_cache_and_the_base_draws_the_demo_scene(hub, tmp_path):
    from PIL import Image
    from sdxl_ui.demo import scenes as S

    home, _ = hub
    proc, data = _generate(home, tmp_path, "--precision", "bf16", "--use-refiner", "on", "--steps", "20")
    assert proc.returncode == 0 and data["ok"], proc.stdout + proc.stderr[-3000:]
    assert data["refiner"] is True and _row(data, "model profile").startswith("sdxl: ")
    with Image.open(data["path"]) as image:
        reading = S.read_scene(image.convert("RGB"))
    # The fp16 files hold the demo's own weights: the picture is the prompt's scene.
    assert (reading.color, reading.shape, reading.background) == ("red", "circle", "blue"), reading


def test_fp32_loads_a_cache_that_holds_only_the_fp16_files(hub):
    """A CPU without bf16 runs fp32 (plain files first); a cache filled on a GPU has the fp16 files only: they
    load, upcast. Through ``load_models`` (no memory preflight: fp32 SDXL with its refiner is ~24 GB by the
    estimate), with the refiner the settings name for the default model."""
    home, _ = hub
    script = (
        "from sdxl_ui.models import load_models, resolve_source\n"
        "from sdxl_ui.settings import AppSettings\n"
        f"settings = AppSettings(model={BASE_ID!r})\n"
        "m = load_models(resolve_source(settings.model), settings.refiner_source, 'float32', 'float32', True)\n"
        "print(settings.refiner_source, m.base.unet.dtype, m.refiner.unet.dtype, m.refiner.vae is m.base.vae,\n"
        "      m.refiner.unet.config.in_channels, sep='|')\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=hub_env(home),
                          cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == f"{REFINER_ID}|torch.float32|torch.float32|True|4"


def test_a_file_missing_from_the_cache_is_named_and_exits_1(tmp_path):
    home = _cache(tmp_path / "home", refiner=False)
    (snapshot(home, BASE_ID) / UNET_FP16).unlink()  # e.g. a download that was interrupted
    proc, data = _generate(home, tmp_path / "out", "--precision", "bf16")
    assert proc.returncode == 1, proc.stdout + proc.stderr[-3000:]  # runtime: the model cannot be loaded
    assert data["ok"] is False and data["kind"] == "model"
    error = data["error"]
    assert error.startswith(f"model: could not load {BASE_ID!r}") and "offline" in error, error
    assert f"without {UNET_FP16} (snapshot" in error and str(snapshot(home, BASE_ID)) in error, error
    assert not list((tmp_path / "out").rglob("*.png"))
