"""A preset's real schedule (the UNet calls of one image, recorded through the service's own path) and the
per-image arithmetic built on it: derived figures, seconds per 1024² image, the end-to-end check's comparison."""
from __future__ import annotations

import dataclasses
from datetime import date

from .build import (EXPECTED_PARAMS, EXPECTED_REFINER_UNET_PARAMS, SDXL_UNET, SDXL_VAE, tiny_unet_config,
                    unet_tflops, vae_decode_tflops)


# A UNet call of a schedule: F (full) or C (cached), and the rows it runs per image (2 = with CFG, 1 = without).
KIND_NAMES = {"F2": "full_guided", "F1": "full_cond", "C2": "cached_guided", "C1": "cached_cond"}


class CallRecorder:
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


def schedule_calls(unet, rows: list[int]) -> list[str]:
    """The recorded calls as kinds ("F2", "C1", … see KIND_NAMES): the feature cache's trace with the rows."""
    from ..optimizations import feature_cache

    cache = feature_cache.get(unet)
    trace = cache.run.trace if cache is not None and cache.enabled and cache.interval > 1 else "F" * len(rows)
    assert len(trace) == len(rows), (trace, rows)
    return [f"{'C' if t == 'C' else 'F'}{r}" for t, r in zip(trace, rows)]


def preset_schedule(probe, settings, quality: str, requested_steps: int | None = None,
                    profile: str | None = None) -> dict:
    """The real schedule of a preset's image on this device: the tiny model run through the service's own path
    (``apply`` + ``run_stages``) with the preset's plan (steps policy, sampler, feature cache, guidance interval),
    each UNet call recorded. Returns steps, sampler and the calls ("F2", "C1", … see KIND_NAMES).

    ``profile``: a model family (profiles.py, e.g. "lcm") taken as detected, as the service takes it: its steps for
    the quality, its guidance, its own scheduler (with its overrides and call options) and what its plan turns off
    (feature cache, guidance interval, refiner)."""
    import torch

    from ..denoise import profile_scheduler, run_stages
    from ..models import load_models, resolve_source
    from ..optimize import apply
    from ..policy import make_plan
    from ..profiles import profile_named
    from ..schema import PRESETS, Quality

    q = Quality(quality)
    preset, high = PRESETS[q], q is Quality.HIGH
    family = profile_named(profile or "sdxl")
    detected = (family.name, "bench: this profile's schedule") if profile else None
    if profile:
        settings = settings.with_(profile=family.name)
    # The schedule is the base's calls alone (its run below has no refiner): planned without one, so that a
    # --use-refiner on that would not fit at 1024² in this host's dtype does not refuse a schedule that needs none.
    plan = make_plan(probe, settings.with_(use_refiner="off"), "sdxl", 1024, 1024, high, profile=detected)
    steps = plan.steps_for(requested_steps or family.steps_for(high) or preset.steps)
    guidance = preset.guidance if family.guidance is None else family.guidance
    tiny = make_plan(probe, settings.with_(model="tiny", device="cpu", precision="fp32", compile=False), "tiny",
                     64, 64, high, profile=detected)
    tiny = dataclasses.replace(tiny, feature_cache=plan.feature_cache, guidance_interval=plan.guidance_interval,
                               refiner=False)
    models = load_models(resolve_source("tiny"), None, "float32", "float32", False)
    apply(tiny, models)
    # As the service: the family's own scheduler (the sampler left on auto), else the preset's sampler.
    models.base.scheduler = profile_scheduler(family, preset.scheduler, models.scheduler_config, own=True)
    options = dict(family.options) if family.scheduler else {}
    recorder = CallRecorder(models.base.unet)
    try:
        with torch.inference_mode():
            run_stages(models, False, 64, 64, dict(prompt="a fox", num_inference_steps=steps,
                                                   guidance_scale=guidance, output_type="latent",
                                                   generator=torch.Generator().manual_seed(0), **options))
    finally:
        recorder.close()
    calls = schedule_calls(models.base.unet, recorder.rows)
    out = {"steps": steps, "sampler": family.sampler_label if family.scheduler else preset.scheduler.value,
           "feature_cache": plan.feature_cache, "guidance_interval": list(plan.guidance_interval), "calls": calls,
           "counts": {KIND_NAMES[c]: calls.count(c) for c in sorted(set(calls))}}
    if profile:
        out.update(profile=plan.profile, guidance=guidance, scheduler=type(models.base.scheduler).__name__)
    return out


def schedule_seconds(calls, kinds: dict, scale: float = 1.0) -> float:
    """The UNet time of a schedule from the per-kind step times (× ``scale``, e.g. the 1024²/res² FLOP ratio)."""
    return sum(kinds[KIND_NAMES[c]] for c in calls) * scale


def summarize(results: dict, arch: str, res: int, steps: int, device: str, machine: str, torch_version: str,
              hq_steps: int, day: str | None = None, schedules: dict | None = None,
              dtype_peaks: dict | None = None) -> dict:
    """Derived figures (FLOPs, % of peak, 1024² projections, ratios) from the children's raw timings."""
    import torch

    unet_config = SDXL_UNET if arch == "full" else tiny_unet_config()
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
    if "plan" in results:
        summary["decode_1024"] = decodes = decode_seconds(results["plan"], vae_scale, res)
    if "baseline" in results and "plan" in results and "kinds" in results["plan"] and schedules:
        summary["presets"] = per_image(results, schedules, unet_tf_1024 / unet_tf, vae_scale, decodes)
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


def decode_seconds(plan: dict, vae_scale: float, res: int) -> dict:
    """The decode of one 1024² image: the full VAE's (FLOP-scaled) and, where the plan's child timed it, the tiny
    decoder's (AutoencoderTiny; scaled by the pixel ratio: its cost is linear in pixels)."""
    out = {"full_vae_s": round(plan["vae_decode_s"] * vae_scale, 4)}
    if "tiny_decode_s" in plan:
        out["tiny_decoder_s"] = round(plan["tiny_decode_s"] * (1024 / res) ** 2, 4)
    return out


def per_image(results: dict, schedules: dict, unet_scale: float, vae_scale: float, decodes: dict | None = None) -> dict:
    """Seconds per 1024² image: stock diffusers (its fp32 guided step × 50) and each preset from its real schedule
    (per-kind step times × the calls of each kind), both with the UNet times scaled by the 1024²/res² FLOP ratio,
    plus text encoding and the FLOP-scaled VAE decode of that configuration. A few-step profile's schedule also
    gets a row with the tiny decoder's decode in place of the full VAE's (``decodes``: see decode_seconds)."""
    base, plan = results["baseline"], results["plan"]
    decodes = decodes or {"full_vae_s": plan["vae_decode_s"] * vae_scale}
    stock = round(STOCK_STEPS * base["s_per_step"] * unet_scale + base["text_encode_s"]
                  + base["vae_decode_s"] * vae_scale, 2)
    out = {"stock": {"image_s": stock, "steps": STOCK_STEPS, "dtype": base["dtype"],
                     "what": "stock diffusers: fp32, Euler, 50 steps, CFG on every step"}}
    for name, sched in schedules.items():
        unet_s = schedule_seconds(sched["calls"], plan["kinds"], unet_scale)
        out[name] = _preset_row(stock, unet_s, plan, decodes["full_vae_s"], sched)
        if sched.get("profile") and "tiny_decoder_s" in decodes:
            out[f"{name} tiny"] = _preset_row(stock, unet_s, plan, decodes["tiny_decoder_s"], sched, of=name)
        peer = _peer_row(stock, base, sched, unet_scale, vae_scale, name)
        if peer is not None:
            out[f"{name} peer"] = peer
            out[name]["vs_peer"] = round(peer["image_s"] / out[name]["image_s"], 2)
        out.update(_int8_rows(stock, results.get("int8"), plan, sched, unet_scale, decodes, name,
                              peer["image_s"] if peer else None))
    return out


def _int8_rows(stock: float, i8: dict | None, plan: dict, sched: dict, unet_scale: float, decodes: dict, of: str,
               peer_s: float | None) -> dict:
    """A few-step profile's schedule on the opt-in int8 UNet (``--precision int8``: the int8 child's own step
    kinds), with the full VAE and with the tiny decoder: the VAE is not int8, so the plan's decodes. None where
    the int8 child did not run or time its kinds."""
    if not sched.get("profile") or not i8 or "kinds" not in i8:
        return {}
    unet_s = schedule_seconds(sched["calls"], i8["kinds"], unet_scale)
    rows = {}
    for suffix, decode, tiny in (("int8", decodes["full_vae_s"], None), ("int8 tiny", decodes.get("tiny_decoder_s"),
                                                                        of)):
        if decode is None:
            continue
        row = _preset_row(stock, unet_s, plan, decode, sched, of=tiny)
        row.pop("schedule", None)
        row.update(schedule_of=of, dtype=f"int8 + {plan['dtype']}", int8=True,
                   what=row.get("what", "") + "; UNet linear layers and convolutions int8 (opt-in --precision int8)")
        if peer_s and not tiny:
            row["vs_peer"] = round(peer_s / row["image_s"], 2)
        rows[f"{of} {suffix}"] = row
    return rows


def _peer_row(stock: float, base: dict, sched: dict, unet_scale: float, vae_scale: float, of: str) -> dict | None:
    """Stock diffusers (the baseline's fp32 steps, text encoding and full VAE decode) running a few-step profile's
    own schedule: what FastSD CPU's PyTorch path does. None for a preset, a schedule with cached calls (stock has no
    feature cache) or a result saved before the baseline timed its conditional-only step."""
    if not sched.get("profile") or "full_cond_s" not in base or not set(sched["calls"]) <= {"F1", "F2"}:
        return None
    unet_s = schedule_seconds(sched["calls"], {"full_guided": base["s_per_step"], "full_cond": base["full_cond_s"]},
                              unet_scale)
    image = round(unet_s + base["text_encode_s"] + base["vae_decode_s"] * vae_scale, 2)
    return {"image_s": image, "ratio": round(stock / image, 2), "unet_s": round(unet_s, 2),
            "text_encode_s": base["text_encode_s"], "decode_s": round(base["vae_decode_s"] * vae_scale, 4),
            "decoder": "full", "steps": sched["steps"], "sampler": sched["sampler"], "counts": sched["counts"],
            "dtype": base["dtype"], "peer_of": of,
            "what": f"peer: stock diffusers {base['dtype'].replace('float', 'fp')}, the same {sched['steps']}-step "
                    f"{sched['scheduler']} schedule, full VAE decode (FastSD CPU's PyTorch path)"}


def _preset_row(stock: float, unet_s: float, plan: dict, decode_s: float, sched: dict, of: str | None = None):
    """One preset's figures per 1024² image (``of``: the tiny decoder's row of that preset's schedule)."""
    image = round(unet_s + plan["text_encode_s"] + decode_s, 2)
    # The ratio of the figures as stored (rounded), so that the JSON agrees with itself.
    row = {"image_s": image, "ratio": round(stock / image, 2), "unet_s": round(unet_s, 2),
           "text_encode_s": plan["text_encode_s"], "decode_s": round(decode_s, 4),
           "decoder": "tiny" if of else "full", "steps": sched["steps"], "sampler": sched["sampler"],
           "counts": sched["counts"], "dtype": plan["dtype"]}
    if sched.get("profile"):
        counts = ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in sched["counts"].items())
        row["what"] = (f"{sched['profile']} profile: {sched['steps']} steps {sched['scheduler']}, guidance "
                       f"{sched['guidance']:g}, {counts}, "
                       + ("tiny decoder (AutoencoderTiny)" if of else "full VAE decode"))
    if of:
        row["schedule_of"] = of  # the schedule is that row's (a replay re-derives this row from it)
    else:
        row["schedule"] = sched
    return row


def check_figures(plan: dict) -> dict:
    """The end-to-end image against the same computation (at the bench size, not scaled): within 10 %?"""
    c = plan["check"]
    computed = schedule_seconds(c["calls"], plan["kinds"]) + plan["text_encode_s"]
    error = (c["measured_denoise_s"] - computed) / computed
    return {"steps": c["steps"], "res": c["res"], "measured_s": c["measured_denoise_s"],
            "computed_s": round(computed, 2), "error_pct": round(100 * error, 1), "within_10_pct": abs(error) <= 0.10,
            "counts": {KIND_NAMES[k]: c["calls"].count(k) for k in sorted(set(c["calls"]))}}
