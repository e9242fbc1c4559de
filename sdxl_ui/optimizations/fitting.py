"""What fits in memory and how: the refiner, VAE tiling and slicing, CPU offload (and its hook chains when base
and refiner share modules), the attention implementation, and the memory check that refuses with numbers."""
from __future__ import annotations

import weakref
from types import SimpleNamespace

from ..schema import HardwareProbe, OptimizationRow, Status
from ..settings import AppSettings, AttentionChoice, OffloadChoice, Toggle
from . import hooks
from .profile import family
from .base import REQUIRED, PlanError, Unit, live_row, offload_kind, pipes, planned_row, short
from .memory import DTYPE_BYTES, OFFLOAD_MARGIN, VAE_TILE_PX, MemoryEstimate, as_size


# ---------------------------------------------------------------- attention

MPS_SLICING_BROKEN = ("on Apple MPS sliced attention has produced broken images since torch 2.4 "
                      "(InvokeAI #7049, whose fix is to use SDPA there)")


def sdpa_backends_for(probe: HardwareProbe, device: str) -> str:
    """The SDPA backends the probe saw run on ``device`` itself (never another device's list)."""
    return ", ".join(probe.sdpa_backends.get(device, ())) or "untested on this device"


def plan_attention(probe: HardwareProbe, settings: AppSettings, device: str, offload: str, est: "MemoryEstimate",
                    available: float, where: str) -> tuple[str, str, str]:
    """(attention, reason, slicing reason). ``attention`` is one of sdpa, xformers, sliced."""
    sdpa_why = f"PyTorch SDPA (backends that ran on {device.upper()}: {sdpa_backends_for(probe, device)})"
    slow = "slicing would only slow each step (+67 % on an H200)"
    if settings.attention is AttentionChoice.XFORMERS:
        if device != "cuda":
            return "sdpa", f"--attention xformers ignored: xformers has CUDA-only kernels; {sdpa_why}", \
                "off: xformers was asked for, SDPA runs instead"
        if not probe.xformers.version:
            raise PlanError("attention: 'xformers' was requested but xformers is not installed "
                            "(`pip install -r requirements-xformers.txt`, see README), or use --attention auto")
        if not probe.xformers.kernel_ok:
            raise PlanError(f"attention: 'xformers' {probe.xformers.version} is installed but its kernels do not "
                            f"run on this GPU ({probe.xformers.kernel_error}); install the xformers build for torch "
                            f"{probe.torch_version} (README: Set-up), or use --attention auto (PyTorch SDPA)")
        # xformers' memory-efficient kernel never materialises the attention matrix: slicing on top saves nothing.
        return "xformers", "chosen by --attention xformers; its kernel test passed", \
            "off: xformers' memory-efficient attention already avoids the full attention matrix"
    if settings.attention is AttentionChoice.SLICED:
        why = "forced by --attention sliced (saves memory, slower)"
        if device == "mps":
            why += f"; warning: {MPS_SLICING_BROKEN}"
        return "sliced", why, "on: forced by --attention sliced"
    needs_slicing = offload == "sequential" and available < est.step_gb + 0.5 or (
        device != "cuda" and est.total_gb > available
    )
    if needs_slicing and device == "mps":
        return "sdpa", sdpa_why, f"off although ~{est.total_gb:.1f} GB are needed, {where}: {MPS_SLICING_BROKEN}"
    if needs_slicing:
        return "sliced", f"sliced: the estimate (~{est.total_gb:.1f} GB) exceeds {where}", \
            f"on: ~{est.total_gb:.1f} GB needed, {where}"
    if offload != "none":
        return "sdpa", sdpa_why, f"off: {offload} offload makes room ({where}); {slow}"
    return "sdpa", sdpa_why, f"{where}, ~{est.total_gb:.1f} GB needed: {slow}"


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
    if offload_kind(pipe) != "model":
        return
    for other in (models.base, models.refiner):
        if other is not None and other is not pipe and offload_kind(other) == "model":
            other.maybe_free_model_hooks()  # its models, its UNet included, back to the CPU
    # diffusers: "make sure the model is in the same state as before calling it": all on the CPU, its chain attached
    pipe.maybe_free_model_hooks()


def release_offload(models) -> None:
    """After a run however it ended (finished, stopped, failed): nothing left on the accelerator under model
    offload, and the base owns the shared modules' hooks again. No-op without model offload."""
    claim_offload(models, models.base)


class OffloadRun:
    """Model offload as a run hook (``hooks.py``) on the base and the refiner: before a pipeline runs it claims the
    shared modules' hook chain (``claim_offload``); when the run ends every model goes back to the CPU. Holds the
    two pipelines weakly (the hook hangs on them)."""

    def __init__(self, models):
        self._base = weakref.ref(models.base)
        self._refiner = weakref.ref(models.refiner) if models.refiner is not None else (lambda: None)

    def _models(self):
        return SimpleNamespace(base=self._base(), refiner=self._refiner())

    def before(self, pipe) -> None:
        claim_offload(self._models(), pipe)

    def release(self, pipe) -> None:
        release_offload(self._models())


class Refiner(Unit):
    key, rows = "refiner", ("Refinement",)
    fields = {"refiner": REQUIRED}
    decide_at, row_at = 40, 80

    def decide(self, ctx):
        s = ctx.settings
        want, why = False, ""
        prof = family(ctx)
        if not prof.refiner:
            why = (f"not applicable: {prof.label} is a few-step model; SDXL's refiner continues a long schedule "
                   f"from 0.8 of it, which a {prof.steps_for(ctx.high_quality)}-step schedule does not have")
        elif s.refiner_source is None:
            why = "no refiner configured (--refiner none, or a custom base model without --refiner)"
        elif s.use_refiner is Toggle.ON:
            want, why = True, "forced on by --use-refiner on"
        elif s.use_refiner is Toggle.OFF:
            why = "turned off by --use-refiner off"
        elif not ctx.high_quality:
            why = "Fast quality uses the base model only"
        elif ctx.device == "cpu":
            why = ("DISABLED (CPU mode): the refiner is a second UNet (SDXL's: 2.3 B parameters); on CPU it "
                   "adds minutes per image")
        else:
            # On CUDA the offload decision makes room (model offload moves one UNet at a time); on MPS the models
            # share system RAM, so base + refiner must fit.
            need = 0.0 if ctx.device == "cuda" else ctx.estimate(refiner=True, tiled=False).total_gb
            if need <= ctx.available:
                want, why = True, f"high quality on {ctx.device.upper()}: base to 0.8, refiner from 0.8"
            else:
                why = f"off: base + refiner need ~{need:.1f} GB, {ctx.where}"
        ctx.values["refiner"], ctx.reasons["refiner"] = want, why

    def adjust(self, loaded, request):
        # the request's choice, but a refiner that was not loaded stays off
        return {"refiner": request.refiner and loaded.refiner}, {"refiner": request.reasons["refiner"]}

    def expected(self, plan, probe):
        return [planned_row("Refinement", plan.refiner, plan.reasons["refiner"])]

    def live(self, live):
        r = live.plan.reasons["refiner"]
        if live.refiner_on:
            return [OptimizationRow("Refinement", Status.ACTIVE,
                                    f"refiner loaded ({short(live.models.refiner.unet.dtype)}), shares text encoder 2 "
                                    f"and VAE — {r}")]
        return [OptimizationRow("Refinement", Status.OFF, r)]


class VaeTiling(Unit):
    key, rows = "vae_tiling", ("VAE tiling",)
    fields = {"vae_tiling": REQUIRED}
    decide_at, apply_at, row_at = 50, 50, 60
    per_request = ("vae_tiling",)

    def decide(self, ctx):
        s = ctx.settings
        tiled = False
        if s.vae_tiling is Toggle.ON:
            tiled, why = True, "forced on by --vae-tiling on"
        elif s.vae_tiling is Toggle.OFF:
            why = "turned off by --vae-tiling off"
        else:
            full = ctx.estimate(tiled=False)
            if ctx.width * ctx.height > 1536 * 1536:
                tiled, why = True, f"{ctx.px} is above 1536²: tiles keep the decode's memory flat"
            elif ctx.device != "cuda" and full.total_gb > ctx.available:
                tiled, why = True, f"decode at {ctx.px} needs ~{full.decode_gb:.1f} GB, {ctx.where}"
            else:
                why = f"not needed at {ctx.px}: decode needs ~{full.decode_gb:.1f} GB, {ctx.where}"
        ctx.values["vae_tiling"], ctx.reasons["vae_tiling"] = tiled, why

    def apply(self, plan, models):
        for pipe in pipes(models):
            if plan.vae_tiling:
                set_vae_tile(pipe.vae, VAE_TILE_PX)
                pipe.vae.enable_tiling()
            else:
                pipe.vae.disable_tiling()

    def expected(self, plan, probe):
        return [planned_row("VAE tiling", plan.vae_tiling, plan.reasons["vae_tiling"])]

    def live(self, live):
        vae = live.base.vae
        tile = vae.tile_sample_min_size
        return [live_row("VAE tiling", bool(vae.use_tiling), live.plan.vae_tiling, live.plan.reasons["vae_tiling"],
                         f"images larger than {tile} px decode in overlapping {tile}-px tiles" if vae.use_tiling
                         else "")]


def set_vae_tile(vae, px: int) -> None:
    """diffusers' AutoencoderKL takes its tile size from config.sample_size (1024 for SDXL): tiling would then
    change nothing up to 1024². Set the tile edge in pixels and its latent counterpart."""
    vae.tile_sample_min_size = px
    vae.tile_latent_min_size = px // 2 ** (len(vae.config.block_out_channels) - 1)


class Offload(Unit):
    key, rows = "offload", ("CPU offload",)
    fields = {"offload": REQUIRED}
    decide_at, apply_at, row_at = 60, 100, 50

    def decide(self, ctx):
        s, est = ctx.settings, ctx.estimate()
        offload = "none"
        if ctx.device != "cuda":
            why = f"{ctx.device.upper()}: the models already live in system memory"
            if s.offload in (OffloadChoice.MODEL, OffloadChoice.SEQUENTIAL):
                why += f"; --offload {s.offload.value} ignored"
        elif s.offload is not OffloadChoice.AUTO:
            offload, why = s.offload.value, f"forced by --offload {s.offload.value}"
        else:
            full_need = est.total_gb
            biggest = as_size(ctx.model_kind).unet_params * DTYPE_BYTES[ctx.values["dtype"]] / 1e9
            model_need = biggest + est.step_gb + 0.5
            if full_need * OFFLOAD_MARGIN <= ctx.available:
                why = f"none: everything fits (~{full_need:.1f} GB needed, {ctx.where})"
            elif model_need <= ctx.available:
                offload = "model"
                why = (f"model offload: all models need ~{full_need:.1f} GB, {ctx.where}; one model at a "
                       f"time needs ~{model_need:.1f} GB")
            else:
                offload = "sequential"
                why = f"sequential offload (slowest): even the UNet alone needs ~{model_need:.1f} GB, {ctx.where}"
        ctx.values["offload"], ctx.reasons["offload"] = offload, why

    def apply(self, plan, models):
        # Offload last and only once: after it, no .to(device) (diffusers' contract). The plan's device is passed
        # on: diffusers would otherwise pick an accelerator by itself.
        for pipe in pipes(models):
            if plan.offload == "model" and not offload_kind(pipe):
                pipe.enable_model_cpu_offload(device=plan.device)
            elif plan.offload == "sequential" and not offload_kind(pipe):
                pipe.enable_sequential_cpu_offload(device=plan.device)
        for pipe in pipes(models):
            hooks.install(pipe, "offload", OffloadRun(models) if plan.offload == "model" else None)
        if plan.offload == "model":
            release_offload(models)

    def evidence(self, plan):
        return {"CPU offload": f"{plan.offload} offload hooks attached"} if plan.offload != "none" else {}

    def expected(self, plan, probe):
        if plan.device != "cuda":
            return [OptimizationRow("CPU offload", Status.NOT_APPLICABLE, plan.reasons["offload"])]
        return [planned_row("CPU offload", plan.offload != "none", plan.reasons["offload"])]

    def live(self, live):
        r = live.plan.reasons["offload"]
        if live.device_type in ("cpu", "mps") and not live.offload:
            return [OptimizationRow("CPU offload", Status.NOT_APPLICABLE, r)]
        return [live_row("CPU offload", bool(live.offload), live.plan.offload != "none", r,
                         f"{live.offload} offload hooks attached" if live.offload else "")]


class Attention(Unit):
    """One closed choice (sdpa | xformers | sliced), so no plan pairs two of them. PyTorch SDPA by default;
    xformers only where its CUDA kernels ran; slicing only for memory, and never chosen on Apple MPS."""

    key, rows = "attention", ("PyTorch SDPA attention", "xformers", "attention slicing")
    fields = {"attention": REQUIRED, "attention_slicing": REQUIRED}
    decide_at, apply_at, row_at = 70, 40, 40

    def decide(self, ctx):
        attention, ctx.reasons["attention"], ctx.reasons["attention_slicing"] = plan_attention(
            ctx.probe, ctx.settings, ctx.device, ctx.values["offload"], ctx.estimate(), ctx.available, ctx.where)
        ctx.values.update(attention=attention, attention_slicing=attention == "sliced")

    def adjust(self, loaded, request):
        # One choice: the request's, except that an xformers plan stays xformers (its kernel already avoids the
        # full attention matrix, so slicing would add nothing but time).
        source = loaded if loaded.attention == "xformers" else request
        return ({"attention": source.attention, "attention_slicing": source.attention == "sliced"},
                {k: source.reasons[k] for k in ("attention", "attention_slicing")})

    def apply(self, plan, models):
        from diffusers.models.attention_processor import AttnProcessor2_0

        for pipe in pipes(models):
            if plan.attention == "xformers":
                pipe.enable_xformers_memory_efficient_attention()
            elif plan.attention == "sliced":
                pipe.enable_attention_slicing("auto")
            else:
                pipe.unet.set_attn_processor(AttnProcessor2_0())
                pipe.vae.set_attn_processor(AttnProcessor2_0())

    def evidence(self, plan):
        return {"xformers": "kernel test passed"} if plan.attention == "xformers" else {}

    def expected(self, plan, probe):
        r = plan.reasons
        if plan.attention == "sdpa":
            rows = [OptimizationRow("PyTorch SDPA attention", Status.ACTIVE, sdpa_flavour(probe, plan.device))]
        else:
            rows = [OptimizationRow("PyTorch SDPA attention", Status.OFF, r["attention"])]
        rows.append(xformers_row(probe, plan.device, active=plan.attention == "xformers"))
        rows.append(planned_row("attention slicing", plan.attention_slicing, r["attention_slicing"]))
        return rows

    def live(self, live):
        if "sdpa" in live.kinds:
            rows = [OptimizationRow("PyTorch SDPA attention", Status.ACTIVE,
                                    f"{sdpa_flavour(live.probe, live.device_type)}; processors: {live.listing}")]
        else:
            rows = [OptimizationRow("PyTorch SDPA attention", Status.OFF, f"processors: {live.listing}")]
        rows.append(xformers_row(live.probe, live.device_type, active="xformers" in live.kinds))
        rows.append(live_row("attention slicing", "sliced" in live.kinds, live.plan.attention == "sliced",
                             live.plan.reasons["attention_slicing"]))
        return rows


def sdpa_flavour(probe: HardwareProbe, device_type: str) -> str:
    """Which SDPA kernels ran on this device in the probe (on CPU: its flash kernel); never another device's."""
    backends = probe.sdpa_backends.get(device_type, ())
    if device_type == "cpu" and "flash" in backends:
        return "CPU flash kernel"
    return f"backends that ran on {device_type.upper()}: {sdpa_backends_for(probe, device_type)}"


def xformers_row(probe: HardwareProbe, device_type: str, active: bool) -> OptimizationRow:
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


class MemoryCheck(Unit):
    """Refuse with numbers when even the weights cannot fit; the memory reason for the status panel."""

    key = "memory"
    fields = {"memory_needed_gb": REQUIRED, "memory_available_gb": REQUIRED}
    decide_at = 80
    per_request = ("memory_needed_gb",)

    def decide(self, ctx):
        est, v = ctx.estimate(), ctx.values
        if ctx.device != "cuda" and est.weights_gb + est.refiner_gb + est.overhead_gb > ctx.available:
            raise PlanError(
                f"memory: the model needs ~{est.weights_gb + est.refiner_gb + est.overhead_gb:.1f} GB "
                f"({v['dtype']} weights{' + refiner' if v['refiner'] else ''}), {ctx.where}; try closing other "
                f"programs, {'--use-refiner off, ' if v['refiner'] else ''}"
                f"{'--precision bf16, ' if v['dtype'] == 'float32' else ''}or --model demo to try the app offline")
        v["memory_needed_gb"], v["memory_available_gb"] = round(est.total_gb, 2), ctx.available
        ctx.reasons["memory"] = (
            f"~{est.total_gb:.1f} GB needed (weights {est.weights_gb:.1f}, refiner {est.refiner_gb:.1f}, "
            f"step {est.step_gb:.1f}, decode {est.decode_gb:.1f}, overhead {est.overhead_gb:.1f}; sizes: "
            f"{as_size(ctx.model_kind).how}), {ctx.where}")


class VaeSlicing(Unit):
    key, rows = "vae_slicing", ("VAE slicing",)
    fields = {"vae_slicing": REQUIRED}
    decide_at, apply_at, row_at = 110, 60, 70

    def decide(self, ctx):
        ctx.values["vae_slicing"], ctx.reasons["vae_slicing"] = False, "one image per pipeline call: nothing to slice"

    def apply(self, plan, models):
        for pipe in pipes(models):
            if plan.vae_slicing:
                pipe.vae.enable_slicing()
            else:
                pipe.vae.disable_slicing()

    def expected(self, plan, probe):
        return [planned_row("VAE slicing", plan.vae_slicing, plan.reasons["vae_slicing"])]

    def live(self, live):
        return [live_row("VAE slicing", bool(live.base.vae.use_slicing), live.plan.vae_slicing,
                         live.plan.reasons["vae_slicing"])]


UNITS = (Refiner(), VaeTiling(), Offload(), Attention(), MemoryCheck(), VaeSlicing())
