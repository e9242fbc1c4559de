"""Pure planning: (hardware probe, settings, model, size) -> Plan, every decision with its reason.

No torch, no I/O: tests feed recorded probes (tests/probes/*.json) instead of patching torch.
Facts behind the rules are in ../shared/seed/NOTES.md and ../shared/PERFORMANCE-ANCHORS.md.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from .schema import HardwareProbe, Plan
from .settings import PRECISION_DTYPES, AppSettings, AttentionChoice, DeviceChoice, OffloadChoice, Precision, Toggle

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

def plan_dtype(probe: HardwareProbe, settings: AppSettings, device: str) -> tuple[str, str, str]:
    """(dtype, vae_dtype, reason)."""
    if settings.precision is not Precision.AUTO:
        dtype = PRECISION_DTYPES[settings.precision]
        why = f"forced by --precision {settings.precision.value}"
        if device == "cpu" and dtype == "float16":
            why += " (fp16 on CPU has few fast kernels and is usually slower than fp32)"
        if device == "cpu" and dtype == "bfloat16" and not probe.cpu.has_fast_bf16:
            why += " (this CPU has neither avx512_bf16 nor AMX: bf16 is emulated and slow)"
    elif device == "cpu":
        if probe.cpu.has_fast_bf16:
            found = [f for f in ("avx512_bf16", "amx_bf16") if f in probe.cpu.flags]
            dtype, why = "bfloat16", (f"CPU has {' and '.join(found)}: bf16 weights and inputs run the SDXL UNet "
                                      "~2× faster than fp32 (`bench` on a 2-core EPYC: 18.5 → 9.2 s per guided 512² step; "
                                      "the gain is the CPU's bf16/fp32 GEMM ratio, 2–3.2× on AVX512-BF16)")
        else:
            dtype, why = "float32", "CPU has neither avx512_bf16 nor AMX: bf16 would be emulated, fp32 is fastest"
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
    return dtype, vae_dtype, why


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
) -> Plan:
    reasons: dict[str, str] = {}
    device, reasons["device"] = plan_device(probe, settings)
    dtype, vae_dtype, reasons["dtype"] = plan_dtype(probe, settings, device)
    has_refiner = settings.refiner_source is not None

    # Memory available for the models on the chosen device.
    if device == "cuda":
        available = probe.cuda.vram_free_gb or probe.cuda.vram_total_gb or 0.0
        where = f"{available:.1f} GB VRAM free"
    else:  # CPU and MPS (unified memory) use system RAM
        available = probe.cpu.ram_available_gb
        where = f"{available:.1f} GB RAM available"
    px = f"{width}×{height}"

    # Refiner: on for high quality on a GPU with room; never by default on CPU.
    want_refiner, refiner_why = False, ""
    if not has_refiner:
        refiner_why = "no refiner configured (--refiner none, or a custom base model without --refiner)"
    elif settings.use_refiner is Toggle.ON:
        want_refiner, refiner_why = True, "forced on by --use-refiner on"
    elif settings.use_refiner is Toggle.OFF:
        refiner_why = "turned off by --use-refiner off"
    elif not high_quality:
        refiner_why = "Fast quality uses the base model only"
    elif device == "cpu":
        refiner_why = ("DISABLED (CPU mode): the refiner is a second UNet (SDXL's: 2.3 B parameters); on CPU it "
                       "adds minutes per image")
    else:
        # On CUDA the offload decision below makes room (model offload moves one UNet at a time); on MPS the
        # models share system RAM, so base + refiner must fit.
        need = 0.0 if device == "cuda" else estimate_memory(
            model_kind, dtype, vae_dtype, width, height, device, True, False).total_gb
        if need <= available:
            want_refiner, refiner_why = True, f"high quality on {device.upper()}: base to 0.8, refiner from 0.8"
        else:
            refiner_why = f"off: base + refiner need ~{need:.1f} GB, {where}"

    # VAE tiling: large images or tight memory.
    tiled = False
    if settings.vae_tiling is Toggle.ON:
        tiled, reasons["vae_tiling"] = True, "forced on by --vae-tiling on"
    elif settings.vae_tiling is Toggle.OFF:
        reasons["vae_tiling"] = "turned off by --vae-tiling off"
    else:
        full = estimate_memory(model_kind, dtype, vae_dtype, width, height, device, want_refiner, False)
        if width * height > 1536 * 1536:
            tiled, reasons["vae_tiling"] = True, f"{px} is above 1536²: tiles keep the decode's memory flat"
        elif device != "cuda" and full.total_gb > available:
            tiled, reasons["vae_tiling"] = True, f"decode at {px} needs ~{full.decode_gb:.1f} GB, {where}"
        else:
            reasons["vae_tiling"] = f"not needed at {px}: decode needs ~{full.decode_gb:.1f} GB, {where}"
    est = estimate_memory(model_kind, dtype, vae_dtype, width, height, device, want_refiner, tiled)

    # Offload (CUDA only): thresholds from the estimate, not from the seed's "20 GB" rule.
    offload = "none"
    if device != "cuda":
        reasons["offload"] = f"{device.upper()}: the models already live in system memory"
        if settings.offload in (OffloadChoice.MODEL, OffloadChoice.SEQUENTIAL):
            reasons["offload"] += f"; --offload {settings.offload.value} ignored"
    elif settings.offload is not OffloadChoice.AUTO:
        offload, reasons["offload"] = settings.offload.value, f"forced by --offload {settings.offload.value}"
    else:
        full_need = est.total_gb
        biggest = (SDXL_PARAMS["unet"] if model_kind != "tiny" else 1e6) * DTYPE_BYTES[dtype] / 1e9
        model_need = biggest + est.step_gb + 0.5
        if full_need * OFFLOAD_MARGIN <= available:
            reasons["offload"] = f"none: everything fits (~{full_need:.1f} GB needed, {where})"
        elif model_need <= available:
            offload = "model"
            reasons["offload"] = (f"model offload: all models need ~{full_need:.1f} GB, {where}; one model at a "
                                  f"time needs ~{model_need:.1f} GB")
        else:
            offload = "sequential"
            reasons["offload"] = (f"sequential offload (slowest): even the UNet alone needs ~{model_need:.1f} GB, "
                                  f"{where}")

    # Attention: one closed choice (sdpa | xformers | sliced), so no plan pairs two of them. PyTorch SDPA by
    # default; xformers only where its CUDA kernels ran; slicing only for memory, and never chosen on Apple MPS.
    attention, reasons["attention"], reasons["attention_slicing"] = _plan_attention(
        probe, settings, device, offload, est, available, where)

    # Refuse with numbers when even the weights cannot fit.
    if device != "cuda" and est.weights_gb + est.refiner_gb + est.overhead_gb > available:
        raise PlanError(
            f"memory: the model needs ~{est.weights_gb + est.refiner_gb + est.overhead_gb:.1f} GB "
            f"({dtype} weights{' + refiner' if want_refiner else ''}), {where}; try closing other programs, "
            f"{'--use-refiner off, ' if want_refiner else ''}"
            f"{'--precision bf16, ' if dtype == 'float32' else ''}or --model tiny to test the app"
        )

    reasons["refiner"] = refiner_why
    if device == "cpu":
        steps_factor = CPU_STEPS_FACTOR
        reasons["steps_factor"] = "CPU: steps × 0.7 (the seed's policy, e.g. 50 → 35)"
        threads = settings.threads or probe.cpu.physical_cores
        reasons["threads"] = (f"forced to {threads}" if settings.threads
                              else f"{threads} = physical cores (SMT siblings share the same AVX-512 units)")
    else:
        steps_factor, threads = 1.0, None
        reasons["steps_factor"] = f"{device.upper()}: steps as requested"
        reasons["threads"] = "torch default (the GPU does the work)"
    reasons["vae_slicing"] = "one image per pipeline call: nothing to slice"
    if settings.compile:
        reasons["compile"] = ("on (--compile): the first step compiles for minutes (H200: 159 s), later steps are "
                              "faster (H200: 77 → 56 ms; this CPU: −7 %)")
    else:
        reasons["compile"] = ("off: the first call compiles for minutes and gains 7 % on CPU, ~27 % on an H200; "
                              "use --compile for long-running servers")
    reasons["memory"] = (f"~{est.total_gb:.1f} GB needed (weights {est.weights_gb:.1f}, refiner {est.refiner_gb:.1f}, "
                         f"step {est.step_gb:.1f}, decode {est.decode_gb:.1f}, overhead {est.overhead_gb:.1f}), "
                         f"{where}")
    return Plan(
        device=device,
        dtype=dtype,
        vae_dtype=vae_dtype,
        attention=attention,
        attention_slicing=attention == "sliced",
        offload=offload,
        vae_tiling=tiled,
        vae_slicing=False,
        steps_factor=steps_factor,
        refiner=want_refiner,
        threads=threads,
        memory_needed_gb=round(est.total_gb, 2),
        memory_available_gb=available,
        reasons=reasons,
        compile=settings.compile,
    )


def adjust_plan(loaded: Plan, request_plan: Plan) -> Plan:
    """The plan for one request: device, dtypes, offload and threads stay as loaded (the weights are already
    placed); size- and quality-dependent choices (refiner use, VAE tiling, attention slicing) come from the
    request's own plan. A refiner that was not loaded stays off."""
    reasons = dict(loaded.reasons)
    for key in ("refiner", "vae_tiling", "memory"):
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
        reasons=reasons,
    )
