"""Where and in what precision the models run: the device (CUDA only when its kernels ran, then MPS, then CPU),
the dtype (on a CPU the fastest exact dtype by the probe's measured GEMM), the VAE's memory layout (channels-last
where the probe measured its convolutions faster so), and opt-in int8 layers (linear and convolution)."""
from __future__ import annotations

from ..schema import HardwareProbe, OptimizationRow, Status
from ..settings import PRECISION_DTYPES, AppSettings, DeviceChoice, Precision
from .base import REQUIRED, SHORT_DTYPE, PlanError, Unit, live_row, offload_kind, pipes, planned_row, short

INT8_MIN_FEATURES = 64  # linear layers narrower than this stay float (nothing to gain; SDXL's narrowest: 320)
INT8_MIN_CHANNELS = 32  # convolutions narrower than this stay float (the UNet's 4-channel first and last)


# ---------------------------------------------------------------- device

def _cuda_fix(probe: HardwareProbe) -> str:
    sm = probe.cuda.sm or "its architecture"
    return (
        f"install a PyTorch build compiled for {sm} (for Blackwell sm_120: a CUDA 12.8+ build, "
        f"`pip install --upgrade torch --index-url https://download.pytorch.org/whl/cu128`); "
        f"the same sdxl_ui code uses the GPU as soon as the kernel test passes"
    )


def _cuda_failure(probe: HardwareProbe) -> str:
    c = probe.cuda
    arch = ", ".join(c.arch_list) or "unknown"
    return (
        f"{c.device_name} ({c.sm}) is present but PyTorch {probe.torch_version} cannot run kernels on it "
        f"(its arch list: {arch}; kernel test: {c.kernel_error})"
    )


def plan_device(probe: HardwareProbe, settings: AppSettings) -> tuple[str, str]:
    """(device, reason). Auto order: CUDA (only if its kernel test passed) -> MPS -> CPU."""
    cuda_ok = probe.cuda.available and probe.cuda.kernel_ok is True
    choice = settings.device
    if choice is DeviceChoice.CUDA:
        if not probe.cuda.available:
            raise PlanError("device: 'cuda' was requested but PyTorch sees no CUDA GPU "
                            f"(torch {probe.torch_version}, CUDA build: {probe.cuda.version or 'none'}); "
                            "use --device auto or cpu, or install a CUDA build of PyTorch")
        if not cuda_ok:
            raise PlanError(f"device: 'cuda' was requested but {_cuda_failure(probe)}. Fix: {_cuda_fix(probe)}; "
                            "until then use --device auto (falls back to CPU)")
        return "cuda", f"forced by --device cuda; kernel test passed on {probe.cuda.device_name} ({probe.cuda.sm})"
    if choice is DeviceChoice.MPS:
        if not probe.mps.available:
            raise PlanError("device: 'mps' was requested but Apple MPS is not available on this machine")
        return "mps", "forced by --device mps"
    if choice is DeviceChoice.CPU:
        return "cpu", "forced by --device cpu"
    if cuda_ok:
        return "cuda", (f"CUDA GPU {probe.cuda.device_name} ({probe.cuda.sm}, {probe.cuda.vram_total_gb} GB); "
                        "kernel test passed")
    if probe.cuda.available:
        return "cpu", f"falling back to CPU: {_cuda_failure(probe)}. Fix: {_cuda_fix(probe)}"
    if probe.mps.available:
        return "mps", "Apple silicon GPU (MPS) available"
    return "cpu", "no usable GPU found (no CUDA device, no Apple MPS)"


# ---------------------------------------------------------------- dtype

# A lower precision is taken on the CPU only when its measured GEMM beats fp32 by this much (rounding costs a
# little accuracy: it has to buy a real speed-up).
CPU_DTYPE_MIN_GAIN = 1.3
EXACT_CPU_DTYPES = (("bf16", "bfloat16"), ("fp16", "float16"))
HARDWARE_FLAGS = {"bf16": ("avx512_bf16", "amx_bf16"), "fp16": ("avx512_fp16", "amx_fp16")}
INCONCLUSIVE = 0.8  # a lower precision with hardware support that measures ≥ this × fp32 is taken (see below)


def _gemm_figures(gemm, keys=("fp32", "bf16", "fp16", "int8")) -> str:
    return ", ".join(f"{k} {gemm[k]:g}" for k in keys if k in gemm)


def _cpu_dtype_by_measurement(probe: HardwareProbe) -> tuple[str, str] | None:
    """(dtype, reason) from the probe's measured GEMM speeds, or None when the probe has none (older probes)."""
    gemm = probe.cpu.gemm_gflops
    how = f"measured {probe.cpu.gemm_note or 'matmul'}: {_gemm_figures(gemm, ('fp32', 'bf16', 'fp16'))} GFLOP/s"
    if probe.cpu.forced_dtype:
        key = probe.cpu.forced_dtype
        return PRECISION_DTYPES[Precision(key)], (f"SDXL_UI_CPU_DTYPE={key}: {key} is taken as this CPU's fastest "
                                                  f"exact dtype, whatever was {how if gemm else 'measured'}")
    if "fp32" not in gemm:
        return None
    fp32 = gemm["fp32"]
    candidates = [(gemm[k], k, name) for k, name in EXACT_CPU_DTYPES if k in gemm]
    speed, key, name = max(candidates, default=(0.0, "", ""))
    flags = [f for f in HARDWARE_FLAGS.get(key, ()) if f in probe.cpu.flags]
    if key and speed >= CPU_DTYPE_MIN_GAIN * fp32:
        return name, (f"{how} → {key}, {speed / fp32:.1f}× fp32's GEMM ({' and '.join(flags) or 'hardware support'}"
                      f"); the SDXL UNet's step follows the GEMM ratio (`bench` on a 2-core EPYC: bf16 21.1 → 9.3 s "
                      "per guided 512² step)")
    if key and flags and speed >= INCONCLUSIVE * fp32:
        # A short probe on a busy machine can blur a real 2× gain; an emulated dtype measures ~5× slower, never
        # close to fp32. The CPU's own flags decide between the two.
        return name, (f"{how} → {key}: the CPU has {' and '.join(flags)}; the measurement ({speed / fp32:.1f}× fp32) "
                      "was likely taken under load, an emulated dtype would measure far below fp32")
    return "float32", f"{how} → fp32 (no lower precision is ≥ {CPU_DTYPE_MIN_GAIN:g}× faster here: emulated)"


def plan_dtype(probe: HardwareProbe, settings: AppSettings, device: str) -> tuple[str, str, str, list[str]]:
    """(dtype, vae_dtype, reason, warnings). On the CPU the fastest exact dtype by the probe's measurement; a
    forced dtype that the measurement shows emulated gets a warning with the measured slowdown."""
    warnings: list[str] = []
    forced = settings.precision not in (Precision.AUTO, Precision.INT8)
    if forced:
        dtype = PRECISION_DTYPES[settings.precision]
        why = f"forced by --precision {settings.precision.value}"
        gemm = probe.cpu.gemm_gflops
        key = settings.precision.value
        if device == "cpu" and key in gemm and "fp32" in gemm and key != "fp32" and gemm[key] < gemm["fp32"]:
            slow = gemm["fp32"] / max(gemm[key], 1e-9)
            warning = (f"precision {key}: measured {gemm[key]:g} GFLOP/s against fp32's {gemm['fp32']:g} on this CPU "
                       f"({probe.cpu.gemm_note}): emulated, each step will be ~{slow:.0f}× slower than with "
                       "--precision auto")
            warnings.append(warning)
            why += f" ⚠ {warning}"
        elif device == "cpu" and dtype == "float16":
            why += " (fp16 on CPU has few fast kernels and is usually slower than fp32)"
        elif device == "cpu" and dtype == "bfloat16" and not probe.cpu.has_fast_bf16 and key not in gemm:
            why += " (this CPU has neither avx512_bf16 nor AMX: bf16 is emulated and slow)"
    elif device == "cpu":
        measured = _cpu_dtype_by_measurement(probe)
        if measured is not None:
            dtype, why = measured
        elif probe.cpu.has_fast_bf16:
            found = [f for f in ("avx512_bf16", "amx_bf16") if f in probe.cpu.flags]
            dtype, why = "bfloat16", (f"CPU has {' and '.join(found)} (no GEMM measurement in this probe): bf16 "
                                      "weights and inputs run the SDXL UNet ~2× faster than fp32 (`bench` on a 2-core "
                                      "EPYC: 18.5 → 9.2 s per guided 512² step)")
        else:
            dtype, why = "float32", ("CPU has neither avx512_bf16 nor AMX (no GEMM measurement in this probe): bf16 "
                                     "would be emulated, fp32 is fastest")
    elif device == "cuda":
        dtype, why = "float16", ("fp16 on CUDA: 3.75× faster than fp32 (H200 reference: 77 vs 290 ms/step) "
                                 "with no visible loss; SDXL ships an fp16 variant")
    else:
        dtype, why = "float16", "fp16 on Apple MPS"
    # The SDXL VAE overflows in fp16 (NaN/black images): decode it in fp32. bf16 keeps fp32's exponent range,
    # so a bf16 VAE does not overflow (measured difference to fp32 is small, see README).
    vae_dtype = "float32" if dtype == "float16" else dtype
    if vae_dtype != dtype:
        why += "; VAE decoded in fp32 (the SDXL VAE overflows in fp16)"
    return dtype, vae_dtype, why, warnings


# ---------------------------------------------------------------- the units

class Device(Unit):
    key, rows = "device", ("device",)
    fields = {"device": REQUIRED}
    decide_at, apply_at, row_at = 10, 20, 10

    def decide(self, ctx):
        ctx.values["device"], ctx.reasons["device"] = plan_device(ctx.probe, ctx.settings)

    def apply(self, plan, models):
        for pipe in pipes(models):
            if plan.offload == "none" and pipe.device.type != plan.device and not offload_kind(pipe):
                pipe.to(plan.device)

    def expected(self, plan, probe):
        return [OptimizationRow("device", Status.ACTIVE, f"{plan.device} — {plan.reasons['device']}")]

    def live(self, live):
        return [OptimizationRow("device", Status.ACTIVE,
                                f"{live.execution.split(':')[0]} — {live.plan.reasons['device']}")]


class PrecisionUnit(Unit):
    key, rows = "dtype", ("precision",)
    fields = {"dtype": REQUIRED, "vae_dtype": REQUIRED}
    decide_at, row_at = 20, 20

    def decide(self, ctx):
        dtype, vae_dtype, ctx.reasons["dtype"], warnings = plan_dtype(ctx.probe, ctx.settings, ctx.device)
        ctx.values.update(dtype=dtype, vae_dtype=vae_dtype)
        ctx.warnings += warnings

    def evidence(self, plan):
        return {"precision": f"{SHORT_DTYPE[plan.dtype]} UNet/text encoders, {SHORT_DTYPE[plan.vae_dtype]} VAE"}

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
    """Opt-in int8 layers in the UNet(s) (``--precision int8``): linear layers and convolutions; never on by itself,
    because it changes the output."""

    key, rows = "int8", ("int8 layers",)
    fields = {"int8": False}
    decide_at, apply_at, row_at = 30, 30, 30

    def decide(self, ctx):
        gemm = ctx.probe.cpu.gemm_gflops
        if ctx.settings.precision is not Precision.INT8:
            ctx.values["int8"] = False
            offered = ctx.device == "cpu" and "int8" in gemm
            ctx.reasons["int8"] = ("opt-in only (--precision int8), because it changes the output"
                                   + (f"; this CPU's int8 GEMM: {gemm_line(gemm)}" if offered else ""))
            return
        if ctx.device != "cpu":
            raise PlanError(f"precision: 'int8' runs the UNet's layers on the CPU's int8 GEMM (VNNI/AMX); "
                            f"it is not offered on {ctx.device.upper()}: use --precision auto there")
        ctx.values["int8"] = True
        best_float = max((v for k, v in gemm.items() if k in ("fp32", "bf16", "fp16")), default=0.0)
        measured = f"measured: {gemm_line(gemm)}" if gemm else "not measured in this probe"
        ctx.reasons["int8"] = (f"on (--precision int8): the UNet's linear layers run int8 GEMMs (per-channel "
                               f"weight, per-token activation scales) and its convolutions oneDNN's int8 "
                               f"convolution (per-channel weight, per-tensor activation scales), other layers in "
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

        for pipe in pipes(models):
            int8.quantize_linears(pipe.unet, min_features=INT8_MIN_FEATURES)
            int8.quantize_convs(pipe.unet, min_channels=INT8_MIN_CHANNELS)

    def evidence(self, plan):
        return {"int8 layers": "linear layers int8"} if plan.int8 else {}

    def expected(self, plan, probe):
        return [planned_row("int8 layers", plan.int8, plan.reasons["int8"])]

    def live(self, live):
        from . import int8

        state = int8.state(live.base.unet)
        n = state.get("int8_layers", 0) if state.get("enabled") else 0
        convs = state.get("int8_convs", 0) if state.get("enabled") else 0
        detail = ""
        if n or convs:
            params = (state.get("params_int8", 0) + state.get("conv_params_int8", 0)) / 1e6
            detail = (f"{n} UNet linear layers int8, {convs} convolutions int8 ({params:.1f} M parameters"
                      + (f"; {state['fallbacks']} calls fell back to float" if state.get("fallbacks") else "")
                      + "); the output differs from the exact run")
        return [live_row("int8 layers", bool(n or convs), live.plan.int8, live.plan.reasons["int8"], detail)]


# ---------------------------------------------------------------- memory layout

CHANNELS_LAST_MIN_GAIN = 1.15  # the measured speed-up of the VAE's convolutions that makes the layout worth it


def decide_vae_layout(probe: HardwareProbe, device: str, vae_dtype: str) -> tuple[bool, str]:
    """(channels-last, reason) for the VAE from the probe's measured 3×3 convolutions at the VAE's shape in its
    dtype, in both layouts. oneDNN picks its kernel by the weights' layout; the values are the same either way."""
    if device != "cpu":
        return False, (f"measured on the CPU only: on {device.upper()} the VAE keeps PyTorch's default layout")
    d = SHORT_DTYPE.get(vae_dtype, vae_dtype)
    speeds = probe.cpu.op_speeds.get("vae conv", {})
    if d not in speeds or f"{d} cl" not in speeds:
        return False, f"the VAE's convolutions in {d} were not measured in this probe (doctor measures them)"
    gain = speeds[f"{d} cl"] / max(speeds[d], 1e-9)
    measured = (f"measured the VAE's 3×3 convolutions in {d}: {speeds[d]:g} GFLOP/s in the default layout, "
                f"{speeds[f'{d} cl']:g} channels-last ({gain:.2f}×)")
    if gain >= CHANNELS_LAST_MIN_GAIN:
        return True, f"{measured} → channels-last (the same values, faster kernels)"
    return False, f"{measured} → the default layout (channels-last is not ≥ {CHANNELS_LAST_MIN_GAIN:g}× faster here)"


def is_channels_last(module) -> bool:
    """Whether the module's 4-D weights are laid out channels-last (read from the live tensors)."""
    import torch

    weights = [p for p in module.parameters() if p.dim() == 4 and p.shape[1] > 1 and p.shape[2] * p.shape[3] > 1]
    return bool(weights) and all(p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
                                 for p in weights)


class VaeLayout(Unit):
    """The VAE (and the decoders beside it: the tiny decoder) in channels-last memory layout on a CPU where its
    convolutions were measured faster so (the Xeon with AMX: bf16 1024² decode 25.6 → 9.1 s, the tiny decoder's
    2.7 → 0.9 s, the picture unchanged)."""

    key, rows = "vae_channels_last", ("channels-last VAE",)
    fields = {"vae_channels_last": False}
    decide_at, apply_at, row_at = 25, 25, 25

    def decide(self, ctx):
        on, why = decide_vae_layout(ctx.probe, ctx.device, ctx.values["vae_dtype"])
        ctx.values["vae_channels_last"], ctx.reasons["vae_channels_last"] = on, why

    def apply(self, plan, models):
        import torch

        from . import hooks

        wanted = torch.channels_last if plan.vae_channels_last else torch.contiguous_format
        for pipe in pipes(models):  # the VAE and the decoders beside it (the tiny decoder: 2.7 → 0.9 s at 1024²)
            for module in (pipe.vae, *hooks.modules(pipe)):
                if is_channels_last(module) != plan.vae_channels_last:  # only a change converts (never on a GPU)
                    module.to(memory_format=wanted)

    def evidence(self, plan):
        return {"channels-last VAE": "channels-last"} if plan.vae_channels_last else {}

    def expected(self, plan, probe):
        return [planned_row("channels-last VAE", plan.vae_channels_last, plan.reasons["vae_channels_last"])]

    def live(self, live):
        from . import hooks

        on = is_channels_last(live.base.vae)
        beside = [m for m in hooks.modules(live.base) if is_channels_last(m) == on]
        state = ("the VAE's convolution weights channels-last" + (f", and {len(beside)} decoder(s) beside it"
                                                                  if beside else "")) if on else ""
        return [live_row("channels-last VAE", on, live.plan.vae_channels_last, live.plan.reasons["vae_channels_last"],
                         state)]


def gemm_line(gemm) -> str:
    units = {"int8": "GOP/s"}
    return ", ".join(f"{k} {v:g} {units.get(k, 'GFLOP/s')}" for k, v in gemm.items())


UNITS = (Device(), PrecisionUnit(), VaeLayout(), Int8())
