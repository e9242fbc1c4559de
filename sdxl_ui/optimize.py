"""apply(plan, models) and report(models, ...): the report is read back from the live pipeline.

The plan says what we intended; only the pipeline's own state (attention processor classes, module dtypes and
devices, accelerate offload hooks, VAE tiling flags, scheduler class, torch thread count) says what is true.
``expected_report`` is the plan-only version that ``doctor`` prints before any weights are loaded.
"""
from __future__ import annotations

import logging
from collections import Counter

from .policy import VAE_TILE_PX, sdpa_backends_for
from .schema import HardwareProbe, OptimizationReport, OptimizationRow, Plan, Status

log = logging.getLogger(__name__)

SHORT_DTYPE = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
PROCESSOR_LABELS = {
    "AttnProcessor2_0": "sdpa",
    "XFormersAttnProcessor": "xformers",
    "SlicedAttnProcessor": "sliced",
    "AttnProcessor": "classic",
}


def _short(dtype) -> str:
    name = str(dtype).replace("torch.", "")
    return SHORT_DTYPE.get(name, name)


def apply(plan: Plan, models) -> None:
    """Put the loaded pipelines into the state the plan asks for. Idempotent: safe to call per request."""
    import torch
    from diffusers.models.attention_processor import AttnProcessor2_0

    if plan.threads:
        torch.set_num_threads(plan.threads)
    pipes = [p for p in (models.base, models.refiner) if p is not None]
    for pipe in pipes:
        if plan.offload == "none" and pipe.device.type != plan.device and not _offload_kind(pipe):
            pipe.to(plan.device)
        if plan.attention == "xformers":
            pipe.enable_xformers_memory_efficient_attention()
        elif plan.attention == "sliced":
            pipe.enable_attention_slicing("auto")
        else:
            pipe.unet.set_attn_processor(AttnProcessor2_0())
            pipe.vae.set_attn_processor(AttnProcessor2_0())
        if plan.vae_tiling:
            _set_vae_tile(pipe.vae, VAE_TILE_PX)
            pipe.vae.enable_tiling()
        else:
            pipe.vae.disable_tiling()
        if plan.vae_slicing:
            pipe.vae.enable_slicing()
        else:
            pipe.vae.disable_slicing()
    if plan.compile and not _is_compiled(models.base.unet):
        # Compiled lazily: the first step pays the compilation (reported as warm-up in the log and bench).
        models.base.unet = torch.compile(models.base.unet)
    # Offload last and only once: after it, no .to(device) (diffusers' contract). The plan's device is passed on:
    # diffusers would otherwise pick an accelerator by itself.
    for pipe in pipes:
        if plan.offload == "model" and not _offload_kind(pipe):
            pipe.enable_model_cpu_offload(device=plan.device)
        elif plan.offload == "sequential" and not _offload_kind(pipe):
            pipe.enable_sequential_cpu_offload(device=plan.device)
    if plan.offload == "model":
        release_offload(models)


def claim_offload(models, pipe) -> None:
    """Model offload with a refiner: before ``pipe`` runs, every model goes back to the CPU and ``pipe`` gets its
    own hook chain on every module it will run.

    Base and refiner share text_encoder_2 and the VAE. diffusers' ``enable_model_cpu_offload()`` begins with
    ``remove_all_hooks()`` over the pipeline's components, and ``maybe_free_model_hooks()`` re-applies it after
    every call, so whichever pipeline offloaded last owns the shared modules' hooks and the other runs them outside
    its chain: a hook from the other chain does not offload the model before it (text encoder 1 stayed on the GPU
    through the whole base denoising), and a pipeline that did not finish its call leaves its UNet on the GPU
    while the other one loads. Re-applying costs no transfer (everything is already on the CPU between calls).
    No-op without model offload."""
    if _offload_kind(pipe) != "model":
        return
    for other in (models.base, models.refiner):
        if other is not None and other is not pipe and _offload_kind(other) == "model":
            other.maybe_free_model_hooks()  # its models, its UNet included, back to the CPU
    # diffusers: "make sure the model is in the same state as before calling it": all on the CPU, its chain attached
    pipe.maybe_free_model_hooks()


def release_offload(models) -> None:
    """After a run however it ended (finished, stopped, failed): nothing left on the accelerator under model
    offload, and the base owns the shared modules' hooks again. No-op without model offload."""
    claim_offload(models, models.base)


def _set_vae_tile(vae, px: int) -> None:
    """diffusers' AutoencoderKL takes its tile size from config.sample_size (1024 for SDXL): tiling would then
    change nothing up to 1024². Set the tile edge in pixels and its latent counterpart."""
    vae.tile_sample_min_size = px
    vae.tile_latent_min_size = px // 2 ** (len(vae.config.block_out_channels) - 1)


def _is_compiled(module) -> bool:
    return type(module).__name__ == "OptimizedModule"  # what torch.compile returns for an nn.Module


def _offload_kind(pipe) -> str | None:
    """'model' / 'sequential' from the accelerate hooks actually attached to the UNet, else None."""
    hook = getattr(pipe.unet, "_hf_hook", None)
    if hook is None:
        return None
    names = {type(hook).__name__} | {type(h).__name__ for h in getattr(hook, "hooks", ())}
    if "CpuOffload" in names:
        return "model"
    if "AlignDevicesHook" in names:
        return "sequential"
    return "unknown"


def _sdpa_flavour(probe: HardwareProbe, device_type: str) -> str:
    """Which SDPA kernels ran on this device in the probe (on CPU: its flash kernel); never another device's."""
    backends = probe.sdpa_backends.get(device_type, ())
    if device_type == "cpu" and "flash" in backends:
        return "CPU flash kernel"
    return f"backends that ran on {device_type.upper()}: {sdpa_backends_for(probe, device_type)}"


def _xformers_row(probe: HardwareProbe, device_type: str, active: bool) -> OptimizationRow:
    xf = probe.xformers
    if active:
        ran = "its kernel test passed" if xf.kernel_ok else "its kernel was not tested"
        return OptimizationRow("xformers", Status.ACTIVE, f"{xf.version} memory-efficient attention; {ran}")
    if not xf.version:
        return OptimizationRow("xformers", Status.UNAVAILABLE, "not installed (optional; PyTorch SDPA is as fast)")
    if device_type != "cuda":
        return OptimizationRow("xformers", Status.NOT_APPLICABLE,
                               f"{xf.version} installed, not applicable on {device_type.upper()} (CUDA-only kernels)")
    if xf.kernel_ok is False:
        return OptimizationRow("xformers", Status.UNAVAILABLE,
                               f"{xf.version} installed but its kernels do not run: {xf.kernel_error}")
    return OptimizationRow("xformers", Status.OFF,
                           f"{xf.version} works here; PyTorch SDPA chosen (--attention xformers to use it)")


def _processors(pipe) -> dict[str, Counter]:
    """Attention processor classes per module, read from the live modules."""
    return {name: Counter(type(p).__name__ for p in getattr(pipe, name).attn_processors.values())
            for name in ("unet", "vae")}


def _module_dtypes(pipe) -> dict[str, str]:
    out = {}
    for name in ("unet", "text_encoder", "text_encoder_2", "vae"):
        module = getattr(pipe, name, None)
        if module is not None:
            out[name] = f"{_short(module.dtype)}@{module.device.type}"
    return out


def report(models, plan: Plan, probe: HardwareProbe, use_refiner: bool | None = None) -> OptimizationReport:
    """Rows built from the pipeline's state; ``plan`` only supplies the *reasons* for rows that are off."""
    import torch

    base = models.base
    r = plan.reasons
    rows: list[OptimizationRow] = []
    dtypes = _module_dtypes(base)
    devices = sorted({v.split("@")[1] for v in dtypes.values()})
    offload = _offload_kind(base)
    execution = str(base._execution_device) if offload else ", ".join(devices)
    rows.append(OptimizationRow("device", Status.ACTIVE, f"{execution.split(':')[0]} — {r['device']}"))
    unet_dtype = _short(base.unet.dtype)
    rows.append(OptimizationRow(
        "precision", Status.ACTIVE,
        f"{unet_dtype} UNet/text encoders, {_short(base.vae.dtype)} VAE ({', '.join(f'{k} {v}' for k, v in dtypes.items())})"
        f" — {r['dtype']}"))

    processors = _processors(base)
    # The UNet is where the attention time goes: its processors decide the status; the listing shows all.
    kinds = {PROCESSOR_LABELS.get(name, name) for name in processors["unet"]}
    listing = "; ".join(f"{module} " + ", ".join(f"{n}×{cls}" for cls, n in sorted(counts.items()))
                        for module, counts in processors.items() if counts)
    device_type = execution.split(":")[0]
    if "sdpa" in kinds:
        flavour = _sdpa_flavour(probe, device_type)
        rows.append(OptimizationRow("PyTorch SDPA attention", Status.ACTIVE, f"{flavour}; processors: {listing}"))
    else:
        rows.append(OptimizationRow("PyTorch SDPA attention", Status.OFF, f"processors: {listing}"))

    rows.append(_xformers_row(probe, device_type, active="xformers" in kinds))

    rows.append(_live_row("attention slicing", "sliced" in kinds, plan.attention == "sliced", r["attention_slicing"]))

    if device_type in ("cpu", "mps") and not offload:
        rows.append(OptimizationRow("CPU offload", Status.NOT_APPLICABLE, r["offload"]))
    else:
        rows.append(_live_row("CPU offload", bool(offload), plan.offload != "none", r["offload"],
                              f"{offload} offload hooks attached" if offload else ""))

    vae = base.vae
    tile = vae.tile_sample_min_size
    rows.append(_live_row("VAE tiling", bool(vae.use_tiling), plan.vae_tiling, r["vae_tiling"],
                          f"images larger than {tile} px decode in overlapping {tile}-px tiles" if vae.use_tiling
                          else ""))
    rows.append(_live_row("VAE slicing", bool(vae.use_slicing), plan.vae_slicing, r["vae_slicing"]))

    refiner_on = models.refiner is not None if use_refiner is None else use_refiner and models.refiner is not None
    if refiner_on:
        rows.append(OptimizationRow("Refinement", Status.ACTIVE,
                                    f"refiner loaded ({_short(models.refiner.unet.dtype)}), shares text encoder 2 "
                                    f"and VAE — {r['refiner']}"))
    else:
        rows.append(OptimizationRow("Refinement", Status.OFF, r["refiner"]))

    rows.append(_live_row("torch.compile", _is_compiled(base.unet), plan.compile, r["compile"]))
    rows.append(OptimizationRow("scheduler", Status.ACTIVE, type(base.scheduler).__name__))
    factor = plan.steps_factor
    rows.append(OptimizationRow("steps policy", Status.ACTIVE if factor != 1.0 else Status.OFF,
                                f"× {factor:g} (50 → {plan.steps_for(50)}) — {r['steps_factor']}"))
    threads = torch.get_num_threads()
    rows.append(OptimizationRow("CPU threads", Status.ACTIVE if device_type == "cpu" else Status.NOT_APPLICABLE,
                                f"torch uses {threads} — {r['threads']}"))
    return OptimizationReport(rows=tuple(rows), source="pipeline")


def _live_row(name: str, active: bool, planned: bool, reason: str, state: str = "") -> OptimizationRow:
    """A row whose status is read from the pipeline. The plan's reason is quoted as the reason only when the plan
    decided the same; otherwise the row says the live state departs from the plan (never "active — not needed")."""
    if active == planned:
        detail = f"{state} — {reason}" if state else reason
    else:
        detail = (f"{state + '; ' if state else ''}{'on' if active else 'off'} on the live pipeline, not as planned "
                  f"(plan: {reason})")
    return OptimizationRow(name, Status.ACTIVE if active else Status.OFF, detail)


def expected_report(plan: Plan, probe: HardwareProbe) -> OptimizationReport:
    """What ``report`` should say once a model is loaded with this plan (for ``doctor``; no weights needed)."""
    r = plan.reasons
    dev = plan.device
    rows = [
        OptimizationRow("device", Status.ACTIVE, f"{dev} — {r['device']}"),
        OptimizationRow("precision", Status.ACTIVE,
                        f"{SHORT_DTYPE[plan.dtype]} UNet/text encoders, {SHORT_DTYPE[plan.vae_dtype]} VAE — {r['dtype']}"),
    ]
    if plan.attention == "sdpa":
        rows.append(OptimizationRow("PyTorch SDPA attention", Status.ACTIVE, _sdpa_flavour(probe, dev)))
    else:
        rows.append(OptimizationRow("PyTorch SDPA attention", Status.OFF, r["attention"]))
    rows.append(_xformers_row(probe, dev, active=plan.attention == "xformers"))
    rows.append(OptimizationRow("attention slicing", Status.ACTIVE if plan.attention_slicing else Status.OFF,
                                r["attention_slicing"]))
    if dev != "cuda":
        rows.append(OptimizationRow("CPU offload", Status.NOT_APPLICABLE, r["offload"]))
    else:
        rows.append(OptimizationRow("CPU offload", Status.ACTIVE if plan.offload != "none" else Status.OFF,
                                    r["offload"]))
    rows.append(OptimizationRow("VAE tiling", Status.ACTIVE if plan.vae_tiling else Status.OFF, r["vae_tiling"]))
    rows.append(OptimizationRow("VAE slicing", Status.ACTIVE if plan.vae_slicing else Status.OFF, r["vae_slicing"]))
    rows.append(OptimizationRow("Refinement", Status.ACTIVE if plan.refiner else Status.OFF, r["refiner"]))
    rows.append(OptimizationRow("torch.compile", Status.ACTIVE if plan.compile else Status.OFF, r["compile"]))
    rows.append(OptimizationRow("steps policy", Status.ACTIVE if plan.steps_factor != 1.0 else Status.OFF,
                                f"× {plan.steps_factor:g} (50 → {plan.steps_for(50)}) — {r['steps_factor']}"))
    rows.append(OptimizationRow("CPU threads", Status.ACTIVE if dev == "cpu" else Status.NOT_APPLICABLE,
                                f"{plan.threads or 'default'} — {r['threads']}"))
    return OptimizationReport(rows=tuple(rows), source="plan")
