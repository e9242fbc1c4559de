"""Command line: `python -m sdxl_ui generate | upscale | doctor | bench | selftest | train-demo | eval-demo`.

Exit codes: 0 success; 2 bad input, one line naming the field and the value (a request field, --out, a --model
that does not exist or is not an SDXL model, a --device/--attention this machine cannot honour); 1 a runtime
failure (the model could not be downloaded or loaded, out of memory, a device error, the image could not be
saved, interrupted by SIGTERM/SIGINT).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import signal
import sys
import threading
from pathlib import Path

# Re-exported: app.py and older callers import these from the cli.
from .commandline import (EXIT_BAD_INPUT, EXIT_FAIL, EXIT_OK, add_settings_args,  # noqa: F401
                          add_picture_args, add_technique_args, check_paths, fail, picture_fields, plan_error_code,
                          settings_from_args, setup_logging, read_picture)
from .jobs import CancelToken, capabilities_of, collect
from .samplers import sampler_choice
from .schema import ErrorKind, Event, GenerationRequest, ProgressEvent, ResultEvent, ValidationError
from .optimizations.registry import SWITCHES
from .settings import DeviceChoice


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m sdxl_ui", description="SDXL image generation, any hardware")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate image(s) headless")
    add_settings_args(gen)
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--negative", default="")
    gen.add_argument("--quality", default="high", help="high | fast | few-step (the few-step LoRA beside the model, 4 steps)")
    gen.add_argument("--steps", help="requested steps (CPU runs × 0.7)")
    gen.add_argument("--guidance")
    gen.add_argument("--seed", help="0 … 4294967295; random when omitted")
    gen.add_argument("--width")
    gen.add_argument("--height")
    gen.add_argument("--scheduler", default="auto",
                     help="the sampler: auto (the quality preset's) or AUTOMATIC1111's name ('DPM++ 2M', 'Euler a', "
                          "'DPM++ 2M Karras', …) or ours (dpmpp_2m, euler_a, …)")
    gen.add_argument("--schedule", default="automatic",
                     help="the schedule type: automatic (the sampler's own), uniform, karras, exponential, "
                          "polyexponential, sgm_uniform, kl_optimal, align_your_steps, simple, normal, ddim, beta")
    gen.add_argument("--images", default="1", help="images per run, 1-4 (seeds seed, seed+1, …)")
    gen.add_argument("--init-image", help="image to image: start from this picture (PNG, JPEG, WebP)")
    gen.add_argument("--strength", default="0.75",
                     help="image to image: how much of the picture is redrawn, above 0 to 1 (A1111's denoising "
                          "strength; about strength × steps steps run)")
    add_picture_args(gen)
    add_technique_args(gen)
    gen.add_argument("--out", help="output .png (default: a new file under --outputs)")
    gen.add_argument("--json", action="store_true", help="print one JSON object")
    gen.add_argument("--ray-address", help="send the job to the workers that `app.py --ray-address` (or "
                                           "--workers) deployed on this Ray cluster (docs/serving.md)")

    _upscale_args(sub)
    _doctor_args(sub)

    bench = sub.add_parser("bench", help="benchmark the full SDXL architecture against stock diffusers")
    add_settings_args(bench)
    bench.add_argument("--arch", choices=["full", "tiny"], default="full")
    bench.add_argument("--res", type=int, default=512)
    bench.add_argument("--steps", type=int, default=2, help="timed steps (after one warm-up step)")
    bench.add_argument("--bench-device", "--target", dest="bench_device", choices=["auto", "cpu", "cuda"],
                       default="auto")
    bench.add_argument("--only", choices=["both", "baseline", "plan"], default="both")
    bench.add_argument("--check-steps", type=int, default=8,
                       help="steps of the one real Fast image that checks the per-image computation (0: skip)")
    bench.add_argument("--baseline-precision", choices=["fp32", "fp16", "bf16"], default="fp32",
                       help="dtype of the stock-diffusers baseline (fp16 on a GPU = stock fp16 + SDPA)")
    bench.add_argument("--from-json", help="print the table of a saved `bench --json` result (no re-timing)")

    _train_demo_args(sub)

    ev = sub.add_parser("eval-demo", help="prompt adherence of the demo model, read back by the scene reader")
    add_settings_args(ev)
    ev.add_argument("--quality", default="high", help="high | fast")
    ev.add_argument("--steps", type=int, help="requested steps (CPU runs × 0.7); default: the preset's")
    ev.add_argument("--grid", help="also write a grid picture of 8 prompts to this PNG")
    ev.add_argument("--compare", action="store_true",
                    help="each preset and each technique on its own against the exact run: adherence, PSNR, speed")
    ev.add_argument("--json", action="store_true")
    bench.add_argument("--vae-check", action="store_true",
                       help="also decode in fp32 and report how far the plan's VAE dtype is from it")
    bench.add_argument("--hq", action="store_true",
                       help="also time the whole High-quality image end to end (50 steps, base then refiner "
                            "where the plan uses it) for stock and plan; meant for GPUs, or --arch tiny")
    _bench_instead(bench)
    bench.add_argument("--json", action="store_true")

    selftest = sub.add_parser("selftest", help="build and run every configuration the planner can choose on this "
                                               "device, check each, print a table (exit 1 on any failure)")
    selftest.add_argument("--device", choices=[c.value for c in DeviceChoice], default="auto")
    selftest.add_argument("--arch", choices=["tiny", "full"], default="tiny",
                          help="tiny: the demo architecture (seconds); full: SDXL 1.0 with random weights (GPU)")
    selftest.add_argument("--res", type=int, help="image side (default: 256 tiny; full: 1024 on a GPU, 512 on CPU)")
    selftest.add_argument("--only", help="comma-separated configuration keys, e.g. stop,vae-tiling")
    selftest.add_argument("--skip", help="comma-separated configuration keys to leave out, e.g. compile")
    selftest.add_argument("--json", action="store_true")
    return parser


def _result_json(result: ResultEvent, note: str | None) -> dict:
    return {
        "ok": True, "path": result.path, "seed": result.seed, "model": result.model, "note": note,
        "device": result.device, "dtype": result.dtype, "steps_requested": result.steps_requested,
        "steps_run": result.steps_run, "refiner": result.refiner,
        "optimizations": result.report.to_list(),
        "timings": {"load_s": result.timings.load_s, "generate_s": result.timings.generate_s,
                    "total_s": result.timings.total_s},
        "parameters": result.parameters, "save_error": result.save_error,
    }


def _bench_instead(bench) -> None:
    """bench's other measures, each instead of the step timing."""
    bench.add_argument("--prompt-chunks", action="store_true",
                       help="instead: the text encoders' time for a prompt of 1 to 4 chunks (the full SDXL encoders)")
    bench.add_argument("--pictures", action="store_true",
                       help="instead: image to image, the hires fix and inpainting at --res (e.g. 1024) with the LCM "
                            "profile's 4 steps, end to end, beside text to image and stock diffusers fp32 (--only)")


def _print_progress(event: Event) -> None:
    match event:
        case ProgressEvent():
            print(f"   {event.line()}", file=sys.stderr)


def cmd_generate(args) -> int:
    from .models import ModelLoadError
    from .policy import PlanError
    from .service import CancelToken, GenerationService, check_output_path

    try:
        settings = settings_from_args(args)
        request = GenerationRequest.from_raw(
            prompt=args.prompt, negative_prompt=args.negative, quality=args.quality, steps=args.steps,
            guidance=args.guidance, seed=args.seed, width=args.width, height=args.height,
            **sampler_choice(args.scheduler, args.schedule), images=args.images,
            techniques={s.name: getattr(args, s.name) for s in SWITCHES},
            init_image=read_picture("init_image", args.init_image) if args.init_image else None,
            strength=args.strength, **picture_fields(args))
        # A relative --out is relative to the current folder, as in any shell tool (and the Python API).
        out = check_output_path(args.out) if args.out is not None else None
        if getattr(args, "ray_address", None):  # the same seam, served by the team's Ray workers
            from .backends.ray_serve import RayBackend

            service = RayBackend(settings, address=args.ray_address, attach=True)
        else:
            service = GenerationService(settings)
        service.check_model()  # a missing or non-SDXL --model, before any work (and before the memory check)
    except ValidationError as exc:
        return fail(str(exc), EXIT_BAD_INPUT, args.json, ErrorKind.VALIDATION)
    except ModelLoadError as exc:
        return fail(str(exc), EXIT_BAD_INPUT, args.json, ErrorKind.MODEL)
    try:
        service.plan  # noqa: B018 - --device/--attention this machine cannot honour, or too little memory
    except PlanError as exc:
        return fail(str(exc), plan_error_code(exc), args.json, ErrorKind.SETTINGS)
    if capabilities_of(service).start:
        try:
            service.start()
        except Exception as exc:  # noqa: BLE001 - no cluster there, or no app deployed on it
            return fail(f"ray-address: no sdxl_ui workers reachable at {args.ray_address!r} "
                         f"({type(exc).__name__}: {exc})", EXIT_FAIL, args.json, ErrorKind.RUNTIME)
    cancel = CancelToken()
    with _stop_on_signals(cancel):
        try:
            # To the end of the stream, even after an error: the worker has then finished, so the process never
            # exits while a thread is still inside torch.
            got = collect(service.generate(request, cancel=cancel, output_path=out),
                          each=None if args.json else _print_progress)
        except KeyboardInterrupt:  # a second SIGINT/SIGTERM: stop now
            return fail("interrupted twice: stopped without waiting for the run", EXIT_FAIL, args.json,
                         ErrorKind.CANCELLED)
    results, error = got.results, got.error
    if error is not None:
        code = EXIT_BAD_INPUT if error.kind is ErrorKind.VALIDATION else EXIT_FAIL
        return fail(error.message, code, args.json, error.kind)
    note = service.source.note
    if args.json:
        data = _result_json(results[0], note)
        if len(results) > 1:
            data["images"] = [_result_json(r, note) for r in results]
        print(json.dumps(data, ensure_ascii=False, indent=1))
    else:
        for r in results:
            print(r.path or r.save_error)  # save_error reads "not saved: <reason>"
    return EXIT_OK if all(r.path for r in results) else EXIT_FAIL


def cmd_doctor(args) -> int:
    from .optimize import expected_report
    from .policy import PlanError, make_plan
    from .schema import HardwareProbe

    try:
        settings = settings_from_args(args)
        if args.probe_json:
            try:
                probe = HardwareProbe.from_dict(json.loads(Path(args.probe_json).read_text(encoding="utf-8")))
            except (OSError, ValueError) as exc:
                raise ValidationError("probe_json", args.probe_json,
                                      f"cannot be read as probe JSON ({exc})") from None
        else:
            from .device import forget_op_speeds, probe_hardware

            if args.remeasure:
                forget_op_speeds()
            probe = probe_hardware()
    except ValidationError as exc:
        return fail(str(exc), EXIT_BAD_INPUT, args.json, ErrorKind.VALIDATION)
    from .models import ModelLoadError, resolve_source

    try:
        source = resolve_source(settings.model)
    except ModelLoadError as exc:
        return fail(str(exc), EXIT_BAD_INPUT, args.json, ErrorKind.MODEL)
    from .adapters import profile_evidence

    model_kind, size = source.size(settings.refiner_source), source.native_size
    detected = profile_evidence(source, settings.loras)  # the family the model's and the LoRAs' files name
    try:
        plan = make_plan(probe, settings, model_kind, size, size, True, profile=detected)
    except PlanError as exc:
        if args.json:
            print(json.dumps({"probe": probe.to_dict(), "plan": None, "error": str(exc)}, ensure_ascii=False,
                             indent=1))
        else:
            print(f"error: {exc}", file=sys.stderr)
        return plan_error_code(exc)
    rep = expected_report(plan, probe)
    # The per-request techniques differ between the presets: the Fast preset's rows too.
    fast_plan = make_plan(probe, settings, model_kind, size, size, False, profile=detected)
    fast_rows = [row for row in expected_report(fast_plan, probe).rows
                 if row.name in ("feature cache", "guidance interval", "Refinement")]
    if args.json:
        print(json.dumps({"probe": probe.to_dict(), "plan": plan.to_dict(), "optimizations": rep.to_list(),
                          "fast_optimizations": [row.to_dict() for row in fast_rows]},
                         ensure_ascii=False, indent=1))
        return EXIT_OK
    c = probe.cuda
    print(f"torch {probe.torch_version} on {probe.os}")
    print(f"CPU  {probe.cpu.model_name}: {probe.cpu.physical_cores} cores, flags {', '.join(probe.cpu.flags)}, "
          f"RAM {probe.cpu.ram_available_gb}/{probe.cpu.ram_total_gb} GB free")
    if c.available:
        print(f"CUDA {c.device_name} {c.sm}, {c.vram_total_gb} GB; torch arch list {', '.join(c.arch_list)}; "
              f"kernel test {'passed' if c.kernel_ok else 'FAILED: ' + str(c.kernel_error)}")
    else:
        print(f"CUDA not available (torch CUDA build: {c.version or 'none'})")
    print(f"MPS  {'available' if probe.mps.available else 'not available'}")
    print(f"xformers {probe.xformers.version or 'not installed'}")
    if probe.cpu.gemm_gflops:
        print(f"GEMM {', '.join(f'{k} {v:g}' for k, v in probe.cpu.gemm_gflops.items())} GFLOP/s (int8: GOP/s), "
              f"{probe.cpu.gemm_note}")
    for line in op_speed_lines(probe.cpu):
        print(line)
    print(f"\nPlan: {plan.device}, {plan.dtype} — {plan.reason}")
    for warning in plan.warnings:
        print(f"⚠ {warning}")
    print(f"Memory: {plan.reasons['memory']}")
    print("\nExpected optimization report (High quality):")
    for line in rep.log_lines():
        print(f"   {line}")
    print("Fast preset, where it differs:")
    for row in fast_rows:
        print(f"   {row.log_line()}")
    return EXIT_OK


def op_speed_lines(cpu) -> list[str]:
    """doctor's table of the operation speeds per dtype (GFLOP/s; cl = channels-last layout), and how measured."""
    if not cpu.op_speeds:
        return []
    from .device import OP_CLASSES

    columns = sorted({k for speeds in cpu.op_speeds.values() for k in speeds},
                     key=lambda k: (["fp32", "bf16", "fp16", "int8"].index(k.split()[0]), k))
    lines = [f"Operation speeds, GFLOP/s ({cpu.op_note}):", "   " + f"{'':11}" + "".join(f"{c:>9}" for c in columns)]
    for name in sorted(cpu.op_speeds, key=lambda n: list(OP_CLASSES).index(n) if n in OP_CLASSES else len(OP_CLASSES)):
        speeds = cpu.op_speeds[name]
        lines.append("   " + f"{name:11}" + "".join(f"{speeds[c]:>9g}" if c in speeds else f"{'—':>9}"
                                                    for c in columns) + f"   {OP_CLASSES.get(name, '')}")
    return lines


def _train_demo_args(sub) -> None:
    train = sub.add_parser("train-demo", help="train the demo model from scratch on the scene world (CPU)")
    train.add_argument("--out", required=True, help="folder to write (a diffusers pipeline; refiner in out/refiner)")
    train.add_argument("--minutes", type=float, default=None,
                       help="time budget (default: 78 for the demo model, 45 for --distill lcm, 8 for --distill "
                            "decoder)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's choice)")
    train.add_argument("--resume", action="store_true", help="skip stages whose checkpoint is in OUT/.train")
    train.add_argument("--smoke", action="store_true", help="a few steps per stage on a tiny dataset (seconds)")
    train.add_argument("--json", action="store_true", help="print the training report as JSON")
    train.add_argument("--distill", choices=["lcm", "decoder"],
                       help="instead of the demo model: an LCM-LoRA (lcm) or a tiny decoder (decoder) distilled "
                            "from the model in --from, written to --out")
    train.add_argument("--from", dest="source", default=None,
                       help="the model to distil from (default: the shipped demo model)")
    train.add_argument("--rank", type=int, default=24, help="LoRA rank of --distill lcm (default 24)")


def cmd_train_demo(args) -> int:
    from .demo.train import train

    if args.minutes is None:
        args.minutes = {"lcm": 45.0, "decoder": 8.0}.get(args.distill, 78.0)
    if not args.minutes > 0:
        return fail(f"minutes: must be more than 0 (got {args.minutes!r})", EXIT_BAD_INPUT, args.json,
                    ErrorKind.VALIDATION)
    out = Path(args.out).expanduser()
    if out.exists() and not out.is_dir():
        return fail(f"out: {args.out!r} exists and is not a folder", EXIT_BAD_INPUT, args.json, ErrorKind.VALIDATION)
    if args.distill:
        return _distill(args, out)
    if args.source is not None:
        return fail("from: only with --distill (the demo model itself is trained from scratch)", EXIT_BAD_INPUT,
                    args.json, ErrorKind.VALIDATION)
    report = train(out, minutes=args.minutes, seed=args.seed, resume=args.resume, smoke=args.smoke,
                   threads=args.threads)
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(f"wrote {out} ({report['bytes'] / 1e6:.1f} MB) in {report['total_s'] / 60:.1f} min")
    return EXIT_OK


def _distill(args, out: Path) -> int:
    from .demo.distill import distill
    from .settings import DEMO_MODEL_DIR

    source = Path(args.source).expanduser() if args.source else DEMO_MODEL_DIR
    if not (source / "model_index.json").is_file():
        return fail(f"from: {str(source)!r} is not a diffusers model folder (no model_index.json)", EXIT_BAD_INPUT,
                    args.json, ErrorKind.VALIDATION)
    if not 1 <= args.rank <= 256:
        return fail(f"rank: must be 1 … 256 (got {args.rank})", EXIT_BAD_INPUT, args.json, ErrorKind.VALIDATION)
    report = distill(args.distill, source, out, args.minutes, seed=args.seed, smoke=args.smoke,
                     threads=args.threads, rank=args.rank)
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(f"wrote {out} ({report['bytes'] / 1e6:.2f} MB) in {report['total_s'] / 60:.1f} min")
    return EXIT_OK


def _doctor_args(sub) -> None:
    doc = sub.add_parser("doctor", help="print the hardware probe, the plan and the expected report")
    add_settings_args(doc)
    doc.add_argument("--json", action="store_true")
    doc.add_argument("--probe-json", help="replay a probe recorded on another machine (doctor --json output)")
    doc.add_argument("--remeasure", action="store_true",
                     help="measure the operation speeds again (they are kept per machine and torch version)")


def _upscale_args(sub) -> None:
    up = sub.add_parser("upscale", help="upscale a picture (no model loaded): a built-in upscaler or your own "
                                        "super-resolution model")
    up.add_argument("input", help="the picture (PNG, JPEG, WebP)")
    up.add_argument("out", help="the upscaled picture (.png; its parameters chunk is kept, with the upscale's)")
    up.add_argument("--upscaler", default="Lanczos",
                    help="Lanczos (default), Nearest, or a model file's name in --upscaler-dir (e.g. 4x-UltraSharp)")
    up.add_argument("--scale", default="2", help="times the size, 1 to 8 (default 2)")
    up.add_argument("--width", default="0", help="to this width (with --height; the picture scaled to cover it)")
    up.add_argument("--height", default="0", help="to this height (with --width)")
    up.add_argument("--no-crop", action="store_true", help="with --width/--height: keep the proportions, no crop")
    up.add_argument("--upscaler-dir", help="folder of your super-resolution models (.pth/.safetensors)")
    up.add_argument("--device", choices=[c.value for c in DeviceChoice])
    up.add_argument("--json", action="store_true", help="print one JSON object")


def cmd_upscale(args) -> int:
    """``upscale IN OUT``: the one picture through the service's upscale (the same path as A1111's extras)."""
    from .edits import Upscale
    from .run import Cancelled
    from .saving import check_output_path, save_png_copy
    from .service import GenerationService
    from .settings import AppSettings

    try:
        spec = Upscale(upscaler=args.upscaler, scale=args.scale, width=args.width, height=args.height,
                       crop=not args.no_crop)
        settings = check_paths(AppSettings.from_env(upscaler_dir=args.upscaler_dir, device=args.device))
        picture = read_picture("input", args.input)
        out = check_output_path(args.out)
        cancel = CancelToken()
        with _stop_on_signals(cancel):
            result = GenerationService(settings).upscale([picture], spec, cancel)[0]
        save_png_copy(result, out, picture, spec.infotext())
    except ValidationError as exc:
        return fail(str(exc), EXIT_BAD_INPUT, args.json, ErrorKind.VALIDATION)
    except Cancelled:
        return fail("interrupted: nothing saved", EXIT_FAIL, args.json, ErrorKind.CANCELLED)
    except OSError as exc:
        return fail(f"could not save {args.out}: {exc}", EXIT_FAIL, args.json, ErrorKind.RUNTIME)
    if args.json:
        print(json.dumps({"ok": True, "path": str(out), "width": result.width, "height": result.height}))
    else:
        print(out)
    return EXIT_OK


@contextlib.contextmanager
def _stop_on_signals(cancel):
    """SIGTERM/SIGINT during a run cancel it at the next step instead of killing the process: an image being
    decoded or saved is finished (never left half-written), then the run ends with "cancelled at step k/N".
    A second signal raises KeyboardInterrupt at once."""
    if threading.current_thread() is not threading.main_thread():  # signal handlers live in the main thread
        yield
        return

    def on_signal(signum, _frame):
        if cancel.cancelled:
            raise KeyboardInterrupt
        logging.getLogger("sdxl_ui").warning(
            "%s received: stopping at the next step (an image being saved is finished first)",
            signal.Signals(signum).name)
        cancel.cancel()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # eval-demo runs dozens of images: its per-image log lines would bury the figures.
    quiet = getattr(args, "json", False) or args.command == "eval-demo"
    setup_logging(logging.WARNING if quiet else logging.INFO)
    if args.command == "generate":
        return cmd_generate(args)
    if args.command == "doctor":
        return cmd_doctor(args)
    if args.command == "upscale":
        return cmd_upscale(args)
    if args.command == "selftest":
        from .selftest import cmd_selftest

        return cmd_selftest(args)
    if args.command == "train-demo":
        return cmd_train_demo(args)
    if args.command == "eval-demo":
        from .demo.evaluate import cmd_eval_demo

        return cmd_eval_demo(args)
    from .bench import cmd_bench

    return cmd_bench(args)
