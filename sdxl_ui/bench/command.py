"""`python -m sdxl_ui bench`: probe, plan, one child process per configuration, then the summary as a table or
JSON; `--from-json` re-derives and prints a saved result without re-timing."""
from __future__ import annotations

import json
import sys

from .report import format_table, machine_label
from .schedules import preset_schedule, summarize
from .timing import HQ_STEPS, run_child

# The user's plan flags that the bench's plan honours (e.g. --vae-tiling on, --threads 1, --use-refiner on).
PLAN_FLAGS = ("precision", "attention", "offload", "vae_tiling", "threads", "use_refiner")


def _plan_flags(settings) -> dict:
    """The PLAN_FLAGS of these settings as plain values, for the children's AppSettings."""
    return {name: getattr(getattr(settings, name), "value", getattr(settings, name)) for name in PLAN_FLAGS}


def cmd_bench(args) -> int:
    """Time stock diffusers and the plan (and int8 / compiled where asked) on the full or tiny architecture."""
    if args.from_json:
        return _replay(args)
    from ..commandline import settings_from_args
    from ..device import probe_hardware
    from ..policy import make_plan
    from ..settings import PRECISION_DTYPES, Precision

    settings = settings_from_args(args)
    probe = probe_hardware()
    device_choice = args.bench_device if args.bench_device != "auto" else settings.device.value
    plan_settings = settings.with_(device=device_choice, model="stabilityai/stable-diffusion-xl-base-1.0")
    plan = make_plan(probe, plan_settings, "tiny" if args.arch == "tiny" else "sdxl", args.res, args.res, True)
    device = plan.device
    if args.prompt_chunks:
        from .prompts import cmd_prompt_chunks

        return cmd_prompt_chunks(args, probe, plan)
    if args.pictures:
        from .pictures import cmd_pictures

        return cmd_pictures(args, probe)

    def say(msg):  # progress goes to stderr, also with --json (stdout holds only the JSON object)
        print(msg, file=sys.stderr, flush=True)

    say(f"bench: SDXL {args.arch} architecture, {args.res}², {args.steps} timed step(s) after a warm-up, "
        f"on {device} ({probe.cpu.model_name if device == 'cpu' else probe.cuda.device_name})")
    base_spec = {"arch": args.arch, "res": args.res, "steps": args.steps, "device": device,
                 "device_choice": device_choice, "probe": probe.to_dict(), "hq": args.hq,
                 "plan_settings": _plan_flags(settings)}
    if args.hq:
        say(f"   --hq: also the whole High-quality image ({HQ_STEPS} steps requested, base to 0.8 then the "
            f"refiner where the plan uses it), run twice per configuration, the second timed"
            + (" — on a CPU with the full architecture this takes hours" if device == "cpu" and
               args.arch == "full" else ""))
    results = {}
    configs = []
    if args.only in ("both", "baseline"):
        # Stock diffusers: fp32 by default; on a GPU, --baseline-precision fp16 gives "stock fp16 + SDPA".
        baseline_dtype = PRECISION_DTYPES[Precision(args.baseline_precision)]
        configs.append(("baseline", {"kind": "baseline", "dtype": baseline_dtype}))
    if args.only in ("both", "plan"):
        configs.append(("plan", {"kind": "plan", "dtype": plan.dtype, "vae_check": args.vae_check}))
    if args.only in ("both", "plan") and device == "cpu" and "int8" in probe.cpu.gemm_gflops:
        # Opt-in int8 (--precision int8): its step, and how far its noise prediction is from the exact one.
        configs.append(("int8", {"kind": "int8", "dtype": plan.dtype, "hq": False}))
    if args.compile:
        configs.append(("compiled", {"kind": "plan", "dtype": plan.dtype, "compile": True, "hq": False}))
    for name, extra in configs:
        if name == "plan" and args.check_steps:
            extra["check_steps"] = args.check_steps
    for name, extra in configs:
        say(f"-- building and timing {name} ({extra['dtype']})… (minutes on CPU)")
        results[name] = run_child({**base_spec, **extra, "label": name})
        results[name]["kind"] = name

    schedules = {}
    if "plan" in results and "kinds" in results["plan"]:
        for quality in ("high", "fast"):
            schedules[quality] = preset_schedule(probe, plan_settings, quality)
        # A few-step profile (LCM, its High-quality steps: 4), as the service runs it; per_image adds its row with
        # the tiny decoder.
        lcm = preset_schedule(probe, plan_settings, "high", profile="lcm")
        schedules[f"lcm-{lcm['steps']}"] = lcm
    summary = summarize(results, args.arch, args.res, args.steps, device, machine_label(probe, device),
                        probe.torch_version, hq_steps=plan.steps_for(50), schedules=schedules,
                        dtype_peaks={"gflops": dict(probe.cpu.gemm_gflops), "how": probe.cpu.gemm_note}
                        if device == "cpu" else None)
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
        print(format_table(summary))
    if args.arch == "full" and not all(r.get("params_ok") for r in results.values()):
        print("error: parameter counts differ from SDXL base 1.0", file=sys.stderr)
        return 1
    return 0


def _replay(args) -> int:
    """Re-derive and print a saved `bench --json` result (e.g. after changing the table) without re-timing."""
    with open(args.from_json, encoding="utf-8") as f:
        saved = json.load(f)
    if "ours" in saved or "stock" in saved:  # a `bench --pictures --json` result
        from .pictures import table

        print(json.dumps(saved, indent=1) if args.json else f"{table(saved)}\n(on {saved.get('machine', '?')})")
        return 0
    results = {k: v for k, v in saved.items() if isinstance(v, dict) and "matmul_peak_gflops" in v}
    plan_steps = round(50 * 0.7) if saved["device"] == "cpu" else 50
    summary = summarize(results, saved["arch"], saved["res"], saved["timed_steps"], saved["device"],
                        saved["machine"], saved["torch"], hq_steps=plan_steps, day=saved["date"],
                        schedules={k: v["schedule"] for k, v in saved.get("presets", {}).items() if "schedule" in v},
                        dtype_peaks=saved.get("dtype_peaks"))
    print(json.dumps(summary, indent=1) if args.json else format_table(summary))
    return 0
