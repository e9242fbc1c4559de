"""Timing one configuration in a child process of its own (built directly in its dtype: its peak RSS is its own,
and the fp32 baseline's memory is gone before the plan is built): text encoding, the guided UNet step, each kind
of UNet call a schedule is made of, the VAE decode, the end-to-end check and the whole High-quality image."""
from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import tempfile
import time

from .build import PROMPT, build_full, build_tiny_arch, matmul_peak_gflops, param_counts, sync, unet_inputs
from .schedules import CallRecorder, schedule_calls

HQ_STEPS, HQ_GUIDANCE = 50, 8.0  # the High-quality preset, as stock diffusers is asked to run it too


def run_configuration(spec: dict) -> dict:
    """One configuration, in this process: build, warm up, time. ``spec`` comes from the parent."""
    import torch

    torch.set_flush_denormal(True)
    kind, device = spec["kind"], spec["device"]
    dtype = getattr(torch, spec["dtype"])
    plan = probe = models = reference = None
    if kind == "plan":
        plan, probe = _plan(spec)
    pipe, refiner, out, build_s = _build(torch, spec, dtype, plan)
    grad_context = torch.no_grad  # what the stock pipeline's __call__ uses
    if kind == "int8":
        plan, probe = _plan(spec, precision="int8")
    if kind in ("plan", "int8"):
        models, reference = _apply_plan(torch, spec, dtype, plan, probe, pipe, refiner, build_s, out)
        grad_context = torch.inference_mode
    out["threads"] = torch.get_num_threads()  # stock: torch's default; plan: what apply() set
    if str(device).startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()

    with grad_context():
        x, inputs = _time_steps(torch, spec, pipe, dtype, out)
        if kind == "baseline":  # stock's conditional-only step: the peer row (its few-step schedule without CFG)
            out["full_cond_s"] = round(_median_time(torch, device, lambda: pipe.unet(x[1:], **_halve(inputs))), 4)
            print(f"PROGRESS baseline: conditional-only step {out['full_cond_s']:.2f} s", file=sys.stderr, flush=True)
        if kind in ("plan", "int8") and spec.get("kinds", True):
            out["kinds"] = _time_kinds(torch, pipe.unet, x, inputs, device, label=spec.get("label", kind))
        if kind == "int8":
            out["int8"] = _int8_difference(torch, pipe.unet, x, inputs, reference)
        _time_decode(torch, spec, pipe, dtype, out)
        if kind == "plan" and not spec.get("compile"):
            _time_tiny_decode(torch, spec, dtype, out)
    if kind == "plan" and spec.get("check_steps"):
        out["check"] = _end_to_end_check(torch, spec, models, probe)
    if spec.get("hq"):
        out["hq"] = _time_hq(torch, spec, pipe, refiner, plan, models)
    out["peak_rss_gb"] = round(_rss_gb(), 2)
    if str(device).startswith("cuda"):
        out["peak_vram_gb"] = round(torch.cuda.max_memory_allocated() / 1024**3, 2)
    out["matmul_peak_gflops"] = round(matmul_peak_gflops(torch, dtype, device), 1)
    return out


def _plan(spec: dict, precision: str | None = None):
    """(plan, probe) for this configuration: the parent's probe and the user's plan flags (``precision``: the
    int8 configuration's override)."""
    from ..policy import make_plan
    from ..schema import HardwareProbe

    probe = HardwareProbe.from_dict(spec["probe"])
    settings = _settings(spec) if precision is None else _settings(spec).with_(precision=precision)
    return make_plan(probe, settings, "tiny" if spec["arch"] == "tiny" else "sdxl", spec["res"], spec["res"],
                     True), probe


def _build(torch, spec: dict, dtype, plan) -> tuple:
    """(base, refiner, the first figures, build seconds): built straight in ``dtype`` on the device, timed."""
    # The refiner only for --hq, and for the plan only where it would use one (its RAM counts in peak RSS).
    with_refiner = bool(spec.get("hq")) and (plan is None or plan.refiner)
    t0 = time.perf_counter()
    build = build_full if spec["arch"] == "full" else build_tiny_arch
    pipe, refiner = build(torch, dtype, spec["device"], with_refiner=with_refiner)
    build_s = time.perf_counter() - t0
    params = param_counts(pipe, refiner)
    out: dict = {"kind": spec["kind"], "dtype": spec["dtype"], "device": spec["device"], "res": spec["res"],
                 "build_s": round(build_s, 1), "params": params}
    return pipe, refiner, out, build_s


def _apply_plan(torch, spec: dict, dtype, plan, probe, pipe, refiner, build_s: float, out: dict) -> tuple:
    """Apply the plan to the built pipelines as the service does; (models, the exact noise prediction of the same
    weights before quantization, for int8's difference, else None)."""
    from ..models import LoadedModels, ModelSource
    from ..optimize import apply, report

    kind = spec["kind"]
    models = LoadedModels(base=pipe, refiner=refiner, source=ModelSource("bench", f"sdxl-{spec['arch']}-random"),
                          load_s=build_s)
    reference = None
    if kind == "int8":  # the noise prediction of the same weights before quantization, for the difference
        x0, inputs0 = unet_inputs(torch, pipe.unet.config, spec["res"], spec["device"], dtype)
        with torch.inference_mode():
            reference = pipe.unet(x0, **inputs0).sample.float()
        t = time.perf_counter()
    apply(plan, models)
    if kind == "int8":
        out["quantize_s"] = round(time.perf_counter() - t, 1)
    out["report"] = report(models, plan, probe).to_list()
    return models, reference


def _time_steps(torch, spec: dict, pipe, dtype, out: dict):
    """Text encoding, then the guided UNet step: a warm-up (and, with --compile, the compilation), then --steps
    timed. Returns the UNet's inputs, for the step kinds."""
    kind, res, steps, device = spec["kind"], spec["res"], spec["steps"], spec["device"]
    t = time.perf_counter()
    prompt_embeds, neg, pooled, neg_pooled = pipe.encode_prompt(
        PROMPT, device=device, num_images_per_prompt=1, do_classifier_free_guidance=True, negative_prompt="")
    sync(torch, device)
    out["text_encode_s"] = round(time.perf_counter() - t, 3)

    x, inputs = unet_inputs(torch, pipe.unet.config, res, device, dtype)
    times = []
    unet = pipe.unet
    if spec.get("compile"):
        from ..optimizations.speed import compile_unet, keep_compiled_graphs

        kept = keep_compiled_graphs()  # as the app compiles: with this graph kept, the warm-up is a later start's
        graphs = kept / "fxgraph"
        before = sum(1 for f in graphs.rglob("*") if f.is_file()) if graphs.is_dir() else 0
        unet, freeze = compile_unet(torch, pipe.unet, device)
        out["compile_cache"] = {"dir": str(kept), "graphs_before": before, "freezing": freeze}
    for i in range(steps + 1):  # step 0 is the warm-up (and, with --compile, the compilation)
        sync(torch, device)
        t = time.perf_counter()
        unet(x, **inputs)
        sync(torch, device)
        times.append(time.perf_counter() - t)
        print(f"PROGRESS {spec.get('label', kind)}: {'warm-up' if i == 0 else f'step {i}/{steps}'} "
              f"{times[-1]:.2f} s",
              file=sys.stderr, flush=True)
    # ru_maxrss only grows: read here, it is the peak through text encoding and the UNet steps.
    out["peak_rss_step_gb"] = round(_rss_gb(), 2)
    out["warmup_s"] = round(times[0], 3)
    out["s_per_step"] = round(min(times[1:]), 4)
    out["step_times_s"] = [round(v, 4) for v in times[1:]]
    return x, inputs


def _time_decode(torch, spec: dict, pipe, dtype, out: dict) -> None:
    """The VAE decode of one image's latents (and, with --vae-check, how far its dtype is from fp32)."""
    from ..denoise import decode_latents

    res, device = spec["res"], spec["device"]
    latents = torch.randn(1, 4, res // 8, res // 8, generator=torch.Generator("cpu").manual_seed(0))
    t = time.perf_counter()
    image = decode_latents(pipe, latents.to(device, pipe.vae.dtype))
    sync(torch, device)
    out["vae_decode_s"] = round(time.perf_counter() - t, 3)
    out["vae_output_ok"] = image.size == (res, res)
    if spec.get("vae_check") and dtype != torch.float32:
        out["vae_check"] = _vae_precision_check(torch, pipe.vae, latents.to(device))


def _time_tiny_decode(torch, spec: dict, dtype, out: dict) -> None:
    """The tiny decoder's decode of one image's latents, timed as ``_time_decode`` times the full VAE (one call):
    diffusers' AutoencoderTiny with its default config (TAESDXL's architecture, madebyollin/taesdxl), random
    weights, built here in the plan's dtype on its device. Its scaling factor is 1.0: it takes the pipeline's
    latents as they are."""
    from diffusers import AutoencoderTiny

    res, device = spec["res"], spec["device"]
    decoder = AutoencoderTiny().to(device, dtype).eval()
    latents = torch.randn(1, 4, res // 8, res // 8, generator=torch.Generator("cpu").manual_seed(0)).to(device, dtype)
    sync(torch, device)
    t = time.perf_counter()
    image = decoder.decode(latents).sample
    sync(torch, device)
    out["tiny_decode_s"] = round(time.perf_counter() - t, 4)
    out["tiny_decode_ok"] = tuple(image.shape) == (1, 3, res, res)
    del decoder


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


def _rss_gb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux: KiB


def _median_time(torch, device, fn, repeats: int = 3) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        sync(torch, device)
        t = time.perf_counter()
        fn()
        sync(torch, device)
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
    from ..optimizations import feature_cache

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


def _end_to_end_check(torch, spec, models, probe) -> dict:
    """One real image with the Fast preset's techniques at the bench size and ``check_steps`` steps, timed end to
    end through the service's path, against the time computed from the per-kind step times and its own recorded
    schedule — the computation the per-image figures rest on."""
    from ..denoise import decode_latents, run_stages, scheduler_for
    from ..optimize import apply
    from ..policy import make_plan
    from ..schema import PRESETS, Quality

    res, steps, device = spec["res"], spec["check_steps"], spec["device"]
    fast = make_plan(probe, _settings(spec), "tiny" if spec["arch"] == "tiny" else "sdxl", res, res, False)
    apply(fast, models)
    pipe = models.base
    preset = PRESETS[Quality.FAST]
    pipe.scheduler = scheduler_for(preset.scheduler, pipe.scheduler.config)
    recorder = CallRecorder(pipe.unet)
    try:
        with torch.inference_mode():
            sync(torch, device)
            t = time.perf_counter()
            latents = run_stages(models, False, res, res, dict(
                prompt=PROMPT, num_inference_steps=steps, guidance_scale=preset.guidance, output_type="latent",
                generator=torch.Generator("cpu").manual_seed(0)))
            sync(torch, device)
            denoise = time.perf_counter() - t
            t = time.perf_counter()
            decode_latents(pipe, latents)
            decode = time.perf_counter() - t
    finally:
        recorder.close()
    calls = schedule_calls(pipe.unet, recorder.rows)
    print(f"PROGRESS check: {steps} Fast steps at {res}² in {denoise:.1f} s (+ decode {decode:.1f} s)",
          file=sys.stderr, flush=True)
    return {"steps": steps, "res": res, "calls": calls, "measured_denoise_s": round(denoise, 2),
            "decode_s": round(decode, 2)}


def _time_hq(torch, spec: dict, pipe, refiner, plan, models) -> dict:
    """The whole High-quality image, end to end (text encoding, denoising, decode), second run of two.

    Stock: what the seed does with stock diffusers — base to 0.8 (latents), then the refiner pipeline from 0.8,
    which also decodes (its own VAE handling). Plan: the service's own path (``run_stages`` + ``decode_latents``)
    with the plan's steps policy and refiner decision for this device."""
    from ..denoise import REFINER_SPLIT, decode_latents, run_stages

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
            sync(torch, device)
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
    """The app settings the parent's plan was made with (the user's plan flags, the device asked for)."""
    from ..settings import AppSettings

    return AppSettings(model="tiny" if spec["arch"] == "tiny" else "stabilityai/stable-diffusion-xl-base-1.0",
                       device=spec["device_choice"], **spec.get("plan_settings", {}))


ERROR_TAIL_LINES = 30  # a failed child's stderr lines shown with the error (a traceback's tail)


def run_child(spec: dict) -> dict:
    """Run one configuration in a child process (``python -m sdxl_ui.bench SPEC.json``: its peak RSS is its own),
    stream its progress lines to stderr, and return its figures."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
        path = f.name
    try:
        proc = subprocess.Popen([sys.executable, "-m", "sdxl_ui.bench", path], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        result_line, errors = None, collections.deque(maxlen=ERROR_TAIL_LINES)
        for line in proc.stderr:  # stream progress lines; keep the tail of the rest (the child's own error)
            if line.startswith("PROGRESS "):
                print(f"   {line[9:].rstrip()}", file=sys.stderr, flush=True)
            elif line.strip():
                errors.append(line.rstrip())
        stdout = proc.stdout.read()
        proc.wait()
        for line in stdout.splitlines():
            if line.startswith("RESULT "):
                result_line = line[7:]
        if proc.returncode != 0 or result_line is None:
            said = "\n".join(errors) or stdout[-500:].strip() or "(nothing)"
            raise RuntimeError(f"bench child for {spec['kind']} ({spec.get('label', spec['kind'])}) failed "
                               f"(exit {proc.returncode}); its last output:\n{said}")
        return json.loads(result_line)
    finally:
        os.unlink(path)


def child_main(argv: list[str]) -> None:
    """The child process: ``python -m sdxl_ui.bench SPEC.json`` prints one line, RESULT and the figures as JSON."""
    import logging

    logging.getLogger("xformers").setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    with open(argv[0], encoding="utf-8") as spec_file:
        result = run_configuration(json.load(spec_file))
    print("RESULT " + json.dumps(result), flush=True)
