"""`python -m sdxl_ui eval-demo`: prompt adherence of the demo model, judged by the scene reader.

A fixed prompt set (48 scenes over every trained colour/shape pair, each prompt naming colour, shape, size,
position and background; plus 6 prompts for the three held-out pairs, reported apart) goes through the
ordinary GenerationService — the same plan, schedulers, refiner hand-off and decode users get — one image per
prompt with a fixed seed. The reader reads each picture back; the figures are right answers per attribute.
This is the judge of every speed-for-quality trade (feature caching, guidance interval, int8, fewer steps).
"""
from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import scenes as S

SEED0 = 1000
PROMPT_SET = dict(n=48, seed=1234)
HELD_OUT_SET = dict(n=6, seed=77, held_out=True)
# The targets for the demo model (colour and background ≥ 90 %, shape and position ≥ 80 %).
TARGETS = {"color": 0.9, "background": 0.9, "shape": 0.8, "position": 0.8}


def prompt_set() -> list[S.Scene]:
    return S.eval_scenes(**PROMPT_SET)


def held_out_set() -> list[S.Scene]:
    return S.eval_scenes(**HELD_OUT_SET)


@dataclass
class Adherence:
    right: dict[str, int] = field(default_factory=lambda: {a: 0 for a in S.ATTRIBUTES})
    total: int = 0
    seconds: list[float] = field(default_factory=list)
    misses: list[dict] = field(default_factory=list)

    def add(self, scene: S.Scene, reading: S.Reading, seconds: float, prompt: str, seed: int) -> None:
        self.total += 1
        self.seconds.append(seconds)
        matches = reading.matches(scene)
        for attr, ok in matches.items():
            self.right[attr] += int(ok)
        wrong = {a: getattr(reading, a) for a, ok in matches.items() if not ok}
        if wrong:
            self.misses.append({"prompt": prompt, "seed": seed, "read": wrong})

    def rate(self, attr: str) -> float:
        return self.right[attr] / self.total if self.total else 0.0

    def meets_targets(self) -> bool:
        return all(self.rate(a) >= t for a, t in TARGETS.items())

    def to_dict(self) -> dict:
        return {"n": self.total, "right": dict(self.right),
                "rate": {a: round(self.rate(a), 3) for a in S.ATTRIBUTES},
                "s_per_image_median": round(statistics.median(self.seconds), 3) if self.seconds else None,
                "misses": self.misses}


def run_prompts(service, scenes: list[S.Scene], seed0: int = SEED0, keep_images: list | None = None,
                **request_fields) -> Adherence:
    """Generate each scene's prompt through ``service`` (seed seed0 + i) and read the pictures back.
    ``request_fields``: anything GenerationRequest takes (quality, steps, guidance, scheduler, negative_prompt)."""
    from ..schema import ErrorEvent, GenerationRequest, ResultEvent

    result = Adherence()
    for i, scene in enumerate(scenes):
        prompt = S.prompt_for(scene)
        request = GenerationRequest.from_raw(prompt=prompt, seed=seed0 + i, **request_fields)
        image, seconds = None, 0.0
        for event in service.generate(request):
            match event:
                case ErrorEvent():
                    raise RuntimeError(f"eval-demo: generation failed for {prompt!r}: {event.message}")
                case ResultEvent():
                    image, seconds = event.image, event.timings.generate_s
        result.add(scene, S.read_scene(image), seconds, prompt, seed0 + i)
        if keep_images is not None:
            keep_images.append((prompt, image))
    return result


def make_grid(items: list[tuple[str, object]], columns: int = 4, path: str | Path | None = None):
    """A picture grid with each prompt written under its image (for the README)."""
    from PIL import Image, ImageDraw, ImageFont

    side = max(img.width for _, img in items)
    label_h, pad = 34, 6
    rows = (len(items) + columns - 1) // columns
    grid = Image.new("RGB", (columns * (side + pad) + pad, rows * (side + label_h + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default()
    for k, (prompt, img) in enumerate(items):
        x, y = pad + (k % columns) * (side + pad), pad + (k // columns) * (side + label_h + pad)
        grid.paste(img.resize((side, side)), (x, y))
        words, lines, line = prompt.split(), [], ""
        for word in words:  # wrap to the image width
            trial = f"{line} {word}".strip()
            if draw.textlength(trial, font=font) > side and line:
                lines.append(line)
                line = word
            else:
                line = trial
        lines.append(line)
        for n, text in enumerate(lines[:3]):
            draw.text((x, y + side + 2 + 10 * n), text, fill="black", font=font)
    if path is not None:
        grid.save(path)
    return grid


GRID_PROMPTS = [
    "a large red circle on a blue background", "a small yellow square on the left, black background",
    "a large green triangle at the bottom, white background", "a small white square at the top on a purple background",
    "a large blue circle on the right on a yellow background", "a small orange triangle in the center on a green background",
    "a large black square on an orange background", "a purple circle on the left on a white background",
]


def evaluate(service, quality: str = "high", steps: int | None = None, **request_fields) -> dict:
    """eval-demo's whole measurement: the prompt set and the held-out set through ``service``."""
    fields = dict(quality=quality, steps=steps, **request_fields)
    start = time.perf_counter()
    main = run_prompts(service, prompt_set(), **fields)
    held = run_prompts(service, held_out_set(), seed0=SEED0 + 500, **fields)
    return {"quality": quality, "steps_requested": steps, "model": service.source.label,
            "device": service.plan.device, "dtype": service.plan.dtype, "adherence": main.to_dict(),
            "meets_targets": main.meets_targets(), "targets": TARGETS, "held_out": held.to_dict(),
            "wall_s": round(time.perf_counter() - start, 1)}


STEP_SWEEP = (2, 4, 8)  # a few-step profile's adherence is reported at these steps
FEW_STEP_TARGET_POINTS = 5.0  # 4 steps within 5 points of High quality (35 steps) on every attribute


def sweep(service, baseline=None) -> dict:
    """``eval-demo`` of a few-step profile (e.g. ``--lora`` of an LCM-LoRA): adherence at 2, 4 and 8 steps, each
    attribute's difference in points to ``baseline`` (the same model without the LoRA, High quality)."""
    out: dict = {"model": service.source.label, "profile": service.plan.profile, "device": service.plan.device,
                 "dtype": service.plan.dtype, "decoder": service.plan.decoder, "steps": {}}
    base = evaluate(baseline, "high") if baseline is not None else None
    if base is not None:
        out["baseline_high"] = base
    for steps in STEP_SWEEP:
        result = evaluate(service, "high", steps)
        if base is not None:
            result["points_vs_high"] = {a: round(100 * (result["adherence"]["rate"][a]
                                                        - base["adherence"]["rate"][a]), 1) for a in S.ATTRIBUTES}
        out["steps"][str(steps)] = result
    four = out["steps"]["4"].get("points_vs_high")
    out["four_steps_within_5_points"] = (None if four is None
                                         else all(v >= -FEW_STEP_TARGET_POINTS for v in four.values()))
    return out


def print_sweep(out: dict) -> None:
    def line(a: dict) -> str:
        return ", ".join(f"{k} {a['right'][k]}/{a['n']}" for k in S.ATTRIBUTES)

    print(f"eval-demo: model {out['model']}, profile {out['profile']}, decoder {out['decoder']}, on {out['device']} "
          f"({out['dtype']})")
    if "baseline_high" in out:
        b = out["baseline_high"]
        print(f"   without the LoRA, High quality: {line(b['adherence'])}; "
              f"{b['adherence']['s_per_image_median']} s/image")
    for steps, r in out["steps"].items():
        points = r.get("points_vs_high")
        diff = "" if points is None else " (points vs High quality: " + ", ".join(
            f"{k} {v:+.1f}" for k, v in points.items()) + ")"
        print(f"   {steps} steps: {line(r['adherence'])}{diff}; {r['adherence']['s_per_image_median']} s/image")
        print(f"      held-out pairs: {line(r['held_out'])}")
    verdict = out["four_steps_within_5_points"]
    if verdict is not None:
        print("4 steps within 5 points of High quality on every attribute: " + ("yes" if verdict else "NO"),
              file=sys.stderr)


def psnr(a, b) -> float:
    """PSNR in dB between two same-size images (99 for identical ones)."""
    import math

    import numpy as np

    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    mse = float(((x - y) ** 2).mean())
    return 99.0 if mse == 0 else round(10 * math.log10(255.0 ** 2 / mse), 2)


def _switches(feature_cache: str, guidance_interval: str) -> dict:
    return dict(techniques=dict(feature_cache=feature_cache, guidance_interval=guidance_interval))


# Each technique on its own and each preset, against the exact run of the same preset (same prompts and seeds):
# (label, quality, request fields, the service it runs on: "" the plain one, "int8" the --precision int8 one,
# "lcm" / "lcm int8" those with the model's few-step LoRA loaded at start, exact / int8).
COMPARISONS = (
    ("high: exact", "high", _switches("off", "off"), ""),
    ("high: preset", "high", {}, ""),
    ("high: feature cache only", "high", _switches("on", "off"), ""),
    ("high: guidance interval only", "high", _switches("off", "on"), ""),
    ("high: int8 only", "high", _switches("off", "off"), "int8"),
    ("fast: exact", "fast", _switches("off", "off"), ""),
    ("fast: preset", "fast", {}, ""),
    ("fast: feature cache only", "fast", _switches("on", "off"), ""),
    ("fast: guidance interval only", "fast", _switches("off", "on"), ""),
    ("fast: preset + int8", "fast", {}, "int8"),
    ("few_step: exact", "few_step", {}, "lcm"),
    ("few_step: int8", "few_step", {}, "lcm int8"),
)
INT8_BAR = -2.0  # points: an int8 configuration stays this close to its exact run overall and on every attribute
# (the other techniques: 3 overall)


def compare(service, others: dict | None = None) -> dict:
    """``eval-demo --compare``: adherence (right answers of 48 prompts × 5 attributes), its difference to the
    exact run of the same preset in percentage points, mean PSNR against the exact images, median seconds.
    ``others``: the services beside the plain one (keys as in ``COMPARISONS``); a comparison whose service is
    missing (no int8 GEMM, no few-step LoRA) is left out."""
    services = {"": service, **(others or {})}
    out, exact = {}, {}
    for label, quality, fields, key in COMPARISONS:
        if services.get(key) is None or (key and not label.endswith(": exact") and quality not in exact):
            continue
        images: list = []
        result = run_prompts(services[key], prompt_set(), keep_images=images, quality=quality, **fields)
        right = sum(result.right.values())
        total = result.total * len(S.ATTRIBUTES)
        row = {"right": right, "of": total, "by_attribute": dict(result.right),
               "s_per_image_median": round(statistics.median(result.seconds), 3)}
        if label.endswith(": exact"):
            exact[quality] = (right, images, dict(result.right))
        else:
            ref_right, ref_images, ref_by = exact[quality]
            row["points_vs_exact"] = round(100 * (right - ref_right) / total, 1)
            row["psnr_vs_exact_db"] = round(statistics.mean(psnr(a[1], b[1]) for a, b in zip(ref_images, images)), 1)
            row["within_3_points"] = row["points_vs_exact"] >= -3.0
            # per attribute, in points of that attribute's answers (one prompt of 48 = 2.1 points)
            row["points_by_attribute"] = {a: round(100 * (n - ref_by[a]) / result.total, 1)
                                          for a, n in result.right.items()}
            if "int8" in key:  # the int8 bar: within 2 points overall and on every attribute
                row["within_2_points"] = (row["points_vs_exact"] >= INT8_BAR
                                          and min(row["points_by_attribute"].values()) >= INT8_BAR)
        out[label] = row
        print(f"   {label:<30} {right}/{total}" + (f"  {row['points_vs_exact']:+.1f} pts, PSNR "
                                                  f"{row['psnr_vs_exact_db']} dB" if "points_vs_exact" in row else "")
              + f"  {row['s_per_image_median']} s/image", file=sys.stderr, flush=True)
    return out


def _compare_services(service, settings) -> dict:
    """The services ``compare`` runs beside the plain one: int8 (on a CPU with an int8 GEMM) and, when the model
    folder has a few-step LoRA beside it, that LoRA loaded at start, exact and int8 (int8 layers are made after
    the LoRA is fused, so a per-job LoRA cannot run on them)."""
    from ..adapters import few_step_lora
    from ..service import GenerationService

    int8 = service.plan.device == "cpu" and "int8" in service.probe.cpu.gemm_gflops
    found = few_step_lora(service.source)
    variants = {"int8": settings.with_(precision="int8") if int8 else None}
    if found is not None:
        lcm = settings.with_(loras=(*settings.loras, found[0]))
        variants.update({"lcm": lcm, "lcm int8": lcm.with_(precision="int8") if int8 else None})
    out = {}
    for key, variant in variants.items():
        if variant is not None:
            out[key] = GenerationService(variant, probe=service.probe)
            out[key].ensure_loaded()
    return out


def cmd_eval_demo(args) -> int:
    from ..commandline import EXIT_BAD_INPUT, EXIT_FAIL, EXIT_OK, fail, settings_from_args
    from ..models import ModelLoadError
    from ..policy import PlanError
    from ..schema import ErrorKind, ValidationError
    from ..service import GenerationService

    try:
        settings = settings_from_args(args)
        if args.model is None and not settings.is_demo:
            settings = settings.with_(model="demo", refiner="auto")
        if args.quality not in ("high", "fast"):
            raise ValidationError("quality", args.quality, "must be high or fast")
        if args.steps is not None and not 1 <= args.steps <= 150:
            raise ValidationError("steps", args.steps, "must be 1 … 150")
    except ValidationError as exc:
        return fail(str(exc), EXIT_BAD_INPUT, args.json, ErrorKind.VALIDATION)
    with tempfile.TemporaryDirectory(prefix="eval-demo-") as tmp:
        if args.outputs is None:
            settings = settings.with_(outputs=Path(tmp))
        service = GenerationService(settings)
        try:
            service.ensure_loaded()
            if args.compare:
                result = {"model": service.source.label, "device": service.plan.device,
                          "dtype": service.plan.dtype,
                          "comparisons": compare(service, _compare_services(service, settings))}
                result["all_within_3_points"] = all(r.get("within_3_points", True)
                                                    for r in result["comparisons"].values())
                result["int8_within_2_points"] = all(r.get("within_2_points", True)
                                                     for r in result["comparisons"].values())
                print(json.dumps(result, indent=1) if args.json else
                      "eval-demo --compare: " + ("every technique and preset within 3 points of exact"
                                                 if result["all_within_3_points"] else "NOT all within 3 points")
                      + ("; int8 within 2" if result["int8_within_2_points"] else "; int8 NOT within 2 points"))
                return EXIT_OK
            if args.steps is None and service.plan.profile != "sdxl" and args.grid is None:
                baseline = GenerationService(settings.with_(loras=(), profile="auto", decoder="full"),
                                             probe=service.probe) if settings.loras else None
                result = sweep(service, baseline)
                print(json.dumps(result, indent=1)) if args.json else print_sweep(result)
                return EXIT_OK
            result = evaluate(service, args.quality, args.steps)
            if args.grid:
                from ..jobs import collect
                from ..schema import GenerationRequest

                items = []

                for k, prompt in enumerate(GRID_PROMPTS):
                    request = GenerationRequest.from_raw(prompt=prompt, seed=SEED0 + k, quality=args.quality,
                                                         steps=args.steps)
                    items += [(prompt, r.image) for r in collect(service.generate(request)).results]
                make_grid(items, path=args.grid)
                result["grid"] = str(args.grid)
        except (ModelLoadError, PlanError, RuntimeError) as exc:
            return fail(str(exc), EXIT_FAIL, args.json, ErrorKind.MODEL)
    if args.json:
        print(json.dumps(result, indent=1))
        return EXIT_OK
    a, h = result["adherence"], result["held_out"]
    print(f"eval-demo: model {result['model']} on {result['device']} ({result['dtype']}), quality {args.quality}"
          f"{'' if args.steps is None else f', {args.steps} steps requested'}")
    print(f"prompt adherence, {a['n']} prompts (target): " + ", ".join(
        f"{k} {a['right'][k]}/{a['n']} = {a['rate'][k]:.0%}" + (f" (≥{TARGETS[k]:.0%})" if k in TARGETS else "")
        for k in S.ATTRIBUTES))
    print(f"held-out pairs ({', '.join(' '.join(p) for p in sorted(S.HELD_OUT))}), {h['n']} prompts: " + ", ".join(
        f"{k} {h['right'][k]}/{h['n']}" for k in S.ATTRIBUTES))
    print(f"seconds per image (median): {a['s_per_image_median']} s; whole run {result['wall_s']} s")
    print("targets " + ("met" if result["meets_targets"] else "NOT met"), file=sys.stderr)
    return EXIT_OK
