"""Bad input (issues 6 and 12): each bad request through the page handler, the Python API and the CLI, odd but
valid prompts, bad output paths and bad models. Each case counts in the reliability summary line (conftest.py)."""
from __future__ import annotations

import asyncio
import json
import math
import os
import subprocess
import sys

import pytest
from tests.helpers import RELIABILITY, ROOT, load_probe, run

from sdxl_ui import ImageService
from sdxl_ui.metadata import parse_parameters, read_parameters
from sdxl_ui.schema import GenerationRequest, ServiceState
from sdxl_ui.service import GenerationService
from sdxl_ui.settings import AppSettings

# (case id, field the message must name, request fields). Each goes through the page handler, the Python
# API and the CLI.
BAD_REQUESTS = [
    ("empty prompt", "prompt", {"prompt": ""}),
    ("whitespace prompt", "prompt", {"prompt": "  \t\n "}),
    ("width not multiple of 8", "width", {"width": 1001}),
    ("width zero", "width", {"width": 0}),
    ("width negative", "width", {"width": -512}),
    ("width huge", "width", {"width": 100_000}),
    ("width not a number", "width", {"width": "wide"}),
    ("height not multiple of 8", "height", {"height": 513}),
    ("steps zero", "steps", {"steps": 0}),
    ("steps negative", "steps", {"steps": -1}),
    ("steps 10^6", "steps", {"steps": 10**6}),
    ("guidance negative", "guidance", {"guidance": -2}),
    ("guidance NaN", "guidance", {"guidance": math.nan}),
    ("guidance infinite", "guidance", {"guidance": math.inf}),
    ("seed negative", "seed", {"seed": -7}),
    ("seed 2^32", "seed", {"seed": 2**32}),
    ("seed not a number", "seed", {"seed": "lucky"}),
    # Not valid Unicode: a lone surrogate (JSON "\udcff"; on a command line, the byte 0xff of `$'caf\xff'`).
    ("prompt not valid Unicode", "prompt", {"prompt": "caf\udcff"}),
    ("negative prompt not valid Unicode", "negative_prompt", {"negative_prompt": "\udcff blur"}),
]
# Inputs that must *work*, shown and stored as text.
ODD_BUT_VALID = [
    ("5000-character prompt", {"prompt": "a fox in the snow, " * 263}),
    ("HTML/script prompt and negative", {"prompt": "<script>alert('x')</script><img src=x onerror=alert(1)>",
                                         "negative_prompt": "<b>bold</b> & </pre>"}),
    ("emoji and non-Latin", {"prompt": "🦊 狐狸 в снегу, ضوء ذهبي"}),
]


@pytest.fixture(scope="module")
def page_handler(service):
    """The page's real Generate handler, called in-process (no HTTP): any value a form could send."""
    from sdxl_ui.ui import build_ui

    demo = build_ui(service)
    fn = next(f.fn for f in demo.fns.values() if f.api_name == "generate")

    def call(**fields):
        args = dict(prompt_text=fields.get("prompt", "a fox"), negative_text=fields.get("negative_prompt", ""),
                    quality_label="High quality", n_steps=fields.get("steps", 2), cfg=fields.get("guidance", 8.0),
                    seed_value=fields.get("seed", 1), n_images=1, size_label="Custom",
                    w=fields.get("width", 256), h=fields.get("height", 256), sched="auto", session_history=[],
                    request=None)
        log = ""
        image = None
        for update in fn(**args):
            for component, value in update.items():
                if isinstance(value, str) and "sdxl-log" in value:
                    log = value
                if getattr(component, "elem_id", None) == "output" and value is not None:
                    image = value
        return log, image

    return call


@pytest.mark.parametrize("case,field,fields", BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_input_through_page_api_and_cli(case, field, fields, page_handler, tmp_path):
    # 1. The page: one ❌ line naming the field and the value, no traceback; the next request succeeds.
    log, image = page_handler(**fields)
    assert f"❌ {field}: " in log and "(got " in log, log
    assert "Traceback" not in log and image is None
    # 2. The Python API: False, and the message names the field.
    api = ImageService(model="tiny", outputs=tmp_path)
    kwargs = {"prompt": "a fox", "output_path": str(tmp_path / "x.png"), "num_inference_steps": 2}
    mapping = {"prompt": "prompt", "steps": "num_inference_steps", "guidance": "guidance_scale", "seed": "seed",
               "width": "width", "height": "height", "negative_prompt": "negative_prompt"}
    kwargs.update({mapping[k]: v for k, v in fields.items()})
    assert asyncio.run(api.generate_image(**kwargs)) is False
    assert api.last_error.startswith(f"{field}: ")
    # 3. The CLI: exit code 2 and one line naming the field.
    flags = {"prompt": "--prompt", "steps": "--steps", "guidance": "--guidance", "seed": "--seed",
             "width": "--width", "height": "--height", "negative_prompt": "--negative"}
    argv = ["--prompt", "a fox"]
    for k, v in fields.items():
        argv += [flags[k], str(v)]
    # A str argument with a lone surrogate reaches the child as the raw byte (surrogateescape), as from a shell.
    proc = subprocess.run([sys.executable, "-m", "sdxl_ui", "generate", "--model", "tiny", *argv],
                          capture_output=True, text=True, cwd=ROOT, timeout=120, errors="backslashreplace")
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"error: {field}:"), proc.stderr
    RELIABILITY["bad_inputs"].add(case)


def test_next_page_request_succeeds_after_bad_ones(page_handler):
    log, image = page_handler(prompt="a fox")
    assert image is not None and "✅ Image saved to" in log


@pytest.mark.parametrize("case,fields", ODD_BUT_VALID, ids=[c[0] for c in ODD_BUT_VALID])
def test_odd_but_valid_prompts_work_and_are_stored_as_text(case, fields, page_handler):
    log, image = page_handler(**fields)
    assert image is not None, log
    params = parse_parameters(read_parameters(image))
    assert params["prompt"] == fields["prompt"]
    assert params["negative_prompt"] == fields.get("negative_prompt", "")
    assert "<script>" not in log and "<img" not in log  # escaped in the page's log
    if case.startswith("5000"):
        # CLIP reads 77 tokens: the prompt is read in chunks of 75, up to 8, and the user is told what was cut
        assert "8 chunks of 75 read, the rest cut" in log
    RELIABILITY["bad_inputs"].add(case)


@pytest.mark.parametrize("case,path,problem", [
    ("output path in a missing folder", "{tmp}/missing/x.png", "does not exist"),
    ("output path unwritable", "/proc/x.png", "not writable"),
    ("output path not a png", "{tmp}/x.jpg", "must end with .png"),
    ("output path None (API)", None, "must be a file path"),
    ("output path empty (API)", "", "must be a file path"),
    ("output path with a NUL (API)", "{tmp}/a\x00b.png", "NUL"),
])
def test_bad_output_paths(case, path, problem, tmp_path):
    api = ImageService(model="tiny", outputs=tmp_path / "outputs")
    ok = asyncio.run(api.generate_image(prompt="a fox", output_path=path if path is None else path.format(tmp=tmp_path),
                                        num_inference_steps=2))
    assert ok is False and api.last_error.startswith("output_path: ") and problem in api.last_error, api.last_error
    assert not (tmp_path / "outputs").exists() or not list((tmp_path / "outputs").rglob("*.png"))
    RELIABILITY["bad_inputs"].add(case)


def test_relative_output_path_is_relative_to_the_current_folder_in_api_and_cli(tmp_path, monkeypatch):
    """One rule for both front ends (README): like open() and any shell tool, not "inside the outputs folder"."""
    work = tmp_path / "work"
    (work / "sub").mkdir(parents=True)
    monkeypatch.chdir(work)
    api = ImageService(model="tiny", outputs=tmp_path / "outputs", device="cpu")
    assert asyncio.run(api.generate_image(prompt="a fox", output_path="sub/api.png", num_inference_steps=2)), \
        api.last_error
    assert (work / "sub" / "api.png").is_file() and api.last_result.path == str(work / "sub" / "api.png")
    proc = subprocess.run([sys.executable, "-m", "sdxl_ui", "generate", "--model", "tiny", "--device", "cpu",
                           "--prompt", "a fox", "--steps", "2", "--outputs", str(tmp_path / "outputs"),
                           "--out", "sub/cli.png"], capture_output=True, text=True, cwd=work, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    assert (work / "sub" / "cli.png").is_file()
    assert not (tmp_path / "outputs").exists() or not list((tmp_path / "outputs").rglob("*.png"))
    RELIABILITY["bad_inputs"].add("relative output path")


@pytest.mark.parametrize("value", ["yes", "no", 1, None])
def test_api_high_quality_must_be_a_bool(value, tmp_path):
    api = ImageService(model="tiny", outputs=tmp_path)
    ok = asyncio.run(api.generate_image(prompt="a fox", output_path=str(tmp_path / "x.png"), num_inference_steps=2,
                                        high_quality=value))
    assert ok is False and api.last_error.startswith("high_quality: must be True or False"), api.last_error
    assert not (tmp_path / "x.png").exists()
    RELIABILITY["bad_inputs"].add(f"high_quality={value!r}")


def _bad_models(tmp_path):
    not_sdxl = tmp_path / "sd15"
    not_sdxl.mkdir()
    (not_sdxl / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    corrupt = tmp_path / "broken.safetensors"
    corrupt.write_bytes(b"\x12\x00not a header")
    empty = tmp_path / "empty"
    empty.mkdir()
    return [("model missing path", str(tmp_path / "nope"), "does not exist"),
            ("model folder not SDXL", str(not_sdxl), "not Stable Diffusion XL"),
            ("model corrupt safetensors", str(corrupt), "not a valid .safetensors file"),
            ("model folder empty", str(empty), "no model_index.json")]


def test_a_bad_model_is_named_before_the_memory_check_on_a_small_machine(tmp_path):
    """An empty folder on a host short of RAM: the user must hear about the folder, not about memory."""
    empty = tmp_path / "empty"
    empty.mkdir()
    service = GenerationService(AppSettings(model=str(empty), outputs=tmp_path), probe=load_probe("cpu_small_ram"))
    status = service.status()
    assert status["state"] == ServiceState.ERROR and "no model_index.json" in status["message"], status["message"]
    (error,) = run(service, GenerationRequest(prompt="x"))["errors"]
    assert "no model_index.json" in error.message and "needs ~" not in error.message
    RELIABILITY["bad_inputs"].add("empty model folder, little RAM")


def test_bad_models_through_api_cli_and_page(tmp_path):
    from sdxl_ui.ui.app import build_ui

    for case, spec, problem in _bad_models(tmp_path):
        api = ImageService(model=spec, outputs=tmp_path)
        assert asyncio.run(api.generate_image(prompt="a fox", output_path=str(tmp_path / "m.png"))) is False
        assert api.last_error.startswith("model: ") and problem in api.last_error
        proc = subprocess.run([sys.executable, "-m", "sdxl_ui", "generate", "--model", spec, "--prompt", "x"],
                              capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert proc.returncode == 2 and problem in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        service = GenerationService(AppSettings(model=spec, outputs=tmp_path))
        build_ui(service)  # the page builds (status panel explains) even though the model is bad
        status = service.status()
        if status["state"] != ServiceState.ERROR:  # folder/file errors show once a load was tried
            run(service, GenerationRequest(prompt="x"))
            status = service.status()
        assert status["state"] == ServiceState.ERROR and problem in status["message"]
        RELIABILITY["bad_inputs"].add(case)
