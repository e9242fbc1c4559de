"""One table of optimizations: each is one unit — its decision from the probe and settings (with its reason), how
it is applied to the loaded pipelines, and its report rows, both as planned (``doctor``, before any weights) and
as read back from the live pipeline. ``policy.make_plan``, ``optimize.apply``, ``optimize.report``,
``optimize.expected_report``, ``doctor`` and the page all walk ``UNITS``: adding an optimization is adding a unit.

Decisions run in the order of ``UNITS`` (later ones read earlier ones from ``ctx.values``: e.g. offload reads the
memory estimate that the refiner and VAE-tiling decisions feed); they are pure (no torch, no I/O). ``apply`` runs
in ``APPLY_ORDER`` (offload last: diffusers forbids ``.to()`` after it) and imports torch/diffusers lazily, so this
module imports without them (the UI never imports torch).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from ..schema import HardwareProbe, OptimizationRow, Plan, Status
from ..settings import PRECISION_DTYPES, AppSettings, OffloadChoice, Precision, Toggle

SHORT_DTYPE = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
PROCESSOR_LABELS = {
    "AttnProcessor2_0": "sdpa",
    "XFormersAttnProcessor": "xformers",
    "SlicedAttnProcessor": "sliced",
    "AttnProcessor": "classic",
}
GUIDANCE_ATTR = "_sdxl_ui_guidance_interval"  # the GuidanceInterval a pipeline runs with (None/absent: plain CFG)
DEFAULT_CACHE_INTERVAL = 3  # DeepCache's SDXL setting: 2.6× (its README)
CACHE_BRANCH = 1  # the shallow branch: the outermost level (DeepCache's SDXL setting, cache_layer_id 0)
DEFAULT_GUIDANCE_INTERVAL = (0.0, 0.6)  # guided for the first 60 % of the steps (adaptive guidance, see presets)
INT8_MIN_FEATURES = 64  # linear layers narrower than this stay float (nothing to gain; SDXL's narrowest: 320)
EXACT_GUIDANCE = (0.0, 1.0)


def short(dtype) -> str:
    name = str(dtype).replace("torch.", "")
    return SHORT_DTYPE.get(name, name)


# ---------------------------------------------------------------- decision context

@dataclass
class Decide:
    """What a decision sees: the probe, the settings, the request's shape and quality and its per-request
    switches, and every decision made before it (``values``/``reasons``). ``warnings`` are shown before a run."""

    probe: HardwareProbe
    settings: AppSettings
    model_kind: str
    width: int
    height: int
    high_quality: bool
    feature_cache: Toggle = Toggle.AUTO
    guidance_interval: Toggle = Toggle.AUTO
    values: dict[str, Any] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @property
    def device(self) -> str:
        return self.values["device"]

    @property
    def available(self) -> float:
        """Memory for the models on the chosen device: free VRAM on CUDA, available RAM otherwise (MPS shares it)."""
        if self.device == "cuda":
            return self.probe.cuda.vram_free_gb or self.probe.cuda.vram_total_gb or 0.0
        return self.probe.cpu.ram_available_gb

    @property
    def where(self) -> str:
        return (f"{self.available:.1f} GB VRAM free" if self.device == "cuda"
                else f"{self.available:.1f} GB RAM available")

    @property
    def px(self) -> str:
        return f"{self.width}×{self.height}"

    def estimate(self, refiner: bool | None = None, tiled: bool | None = None):
        from ..policy import estimate_memory

        v = self.values
        return estimate_memory(self.model_kind, v["dtype"], v["vae_dtype"], self.width, self.height, self.device,
                               v.get("refiner", False) if refiner is None else refiner,
                               v.get("vae_tiling", False) if tiled is None else tiled)


# ---------------------------------------------------------------- live state (for read-back rows)

class Live:
    """The loaded pipelines' own state, read once per report."""

    def __init__(self, models, plan: Plan, probe: HardwareProbe, use_refiner: bool | None):
        self.models, self.plan, self.probe = models, plan, probe
        self.base = models.base
        self.refiner_on = (models.refiner is not None if use_refiner is None
                           else bool(use_refiner) and models.refiner is not None)
        self.dtypes = _module_dtypes(self.base)
        self.offload = offload_kind(self.base)
        devices = sorted({v.split("@")[1] for v in self.dtypes.values()})
        self.execution = str(self.base._execution_device) if self.offload else ", ".join(devices)
        self.device_type = self.execution.split(":")[0]
        self.processors = {name: Counter(type(p).__name__ for p in getattr(self.base, name).attn_processors.values())
                           for name in ("unet", "vae")}
        # The UNet is where the attention time goes: its processors decide the status; the listing shows all.
        self.kinds = {PROCESSOR_LABELS.get(name, name) for name in self.processors["unet"]}
        self.listing = "; ".join(f"{module} " + ", ".join(f"{n}×{cls}" for cls, n in sorted(counts.items()))
                                 for module, counts in self.processors.items() if counts)

    @property
    def pipes(self):
        return [p for p in (self.base, self.models.refiner if self.refiner_on else None) if p is not None]


def _module_dtypes(pipe) -> dict[str, str]:
    out = {}
    for name in ("unet", "text_encoder", "text_encoder_2", "vae"):
        module = getattr(pipe, name, None)
        if module is not None:
            out[name] = f"{short(module.dtype)}@{module.device.type}"
    return out


def offload_kind(pipe) -> str | None:
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


def is_compiled(module) -> bool:
    return type(module).__name__ == "OptimizedModule"  # what torch.compile returns for an nn.Module


def live_row(name: str, active: bool, planned: bool, reason: str, state: str = "") -> OptimizationRow:
    """A row whose status is read from the pipeline. The plan's reason is quoted as the reason only when the plan
    decided the same; otherwise the row says the live state departs from the plan (never "active — not needed")."""
    if active == planned:
        detail = f"{state} — {reason}" if state else reason
    else:
        detail = (f"{state + '; ' if state else ''}{'on' if active else 'off'} on the live pipeline, not as planned "
                  f"(plan: {reason})")
    return OptimizationRow(name, Status.ACTIVE if active else Status.OFF, detail)


def planned_row(name: str, active: bool, reason: str) -> OptimizationRow:
    return OptimizationRow(name, Status.ACTIVE if active else Status.OFF, reason)


# ---------------------------------------------------------------- the unit

class Unit:
    """One optimization. Subclasses override what they have: a decision, an application, rows."""

    key = ""  # the reasons key (and usually the Plan field) it decides
    rows: tuple[str, ...] = ()  # its report rows, in order

    def decide(self, ctx: Decide) -> None:  # sets ctx.values[...] and ctx.reasons[...]
        pass

    def apply(self, plan: Plan, models) -> None:
        pass

    def expected(self, plan: Plan, probe: HardwareProbe) -> list[OptimizationRow]:
        return []

    def live(self, live: Live) -> list[OptimizationRow]:
        return []


class Device(Unit):
    key, rows = "device", ("device",)

    def decide(self, ctx):
        from ..policy import plan_device

        ctx.values["device"], ctx.reasons["device"] = plan_device(ctx.probe, ctx.settings)

    def apply(self, plan, models):
        for pipe in _pipes(models):
            if plan.offload == "none" and pipe.device.type != plan.device and not offload_kind(pipe):
                pipe.to(plan.device)

    def expected(self, plan, probe):
        return [OptimizationRow("device", Status.ACTIVE, f"{plan.device} — {plan.reasons['device']}")]

    def live(self, live):
        return [OptimizationRow("device", Status.ACTIVE,
                                f"{live.execution.split(':')[0]} — {live.plan.reasons['device']}")]


class PrecisionUnit(Unit):
    key, rows = "dtype", ("precision",)

    def decide(self, ctx):
        from ..policy import plan_dtype

        dtype, vae_dtype, ctx.reasons["dtype"], warnings = plan_dtype(ctx.probe, ctx.settings, ctx.device)
        ctx.values.update(dtype=dtype, vae_dtype=vae_dtype)
        ctx.warnings += warnings

    def expected(self, plan, probe):
        return [OptimizationRow("precision", Status.ACTIVE,
                                f"{SHORT_DTYPE[plan.dtype]} UNet/text encoders, {SHORT_DTYPE[plan.vae_dtype]} VAE — "
                                f"{plan.reasons['dtype']}")]

    def live(self, live):
        base = live.base
        listing = ", ".join(f"{k} {v}" for k, v in live.dtypes.items())
        return [OptimizationRow("precision", Status.ACTIVE,
                                f"{short(base.unet.dtype)} UNet/text encoders, {short(base.vae.dtype)} VAE "
                                f"({listing}) — {live.plan.reasons['dtype']}")]


class Int8(Unit):
    """Opt-in int8 linear layers in the UNet(s) (``--precision int8``): never on by itself; changes the output."""

    key, rows = "int8", ("int8 linear layers",)

    def decide(self, ctx):
        from ..policy import PlanError

        gemm = ctx.probe.cpu.gemm_gflops
        if ctx.settings.precision is not Precision.INT8:
            ctx.values["int8"] = False
            offered = ctx.device == "cpu" and "int8" in gemm
            ctx.reasons["int8"] = ("opt-in only (--precision int8), because it changes the output"
                                   + (f"; this CPU's int8 GEMM: {_gemm_line(gemm)}" if offered else ""))
            return
        if ctx.device != "cpu":
            raise PlanError(f"precision: 'int8' runs the UNet's linear layers on the CPU's int8 GEMM (VNNI/AMX); "
                            f"it is not offered on {ctx.device.upper()}: use --precision auto there")
        ctx.values["int8"] = True
        best_float = max((v for k, v in gemm.items() if k in ("fp32", "bf16", "fp16")), default=0.0)
        measured = f"measured: {_gemm_line(gemm)}" if gemm else "not measured in this probe"
        ctx.reasons["int8"] = (f"on (--precision int8): the UNet's linear layers run int8 GEMMs with per-channel "
                               f"weight and per-token activation scales, other layers in "
                               f"{SHORT_DTYPE[ctx.values['dtype']]}; {measured}; CHANGES THE OUTPUT slightly "
                               "(8-bit rounding)")
        if "int8" in gemm and gemm["int8"] < 1.5 * best_float:
            ctx.warnings.append(f"precision int8: this CPU's int8 GEMM ({gemm['int8']:g} GOP/s) is not much faster "
                                f"than its best float GEMM ({best_float:g} GFLOP/s): little or no gain, and the "
                                "output changes")

    def apply(self, plan, models):
        if not plan.int8:
            return  # int8 weights are made at load time and stay (a reload brings the float weights back)
        from . import int8

        for pipe in _pipes(models):
            int8.quantize_linears(pipe.unet, min_features=INT8_MIN_FEATURES)

    def expected(self, plan, probe):
        return [planned_row("int8 linear layers", plan.int8, plan.reasons["int8"])]

    def live(self, live):
        from . import int8

        state = int8.state(live.base.unet)
        n = state.get("int8_layers", 0) if state.get("enabled") else 0
        detail = ""
        if n:
            detail = (f"{n} UNet linear layers int8 ({state.get('params_int8', 0) / 1e6:.1f} M parameters); "
                      "the output differs from the exact run")
        return [live_row("int8 linear layers", bool(n), live.plan.int8, live.plan.reasons["int8"], detail)]


def _gemm_line(gemm) -> str:
    units = {"int8": "GOP/s"}
    return ", ".join(f"{k} {v:g} {units.get(k, 'GFLOP/s')}" for k, v in gemm.items())


class Refiner(Unit):
    key, rows = "refiner", ("Refinement",)

    def decide(self, ctx):
        s = ctx.settings
        want, why = False, ""
        if s.refiner_source is None:
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
        from ..policy import VAE_TILE_PX

        for pipe in _pipes(models):
            if plan.vae_tiling:
                _set_vae_tile(pipe.vae, VAE_TILE_PX)
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


def _set_vae_tile(vae, px: int) -> None:
    """diffusers' AutoencoderKL takes its tile size from config.sample_size (1024 for SDXL): tiling would then
    change nothing up to 1024². Set the tile edge in pixels and its latent counterpart."""
    vae.tile_sample_min_size = px
    vae.tile_latent_min_size = px // 2 ** (len(vae.config.block_out_channels) - 1)


class Offload(Unit):
    key, rows = "offload", ("CPU offload",)

    def decide(self, ctx):
        from ..policy import DTYPE_BYTES, OFFLOAD_MARGIN, SDXL_PARAMS

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
            biggest = (SDXL_PARAMS["unet"] if ctx.model_kind != "tiny" else 1e6) * DTYPE_BYTES[ctx.values["dtype"]] / 1e9
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
        from ..optimize import release_offload

        for pipe in _pipes(models):
            if plan.offload == "model" and not offload_kind(pipe):
                pipe.enable_model_cpu_offload(device=plan.device)
            elif plan.offload == "sequential" and not offload_kind(pipe):
                pipe.enable_sequential_cpu_offload(device=plan.device)
        if plan.offload == "model":
            release_offload(models)

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

    def decide(self, ctx):
        from ..policy import _plan_attention

        attention, ctx.reasons["attention"], ctx.reasons["attention_slicing"] = _plan_attention(
            ctx.probe, ctx.settings, ctx.device, ctx.values["offload"], ctx.estimate(), ctx.available, ctx.where)
        ctx.values.update(attention=attention, attention_slicing=attention == "sliced")

    def apply(self, plan, models):
        from diffusers.models.attention_processor import AttnProcessor2_0

        for pipe in _pipes(models):
            if plan.attention == "xformers":
                pipe.enable_xformers_memory_efficient_attention()
            elif plan.attention == "sliced":
                pipe.enable_attention_slicing("auto")
            else:
                pipe.unet.set_attn_processor(AttnProcessor2_0())
                pipe.vae.set_attn_processor(AttnProcessor2_0())

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
    from ..policy import sdpa_backends_for

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

    def decide(self, ctx):
        from ..policy import PlanError

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
            f"step {est.step_gb:.1f}, decode {est.decode_gb:.1f}, overhead {est.overhead_gb:.1f}), {ctx.where}")


class VaeSlicing(Unit):
    key, rows = "vae_slicing", ("VAE slicing",)

    def decide(self, ctx):
        ctx.values["vae_slicing"], ctx.reasons["vae_slicing"] = False, "one image per pipeline call: nothing to slice"

    def apply(self, plan, models):
        for pipe in _pipes(models):
            if plan.vae_slicing:
                pipe.vae.enable_slicing()
            else:
                pipe.vae.disable_slicing()

    def expected(self, plan, probe):
        return [planned_row("VAE slicing", plan.vae_slicing, plan.reasons["vae_slicing"])]

    def live(self, live):
        return [live_row("VAE slicing", bool(live.base.vae.use_slicing), live.plan.vae_slicing,
                         live.plan.reasons["vae_slicing"])]


class Compile(Unit):
    key, rows = "compile", ("torch.compile",)

    def decide(self, ctx):
        ctx.values["compile"] = ctx.settings.compile
        if ctx.settings.compile:
            ctx.reasons["compile"] = ("on (--compile): the first step compiles for minutes (H200: 159 s), later steps "
                                      "are faster (H200: 77 → 56 ms; this CPU: −7 %)")
        else:
            ctx.reasons["compile"] = ("off: the first call compiles for minutes and gains 7 % on CPU, ~27 % on an "
                                      "H200; use --compile for long-running servers")

    def apply(self, plan, models):
        if plan.compile and not is_compiled(models.base.unet):
            import torch

            # Compiled lazily: the first step pays the compilation (reported as warm-up in the log and bench).
            models.base.unet = torch.compile(models.base.unet)

    def expected(self, plan, probe):
        return [planned_row("torch.compile", plan.compile, plan.reasons["compile"])]

    def live(self, live):
        return [live_row("torch.compile", is_compiled(live.base.unet), live.plan.compile,
                         live.plan.reasons["compile"])]


class SchedulerRow(Unit):
    """No decision of the plan: the request picks the sampler (its quality preset's, or Advanced)."""

    rows = ("scheduler",)

    def expected(self, plan, probe):
        from ..schema import PRESETS, SAMPLER_LABELS, Quality

        return [OptimizationRow("scheduler", Status.ACTIVE,
                                "per request: " + "; ".join(f"{q.value}: {SAMPLER_LABELS[p.scheduler]}, {p.steps} steps"
                                                            for q, p in PRESETS.items()) + " (any sampler can be picked per request)")]

    def live(self, live):
        return [OptimizationRow("scheduler", Status.ACTIVE, type(live.base.scheduler).__name__)]


class Steps(Unit):
    key, rows = "steps_factor", ("steps policy",)

    def decide(self, ctx):
        from ..policy import CPU_STEPS_FACTOR

        if ctx.device == "cpu":
            ctx.values["steps_factor"] = CPU_STEPS_FACTOR
            ctx.reasons["steps_factor"] = "CPU: steps × 0.7 (the seed's policy, e.g. 50 → 35)"
        else:
            ctx.values["steps_factor"] = 1.0
            ctx.reasons["steps_factor"] = f"{ctx.device.upper()}: steps as requested"

    def expected(self, plan, probe):
        return [self._row(plan)]

    def live(self, live):
        return [self._row(live.plan)]

    @staticmethod
    def _row(plan):
        factor = plan.steps_factor
        return OptimizationRow("steps policy", Status.ACTIVE if factor != 1.0 else Status.OFF,
                               f"× {factor:g} (50 → {plan.steps_for(50)}) — {plan.reasons['steps_factor']}")


class FeatureCache(Unit):
    """DeepCache-style reuse of the deep UNet features (``optimizations/feature_cache.py``)."""

    key, rows = "feature_cache", ("feature cache",)

    def decide(self, ctx):
        from ..schema import PRESETS, Quality

        preset = PRESETS[Quality.HIGH if ctx.high_quality else Quality.FAST]
        toggle = ctx.feature_cache
        if ctx.settings.compile and toggle is not Toggle.OFF:
            interval, why = 1, "off: --compile replaces the UNet's forward, which the cache needs to wrap"
        elif toggle is Toggle.OFF:
            interval, why = 1, "turned off for this request (Advanced)"
        elif toggle is Toggle.ON:
            interval = preset.feature_cache if preset.feature_cache > 1 else DEFAULT_CACHE_INTERVAL
            why = f"turned on for this request (Advanced): {_cache_words(interval)}"
        elif preset.feature_cache > 1:
            interval = preset.feature_cache
            why = f"Fast preset: {_cache_words(interval)}"
        else:
            interval, why = 1, "High quality stays exact: every step runs the whole UNet"
        ctx.values["feature_cache"], ctx.reasons["feature_cache"] = interval, why

    def apply(self, plan, models):
        from . import feature_cache

        for pipe in _pipes(models):
            if is_compiled(pipe.unet):
                continue
            if plan.feature_cache > 1:
                feature_cache.enable(pipe.unet, interval=plan.feature_cache, branch=CACHE_BRANCH)
            else:
                feature_cache.disable(pipe.unet)

    def expected(self, plan, probe):
        return [planned_row("feature cache", plan.feature_cache > 1, plan.reasons["feature_cache"])]

    def live(self, live):
        from . import feature_cache

        state = feature_cache.state(live.base.unet)
        active = bool(state.get("enabled")) and state.get("interval", 1) > 1
        detail = ""
        if active:
            run = state.get("previous_run") or {k: state.get(k, 0) for k in ("full_steps", "cached_steps")}
            detail = f"interval {state['interval']} on the UNet"
            if run.get("full_steps") or run.get("cached_steps"):
                detail += f"; last run: {run['full_steps']} full, {run['cached_steps']} cached UNet calls"
        return [live_row("feature cache", active, live.plan.feature_cache > 1, live.plan.reasons["feature_cache"],
                         detail)]


def _cache_words(interval: int) -> str:
    return (f"1 UNet call in {interval} runs in full, the {interval - 1} between reuse its deep features and run "
            f"only the outermost level (DeepCache-style; published for SDXL: 2.6× at interval 3, FID 24.16 → 25.68)")


class GuidanceIntervalUnit(Unit):
    """Classifier-free guidance only inside an interval of the schedule (``optimizations/guidance_interval.py``)."""

    key, rows = "guidance_interval", ("guidance interval",)

    def decide(self, ctx):
        from ..schema import PRESETS, Quality

        preset = PRESETS[Quality.HIGH if ctx.high_quality else Quality.FAST]
        toggle, chosen = ctx.guidance_interval, tuple(preset.guidance_interval)
        name = "High quality" if ctx.high_quality else "Fast"
        if toggle is Toggle.OFF:
            interval, why = EXACT_GUIDANCE, "turned off for this request (Advanced): guidance on every step"
        elif toggle is Toggle.ON:
            interval = chosen if chosen != EXACT_GUIDANCE else DEFAULT_GUIDANCE_INTERVAL
            why = f"turned on for this request (Advanced): {_interval_words(interval)}"
        elif chosen != EXACT_GUIDANCE:
            interval, why = chosen, f"{name} preset: {_interval_words(chosen)}"
        else:
            interval, why = EXACT_GUIDANCE, f"{name} preset: guidance on every step"
        ctx.values["guidance_interval"], ctx.reasons["guidance_interval"] = interval, why

    def apply(self, plan, models):
        from .guidance_interval import GuidanceInterval

        interval = tuple(plan.guidance_interval)
        for pipe in _pipes(models):
            setattr(pipe, GUIDANCE_ATTR, None if interval == EXACT_GUIDANCE else GuidanceInterval(*interval))

    def expected(self, plan, probe):
        return [planned_row("guidance interval", tuple(plan.guidance_interval) != EXACT_GUIDANCE,
                            plan.reasons["guidance_interval"])]

    def live(self, live):
        gi = getattr(live.base, GUIDANCE_ATTR, None)
        active = gi is not None and not gi.exact
        detail = ""
        if active:
            detail = f"guided from {gi.start:.0%} to {gi.stop:.0%} of the steps"
            stats = gi.stats()
            if stats["steps"]:
                detail += (f"; last run: {stats['guided_steps']} guided, {stats['unguided_steps']} "
                           f"conditional-only steps, {stats['evaluations_saved']} of "
                           f"{stats['evaluations'] + stats['evaluations_saved']} UNet rows saved")
        planned = tuple(live.plan.guidance_interval) != EXACT_GUIDANCE
        return [live_row("guidance interval", active, planned, live.plan.reasons["guidance_interval"], detail)]


def _interval_words(interval) -> str:
    start, stop = interval
    saved = (1 - (stop - start)) / 2  # of the UNet rows: a guided step runs 2 rows per image, an unguided one 1
    head = f"the first {start:.0%} and " if start > 0 else ""
    return (f"the negative prompt's branch runs from {start:.0%} to {stop:.0%} of the steps only ({head}the last "
            f"{1 - stop:.0%} run the conditional branch alone, ~{saved:.0%} fewer UNet rows; Kynkäänniemi et al. "
            "2024, Castillo et al. 2023)")


class Threads(Unit):
    key, rows = "threads", ("CPU threads",)

    def decide(self, ctx):
        if ctx.device == "cpu":
            threads = ctx.settings.threads or ctx.probe.cpu.physical_cores
            ctx.reasons["threads"] = (f"forced to {threads}" if ctx.settings.threads
                                      else f"{threads} = physical cores (SMT siblings share the same AVX-512 units)")
        else:
            threads = None
            ctx.reasons["threads"] = "torch default (the GPU does the work)"
        ctx.values["threads"] = threads

    def apply(self, plan, models):
        if plan.threads:
            import torch

            torch.set_num_threads(plan.threads)

    def expected(self, plan, probe):
        return [OptimizationRow("CPU threads", Status.ACTIVE if plan.device == "cpu" else Status.NOT_APPLICABLE,
                                f"{plan.threads or 'default'} — {plan.reasons['threads']}")]

    def live(self, live):
        import torch

        return [OptimizationRow("CPU threads",
                                Status.ACTIVE if live.device_type == "cpu" else Status.NOT_APPLICABLE,
                                f"torch uses {torch.get_num_threads()} — {live.plan.reasons['threads']}")]


def _pipes(models):
    return [p for p in (models.base, models.refiner) if p is not None]


# Decision order: each reads only what is above it.
UNITS: tuple[Unit, ...] = (
    Device(), PrecisionUnit(), Int8(), Refiner(), VaeTiling(), Offload(), Attention(), MemoryCheck(), Steps(),
    Threads(), VaeSlicing(), Compile(), FeatureCache(), GuidanceIntervalUnit(), SchedulerRow(),
)
_BY_TYPE = {type(u): u for u in UNITS}
# Application order: threads first; int8 and the feature cache before compile (they change the modules it would
# trace); offload last (after it, no .to()).
APPLY_ORDER: tuple[Unit, ...] = tuple(_BY_TYPE[t] for t in (
    Threads, Device, Int8, Attention, VaeTiling, VaeSlicing, FeatureCache, GuidanceIntervalUnit, Compile, Offload))
# Report order: as the rows have always been listed, the new techniques beside what they relate to.
ROW_ORDER: tuple[Unit, ...] = tuple(_BY_TYPE[t] for t in (
    Device, PrecisionUnit, Int8, Attention, Offload, VaeTiling, VaeSlicing, Refiner, Compile, SchedulerRow, Steps,
    FeatureCache, GuidanceIntervalUnit, Threads))
assert set(APPLY_ORDER) | set(ROW_ORDER) | {_BY_TYPE[MemoryCheck]} == set(UNITS)


def decide(ctx: Decide) -> Decide:
    for unit in UNITS:
        unit.decide(ctx)
    return ctx
