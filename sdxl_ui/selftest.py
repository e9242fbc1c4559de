"""`python -m sdxl_ui selftest`: every configuration the planner can choose on this device, built, run for a few
steps through the service's own path, and checked. On a GPU it is the one command that shows a machine works; on
CPU it runs the CPU configurations and is part of the test suite.

Each configuration (numbered steps, in order):
1. build the model (``--arch tiny``: the demo architecture at toy width; ``full``: the SDXL 1.0 architecture with
   random weights, no download) and a GenerationService whose settings ask for this configuration;
2. one warm-up run (first-call allocations, cuBLAS workspaces, torch.compile's compilation);
3. the measured run: memory before, peak memory, memory after (after garbage collection);
4. the checks: every latent the VAE decodes and every decoded tile is finite, the image is not constant, the
   report read back from the live pipeline (in the result and in the status panel) matches the configuration,
   memory returns to its level before the run, under offload every model is back off the accelerator, and for
   "Stop": the stopped run ends as cancelled within a step and a new run succeeds.
It prints a table (configuration, result, seconds, peak memory) and exits 1 if any configuration failed.
"""
from __future__ import annotations

import gc
import json
import logging
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from .schema import ErrorKind, HardwareProbe

log = logging.getLogger(__name__)

PROMPT = "a red fox in the snow, golden hour"
MEMORY_SLACK_GB = {"cuda": 0.064, "mps": 0.064, "cpu": 0.064}  # allocator/workspace noise after gc
CPU_MEMORY_SLACK_FRACTION = 0.05  # RSS also moves with malloc arenas and library caches
STOP_AT_STEP = 2


@dataclass(frozen=True)
class Configuration:
    key: str
    name: str
    settings: dict  # AppSettings overrides that ask the planner for this configuration
    devices: tuple[str, ...]  # where the planner can choose it
    steps: int = 4
    stop: bool = False
    tiles: bool = False  # the image must be larger than one VAE tile
    note: str = ""  # why it is not offered elsewhere
    request: dict = field(default_factory=dict)  # GenerationRequest fields (e.g. the Fast preset)


CONFIGURATIONS: tuple[Configuration, ...] = (
    Configuration("fp16", "fp16 UNet + fp32 VAE decode, SDPA", {"precision": "fp16"}, ("cuda", "mps"),
                  note="the GPU plan (fp16 has few fast CPU kernels)"),
    Configuration("bf16", "bf16 + SDPA", {"precision": "bf16"}, ("cuda", "cpu"),
                  note="MPS plans fp16"),
    Configuration("fp32", "fp32 + SDPA", {"precision": "fp32"}, ("cpu",),
                  note="the plan for CPUs without AVX512-BF16/AMX; GPUs use fp16"),
    Configuration("sliced", "sliced attention", {"attention": "sliced"}, ("cuda", "cpu"),
                  note="never chosen on Apple MPS (InvokeAI #7049)"),
    Configuration("refiner", "two-stage refiner", {"use_refiner": "on"}, ("cuda", "mps", "cpu")),
    Configuration("offload-model", "model offload + refiner", {"offload": "model", "use_refiner": "on"}, ("cuda",),
                  note="CUDA only: elsewhere the models live in system memory"),
    Configuration("offload-sequential", "sequential offload", {"offload": "sequential"}, ("cuda",),
                  note="CUDA only"),
    Configuration("vae-tiling", "VAE tiling", {"vae_tiling": "on"}, ("cuda", "mps", "cpu"), tiles=True),
    Configuration("xformers", "xformers attention", {"attention": "xformers"}, ("cuda",),
                  note="CUDA-only kernels"),
    Configuration("fast", "Fast: feature cache + guidance interval", {}, ("cuda", "mps", "cpu"), steps=6,
                  request={"quality": "fast"}),
    Configuration("int8", "int8 layers (opt-in)", {"precision": "int8"}, ("cpu",),
                  note="CPU only (torch._int_mm on VNNI/AMX-INT8)"),
    Configuration("compile", "torch.compile UNet", {"compile": True}, ("cuda", "mps", "cpu"), steps=3),
    Configuration("stop", "Stop mid-run, then a new run", {}, ("cuda", "mps", "cpu"), steps=10, stop=True),
)
# On CUDA, Stop runs under model offload with the refiner: the case where a stopped run used to leave a UNet on
# the GPU (issue 13).
STOP_SETTINGS_CUDA = {"offload": "model", "use_refiner": "on"}


@dataclass
class Outcome:
    key: str
    name: str
    result: str  # "pass" | "fail" | "n/a" | "skipped"
    seconds: float = 0.0
    peak_gb: float | None = None
    before_gb: float | None = None
    after_gb: float | None = None
    problems: list[str] = field(default_factory=list)
    note: str = ""

    def to_dict(self) -> dict:
        return {"configuration": self.name, "key": self.key, "result": self.result, "seconds": round(self.seconds, 2),
                "peak_memory_gb": _round(self.peak_gb), "memory_before_gb": _round(self.before_gb),
                "memory_after_gb": _round(self.after_gb), "problems": self.problems, "note": self.note}


def _round(value):
    return None if value is None else round(value, 3)


def applicable(config: Configuration, probe: HardwareProbe, device: str) -> tuple[bool, str]:
    """(runs here, why not). A pure function of the probe, like the planner."""
    if device not in config.devices:
        return False, f"not offered on {device.upper()}: {config.note}".rstrip(": ")
    if config.key == "xformers":
        xf = probe.xformers
        if not xf.version:
            return False, "xformers is not installed (optional: requirements-xformers.txt)"
        if not xf.kernel_ok:
            return False, f"xformers {xf.version} is installed but its kernel did not run: {xf.kernel_error}"
    return True, ""


def settings_for(config: Configuration, device: str, model: str, outputs: Path):
    from .settings import AppSettings

    overrides = {"use_refiner": "off", **config.settings}
    if config.stop and device == "cuda":
        overrides.update(STOP_SETTINGS_CUDA)
    return AppSettings(model=model, refiner="tiny" if model == "tiny" else "selftest", device=device,
                       outputs=outputs, **overrides)


# ---------------------------------------------------------------- memory (measurements, not hardware decisions)

def _memory_gb(torch, device: str) -> float | None:
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        return torch.cuda.memory_allocated() / 1e9
    if device == "mps":
        torch.mps.synchronize()
        torch.mps.empty_cache()
        return torch.mps.current_allocated_memory() / 1e9
    import psutil

    return psutil.Process().memory_info().rss / 1e9


def _reset_peak(torch, device: str) -> None:
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    elif device == "cpu":
        try:  # Linux: "5" resets the peak RSS (VmHWM) of this process
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass


def _peak_gb(torch, device: str) -> float | None:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 1e9
    if device == "mps":
        return torch.mps.driver_allocated_memory() / 1e9  # no peak counter on MPS: what the driver holds now
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e9
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # lifetime peak (KiB on Linux)


# ---------------------------------------------------------------- models

def full_loader(build_device: str):
    """A loader for GenerationService: the full SDXL 1.0 architecture, random weights, built in its dtype."""
    def load(source, refiner_spec, dtype, vae_dtype, want_refiner, *_):
        import torch

        from .assembly import build_full
        from .models import LoadedModels

        start = time.perf_counter()
        base, refiner = build_full(torch, getattr(torch, dtype), build_device, with_refiner=want_refiner)
        if vae_dtype != dtype:
            torch.nn.Module.to(base.vae, dtype=getattr(torch, vae_dtype))
        for pipe in (base, refiner):
            if pipe is not None:
                pipe.set_progress_bar_config(disable=True)
        return LoadedModels(base=base, refiner=refiner, source=source, load_s=time.perf_counter() - start)
    return load


def _service(config, device, arch, probe, outputs):
    from .models import ModelSource
    from .service import GenerationService

    settings = settings_for(config, device, "tiny" if arch == "tiny" else "selftest-sdxl-random", outputs)
    if arch == "tiny":
        return GenerationService(settings, probe=probe)
    offloaded = settings.offload.value in ("model", "sequential")
    return GenerationService(settings, probe=probe, source=ModelSource("selftest", "sdxl-architecture-random"),
                             loader=full_loader("cpu" if offloaded else device))


# ---------------------------------------------------------------- one configuration

class _Watch:
    """Forward hooks on the VAE decoder: every latent it decodes and every tile it returns must be finite."""

    def __init__(self, models):
        self.calls = 0
        self.non_finite: list[str] = []
        decoder = models.base.vae.decoder
        self.handles = [decoder.register_forward_pre_hook(self._pre), decoder.register_forward_hook(self._post)]

    def _pre(self, module, args):
        import torch

        if not torch.isfinite(args[0]).all():
            self.non_finite.append("latents entering the VAE decoder")

    def _post(self, module, args, output):
        import torch

        self.calls += 1
        if not torch.isfinite(output).all():
            self.non_finite.append(f"VAE decoder output (call {self.calls})")

    def close(self):
        for handle in self.handles:
            handle.remove()


def _expected_rows(plan, probe) -> dict[str, tuple[str, str | None]]:
    """Row name -> (status, text the detail must contain), from the units themselves: the status each unit plans
    for this plan (what ``doctor`` prints) and the evidence each must show after a run (``Unit.evidence``)."""
    from .optimizations.registry import ROW_ORDER
    from .optimize import expected_report

    rows: dict[str, tuple[str, str | None]] = {
        row.name: (row.status.value, None) for row in expected_report(plan, probe).rows}
    for unit in ROW_ORDER:
        for name, text in unit.evidence(plan).items():
            rows[name] = (rows[name][0], text)
    return rows


def _check_report(report, plan, probe, where: str) -> list[str]:
    problems = []
    rows = {row.name: row for row in report.rows}
    for name, (status, text) in _expected_rows(plan, probe).items():
        row = rows.get(name)
        if row is None:
            problems.append(f"{where}: no '{name}' row")
        elif row.status.value != status or (text and text not in row.detail):
            problems.append(f"{where}: '{name}' is {row.status.value} ({row.detail[:120]}), expected {status}"
                            + (f" with '{text}'" if text else ""))
    problems += [f"{where}: '{row.name}' departs from the plan ({row.detail[:120]})"
                 for row in report.rows if "not as planned" in row.detail]
    return problems


def _models_off_accelerator(models) -> list[str]:
    """Under offload, between runs no weight may stay on the accelerator."""
    bad = []
    for pipe in (models.base, models.refiner):
        if pipe is None:
            continue
        for name, module in pipe.components.items():
            if hasattr(module, "parameters") and any(p.device.type not in ("cpu", "meta") for p in module.parameters()):
                bad.append(name)
    return sorted(set(bad))


def _run(service, request, cancel=None):
    from .jobs import collect

    got = collect(service.generate(request, cancel=cancel))
    return got.results, got.errors, got.last_step


def _stop_mid_run(service, models, request) -> list[str]:
    """The user presses Stop while the UNet computes step STOP_AT_STEP (a hook in the worker thread, so the moment
    is exact); the service must end the run at that step's callback. Returns the problems."""
    from .service import CancelToken

    token, unet_calls = CancelToken(), []

    def press_stop(*_):
        unet_calls.append(1)
        if len(unet_calls) == STOP_AT_STEP:
            token.cancel()

    handle = models.base.unet.register_forward_hook(press_stop)
    try:
        stopped, errors, last = _run(service, request, cancel=token)
    finally:
        handle.remove()
    if stopped or [e.kind for e in errors] != [ErrorKind.CANCELLED]:
        return [f"Stop: expected a cancelled run, got {len(stopped)} image(s), {[e.message for e in errors]}"]
    if len(unet_calls) != STOP_AT_STEP or last != STOP_AT_STEP:
        return [f"Stop during step {STOP_AT_STEP}: the UNet ran {len(unet_calls)} steps, "
                f"progress reached step {last}"]
    return []


def run_configuration(config: Configuration, device: str, arch: str, res: int, probe: HardwareProbe,
                      outputs: Path) -> Outcome:
    import numpy as np
    import torch

    from .policy import VAE_TILE_PX
    from .schema import GenerationRequest

    out = Outcome(config.key, config.name, "fail")
    start = time.perf_counter()
    service = models = watch = None
    side = max(res, VAE_TILE_PX + 128) if config.tiles else res
    request = GenerationRequest(prompt=PROMPT, steps=config.steps, width=side, height=side, seed=7, **config.request)
    try:
        service = _service(config, device, arch, probe, outputs)
        models, _ = service.ensure_loaded()
        # 2. warm-up (not measured)
        results, errors, _ = _run(service, request)
        if errors or not results:
            out.problems.append(f"warm-up run: {errors[0].message if errors else 'no image'}")
            return out
        # 3. the measured run
        watch = _Watch(models)
        out.before_gb = _memory_gb(torch, device)
        _reset_peak(torch, device)
        if config.stop:
            out.problems += _stop_mid_run(service, models, request)
            out.after_gb = _memory_gb(torch, device)
            watch.calls = 0
        results, errors, _ = _run(service, request)
        out.peak_gb = _peak_gb(torch, device)
        if not config.stop:
            out.after_gb = _memory_gb(torch, device)
        # 4. checks
        if errors or not results:
            out.problems.append(f"run{' after Stop' if config.stop else ''}: "
                                f"{errors[0].message if errors else 'no image'}")
            return out
        result = results[0]
        out.problems += watch.non_finite
        pixels = np.asarray(result.image, dtype=np.float32)
        if not np.isfinite(pixels).all() or pixels.std() < 1.0:
            out.problems.append(f"image is constant (std {pixels.std():.2f} of 255)")
        if config.tiles and watch.calls < 2:
            out.problems.append(f"VAE tiling on, but a {side}² image decoded in {watch.calls} piece(s)")
        applied = service.applied_plan or service.plan
        out.problems += _check_report(result.report, applied, probe, "report")
        out.problems += _check_report(service.current_report(), applied, probe, "status panel")
        slack = MEMORY_SLACK_GB[device] + (CPU_MEMORY_SLACK_FRACTION * out.before_gb if device == "cpu" else 0)
        if out.after_gb - out.before_gb > slack:
            out.problems.append(f"memory did not return: {out.before_gb:.3f} GB before, {out.after_gb:.3f} GB "
                                f"after{' the Stop' if config.stop else ''}")
        if applied.offload != "none" and (left := _models_off_accelerator(models)):
            out.problems.append(f"{applied.offload} offload left {', '.join(left)} on the {device.upper()}")
        out.note = (f"{applied.dtype}/{applied.vae_dtype}, attention {applied.attention}, offload {applied.offload}"
                    f"{', refiner' if applied.refiner else ''}{', VAE tiles' if applied.vae_tiling else ''}"
                    f"{', compiled' if applied.compile else ''}; {side}², {result.steps_run} steps")
    except Exception as exc:  # noqa: BLE001 - a configuration that cannot even run is a failure, with its reason
        log.debug("selftest %s", config.key, exc_info=True)
        out.problems.append(f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}")
    finally:
        if watch is not None:
            watch.close()
        out.seconds = time.perf_counter() - start
        out.result = "fail" if out.problems else "pass"
        del service, models
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    return out


# ---------------------------------------------------------------- the command

def device_label(probe: HardwareProbe, device: str) -> str:
    if device == "cuda":
        c = probe.cuda
        return f"{c.device_name} ({c.sm}, {c.vram_total_gb} GB), torch {probe.torch_version}"
    if device == "mps":
        return f"Apple MPS ({probe.cpu.model_name}), torch {probe.torch_version}"
    c = probe.cpu
    bf16 = [f for f in ("avx512_bf16", "amx_bf16") if f in c.flags]
    return (f"{c.model_name} ({c.physical_cores} cores{', ' + ', '.join(bf16) if bf16 else ', no BF16'}), "
            f"torch {probe.torch_version}")


def format_table(outcomes: list[Outcome]) -> str:
    lines = [f"{'configuration':<38} {'result':<6} {'seconds':>8} {'peak memory':>12}  notes"]
    for o in outcomes:
        peak = f"{o.peak_gb:.2f} GB" if o.peak_gb is not None else "—"
        note = "; ".join(o.problems) if o.problems else o.note
        lines.append(f"{o.name:<38} {o.result.upper():<6} {o.seconds:>8.1f} {peak:>12}  {note}")
    return "\n".join(lines)


def cmd_selftest(args) -> int:
    from .commandline import EXIT_BAD_INPUT, EXIT_FAIL, EXIT_OK, fail
    from .device import probe_hardware
    from .policy import PlanError, plan_device
    from .settings import AppSettings

    known = {c.key for c in CONFIGURATIONS}
    chosen = {}
    for name in ("only", "skip"):
        chosen[name] = [k.strip() for k in (getattr(args, name, None) or "").split(",") if k.strip()]
        if unknown := [k for k in chosen[name] if k not in known]:
            return fail(f"{name}: {unknown[0]!r} is not a configuration (one of {', '.join(sorted(known))})",
                         EXIT_BAD_INPUT, args.json, ErrorKind.VALIDATION)
    only, skip = chosen["only"], chosen["skip"]
    probe = probe_hardware()
    try:
        device, _ = plan_device(probe, AppSettings(model="tiny", device=args.device))
    except PlanError as exc:
        return fail(str(exc), EXIT_BAD_INPUT, args.json, ErrorKind.DEVICE)
    res = args.res or (256 if args.arch == "tiny" else 1024 if device != "cpu" else 512)
    label = device_label(probe, device)
    if not args.json:
        print(f"selftest on {device}: {label}; {args.arch} architecture at {res}²", file=sys.stderr)
    outcomes = []
    with tempfile.TemporaryDirectory(prefix="sdxl_ui-selftest-") as outputs:
        for config in CONFIGURATIONS:
            if only and config.key not in only:
                continue
            if config.key in skip:
                outcomes.append(Outcome(config.key, config.name, "skipped", note="left out by --skip"))
                continue
            ok, why = applicable(config, probe, device)
            if not ok:
                outcomes.append(Outcome(config.key, config.name, "n/a", note=why))
                continue
            outcome = run_configuration(config, device, args.arch, res, probe, Path(outputs))
            outcomes.append(outcome)
            if not args.json:
                print(f"   {outcome.name}: {outcome.result.upper()} ({outcome.seconds:.1f} s)", file=sys.stderr)
    failed = [o for o in outcomes if o.result == "fail"]
    if args.json:
        print(json.dumps({"ok": not failed, "device": device, "device_name": label, "arch": args.arch, "res": res,
                          "passed": sum(o.result == "pass" for o in outcomes), "failed": len(failed),
                          "not_applicable": sum(o.result == "n/a" for o in outcomes),
                          "skipped": sum(o.result == "skipped" for o in outcomes),
                          "configurations": [o.to_dict() for o in outcomes]}, ensure_ascii=False, indent=1))
    else:
        print(format_table(outcomes))
        passed = sum(o.result == "pass" for o in outcomes)
        print(f"\n{passed} passed, {len(failed)} failed, {sum(o.result == 'n/a' for o in outcomes)} not applicable "
              f"on {device} ({label})")
    return EXIT_FAIL if failed else EXIT_OK
