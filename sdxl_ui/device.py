"""probe_hardware(): the only code that asks torch and the OS about hardware (style rule 2).

`torch.cuda.is_available()` only says a driver and a device exist. A new GPU (e.g. an RTX 5090, sm_120)
on a torch build without kernels for it reports available and then fails on the first real op with
"no kernel image is available for execution on the device". So the probe runs a small matmul and conv
on the device and records the outcome; the policy decides from that, never from `is_available()` alone.
"""
from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import platform
from pathlib import Path

from .schema import CpuInfo, CudaInfo, HardwareProbe, MpsInfo, XformersInfo
from .settings import cache_root

log = logging.getLogger(__name__)

INTERESTING_CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "avx512_vnni", "amx_bf16", "amx_fp16",
                         "amx_tile", "amx_int8")


FORCED_DTYPE_ENV = "SDXL_UI_CPU_DTYPE"
FORCED_DTYPES = ("fp32", "bf16", "fp16")


def forced_cpu_dtype(env=None) -> str:
    """``SDXL_UI_CPU_DTYPE``: the exact dtype the plan takes on this CPU instead of the measured fastest one
    (fp32, bf16 or fp16; unset or empty: by measurement). CI runs the suite under fp32 and bf16 this way, so a
    bf16 host also catches what fails on an fp32-plan host and the reverse."""
    from .schema import ValidationError

    value = (os.environ if env is None else env).get(FORCED_DTYPE_ENV, "").strip().lower()
    if value and value not in FORCED_DTYPES:
        raise ValidationError(FORCED_DTYPE_ENV, value, f"must be one of {', '.join(FORCED_DTYPES)} or empty")
    return value


def _gb(n_bytes: float) -> float:
    return round(n_bytes / 1024**3, 2)


def _cpu_info(torch=None) -> CpuInfo:
    import psutil

    model, flags = platform.processor() or "unknown", set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name":
                    model = value.strip()
                elif key == "flags" and not flags:
                    flags = set(value.split())
    except OSError:  # macOS / Windows: no /proc; Apple silicon has no AVX anyway
        pass
    memory = psutil.virtual_memory()
    logical = os.cpu_count() or 1
    gemm, note = _gemm_speeds(torch) if torch is not None else ({}, "")
    ops, op_note = op_speeds(torch, model) if torch is not None else ({}, "")
    return CpuInfo(
        forced_dtype=forced_cpu_dtype(),
        physical_cores=psutil.cpu_count(logical=False) or logical,
        logical_cores=logical,
        model_name=model,
        flags=tuple(f for f in INTERESTING_CPU_FLAGS if f in flags),
        ram_total_gb=_gb(memory.total),
        ram_available_gb=_gb(memory.available),
        gemm_gflops=gemm,
        gemm_note=note,
        op_speeds=ops,
        op_note=op_note,
    )


GEMM_N = 512  # fp16 on most CPUs runs at ~1 % of fp32: it gets a smaller matrix so the probe stays short
GEMM_DTYPES = (("fp32", "float32", GEMM_N), ("bf16", "bfloat16", GEMM_N), ("fp16", "float16", 128))


def _gemm_speeds(torch, rounds: int = 7) -> tuple[dict[str, float], str]:
    """GFLOP/s of a short square matmul per float dtype, and GOP/s of ``torch._int_mm`` (int8 → int32), on the
    CPU with torch's current thread count. Measured, not inferred from CPU flags: a dtype without hardware
    support is emulated (bf16 without AVX512-BF16/AMX at ~20 % of fp32, fp16 at ~1 %). The dtypes take turns
    for ``rounds`` rounds and each keeps its best time, so a moment of load from another program does not
    decide between them. About 0.1 s in all."""
    import time

    g = torch.Generator().manual_seed(0)
    ops = {}
    for short, name, n in GEMM_DTYPES:
        try:
            a = torch.randn(n, n, generator=g).to(getattr(torch, name))
            a @ a  # noqa: B018 - warm-up; a dtype this build cannot multiply is simply not offered
            ops[short] = (lambda a=a: a @ a, n)
        except Exception:  # noqa: BLE001
            continue
    try:
        q = torch.randint(-127, 127, (GEMM_N, GEMM_N), dtype=torch.int8, generator=g)
        torch._int_mm(q, q)
        ops["int8"] = (lambda q=q: torch._int_mm(q, q), GEMM_N)
    except Exception:  # noqa: BLE001 - no int8 GEMM in this torch build
        pass
    best = {k: float("inf") for k in ops}
    for _ in range(rounds):
        for key, (fn, _n) in ops.items():
            t = time.perf_counter()
            fn()
            best[key] = min(best[key], time.perf_counter() - t)
    out = {key: round(2 * n**3 / best[key] / 1e9, 1) for key, (_fn, n) in ops.items()}
    return out, f"{GEMM_N}² matmul (128² for fp16), {torch.get_num_threads()} threads, best of {rounds}"


# The operation classes of an SDXL image at 1024², each at one of its real shapes: (label, what, shape).
OP_CLASSES = {
    "linear": "attention projection, 4096 tokens × 640 → 640 (the UNet at 64²)",
    "conv": "3×3 convolution, 640 → 640 channels at 64² (the UNet)",
    "attention": "SDPA, 10 heads × 4096 tokens × 64 (the UNet at 64²)",
    "vae conv": "3×3 convolution, 256 → 256 channels at 128² (the VAE decoder)",
}
OP_ROUNDS = 2
EMULATED = 0.25  # a dtype under this share of fp32's speed at a case's small shape is emulated: not timed full size
OP_BUDGET_S = 60.0  # the whole measurement's ceiling; what is left when it runs out is not measured (the note says)
SLOW_CALL_S = 1.0  # a call this slow is timed once, not OP_ROUNDS more times


def op_cache_path(env=None) -> Path:
    """Where the operation speeds are kept: in the cache root (settings.cache_root: $SDXL_UI_CACHE_DIR, else
    $XDG_CACHE_HOME/sdxl_ui, else ~/.cache/sdxl_ui); one JSON file, keyed by CPU, flags, threads and torch version."""
    return cache_root(env) / "op-speeds.json"


def _op_key(torch, model: str) -> str:
    return f"{model} | {platform.machine()} | {torch.get_num_threads()} threads | torch {torch.__version__}"


def forget_op_speeds() -> bool:
    """Drop this machine's kept measurement (``doctor --remeasure``); True when there was one."""
    import torch

    path = op_cache_path()
    model = _cpu_model()
    try:
        kept = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    had = kept.pop(_op_key(torch, model), None) is not None
    _write_json(path, kept)
    return had


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _write_json(path: Path, data: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except OSError as exc:  # a read-only home: measured again next time, nothing else lost
        log.info("could not keep the operation speeds in %s: %s", path, exc)


def op_speeds(torch, model: str) -> tuple[dict, str]:
    """GFLOP/s per operation class and dtype (``OP_CLASSES``), read from the cache when this machine and torch
    measured them before, else measured (seconds, once; never past ``OP_BUDGET_S``) and kept."""
    import time as _time

    path, key = op_cache_path(), _op_key(torch, model)
    try:
        kept = json.loads(path.read_text())
    except (OSError, ValueError):  # none yet, or damaged: measured (again)
        kept = {}
    kept = kept if isinstance(kept, dict) else {}
    entry = kept.get(key)
    if isinstance(entry, dict) and isinstance(entry.get("speeds"), dict) and "note" in entry:
        return entry["speeds"], f"{entry['note']}; kept in {path} (doctor --remeasure to measure again)"

    speeds, left = _measure_ops(torch)
    note = (f"measured {_time.strftime('%Y-%m-%d')} at SDXL's 1024² shapes, {torch.get_num_threads()} threads, best "
            f"of {OP_ROUNDS}" + (f"; not measured: {', '.join(left)}" if left else ""))
    kept[key] = {"speeds": speeds, "note": note}
    _write_json(path, kept)
    return speeds, note


def _op_cases(torch, g) -> list:
    """The measured cases, (class, layout suffix, build); ``build(dtype, small)`` returns (call, flops) at the class's
    real shape (``OP_CLASSES``) or, ``small``, at about 1/16 of its work: the screen for an emulated kernel."""
    f = torch.nn.functional

    def linear(dt, small):
        tokens = 256 if small else 4096
        x, w = torch.randn(tokens, 640, generator=g).to(dt), torch.randn(640, 640, generator=g).to(dt)
        return (lambda: f.linear(x, w)), 2 * tokens * 640 * 640

    def attention(dt, small):
        tokens = 512 if small else 4096
        q = torch.randn(1, 10, tokens, 64, generator=g).to(dt)
        return (lambda: f.scaled_dot_product_attention(q, q, q)), 4 * 10 * tokens * tokens * 64

    def conv(channels, side, layout):
        def build(dt, small):
            s = side // 4 if small else side
            layer = torch.nn.Conv2d(channels, channels, 3, padding=1).to(dt)
            if layout:  # the weights' layout decides oneDNN's kernel
                layer.to(memory_format=torch.channels_last)
            image = torch.randn(1, channels, s, s, generator=g).to(dt)
            return (lambda: layer(image)), 2 * channels * channels * 9 * s * s
        return build

    return [("linear", "", linear), ("attention", "", attention),
            ("conv", "", conv(640, 64, False)), ("conv", " cl", conv(640, 64, True)),
            ("vae conv", "", conv(256, 128, False)), ("vae conv", " cl", conv(256, 128, True))]


def _best_rate(fn, flops: float, rounds: int, clock) -> float:
    """FLOP/s of ``fn``: one warm-up call, then the best of ``rounds`` — a call over ``SLOW_CALL_S`` is timed once."""
    t = clock()
    fn()
    took = clock() - t
    if took < SLOW_CALL_S:
        for _ in range(rounds):
            t = clock()
            fn()
            took = min(took, clock() - t)
    return flops / max(took, 1e-9)


def _measure_cases(cases, dtypes, clock, budget_s: float = OP_BUDGET_S) -> tuple[dict, list[str]]:
    """GFLOP/s per class and dtype (+ layout suffix), and what was not measured and why. fp32 is the reference; any
    other dtype is first timed at a case's small shape and left out there (emulated) when under ``EMULATED`` × fp32's
    rate at that shape, so a slow kernel costs a second, not minutes; past ``budget_s`` the rest is left out."""
    out: dict[str, dict[str, float]] = {}
    reference: dict[tuple[str, str], float] = {}
    left: list[str] = []
    started = clock()
    for d, dt in dtypes:
        for name, suffix, build in cases:
            label = f"{d}{suffix} {name}"
            if clock() - started > budget_s:
                left.append(f"{label} (the {budget_s:g} s budget ran out)")
                continue
            try:
                small = _best_rate(*build(dt, True), 1, clock)
                if d == "fp32":
                    reference[(name, suffix)] = small
                elif small < EMULATED * reference.get((name, suffix), 0.0):
                    left.append(f"{label} (emulated: {small / reference[(name, suffix)]:.0%} of fp32 at a small shape)")
                    continue
                out.setdefault(name, {})[f"{d}{suffix}"] = round(_best_rate(*build(dt, False), OP_ROUNDS, clock) / 1e9, 1)
            except Exception:  # noqa: BLE001 - a dtype this build cannot run is simply not offered
                continue
    return out, left


def _measure_ops(torch) -> tuple[dict, list[str]]:
    """The measurement itself: each class in fp32, bf16 and fp16 (a dtype whose short linear runs under ``EMULATED``
    × fp32 is left out whole), convolutions in both memory layouts, int8 linear by ``torch._int_mm``; returns the
    speeds and what was left out and why."""
    import time

    names = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    g = torch.Generator().manual_seed(0)
    cases = _op_cases(torch, g)
    dtypes = []
    with torch.inference_mode():
        reference = _best_rate(*cases[0][2](torch.float32, True), OP_ROUNDS, time.perf_counter)
        for d, dt in names.items():
            try:
                if d == "fp32" or _best_rate(*cases[0][2](dt, True), 1, time.perf_counter) >= EMULATED * reference:
                    dtypes.append((d, dt))
            except Exception:  # noqa: BLE001 - a dtype this build cannot multiply is not offered
                continue
        out, left = _measure_cases(cases, dtypes, time.perf_counter)
        out = {name: out.get(name, {}) for name in OP_CLASSES}
        try:
            a = torch.randint(-127, 127, (4096, 640), dtype=torch.int8, generator=g)
            b = torch.randint(-127, 127, (640, 640), dtype=torch.int8, generator=g)
            rate = _best_rate(lambda: torch._int_mm(a, b), 2 * 4096 * 640 * 640, OP_ROUNDS, time.perf_counter)
            out["linear"]["int8"] = round(rate / 1e9, 1)
        except Exception:  # noqa: BLE001 - no int8 GEMM in this build
            pass
    return out, left


def _kernel_smoke_test(torch, device: str) -> str | None:
    """Run a small matmul and conv on ``device`` and wait for them. Returns None or the error text."""
    try:
        a = torch.randn(64, 64, device=device, dtype=torch.float16 if device != "cpu" else torch.float32)
        b = (a @ a).float().sum()
        x = torch.randn(1, 4, 16, 16, device=device)
        w = torch.randn(8, 4, 3, 3, device=device)
        y = torch.nn.functional.conv2d(x, w, padding=1).sum()
        if device == "cuda":
            torch.cuda.synchronize()
        if not torch.isfinite(b + y):
            return "smoke test produced non-finite values"
        return None
    except Exception as exc:  # noqa: BLE001 - any failure means "do not use this device"
        return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"


def _sdpa_backends(torch, device: str) -> tuple[str, ...]:
    """Which scaled_dot_product_attention backends actually run on ``device`` (tested, not assumed)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dtype = torch.float32 if device == "cpu" else torch.float16
    q = torch.randn(1, 2, 64, 64, device=device, dtype=dtype)
    names = {
        SDPBackend.FLASH_ATTENTION: "flash",
        SDPBackend.EFFICIENT_ATTENTION: "mem_efficient",
        SDPBackend.CUDNN_ATTENTION: "cudnn",
        SDPBackend.MATH: "math",
    }
    working = []
    for backend, name in names.items():
        try:
            with sdpa_kernel([backend]):
                torch.nn.functional.scaled_dot_product_attention(q, q, q)
            if device == "cuda":
                torch.cuda.synchronize()  # a kernel that cannot run fails here, not at some later call
            working.append(name)
        except Exception:  # noqa: BLE001 - "not usable here" is the answer we want
            continue
    return tuple(working)


def _xformers_info(cuda_ok: bool, torch) -> XformersInfo:
    try:
        version = importlib.metadata.version("xformers")
    except importlib.metadata.PackageNotFoundError:
        return XformersInfo()
    if not cuda_ok:
        return XformersInfo(version=version)  # CUDA-only kernels: nothing to test here
    try:
        import xformers.ops

        q = torch.randn(1, 64, 2, 64, device="cuda", dtype=torch.float16)
        xformers.ops.memory_efficient_attention(q, q, q)
        torch.cuda.synchronize()
        return XformersInfo(version=version, kernel_ok=True)
    except Exception as exc:  # noqa: BLE001 - an installed xformers is not a working xformers
        return XformersInfo(version=version, kernel_ok=False, kernel_error=f"{type(exc).__name__}: {exc}"[:300])


def _cuda_info(torch) -> CudaInfo:
    if not torch.cuda.is_available():
        return CudaInfo(available=False, version=torch.version.cuda)
    props = torch.cuda.get_device_properties(0)
    error = _kernel_smoke_test(torch, "cuda")
    free = total = None
    try:
        free, total = torch.cuda.mem_get_info(0)
    except Exception:  # noqa: BLE001 - a device without kernels may fail here too
        total = props.total_memory
    return CudaInfo(
        available=True,
        version=torch.version.cuda,
        device_name=props.name,
        capability=(props.major, props.minor),
        arch_list=tuple(torch.cuda.get_arch_list()),
        kernel_ok=error is None,
        kernel_error=error,
        vram_total_gb=_gb(total) if total else None,
        vram_free_gb=_gb(free) if free else None,
    )


def probe_hardware() -> HardwareProbe:
    """Look at the machine once. Takes well under a second on CPU; a GPU adds its kernel tests."""
    import torch

    cuda = _cuda_info(torch)
    mps_ok = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    sdpa = {"cpu": _sdpa_backends(torch, "cpu")}
    if cuda.kernel_ok:
        sdpa["cuda"] = _sdpa_backends(torch, "cuda")
    if mps_ok:  # each device's SDPA row is built from that device's own test, never from the CPU's
        sdpa["mps"] = _sdpa_backends(torch, "mps")
    return HardwareProbe(
        torch_version=torch.__version__,
        cuda=cuda,
        mps=MpsInfo(available=mps_ok),
        cpu=_cpu_info(torch),
        xformers=_xformers_info(bool(cuda.kernel_ok), torch),
        sdpa_backends=sdpa,
        os=f"{platform.system()} {platform.release()} ({platform.machine()})",
    )
