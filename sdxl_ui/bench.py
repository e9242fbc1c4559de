"""`python -m sdxl_ui bench`: the full SDXL base architecture (random weights, no download), stock diffusers
against this project's plan, in one run.

Each configuration runs in its own child process, built directly in its dtype: its peak RSS is its own
(ru_maxrss of that process), and the fp32 baseline's ~14 GB are gone before the plan is built.
Timed per configuration: guided UNet step (batch 2, best of --steps after one warm-up step), text encoding,
VAE decode; UNet FLOPs come from torch's FlopCounterMode on a meta-device copy (no compute needed).
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import date

# SDXL 1.0 base, from the published configs (stabilityai/stable-diffusion-xl-base-1.0).
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, norm_num_groups=32,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280), transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
    addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
)
# SDXL 1.0 refiner UNet (stabilityai/stable-diffusion-xl-refiner-1.0): text encoder 2 only, aesthetic score.
SDXL_REFINER_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, norm_num_groups=32,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(384, 768, 1536, 1536), transformer_layers_per_block=4, attention_head_dim=(6, 12, 24, 24),
    cross_attention_dim=1280, use_linear_projection=True, addition_embed_type="text_time",
    addition_time_embed_dim=256, projection_class_embeddings_input_dim=2560,
)
SDXL_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
    block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, sample_size=1024, scaling_factor=0.13025, force_upcast=True,
)
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
              num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
CLIP_BIGG = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                 num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)
EXPECTED_PARAMS = {"unet": 2_567_463_684, "text_encoder": 123_060_480, "text_encoder_2": 694_659_840,
                   "vae": 83_653_863}
EXPECTED_REFINER_UNET_PARAMS = 2_259_526_660
HQ_STEPS, HQ_GUIDANCE = 50, 8.0  # the High-quality preset, as stock diffusers is asked to run it too
PROMPT = "a photograph of a red fox in the snow, golden hour, highly detailed"


# ---------------------------------------------------------------- child: one configuration

def _build_full(torch, dtype, device, with_refiner=False):
    from diffusers import (AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline,
                           StableDiffusionXLPipeline, UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from .models import _clip_tokenizer

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build straight in the target dtype: no fp32 copy ever exists
    try:
        with torch.device(device):
            torch.manual_seed(0)
            unet = UNet2DConditionModel(**SDXL_UNET)
            te1 = CLIPTextModel(CLIPTextConfig(**CLIP_L))
            te2 = CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_BIGG))
            vae = AutoencoderKL(**SDXL_VAE)
            refiner_unet = UNet2DConditionModel(**SDXL_REFINER_UNET) if with_refiner else None
    finally:
        torch.set_default_dtype(previous)
    tokenizer = _clip_tokenizer()  # byte-level stand-in: token ids < 514, valid for the 49408-entry embedding
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tokenizer,
                                     tokenizer_2=tokenizer, unet=unet, scheduler=scheduler, add_watermarker=False)
    refiner = None
    if with_refiner:  # shares text encoder 2 and the VAE with the base, as the service loads it
        refiner = StableDiffusionXLImg2ImgPipeline(
            vae=vae, text_encoder=None, text_encoder_2=te2, tokenizer=None, tokenizer_2=tokenizer,
            unet=refiner_unet, scheduler=scheduler, requires_aesthetics_score=True,
            force_zeros_for_empty_prompt=False, add_watermarker=False)
        refiner_unet.eval()
    for module in (unet, te1, te2, vae):
        module.eval()
    return pipe, refiner


def _build_tiny(torch, dtype, device, with_refiner=False):
    from .models import build_tiny

    base, refiner = build_tiny(with_refiner=with_refiner, dtype=str(dtype).replace("torch.", ""))
    return base.to(device), (refiner.to(device) if refiner is not None else None)


def _params(pipe, refiner=None) -> dict:
    params = {name: sum(p.numel() for p in getattr(pipe, name).parameters())
              for name in ("unet", "text_encoder", "text_encoder_2", "vae")}
    if refiner is not None:
        params["refiner_unet"] = sum(p.numel() for p in refiner.unet.parameters())
    return params


def unet_tflops(torch, unet_config: dict, res: int) -> float:
    """TFLOP of one guided step (batch 2) at res², counted on a meta-device copy."""
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config)
        x, inputs = _unet_inputs(torch, unet.config, res, "meta", torch.float32)
    with FlopCounterMode(display=False) as counter:
        unet(x, **inputs)
    return counter.get_total_flops() / 1e12


def vae_decode_tflops(torch, vae_config: dict, res: int) -> float:
    from diffusers import AutoencoderKL
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        vae = AutoencoderKL(**vae_config)
        z = torch.randn(1, 4, res // 8, res // 8)
    with FlopCounterMode(display=False) as counter:
        vae.decode(z)
    return counter.get_total_flops() / 1e12


def _unet_inputs(torch, config, res, device, dtype):
    latent = res // 8
    gen = torch.Generator("cpu").manual_seed(0)
    x = torch.randn(2, 4, latent, latent, generator=gen).to(device, dtype)
    hidden = torch.randn(2, 77, config.cross_attention_dim, generator=gen).to(device, dtype)
    pooled_dim = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    text_embeds = torch.randn(2, pooled_dim, generator=gen).to(device, dtype)
    time_ids = torch.tensor([[res, res, 0, 0, res, res]] * 2, dtype=dtype, device=device)
    timestep = torch.tensor(999.0, device=device)
    return x, dict(timestep=timestep, encoder_hidden_states=hidden,
                   added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids})


def matmul_peak_gflops(torch, dtype, device, n: int = 4096, repeats: int = 5) -> float:
    a = torch.randn(n, n, dtype=torch.float32).to(device, dtype)
    b = torch.randn(n, n, dtype=torch.float32).to(device, dtype)
    best = float("inf")
    for _ in range(repeats + 1):
        _sync(torch, device)
        t = time.perf_counter()
        a @ b
        _sync(torch, device)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def _vae_precision_check(torch, vae, latents) -> dict:
    """Decode the same latents with this VAE and with an fp32 copy; compare outputs (range -1…1)."""
    import copy

    def decode(model):
        z = latents.to(model.dtype) / model.config.scaling_factor
        return model.decode(z, return_dict=False)[0].float()

    low = decode(vae)
    reference = decode(torch.nn.Module.to(copy.deepcopy(vae), dtype=torch.float32))
    diff = (low - reference).abs()
    return {"finite": bool(torch.isfinite(low).all()), "mean_abs_diff": round(float(diff.mean()), 5),
            "max_abs_diff": round(float(diff.max()), 5), "reference": "fp32 copy of the same VAE"}


def _sync(torch, device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def _rss_gb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux: KiB


def run_configuration(spec: dict) -> dict:
    """One configuration, in this process: build, warm up, time. ``spec`` comes from the parent."""
    import torch

    from .models import LoadedModels, ModelSource
    from .optimize import apply, report
    from .schema import HardwareProbe
    from .service import decode_latents

    torch.set_flush_denormal(True)
    kind, arch, res, steps, device = spec["kind"], spec["arch"], spec["res"], spec["steps"], spec["device"]
    dtype = getattr(torch, spec["dtype"])
    plan = models = None
    if kind == "plan":
        from .policy import make_plan

        probe = HardwareProbe.from_dict(spec["probe"])
        plan = make_plan(probe, _settings(spec), "tiny" if arch == "tiny" else "sdxl", res, res, True)
    # The refiner only for --hq, and for the plan only where it would use one (its RAM counts in peak RSS).
    with_refiner = bool(spec.get("hq")) and (plan is None or plan.refiner)
    t0 = time.perf_counter()
    build = _build_full if arch == "full" else _build_tiny
    pipe, refiner = build(torch, dtype, device, with_refiner=with_refiner)
    build_s = time.perf_counter() - t0
    params = _params(pipe, refiner)
    out: dict = {"kind": kind, "dtype": spec["dtype"], "device": device, "res": res, "build_s": round(build_s, 1),
                 "params": params}
    grad_context = torch.no_grad  # what the stock pipeline's __call__ uses
    if kind == "int8":
        from .policy import make_plan

        probe = HardwareProbe.from_dict(spec["probe"])
        plan = make_plan(probe, _settings(spec).with_(precision="int8"), "tiny" if arch == "tiny" else "sdxl",
                         res, res, True)
    if kind in ("plan", "int8"):
        models = LoadedModels(base=pipe, refiner=refiner, source=ModelSource("bench", f"sdxl-{arch}-random"),
                              load_s=build_s)
        if kind == "int8":  # the noise prediction of the same weights before quantization, for the difference
            x0, inputs0 = _unet_inputs(torch, pipe.unet.config, res, device, dtype)
            with torch.inference_mode():
                reference = pipe.unet(x0, **inputs0).sample.float()
            t = time.perf_counter()
        apply(plan, models)
        if kind == "int8":
            out["quantize_s"] = round(time.perf_counter() - t, 1)
        out["report"] = report(models, plan, probe).to_list()
        grad_context = torch.inference_mode
    out["threads"] = torch.get_num_threads()  # stock: torch's default; plan: what apply() set
    if str(device).startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()

    with grad_context():
        t = time.perf_counter()
        prompt_embeds, neg, pooled, neg_pooled = pipe.encode_prompt(
            PROMPT, device=device, num_images_per_prompt=1, do_classifier_free_guidance=True, negative_prompt="")
        _sync(torch, device)
        out["text_encode_s"] = round(time.perf_counter() - t, 3)

        x, inputs = _unet_inputs(torch, pipe.unet.config, res, device, dtype)
        times = []
        unet = pipe.unet
        if spec.get("compile"):
            unet = torch.compile(pipe.unet)
        for i in range(steps + 1):  # step 0 is the warm-up (and, with --compile, the compilation)
            _sync(torch, device)
            t = time.perf_counter()
            unet(x, **inputs)
            _sync(torch, device)
            times.append(time.perf_counter() - t)
            print(f"PROGRESS {spec.get('label', kind)}: {'warm-up' if i == 0 else f'step {i}/{steps}'} "
                  f"{times[-1]:.2f} s",
                  file=sys.stderr, flush=True)
        # ru_maxrss only grows: read here, it is the peak through text encoding and the UNet steps.
        out["peak_rss_step_gb"] = round(_rss_gb(), 2)
        out["warmup_s"] = round(times[0], 3)
        out["s_per_step"] = round(min(times[1:]), 4)
        out["step_times_s"] = [round(v, 4) for v in times[1:]]

        if kind in ("plan", "int8") and spec.get("kinds", True):
            out["kinds"] = _time_kinds(torch, pipe.unet, x, inputs, device, label=spec.get("label", kind))
        if kind == "int8":
            out["int8"] = _int8_difference(torch, pipe.unet, x, inputs, reference)

        latents = torch.randn(1, 4, res // 8, res // 8, generator=torch.Generator("cpu").manual_seed(0))
        t = time.perf_counter()
        image = decode_latents(pipe, latents.to(device, pipe.vae.dtype))
        _sync(torch, device)
        out["vae_decode_s"] = round(time.perf_counter() - t, 3)
        out["vae_output_ok"] = image.size == (res, res)
        if spec.get("vae_check") and dtype != torch.float32:
            out["vae_check"] = _vae_precision_check(torch, pipe.vae, latents.to(device))
    if kind == "plan" and spec.get("check_steps"):
        out["check"] = _end_to_end_check(torch, spec, models, probe)
    if spec.get("hq"):
        out["hq"] = _time_hq(torch, spec, pipe, refiner, plan, models)
    out["peak_rss_gb"] = round(_rss_gb(), 2)
    if str(device).startswith("cuda"):
        out["peak_vram_gb"] = round(torch.cuda.max_memory_allocated() / 1024**3, 2)
    out["matmul_peak_gflops"] = round(matmul_peak_gflops(torch, dtype, device), 1)
    return out


# A UNet call of a schedule: F (full) or C (cached), and the rows it runs per image (2 = with CFG, 1 = without).
KIND_NAMES = {"F2": "full_guided", "F1": "full_cond", "C2": "cached_guided", "C1": "cached_cond"}


def _median_time(torch, device, fn, repeats: int = 3) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        _sync(torch, device)
        t = time.perf_counter()
        fn()
        _sync(torch, device)
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def _halve(value):
    """The conditional half of a batch-2 UNet input (what a step outside the guidance interval runs)."""
    if isinstance(value, dict):
        return {k: _halve(v) for k, v in value.items()}
    shape = getattr(value, "shape", None)
    return value[1:] if shape is not None and len(shape) and shape[0] == 2 else value


def _time_kinds(torch, unet, x, inputs, device, label: str) -> dict:
    """Seconds per UNet call of each kind a schedule is made of (median of 3 after a warm-up): a full step with
    CFG (2 rows per image), a full conditional-only step (1 row: outside the guidance interval), and the feature
    cache's cached step with and without CFG (only the outermost level runs on the kept deep feature)."""
    from .optimizations import feature_cache

    x1, inputs1 = x[1:], _halve(inputs)
    out = {"full_guided": _median_time(torch, device, lambda: unet(x, **inputs))}
    print(f"PROGRESS {label}: full guided step {out['full_guided']:.2f} s", file=sys.stderr, flush=True)
    out["full_cond"] = _median_time(torch, device, lambda: unet(x1, **inputs1))
    print(f"PROGRESS {label}: full conditional-only step {out['full_cond']:.2f} s", file=sys.stderr, flush=True)
    if type(unet).__name__ == "UNet2DConditionModel":
        cache = feature_cache.enable(unet, interval=1_000_000)  # after its first (full) call, every call is cached
        for rows, (xs, kw) in (("cached_guided", (x, inputs)), ("cached_cond", (x1, inputs1))):
            cache.reset()
            unet(xs, **kw)  # the full call that keeps the deep feature
            out[rows] = _median_time(torch, device, lambda: unet(xs, **kw))
            assert cache.run.trace.count("C") >= 4, cache.run.trace  # they really were cached calls
        feature_cache.disable(unet)
        print(f"PROGRESS {label}: cached steps {out['cached_guided']:.2f} / {out['cached_cond']:.2f} s",
              file=sys.stderr, flush=True)
    return {k: round(v, 4) for k, v in out.items()}


def _int8_difference(torch, unet, x, inputs, ref) -> dict:
    """How far the int8 UNet's noise prediction is from the same weights' exact one (same inputs)."""
    out = unet(x, **inputs).sample.float()
    rel = float(((out - ref).pow(2).mean() / ref.pow(2).mean()).sqrt())
    cos = float(torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0))
    return {"noise_pred_rel_rms_diff": round(rel, 5), "noise_pred_cosine": round(cos, 6),
            "reference": "the same random weights in the plan's exact dtype, same inputs"}


class _CallRecorder:
    """Rows per image of every UNet call of a run (2 = with CFG, 1 = conditional only), read after any guidance
    interval hook has halved the batch; the feature cache's own trace says which calls were full (F/R) or cached."""

    def __init__(self, unet, images: int = 1):
        self.rows: list[int] = []
        self.images = images
        self._handle = unet.register_forward_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs, output):
        sample = args[0] if args else kwargs["sample"]
        self.rows.append(sample.shape[0] // self.images)

    def close(self):
        self._handle.remove()


def _run_schedule(unet, rows: list[int]) -> list[str]:
    from .optimizations import feature_cache

    cache = feature_cache.get(unet)
    trace = cache.run.trace if cache is not None and cache.enabled and cache.interval > 1 else "F" * len(rows)
    assert len(trace) == len(rows), (trace, rows)
    return [f"{'C' if t == 'C' else 'F'}{r}" for t, r in zip(trace, rows)]


def preset_schedule(probe, settings, quality: str, requested_steps: int | None = None) -> dict:
    """The real schedule of a preset's image on this device: the tiny model run through the service's own path
    (``apply`` + ``run_stages``) with the preset's plan (steps policy, sampler, feature cache, guidance interval),
    each UNet call recorded. Returns steps, sampler and the calls ("F2", "C1", … see KIND_NAMES)."""
    import torch

    from .models import load_models, resolve_source
    from .optimize import apply
    from .policy import make_plan
    from .schema import PRESETS, Quality
    from .denoise import run_stages, scheduler_for as _scheduler_for

    q = Quality(quality)
    preset = PRESETS[q]
    plan = make_plan(probe, settings, "sdxl", 1024, 1024, q is Quality.HIGH)
    steps = plan.steps_for(requested_steps or preset.steps)
    tiny = make_plan(probe, settings.with_(model="tiny", device="cpu", precision="fp32", compile=False), "tiny",
                     64, 64, q is Quality.HIGH)
    tiny = dataclasses.replace(tiny, feature_cache=plan.feature_cache, guidance_interval=plan.guidance_interval,
                               refiner=False)
    models = load_models(resolve_source("tiny"), None, "float32", "float32", False)
    apply(tiny, models)
    models.base.scheduler = _scheduler_for(preset.scheduler, models.scheduler_config)
    recorder = _CallRecorder(models.base.unet)
    try:
        with torch.inference_mode():
            run_stages(models, False, 64, 64, dict(prompt="a fox", num_inference_steps=steps,
                                                   guidance_scale=preset.guidance, output_type="latent",
                                                   generator=torch.Generator().manual_seed(0)))
    finally:
        recorder.close()
    calls = _run_schedule(models.base.unet, recorder.rows)
    return {"steps": steps, "sampler": preset.scheduler.value, "feature_cache": plan.feature_cache,
            "guidance_interval": list(plan.guidance_interval), "calls": calls,
            "counts": {KIND_NAMES[c]: calls.count(c) for c in sorted(set(calls))}}


def schedule_seconds(calls, kinds: dict, scale: float = 1.0) -> float:
    """The UNet time of a schedule from the per-kind step times (× ``scale``, e.g. the 1024²/res² FLOP ratio)."""
    return sum(kinds[KIND_NAMES[c]] for c in calls) * scale


def _end_to_end_check(torch, spec, models, probe) -> dict:
    """One real image with the Fast preset's techniques at the bench size and ``check_steps`` steps, timed end to
    end through the service's path, against the time computed from the per-kind step times and its own recorded
    schedule — the computation the per-image figures rest on."""
    from .policy import make_plan
    from .schema import PRESETS, Quality
    from .denoise import decode_latents, run_stages, scheduler_for as _scheduler_for

    res, steps, device = spec["res"], spec["check_steps"], spec["device"]
    fast = make_plan(probe, _settings(spec), "sdxl", res, res, False)
    from .optimize import apply

    apply(fast, models)
    pipe = models.base
    preset = PRESETS[Quality.FAST]
    pipe.scheduler = _scheduler_for(preset.scheduler, pipe.scheduler.config)
    recorder = _CallRecorder(pipe.unet)
    try:
        with torch.inference_mode():
            _sync(torch, device)
            t = time.perf_counter()
            latents = run_stages(models, False, res, res, dict(
                prompt=PROMPT, num_inference_steps=steps, guidance_scale=preset.guidance, output_type="latent",
                generator=torch.Generator("cpu").manual_seed(0)))
            _sync(torch, device)
            denoise = time.perf_counter() - t
            t = time.perf_counter()
            decode_latents(pipe, latents)
            decode = time.perf_counter() - t
    finally:
        recorder.close()
    calls = _run_schedule(pipe.unet, recorder.rows)
    print(f"PROGRESS check: {steps} Fast steps at {res}² in {denoise:.1f} s (+ decode {decode:.1f} s)",
          file=sys.stderr, flush=True)
    return {"steps": steps, "res": res, "calls": calls, "measured_denoise_s": round(denoise, 2),
            "decode_s": round(decode, 2)}


def _time_hq(torch, spec: dict, pipe, refiner, plan, models) -> dict:
    """The whole High-quality image, end to end (text encoding, denoising, decode), second run of two.

    Stock: what the seed does with stock diffusers — base to 0.8 (latents), then the refiner pipeline from 0.8,
    which also decodes (its own VAE handling). Plan: the service's own path (``run_stages`` + ``decode_latents``)
    with the plan's steps policy and refiner decision for this device."""
    from .service import REFINER_SPLIT, decode_latents, run_stages

    device, res, label = spec["device"], spec["res"], spec.get("label", spec["kind"])
    stock = spec["kind"] != "plan"
    use_refiner = True if stock else bool(plan.refiner and refiner is not None)
    steps = HQ_STEPS if stock else plan.steps_for(HQ_STEPS)
    result = {"steps": steps, "refiner": use_refiner, "guidance": HQ_GUIDANCE}

    def progress(run, stage):
        def callback(p, i, t, kwargs):
            if (i + 1) % 10 == 0:
                print(f"PROGRESS {label} HQ {run}: {stage} step {i + 1}", file=sys.stderr, flush=True)
            return kwargs
        return callback

    for run in ("warm-up", "timed"):
        marks = [time.perf_counter()]

        def mark(_stage=None):
            _sync(torch, device)
            marks.append(time.perf_counter())

        common = dict(prompt=PROMPT, num_inference_steps=steps, guidance_scale=HQ_GUIDANCE,
                      generator=torch.Generator("cpu").manual_seed(0), output_type="latent")
        if stock:
            with torch.no_grad():
                latents = pipe(width=res, height=res, denoising_end=REFINER_SPLIT,
                               callback_on_step_end=progress(run, "base"), **common).images
                mark()
                common["output_type"] = "pil"  # the refiner pipeline decodes, as in the seed
                image = refiner(image=latents, denoising_start=REFINER_SPLIT,
                                callback_on_step_end=progress(run, "refiner"), **common).images[0]
                mark()
            timed = {"base_s": marks[1] - marks[0], "refiner_and_decode_s": marks[2] - marks[1]}
        else:
            with torch.inference_mode():
                latents = run_stages(models, use_refiner, res, res, common, on_stage_end=mark,
                                     on_step=lambda stage: progress(run, ("base", "refiner")[stage - 1]))
                image = decode_latents(models.base, latents)
                mark()
            timed = {"base_s": marks[1] - marks[0], "decode_s": marks[-1] - marks[-2]}
            if use_refiner:
                timed["refiner_s"] = marks[2] - marks[1]
        timed["total_s"] = marks[-1] - marks[0]
        print(f"PROGRESS {label} HQ {run}: {timed['total_s']:.2f} s", file=sys.stderr, flush=True)
    result.update({k: round(v, 3) for k, v in timed.items()})
    result["image_ok"] = image.size == (res, res)
    return result


def _settings(spec):
    from .settings import AppSettings

    return AppSettings(model="tiny" if spec["arch"] == "tiny" else "stabilityai/stable-diffusion-xl-base-1.0",
                       device=spec["device_choice"], **spec.get("plan_settings", {}))


# The user's plan flags that the bench's plan honours (e.g. --vae-tiling on, --threads 1, --use-refiner on).
PLAN_FLAGS = ("precision", "attention", "offload", "vae_tiling", "threads", "use_refiner")


def _plan_flags(settings) -> dict:
    return {name: getattr(getattr(settings, name), "value", getattr(settings, name)) for name in PLAN_FLAGS}


# ---------------------------------------------------------------- parent: the command

def _child(spec: dict) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
        path = f.name
    try:
        proc = subprocess.Popen([sys.executable, "-m", "sdxl_ui.bench", path], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        result_line = None
        for line in proc.stderr:  # stream progress lines
            if line.startswith("PROGRESS "):
                print(f"   {line[9:].rstrip()}", file=sys.stderr, flush=True)
        stdout = proc.stdout.read()
        proc.wait()
        for line in stdout.splitlines():
            if line.startswith("RESULT "):
                result_line = line[7:]
        if proc.returncode != 0 or result_line is None:
            raise RuntimeError(f"bench child for {spec['kind']} failed (exit {proc.returncode}); "
                               f"output: {stdout[-500:]}")
        return json.loads(result_line)
    finally:
        os.unlink(path)


def cmd_bench(args) -> int:
    if args.from_json:
        return _replay(args)
    from .cli import settings_from_args
    from .device import probe_hardware
    from .settings import PRECISION_DTYPES, Precision
    from .policy import make_plan

    settings = settings_from_args(args)
    probe = probe_hardware()
    device_choice = args.bench_device if args.bench_device != "auto" else settings.device.value
    plan_settings = settings.with_(device=device_choice, model="stabilityai/stable-diffusion-xl-base-1.0")
    plan = make_plan(probe, plan_settings, "tiny" if args.arch == "tiny" else "sdxl", args.res, args.res, True)
    device = plan.device

    def say(msg):  # progress goes to stderr, also with --json (stdout holds only the JSON object)
        print(msg, file=sys.stderr, flush=True)

    say(f"bench: SDXL {args.arch} architecture, {args.res}², {args.steps} timed step(s) after a warm-up, "
        f"on {device} ({probe.cpu.model_name if device == 'cpu' else probe.cuda.device_name})")
    base_spec = {"arch": args.arch, "res": args.res, "steps": args.steps, "device": device,
                 "device_choice": device_choice, "probe": probe.to_dict(), "hq": args.hq,
                 "plan_settings": _plan_flags(settings)}
    if args.hq:
        say(f"   --hq: also the whole High-quality image ({HQ_STEPS} steps requested, base to 0.8 then the "
            f"refiner where the plan uses it), run twice per configuration, the second timed"
            + (" — on a CPU with the full architecture this takes hours" if device == "cpu" and
               args.arch == "full" else ""))
    results = {}
    configs = []
    if args.only in ("both", "baseline"):
        # Stock diffusers: fp32 by default; on a GPU, --baseline-precision fp16 gives "stock fp16 + SDPA".
        baseline_dtype = PRECISION_DTYPES[Precision(args.baseline_precision)]
        configs.append(("baseline", {"kind": "baseline", "dtype": baseline_dtype}))
    if args.only in ("both", "plan"):
        configs.append(("plan", {"kind": "plan", "dtype": plan.dtype, "vae_check": args.vae_check}))
    if args.only in ("both", "plan") and device == "cpu" and "int8" in probe.cpu.gemm_gflops:
        # Opt-in int8 (--precision int8): its step, and how far its noise prediction is from the exact one.
        configs.append(("int8", {"kind": "int8", "dtype": plan.dtype, "hq": False}))
    if args.compile:
        configs.append(("compiled", {"kind": "plan", "dtype": plan.dtype, "compile": True, "hq": False}))
    for name, extra in configs:
        if name == "plan" and args.check_steps:
            extra["check_steps"] = args.check_steps
    for name, extra in configs:
        say(f"-- building and timing {name} ({extra['dtype']})… (minutes on CPU)")
        results[name] = _child({**base_spec, **extra, "label": name})
        results[name]["kind"] = name

    schedules = {}
    if "plan" in results and "kinds" in results["plan"]:
        for quality in ("high", "fast"):
            schedules[quality] = preset_schedule(probe, plan_settings, quality)
    summary = summarize(results, args.arch, args.res, args.steps, device, _machine(probe, device),
                        probe.torch_version, hq_steps=plan.steps_for(50), schedules=schedules,
                        dtype_peaks={"gflops": dict(probe.cpu.gemm_gflops), "how": probe.cpu.gemm_note}
                        if device == "cpu" else None)
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
        print(format_table(summary))
    if args.arch == "full" and not all(r.get("params_ok") for r in results.values()):
        print("error: parameter counts differ from SDXL base 1.0", file=sys.stderr)
        return 1
    return 0


def _replay(args) -> int:
    """Re-derive and print a saved `bench --json` result (e.g. after changing the table) without re-timing."""
    with open(args.from_json, encoding="utf-8") as f:
        saved = json.load(f)
    results = {k: v for k, v in saved.items() if isinstance(v, dict) and "matmul_peak_gflops" in v}
    plan_steps = round(50 * 0.7) if saved["device"] == "cpu" else 50
    summary = summarize(results, saved["arch"], saved["res"], saved["timed_steps"], saved["device"],
                        saved["machine"], saved["torch"], hq_steps=plan_steps, day=saved["date"],
                        schedules={k: v["schedule"] for k, v in saved.get("presets", {}).items() if k != "stock"},
                        dtype_peaks=saved.get("dtype_peaks"))
    print(json.dumps(summary, indent=1) if args.json else format_table(summary))
    return 0


def summarize(results: dict, arch: str, res: int, steps: int, device: str, machine: str, torch_version: str,
              hq_steps: int, day: str | None = None, schedules: dict | None = None,
              dtype_peaks: dict | None = None) -> dict:
    """Derived figures (FLOPs, % of peak, 1024² projections, ratios) from the children's raw timings."""
    import torch

    unet_config = SDXL_UNET if arch == "full" else _tiny_unet_config()
    unet_tf, unet_tf_1024 = unet_tflops(torch, unet_config, res), unet_tflops(torch, unet_config, 1024)
    vae_scale = (vae_decode_tflops(torch, SDXL_VAE, 1024) / vae_decode_tflops(torch, SDXL_VAE, res)
                 if arch == "full" else (1024 / res) ** 2)
    for r in results.values():
        r["unet_tflop_per_step"] = round(unet_tf, 3)
        r["gflops"] = round(unet_tf * 1e3 / r["s_per_step"], 1)
        r["pct_of_peak"] = round(100 * r["gflops"] / r["matmul_peak_gflops"], 1)
        # A 1024² High-quality image: stock diffusers runs its default 50 steps; the plan runs its steps
        # policy (35 on CPU). FLOP-scaled step and decode times, plus text encoding.
        r["hq_steps"] = 50 if r["kind"] == "baseline" else hq_steps
        r["projected_1024_hq_s"] = round(r["hq_steps"] * r["s_per_step"] * unet_tf_1024 / unet_tf
                                         + r["text_encode_s"] + r["vae_decode_s"] * vae_scale, 1)
        if arch == "full":
            expected = dict(EXPECTED_PARAMS, **({"refiner_unet": EXPECTED_REFINER_UNET_PARAMS}
                                                if "refiner_unet" in r["params"] else {}))
            r["params_ok"] = r["params"] == expected
    summary = {
        "date": day or date.today().isoformat(), "arch": arch, "res": res, "timed_steps": steps, "device": device,
        "machine": machine, "torch": torch_version, "expected_params": EXPECTED_PARAMS if arch == "full" else None,
        **results,
    }
    if "plan" in results:
        summary["peak_gflops"] = results["plan"]["matmul_peak_gflops"]
    if "baseline" in results and "plan" in results:
        base, plan = results["baseline"], results["plan"]
        summary["ratio"] = round(base["s_per_step"] / plan["s_per_step"], 2)
        summary["image_ratio"] = round(base["projected_1024_hq_s"] / plan["projected_1024_hq_s"], 2)
        if "hq" in base and "hq" in plan:
            summary["hq_ratio"] = round(base["hq"]["total_s"] / plan["hq"]["total_s"], 2)
    if dtype_peaks:
        summary["dtype_peaks"] = dtype_peaks
    if "baseline" in results and "plan" in results and "kinds" in results["plan"] and schedules:
        summary["presets"] = per_image(results, schedules, unet_tf_1024 / unet_tf, vae_scale)
        if "check" in results["plan"]:
            summary["check"] = check_figures(results["plan"])
    if "baseline" in results and "int8" in results:
        i8, base = results["int8"], results["baseline"]
        step = i8.get("kinds", {}).get("full_guided", i8["s_per_step"])
        summary["int8_step"] = {"s_per_step": step, "ratio_vs_stock_fp32": round(base["s_per_step"] / step, 2),
                                "ratio_vs_plan": round(results["plan"]["kinds"]["full_guided"] / step, 2)
                                if "kinds" in results.get("plan", {}) else None, **i8.get("int8", {})}
    return summary


STOCK_STEPS = 50  # stock diffusers' default: Euler, 50 steps, CFG on every step, fp32 on a CPU


def per_image(results: dict, schedules: dict, unet_scale: float, vae_scale: float) -> dict:
    """Seconds per 1024² image: stock diffusers (its fp32 guided step × 50) and each preset from its real schedule
    (per-kind step times × the calls of each kind), both with the UNet times scaled by the 1024²/res² FLOP ratio,
    plus text encoding and the FLOP-scaled VAE decode of that configuration."""
    base, plan = results["baseline"], results["plan"]
    stock = (STOCK_STEPS * base["s_per_step"] * unet_scale + base["text_encode_s"] + base["vae_decode_s"] * vae_scale)
    out = {"stock": {"image_s": round(stock, 1), "steps": STOCK_STEPS, "dtype": base["dtype"],
                     "what": "stock diffusers: fp32, Euler, 50 steps, CFG on every step"}}
    for name, sched in schedules.items():
        unet_s = schedule_seconds(sched["calls"], plan["kinds"], unet_scale)
        image = unet_s + plan["text_encode_s"] + plan["vae_decode_s"] * vae_scale
        # The ratio of the figures as printed (rounded), so that the JSON agrees with itself.
        out[name] = {"image_s": round(image, 1), "ratio": round(round(stock, 1) / round(image, 1), 2),
                     "unet_s": round(unet_s, 1),
                     "steps": sched["steps"], "sampler": sched["sampler"], "counts": sched["counts"],
                     "dtype": plan["dtype"], "schedule": sched}
    return out


def check_figures(plan: dict) -> dict:
    """The end-to-end image against the same computation (at the bench size, not scaled): within 10 %?"""
    c = plan["check"]
    computed = schedule_seconds(c["calls"], plan["kinds"]) + plan["text_encode_s"]
    error = (c["measured_denoise_s"] - computed) / computed
    return {"steps": c["steps"], "res": c["res"], "measured_s": c["measured_denoise_s"],
            "computed_s": round(computed, 2), "error_pct": round(100 * error, 1), "within_10_pct": abs(error) <= 0.10,
            "counts": {KIND_NAMES[k]: c["calls"].count(k) for k in sorted(set(c["calls"]))}}


def _tiny_unet_config():
    from .models import build_tiny

    base, _ = build_tiny(with_refiner=False)
    return {k: v for k, v in base.unet.config.items() if not k.startswith("_")}


def _machine(probe, device) -> str:
    if device == "cuda":
        return f"{probe.cuda.device_name} ({probe.cuda.vram_total_gb} GB)"
    return f"{probe.cpu.model_name}, {probe.cpu.physical_cores} cores, {probe.cpu.ram_total_gb:.0f} GB"


HQ_PARTS = (("base_s", "base"), ("refiner_s", "refiner"), ("refiner_and_decode_s", "refiner + decode"),
            ("decode_s", "decode"))


def format_table(s: dict) -> str:
    rows = [r for k, r in s.items() if isinstance(r, dict) and "matmul_peak_gflops" in r]
    head = (f"SDXL {s['arch']} architecture on {s['machine']} ({s['device']}), torch {s['torch']}, "
            f"{s['res']}², {s['date']}")
    lines = [head, "",
             f"{'config':<10} {'dtype':<9} {'s/step':>8} {'TFLOP':>6} {'GFLOP/s':>8} {'peak':>7} {'%':>5} "
             f"{'text s':>7} {'VAE s':>6} {'RSS step':>8} {'RSS all':>7} {'HQ 1024² s':>10} {'warm-up s':>9}"]
    for r in rows:
        lines.append(f"{r['kind']:<10} {r['dtype']:<9} {r['s_per_step']:>8.3f} {r['unet_tflop_per_step']:>6.2f} "
                     f"{r['gflops']:>8.1f} {r['matmul_peak_gflops']:>7.1f} {r['pct_of_peak']:>5.1f} "
                     f"{r['text_encode_s']:>7.2f} {r['vae_decode_s']:>6.2f} {r['peak_rss_step_gb']:>8.2f} "
                     f"{r['peak_rss_gb']:>7.2f} "
                     f"{r['projected_1024_hq_s']:>10.1f} {r['warmup_s']:>9.1f}")
        if "peak_vram_gb" in r:
            lines[-1] += f"  VRAM {r['peak_vram_gb']} GB"
    if "ratio" in s:
        lines += ["", f"per guided step, plan vs stock diffusers (baseline s/step ÷ plan s/step): {s['ratio']}×",
                  f"per 1024² High-quality image (projected, stock 50 steps vs plan's steps policy): "
                  f"{s['image_ratio']}×"]
    hq_rows = [r for r in rows if "hq" in r]
    if hq_rows:
        lines += ["", f"High-quality image at {s['res']}², measured end to end (second of two runs):"]
        for r in hq_rows:
            h = r["hq"]
            parts = [f"{name} {h[key]:.2f} s" for key, name in HQ_PARTS if key in h]
            lines.append(f"{r['kind']:<10} {h['total_s']:>8.2f} s  ({h['steps']} steps, refiner "
                         f"{'on' if h['refiner'] else 'off'}: {', '.join(parts)})")
        if "hq_ratio" in s:
            lines.append(f"High-quality image, stock ÷ plan: {s['hq_ratio']}×")
    if "dtype_peaks" in s:
        peaks = s["dtype_peaks"]
        lines += ["", "This host's GEMM (probe): " + ", ".join(f"{k} {v:g}" for k, v in peaks["gflops"].items())
                  + f" GFLOP/s (int8: GOP/s), {peaks['how']}"]
    if "presets" in s:
        kinds = s["plan"]["kinds"]
        lines += ["", f"Step kinds at {s['res']}² ({s['plan']['dtype']}, median of 3): " + ", ".join(
            f"{k.replace('_', ' ')} {v:.3f} s" for k, v in kinds.items())]
        lines.append("Per 1024² image (UNet steps FLOP-scaled from the step kinds, + text encoding + decode):")
        for name, p in s["presets"].items():
            what = p.get("what") or (f"{p['steps']} steps {p['sampler']}, "
                                     + ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in p["counts"].items()))
            lines.append(f"   {name:<6} {p['image_s']:>9.1f} s" + (f"  {p['ratio']:>5.2f}× stock" if "ratio" in p
                                                                     else "         ") + f"  ({what})")
    if "check" in s:
        c = s["check"]
        lines.append(f"Check: one real Fast image at {c['res']}², {c['steps']} steps: measured {c['measured_s']} s, "
                     f"computed {c['computed_s']} s ({c['error_pct']:+.1f} %, "
                     f"{'within' if c['within_10_pct'] else 'NOT within'} 10 %)")
    if "int8_step" in s:
        i = s["int8_step"]
        lines.append(f"int8 (opt-in): {i['s_per_step']:.3f} s per guided step, {i['ratio_vs_stock_fp32']}× stock fp32"
                     + (f", {i['ratio_vs_plan']}× the plan's step" if i.get("ratio_vs_plan") else "")
                     + f"; noise prediction {100 * i['noise_pred_rel_rms_diff']:.2f} % RMS from exact")
    lines.append("HQ 1024² = steps (stock: 50; plan: its steps policy) × FLOP-scaled step time + text encoding + "
                 "FLOP-scaled decode")
    lines.append("RSS step = peak RSS through text encoding and UNet steps; RSS all = including the VAE decode")
    return "\n".join(lines)


if __name__ == "__main__":  # child process: python -m sdxl_ui.bench SPEC.json
    import logging

    logging.getLogger("xformers").setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    with open(sys.argv[1], encoding="utf-8") as spec_file:
        result = run_configuration(json.load(spec_file))
    print("RESULT " + json.dumps(result), flush=True)
