"""The shipped demo model, judged by the scene reader: does the picture show what the prompt asks for?

Every generation goes through the ordinary GenerationService (plan, schedulers, refiner hand-off, decode, save),
with fixed seeds, so a change anywhere on that path that spoils the picture fails here. The thresholds sit
below what the shipped model measures (see README "Demo model") with room for CPU-to-CPU numeric differences.
"""
from __future__ import annotations

import pytest

from sdxl_ui.demo import evaluate as E
from sdxl_ui.demo import scenes as S
from sdxl_ui.schema import GenerationRequest, ResultEvent, Scheduler

SUBSET = E.prompt_set()[:8]


def _service(tmp_path_factory, **settings):
    from sdxl_ui.service import GenerationService
    from sdxl_ui.settings import AppSettings

    service = GenerationService(AppSettings(model="demo", outputs=tmp_path_factory.mktemp("demo-out"), **settings))
    service.ensure_loaded()
    return service


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return _service(tmp_path_factory)


def _score(result: E.Adherence, attrs=("color", "background", "shape", "position")) -> int:
    return sum(result.right[a] for a in attrs)


def test_demo_model_loads_through_the_local_folder_path(demo):
    from sdxl_ui.settings import DEMO_MODEL_DIR

    source = demo.source
    assert (source.kind, source.location, source.label) == ("folder", str(DEMO_MODEL_DIR), "demo")
    assert source.native_size == 128 and demo.native_size() == 128
    assert "simple shapes and colours" in source.note
    assert demo.status()["note"] == source.note


def test_prompt_adherence_over_48_prompts(demo):
    """The issue's bar: colour and background ≥ 90 %, shape and position ≥ 80 % (High quality, fixed seeds)."""
    result = E.run_prompts(demo, E.prompt_set(), quality="high")
    assert result.total == 48
    rates = {a: result.rate(a) for a in S.ATTRIBUTES}
    assert rates["color"] >= 0.9 and rates["background"] >= 0.9, (rates, result.misses)
    assert rates["shape"] >= 0.8 and rates["position"] >= 0.8, (rates, result.misses)


def test_guidance_7_adheres_better_than_guidance_1(demo):
    """16 prompts × 4 attributes = 64 answers. Measured on the shipped model (AMD EPYC, bf16): 63 at guidance 7,
    59 at guidance 1 — this simple world is learned well enough to be drawn mostly right even without
    classifier-free guidance, so the margin is small; guidance must still help, and never be ignored."""
    scenes = E.prompt_set()[8:24]
    guided = E.run_prompts(demo, scenes, quality="high", guidance=7)
    unguided = E.run_prompts(demo, scenes, quality="high", guidance=1)
    assert _score(guided) >= 60, guided.misses
    assert _score(guided) > _score(unguided), (guided.right, unguided.right)


def test_a_negative_prompt_naming_a_colour_keeps_it_out(demo):
    """Where the prompt leaves the colour open and a seed draws red, 'red' as the negative prompt must change it."""
    prompt = "a large circle in the center on a blue background"
    red_seeds = []
    for seed in range(24):
        image = _one(demo, prompt=prompt, seed=seed)
        if S.read_scene(image).color == "red":
            red_seeds.append(seed)
    assert len(red_seeds) >= 2, "the unconstrained prompt should sometimes be drawn red"
    still_red = [s for s in red_seeds if S.read_scene(_one(demo, prompt=prompt, seed=s, negative_prompt="red")).color
                 == "red"]
    assert still_red == [], (red_seeds, still_red)


def _one(service, **fields):
    request = GenerationRequest.from_raw(quality="high", **fields)
    images = [e.image for e in service.generate(request) if isinstance(e, ResultEvent)]
    assert len(images) == 1
    return images[0]


@pytest.mark.parametrize("quality", ["high", "fast"])
def test_each_quality_preset_keeps_the_scene(demo, quality):
    result = E.run_prompts(demo, SUBSET, quality=quality)
    assert _score(result) >= 28, (quality, result.right, result.misses)  # of 32


@pytest.mark.parametrize("sampler", [s.value for s in Scheduler if s is not Scheduler.AUTO])
def test_every_scheduler_offered_keeps_the_scene(demo, sampler):
    """27 of 32 on the 8 prompts; a sampler below it gets the next 8 and must reach 54 of 64 on all 16. Eight
    prompts are few for the stochastic samplers, whose noise path follows the CPU's rounding: on the AMX Xeon
    (2026-12-02) DPM++ 3M SDE read 26 of 32 on the first 8 and 57 of 64 on 16 (on the EPYC, 27 or more on 8); a
    broken sampler reads ~20 of 32 (DPM++ 3M SDE at Fast quality's steps: 21)."""
    result = E.run_prompts(demo, SUBSET, quality="high", scheduler=sampler)
    score = _score(result)
    if score < 27:  # of 32
        more = E.run_prompts(demo, E.prompt_set()[8:16], quality="high", scheduler=sampler)
        assert score + _score(more) >= 54, (sampler, score, _score(more), result.misses, more.misses)  # of 64


def test_refiner_hand_off_keeps_the_scene(tmp_path_factory):
    service = _service(tmp_path_factory, use_refiner="on")
    assert service.models.refiner is not None
    events = list(service.generate(GenerationRequest.from_raw(prompt=S.prompt_for(SUBSET[0]), seed=3)))
    assert any("Refinement: ENABLED" in getattr(e, "message", "") for e in events)
    result = E.run_prompts(service, SUBSET, quality="high")
    assert _score(result) >= 28, (result.right, result.misses)


class RecordingPipeline:
    """Stands in for the diffusers pipeline: records each call's arguments, then lets the real one draw."""

    def __init__(self, pipe):
        object.__setattr__(self, "_pipe", pipe)
        object.__setattr__(self, "calls", [])

    def __getattr__(self, name):
        return getattr(self._pipe, name)

    def __setattr__(self, name, value):
        setattr(self._pipe, name, value)

    def __call__(self, **kwargs):
        self.calls.append({**kwargs, "seed": kwargs["generator"].initial_seed()})
        return self._pipe(**kwargs)


def test_the_service_passes_the_request_through_unchanged(demo):
    real = demo.models.base
    recorder = RecordingPipeline(real)
    demo.models.base = recorder
    try:
        request = GenerationRequest.from_raw(prompt="a small green square at the top", negative_prompt="yellow",
                                             guidance="4.5", steps="20", width="192", height="128", seed="4242",
                                             images="2", quality="high")
        results = [e for e in demo.generate(request) if isinstance(e, ResultEvent)]
    finally:
        demo.models.base = real
    assert len(results) == 2 and len(recorder.calls) == 2
    expected_steps = 14 if demo.plan.device == "cpu" else 20  # the CPU policy: requested steps × 0.7
    for k, call in enumerate(recorder.calls):
        assert call["prompt"] == "a small green square at the top"
        assert call["negative_prompt"] == "yellow"
        assert call["guidance_scale"] == 4.5
        assert call["num_inference_steps"] == expected_steps
        assert (call["width"], call["height"]) == (192, 128)
        assert call["seed"] == 4242 + k
    assert results[0].image.size == (192, 128)


def test_half_precision_unet_with_an_fp32_vae_decodes_the_scene():
    """The GPU configuration (half-precision UNet, VAE decoded in fp32), run on CPU with bf16."""
    import torch

    from sdxl_ui.models import load_models, resolve_source
    from sdxl_ui.service import decode_latents

    models = load_models(resolve_source("demo"), None, "bfloat16", "float32", want_refiner=False)
    assert models.base.unet.dtype == torch.bfloat16
    assert models.base.vae.dtype == torch.float32
    decoded_dtypes = []
    hook = models.base.vae.decoder.register_forward_pre_hook(lambda m, args: decoded_dtypes.append(args[0].dtype))
    scene = S.Scene("yellow", "purple", "square", "right", "large")
    try:
        with torch.inference_mode():
            latents = models.base(prompt=S.prompt_for(scene), num_inference_steps=20, guidance_scale=7,
                                  generator=torch.Generator().manual_seed(1), output_type="latent").images
            assert latents.dtype == torch.bfloat16
            image = decode_latents(models.base, latents)
    finally:
        hook.remove()
    assert decoded_dtypes == [torch.float32]
    assert S.read_scene(image).matches(scene) == {a: True for a in S.ATTRIBUTES}


def test_compare_judges_each_configuration_against_its_own_exact_run_and_holds_int8_to_2_points(monkeypatch):
    """``eval-demo --compare``'s arithmetic, with the pictures' readings given: each row against the exact run of its
    own preset (few-step against few-step), points overall and per attribute, the int8 bar (2 points overall and on
    every attribute) only on int8 rows, and a comparison whose service is missing left out."""
    import numpy as np

    right = {"high: exact": 230, "fast: exact": 230, "few_step: exact": 230, "high: int8 only": 229,
             "fast: preset + int8": 228, "few_step: int8": 231}
    shape_loss = {"high: int8 only": 1, "fast: preset + int8": 2}  # answers lost on "shape", the rest on "size"
    calls = []

    def fake_run_prompts(service, scenes, keep_images=None, quality="high", **fields):
        label = next(lab for lab, q, f, key in E.COMPARISONS if q == quality and f == fields
                     and service is services[key] and lab not in calls)
        calls.append(label)
        n = len(scenes)
        result = E.Adherence(total=n, seconds=[0.5] * n)
        result.right = {a: 46 for a in S.ATTRIBUTES}
        result.right["color"] += right.get(label, 230) - 230
        result.right["shape"] -= shape_loss.get(label, 0)
        result.right["size"] += shape_loss.get(label, 0)
        keep_images.extend((f"p{i}", np.full((8, 8, 3), 100 + i, np.uint8)) for i in range(n))
        return result

    services = {"": object(), "int8": object(), "lcm": object(), "lcm int8": object()}
    monkeypatch.setattr(E, "run_prompts", fake_run_prompts)
    monkeypatch.setattr(E, "psnr", lambda a, b: 99.0)
    out = E.compare(services[""], {k: v for k, v in services.items() if k})
    assert list(out) == [c[0] for c in E.COMPARISONS]
    assert out["few_step: int8"]["points_vs_exact"] == round(100 * 1 / 240, 1)  # against few-step's own exact run
    assert out["high: int8 only"]["points_vs_exact"] == round(-100 / 240, 1)
    assert out["high: int8 only"]["points_by_attribute"]["shape"] == round(-100 / 48, 1)
    assert out["high: int8 only"]["within_2_points"] is False  # one shape answer of 48 lost: 2.1 points
    assert out["fast: preset + int8"]["within_2_points"] is False and out["few_step: int8"]["within_2_points"] is True
    assert "within_2_points" not in out["fast: preset"] and out["fast: preset"]["within_3_points"] is True
    calls.clear()
    out = E.compare(services[""], {})  # no int8 GEMM, no few-step LoRA: those rows are left out
    assert list(out) == [c[0] for c in E.COMPARISONS if not c[3]]
