"""Pure planning: (hardware probe, settings, model, size) -> Plan, every decision with its reason.

No torch, no I/O: tests feed recorded probes (tests/probes/*.json) instead of patching torch.
Facts behind the rules are in ../shared/seed/NOTES.md and ../shared/PERFORMANCE-ANCHORS.md.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from .schema import HardwareProbe, Plan, parse_choice
from .settings import PRECISION_DTYPES, AppSettings, AttentionChoice, DeviceChoice, Precision, Toggle

# Exact parameter counts of the SDXL 1.0 components (PERFORMANCE-ANCHORS.md).
SDXL_PARAMS = {
    "unet": 2_567_463_684,
    "text_encoder": 123_060_480,
    "text_encoder_2": 694_659_840,
    "vae": 83_653_863,
}
SDXL_REFINER_UNET_PARAMS = 2_259_526_660
CPU_STEPS_FACTOR = 0.7  # the seed: 50 -> 35 on CPU
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
# Working memory on top of the weights, per megapixel, measured or derived:
# - GPU: H200 fp16 SDPA 1024² peak 10.0 GiB with 6.9 GB of weights -> ~3 GB (allocator, cuBLAS workspace,
#   fp32 VAE decode). A UNet step alone needs ~1.5 GB of that (SDPA never materialises the attention matrix).
# - CPU: bf16 activations of a guided step at 1024² stay under 1 GB with SDPA; the VAE decoder's
#   128-channel 1024² feature maps (0.5 GB each in fp32) dominate at the end.
GPU_WORK_GB_PER_MP = 3.0
GPU_STEP_GB_PER_MP = 1.5
CPU_STEP_GB_PER_MP_FP32 = 1.6
VAE_DECODE_GB_PER_MP_FP32 = 2.5
VAE_TILE_PX = 512  # tile edge for tiled decode (the SDXL VAE's own default, 1024, would never tile ≤ 1024²)
VAE_TILED_DECODE_GB_FP32 = 0.7  # 512² tiles, whatever the image size
RUNTIME_OVERHEAD_GB = 0.8  # python, torch, tokenizers, the app
OFFLOAD_MARGIN = 1.10


class PlanError(ValueError):
    """The settings cannot be honoured on this hardware; the message says why and what to do."""


@dataclass(frozen=True)
class MemoryEstimate:
    weights_gb: float
    refiner_gb: float
    step_gb: float  # one guided UNet step
    decode_gb: float  # the VAE decode
    overhead_gb: float  # runtime / allocator overhead on top of the larger of step and decode

    @property
    def total_gb(self) -> float:
        return round(self.weights_gb + self.refiner_gb + max(self.step_gb, self.decode_gb) + self.overhead_gb, 2)


def model_param_count(model_kind: str) -> tuple[int, int]:
    """(base pipeline parameters, extra refiner UNet parameters) for ``sdxl`` or ``tiny``."""
    if model_kind == "tiny":
        return 2_000_000, 1_000_000  # a few MB: never the limiting factor
    return sum(SDXL_PARAMS.values()), SDXL_REFINER_UNET_PARAMS


def estimate_memory(
    model_kind: str, dtype: str, vae_dtype: str, width: int, height: int, device: str, refiner: bool, tiled: bool
) -> MemoryEstimate:
    base, refiner_params = model_param_count(model_kind)
    b = DTYPE_BYTES[dtype]
    megapixels = width * height / 1024**2
    weights = base * b / 1e9
    if vae_dtype != dtype:
        weights += SDXL_PARAMS["vae"] * (DTYPE_BYTES[vae_dtype] - b) / 1e9 if model_kind != "tiny" else 0.0
    scale = 0.02 if model_kind == "tiny" else 1.0
    if device == "cpu":
        step = CPU_STEP_GB_PER_MP_FP32 * megapixels * b / 4 * scale
    else:
        step = GPU_STEP_GB_PER_MP * megapixels * b / 2 * scale
    vae_b = DTYPE_BYTES[vae_dtype]
    decode = (VAE_TILED_DECODE_GB_FP32 if tiled else VAE_DECODE_GB_PER_MP_FP32 * megapixels) * vae_b / 4 * scale
    refiner_gb = refiner_params * b / 1e9 if refiner else 0.0
    if device == "cuda":  # measured peak: weights + ~3 GB per megapixel (see GPU_WORK_GB_PER_MP)
        overhead = max(0.0, GPU_WORK_GB_PER_MP * megapixels * scale - max(step, decode))
    else:
        overhead = RUNTIME_OVERHEAD_GB
    return MemoryEstimate(round(weights, 2), round(refiner_gb, 2), round(step, 2), round(decode, 2),
                          round(overhead, 2))


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
    if "fp32" not in gemm:
        return None
    fp32 = gemm["fp32"]
    how = f"measured {probe.cpu.gemm_note or 'matmul'}: {_gemm_figures(gemm, ('fp32', 'bf16', 'fp16'))} GFLOP/s"
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


# ---------------------------------------------------------------- attention

MPS_SLICING_BROKEN = ("on Apple MPS sliced attention has produced broken images since torch 2.4 "
                      "(InvokeAI #7049, whose fix is to use SDPA there)")


def sdpa_backends_for(probe: HardwareProbe, device: str) -> str:
    """The SDPA backends the probe saw run on ``device`` itself (never another device's list)."""
    return ", ".join(probe.sdpa_backends.get(device, ())) or "untested on this device"


def _plan_attention(probe: HardwareProbe, settings: AppSettings, device: str, offload: str, est: "MemoryEstimate",
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
                            f"{probe.torch_version} (README: xformers), or use --attention auto (PyTorch SDPA)")
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


# ---------------------------------------------------------------- the whole plan

def make_plan(
    probe: HardwareProbe,
    settings: AppSettings,
    model_kind: str = "sdxl",
    width: int = 1024,
    height: int = 1024,
    high_quality: bool = True,
    feature_cache: Toggle = Toggle.AUTO,
    guidance_interval: Toggle = Toggle.AUTO,
) -> Plan:
    """Every optimization's decision, in the order of ``optimizations.table.UNITS`` (each reads only the ones
    before it); ``feature_cache`` and ``guidance_interval`` are the request's own switches (Advanced)."""
    from .optimizations.table import Decide, decide

    feature_cache = parse_choice(Toggle, "feature_cache", feature_cache)
    guidance_interval = parse_choice(Toggle, "guidance_interval", guidance_interval)
    ctx = decide(Decide(probe, settings, model_kind, width, height, high_quality, feature_cache, guidance_interval))
    v = ctx.values
    return Plan(
        device=v["device"], dtype=v["dtype"], vae_dtype=v["vae_dtype"], attention=v["attention"],
        attention_slicing=v["attention_slicing"], offload=v["offload"], vae_tiling=v["vae_tiling"],
        vae_slicing=v["vae_slicing"], steps_factor=v["steps_factor"], refiner=v["refiner"], threads=v["threads"],
        memory_needed_gb=v["memory_needed_gb"], memory_available_gb=v["memory_available_gb"],
        reasons=dict(ctx.reasons), compile=v["compile"], int8=v["int8"], feature_cache=v["feature_cache"],
        guidance_interval=tuple(v["guidance_interval"]), warnings=tuple(ctx.warnings),
    )


def adjust_plan(loaded: Plan, request_plan: Plan) -> Plan:
    """The plan for one request: device, dtypes, int8, offload and threads stay as loaded (the weights are already
    placed); size- and quality-dependent choices (refiner use, VAE tiling, attention slicing, feature cache,
    guidance interval) come from the request's own plan. A refiner that was not loaded stays off."""
    reasons = dict(loaded.reasons)
    for key in ("refiner", "vae_tiling", "memory", "feature_cache", "guidance_interval"):
        reasons[key] = request_plan.reasons[key]
    # Attention is one choice: the request's, except that an xformers plan stays xformers (its kernel already
    # avoids the full attention matrix, so slicing would add nothing but time).
    attention_from = loaded if loaded.attention == "xformers" else request_plan
    for key in ("attention", "attention_slicing"):
        reasons[key] = attention_from.reasons[key]
    return replace(
        loaded,
        refiner=request_plan.refiner and loaded.refiner,
        vae_tiling=request_plan.vae_tiling,
        attention=attention_from.attention,
        attention_slicing=attention_from.attention == "sliced",
        memory_needed_gb=request_plan.memory_needed_gb,
        feature_cache=request_plan.feature_cache,
        guidance_interval=request_plan.guidance_interval,
        reasons=reasons,
    )
