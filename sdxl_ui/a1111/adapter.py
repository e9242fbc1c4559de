"""AUTOMATIC1111 ``/sdapi/v1`` requests and responses ⇄ the project's own types. Pure mapping: no I/O, no torch.

A txt2img body becomes a ``GenerationRequest`` per iteration (``n_iter`` of them, ``batch_size`` images each);
the typed events of a run (``ProgressEvent``, ``ResultEvent``, ``ErrorEvent``) become AUTOMATIC1111's JSON.
Every refusal is a ``ValidationError`` naming the AUTOMATIC1111 field and the value (``detail_422``: FastAPI's
``detail`` shape).
"""
from __future__ import annotations

import base64
import dataclasses
import io
import json
import math
import random
from collections import deque
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Any

from ..edits import HiresFix
from ..metadata import parse_parameters
from ..samplers import SAMPLER_LABELS, SCHEDULE_BY_KEY, parse_sampler, parse_schedule, plan_sampler
from ..samplers import SAMPLERS as ALL_SAMPLERS
from ..samplers import SCHEDULES as ALL_SCHEDULES
from ..schema import (MAX_CLIP_SKIP, MAX_IMAGES, MAX_SEED, MIN_SIDE, PRESETS, GenerationRequest, Quality, Schedule, Scheduler, Toggle,
                      ValidationError, parse_choice)

MAX_ITER = 8  # n_iter: sequential batches of one request (each up to MAX_IMAGES images)

SAMPLERS = [{"name": s.name, "aliases": list(s.aliases), "options": dict(s.options)} for s in ALL_SAMPLERS]
SCHEDULERS = [{"name": s.key.value, "label": s.label, "aliases": list(s.aliases) if s.aliases else None,
               "default_rho": s.default_rho, "need_inner_model": s.need_inner_model} for s in ALL_SCHEDULES]
# The request fields this adapter reads (A1111's StableDiffusionTxt2ImgProcessingAPI and our extension); the
# fields of A1111's own that it cannot honour are listed in `info` as ignored, with the reason (IGNORED).
HIRES_READ = ("hr_scale", "hr_resize_x", "hr_resize_y", "hr_upscaler", "hr_second_pass_steps", "hr_prompt",
              "hr_negative_prompt")  # with enable_hr and denoising_strength: the hires fix (``hires_fix``)
MAPPED = frozenset({
    "prompt", "negative_prompt", "steps", "cfg_scale", "width", "height", "seed", "sampler_name", "sampler_index",
    "scheduler", "batch_size", "n_iter", "send_images", "save_images", "override_settings",
    "override_settings_restore_afterwards", "sdxl_ui", "enable_hr", "alwayson_scripts", "script_name",
    "script_args", "styles", "tiling", *HIRES_READ})
# A1111's fields that change the picture and that sdxl_ui does not do, with what the client gets instead. Fields at
# their A1111 default (false, 0, -1, empty, null) are not listed: they ask for nothing.
IGNORED = {
    "restore_faces": "no face restoration model here: the picture as drawn",
    "subseed": "no variation seeds here: the seed alone", "subseed_strength": "no variation seeds here",
    "seed_resize_from_w": "no seed resize here", "seed_resize_from_h": "no seed resize here",
    "eta": "the sampler's own noise", "s_churn": "the sampler's own noise", "s_tmin": "the sampler's own noise",
    "s_tmax": "the sampler's own noise", "s_noise": "the sampler's own noise",
    "s_min_uncond": "guidance runs on every step the plan guides",
    "refiner_checkpoint": "the server's refiner, as its operator set it",
    "refiner_switch_at": "the refiner switches at 0.8",
    "denoising_strength": "no second pass in a txt2img without enable_hr",
    "firstpass_image": "no hires second pass here", "infotext": "the request's own fields",
    "alwayson_scripts": "this server has no extension scripts (ADetailer, ControlNet, …): the picture without them",
}
OVERRIDES_READ = frozenset({"CLIP_stop_at_last_layers", "sd_vae", "sd_model_checkpoint", "sdxl_ui_quality"})
# AUTOMATIC1111's own txt2img request fields (StableDiffusionTxt2ImgProcessingAPI): the only ones its reply's
# `parameters` echoes. Anything else a client sends (SillyTavern's `url` and `auth`, with a password) is not echoed.
A1111_FIELDS = MAPPED | frozenset({
    "styles", "subseed", "subseed_strength", "seed_resize_from_h", "seed_resize_from_w", "restore_faces", "tiling",
    "do_not_save_samples", "do_not_save_grid", "eta", "denoising_strength", "s_min_uncond", "s_churn", "s_tmax",
    "s_tmin", "s_noise", "refiner_checkpoint", "refiner_switch_at", "disable_extra_networks", "firstpass_image",
    "comments", "firstphase_width", "firstphase_height", "hr_scale", "hr_upscaler", "hr_second_pass_steps",
    "hr_resize_x", "hr_resize_y", "hr_checkpoint_name", "hr_additional_modules", "hr_sampler_name", "hr_scheduler",
    "hr_prompt", "hr_negative_prompt", "hr_cfg", "hr_distilled_cfg", "force_task_id", "infotext",
    "distilled_cfg_scale"}) - {"sdxl_ui"}
MAX_DIGITS = 100  # a whole number in a body (Python refuses to read one of more than 4,300 digits: a 500)
SHOWN_NAMES = 20  # ignored field names a log line lists (each escaped, at most 64 characters)
# Our field names in a GenerationRequest's errors → the AUTOMATIC1111 field the client sent.
_FIELD_NAMES = {"guidance": "cfg_scale", "images": "batch_size", "scheduler": "sampler_name"}


def map_sampler(sampler_name: Any, scheduler: Any) -> tuple[Scheduler, Schedule]:
    """AUTOMATIC1111's sampler + schedule type → ours (``samplers.parse_sampler``: names, aliases, any case, the
    legacy "X Karras" names). No sampler: the quality preset's (High quality: Euler, A1111's API default), or a
    few-step profile's own scheduler."""
    if sampler_name is None or (isinstance(sampler_name, str) and not sampler_name.strip()):
        schedule = parse_schedule(scheduler)
        if schedule is Schedule.AUTOMATIC:
            return Scheduler.AUTO, schedule  # the quality preset's sampler (Euler for High quality), or the profile's
        return Scheduler.EULER, schedule  # a schedule type alone: A1111's default sampler with it
    return parse_sampler(sampler_name, scheduler)


def a1111_names(req: GenerationRequest) -> tuple[str, str]:
    """(A1111's sampler name, schedule-type label) of a request, for `info`."""
    sampler = req.sampler
    if sampler is Scheduler.DPMPP_2M_KARRAS:
        return "DPM++ 2M", "Karras"
    return SAMPLER_LABELS[sampler], SCHEDULE_BY_KEY[req.schedule].label


@dataclass(frozen=True)
class Txt2Img:
    """One valid txt2img job: ``n_iter`` requests of ``batch_size`` images, seeds seed, seed+1, …"""

    request: GenerationRequest  # the first iteration's (its seed is the job's first seed)
    n_iter: int = 1
    send_images: bool = True
    save_images: bool = False
    ignored: tuple[str, ...] = ()  # request fields that were ignored (logged in one line)
    echo: dict = field(default_factory=dict)  # the `parameters` of the response
    reasons: dict = field(default_factory=dict)  # ignored field → what the client gets instead (`info`)
    notes: tuple[str, ...] = ()  # where the sampler or schedule type runs as the nearest diffusers can (`info`)

    @property
    def seed(self) -> int:
        return self.request.seed

    @property
    def batch_size(self) -> int:
        return self.request.images

    def iteration(self, k: int) -> GenerationRequest:
        return dataclasses.replace(self.request, seed=(self.seed + k * self.batch_size) % (MAX_SEED + 1))

    @property
    def all_seeds(self) -> list[int]:
        return [(self.seed + i) % (MAX_SEED + 1) for i in range(self.n_iter * self.batch_size)]


def flag(name: str, value: Any, default: bool) -> bool:
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ValidationError(name, value, "must be true or false")
    return value


def _whole(name: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value != int(value):
        raise ValidationError(name, value, "must be a whole number")
    if not low <= value <= high:
        raise ValidationError(name, value, f"must be between {low} and {high}")
    return int(value)


def _extension(body: dict, switches) -> tuple[Quality | None, dict]:
    """The quality preset and technique switches: ``"sdxl_ui": {"quality": "fast", "techniques": {...}}`` or
    ``override_settings.sdxl_ui_quality``."""
    ext = body.get("sdxl_ui") or {}
    if not isinstance(ext, dict):
        raise ValidationError("sdxl_ui", ext, "must be an object: {\"quality\": …, \"techniques\": {…}}")
    unknown = set(ext) - {"quality", "techniques"}
    if unknown:
        raise ValidationError("sdxl_ui", sorted(unknown), "unknown keys; known: quality, techniques")
    overrides = body.get("override_settings") or {}
    raw_quality = ext.get("quality", overrides.get("sdxl_ui_quality"))
    quality = None if raw_quality is None else parse_choice(Quality, "sdxl_ui.quality", raw_quality)
    techniques = ext.get("techniques") or {}
    if not isinstance(techniques, dict):
        raise ValidationError("sdxl_ui.techniques", techniques, "must be an object of switch names to auto/on/off")
    known = {s.name for s in switches}
    for name, value in techniques.items():
        if name not in known:
            raise ValidationError("sdxl_ui.techniques", name, f"unknown switch; known: {', '.join(sorted(known))}")
        parse_choice(Toggle, f"sdxl_ui.techniques.{name}", value)
    return quality, techniques


def _refuse_unsupported(body: dict, model: str) -> None:
    if body.get("script_name"):
        raise ValidationError("script_name", body["script_name"], "script not found (sdxl_ui has no scripts)")
    overrides = body.get("override_settings") or {}
    if not isinstance(overrides, dict):
        raise ValidationError("override_settings", overrides, "must be an object")
    wanted = overrides.get("sd_model_checkpoint")
    if wanted not in (None, "", model):
        raise ValidationError("override_settings.sd_model_checkpoint", wanted,
                              f"switching the model per request is not supported (loaded: {model!r}; the operator "
                              "switches it with POST /sdapi/v1/options)")


HIRES_IGNORED = {
    "hr_checkpoint_name": "the second pass runs on the loaded model",
    "hr_sampler_name": "the second pass runs the first pass's sampler",
    "hr_scheduler": "the second pass runs the first pass's schedule type",
    "hr_additional_modules": "Forge's: no additional modules here",
    "hr_cfg": "Forge's: the second pass runs the first pass's guidance",
    "hr_distilled_cfg": "Forge's: no distilled guidance here",
}


def hires_fix(body: dict) -> HiresFix | None:
    """A1111's hires fix fields of a txt2img body (``enable_hr`` true), with its defaults: scale 2, the
    ``Latent`` upscaler, the first pass's steps, denoising strength 0.7."""
    if not flag("enable_hr", body.get("enable_hr"), False):
        return None

    def given(name, default):
        value = body.get(name)
        return default if value is None else value

    for name in ("hr_resize_x", "hr_resize_y", "hr_second_pass_steps"):
        _whole(name, given(name, 0), 0, 10**6)  # a bad number is refused here, by its A1111 name
    return HiresFix(scale=given("hr_scale", 2.0), resize_x=given("hr_resize_x", 0), resize_y=given("hr_resize_y", 0),
                    upscaler=given("hr_upscaler", "Latent") or "Latent", steps=given("hr_second_pass_steps", 0),
                    strength=given("denoising_strength", 0.7), prompt=given("hr_prompt", ""),
                    negative_prompt=given("hr_negative_prompt", ""))


def _side(body: dict, name: str, native: int) -> int:
    """A1111 rounds a size down to a multiple of 8."""
    value = body.get(name)
    if value is None:
        return native
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or value in (
            float("inf"), float("-inf")):
        raise ValidationError(name, value, "must be a whole number")
    side = int(value)
    return side - side % 8 if side >= MIN_SIDE else side  # below the minimum: refused by the request, as given


def asked(body: dict, name: str) -> bool:
    """The client asked for something with this field (a value other than A1111's "nothing" defaults)."""
    value = body.get(name)
    return value not in (None, False, 0, -1, "", [], {}) and not (name == "s_noise" and value == 1) and not (
        name == "eta" and value in (0, 1)) and not (name == "s_tmax" and value == 0)


def _overrides(body: dict, ignored: dict) -> int:
    """The clip skip of ``override_settings`` (A1111's CLIP_stop_at_last_layers N: diffusers' N − 1); the other
    settings that change a picture and that sdxl_ui cannot honour are listed in ``ignored``."""
    overrides = body.get("override_settings") or {}
    clip = overrides.get("CLIP_stop_at_last_layers", body.get("clip_skip", 1))
    clip = 1 if clip is None else _whole("override_settings.CLIP_stop_at_last_layers", clip, 1, MAX_CLIP_SKIP + 1)
    vae = overrides.get("sd_vae")
    if vae not in (None, "", "Automatic", "None"):
        ignored["override_settings.sd_vae"] = f"{str(vae)[:60]!r} is not a VAE of this server: the model's own"
    for key in sorted(set(overrides) - OVERRIDES_READ):
        ignored[f"override_settings.{str(key)[:60]}"] = "not a setting sdxl_ui has"
    return clip - 1


def parse_txt2img(body: Any, native: int, model: str, switches=(), steps_policy: bool = False,
                  styles: dict | None = None) -> Txt2Img:
    """Validate an AUTOMATIC1111 txt2img body completely (nothing reaches the device before this passes).
    ``steps_policy``: the operator applies the CPU steps policy to the steps clients name too; ``styles``: the
    operator's styles.csv (name → (prompt, negative prompt))."""
    if not isinstance(body, dict):
        raise ValidationError("body", type(body).__name__, "must be a JSON object")
    _refuse_unsupported(body, model)
    quality, techniques = _extension(body, switches)
    seed = body.get("seed", -1)
    seed = -1 if seed is None else _whole("seed", seed, -1, MAX_SEED)
    if seed == -1:
        seed = random.randint(0, MAX_SEED)
    n_iter = _whole("n_iter", body.get("n_iter", 1) if body.get("n_iter") is not None else 1, 1, MAX_ITER)
    batch = body.get("batch_size", 1)
    batch = 1 if batch is None else _whole("batch_size", batch, 1, MAX_IMAGES)
    hires = hires_fix(body)
    ignored = {k: v for k, v in IGNORED.items() if k in body and asked(body, k)
               and not (hires is not None and k == "denoising_strength")}
    if hires is not None:
        ignored.update({k: v for k, v in HIRES_IGNORED.items() if asked(body, k)})
    prompt, negative = apply_styles(body, styles or {}, ignored)
    tiling = flag("tiling", body.get("tiling"), False)
    techniques = {**techniques, **({"tiling": "on"} if tiling and "tiling" in {s.name for s in switches} else {})}
    fields = dict(prompt=prompt, negative_prompt=negative, seed=seed, images=batch, techniques=dict(techniques),
                  width=_side(body, "width", native), height=_side(body, "height", native),
                  clip_skip=_overrides(body, ignored), allow_empty_prompt=True, hires=hires)
    if quality is not None:  # the preset's steps, guidance and sampler (clients send their own defaults always)
        fields.update(quality=quality)
    else:
        sampler, schedule = map_sampler(body.get("sampler_name") or body.get("sampler_index"), body.get("scheduler"))
        fields.update(steps=body.get("steps", 50) if body.get("steps") is not None else 50,
                      guidance=body.get("cfg_scale", 7.0) if body.get("cfg_scale") is not None else 7.0,
                      scheduler=sampler, schedule=schedule)
        if body.get("steps") is not None and not steps_policy:  # a client that names its steps gets them
            fields["techniques"].setdefault("steps_policy", "off")
    if isinstance(fields.get("steps"), bool) or "steps" in fields and not isinstance(fields["steps"], (int, float)):
        raise ValidationError("steps", fields["steps"], "must be a whole number")
    try:
        request = GenerationRequest(**fields)
    except ValidationError as exc:
        raise ValidationError(_FIELD_NAMES.get(exc.field, exc.field), exc.value, exc.problem) from None
    notes = plan_sampler(request.sampler, request.schedule).notes if request.scheduler is not Scheduler.AUTO else ()
    echo = {k: v for k, v in body.items() if k in A1111_FIELDS}
    echo.update(steps=request.requested_steps, cfg_scale=request.guidance_scale, width=request.width,
                height=request.height, batch_size=batch, n_iter=n_iter, seed=body.get("seed", -1))
    return Txt2Img(request, n_iter, flag("send_images", body.get("send_images"), True),
                   flag("save_images", body.get("save_images"), False),
                   tuple(sorted(set(ignored) | {k for k in body if k not in MAPPED and k not in IGNORED})), echo,
                   ignored, notes)


def apply_styles(body: dict, styles: dict, ignored: dict) -> tuple[str, str]:
    """The prompt and negative prompt with the request's ``styles`` applied as A1111 does: a style's text replaces
    its ``{prompt}`` placeholder with the prompt, or is appended after a comma."""
    prompt, negative = body.get("prompt", ""), body.get("negative_prompt") or ""
    if prompt is None:
        prompt = ""
    names = body.get("styles") or []
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ValidationError("styles", names, "must be a list of style names")
    for name in names:
        if name not in styles:
            ignored[f"styles.{name[:60]}"] = "no such style in this server's styles.csv"
            continue
        style_prompt, style_negative = styles[name]
        if isinstance(prompt, str):
            prompt = _merge(prompt, style_prompt)
        if isinstance(negative, str):
            negative = _merge(negative, style_negative)
    return prompt, negative


def _merge(text: str, style: str) -> str:
    if not style:
        return text
    if "{prompt}" in style:
        return style.replace("{prompt}", text)
    return f"{text}, {style}" if text.strip() else style


class _NotJson:
    """What ``parse_json`` reads a number JSON does not have as (NaN, Infinity, 1e400, 5,000 digits), to name the
    field it stands in before refusing the body."""

    def __init__(self, token: str, problem: str):
        self.token, self.problem = token if len(token) <= 40 else token[:37] + "...", problem


def parse_json(text: str):
    """A request body as strict JSON (RFC 8259): NaN, Infinity, a number out of range or of more than MAX_DIGITS
    digits is refused naming its field (``seed: ...``), a body nested too deeply naming the body; never a 500."""
    bad: list[_NotJson] = []

    def constant(token):
        bad.append(_NotJson(token, "must be a number; NaN and Infinity are not JSON numbers"))
        return bad[-1]

    def real(token):
        value = float(token)
        if math.isfinite(value):
            return value
        bad.append(_NotJson(token, "is a number out of range"))
        return bad[-1]

    def whole(token):
        if len(token) > MAX_DIGITS + 1:
            bad.append(_NotJson(token, f"is a number of more than {MAX_DIGITS} digits"))
            return bad[-1]
        return int(token)

    if not text.strip():
        return {}
    try:
        body = json.loads(text, parse_constant=constant, parse_float=real, parse_int=whole)
    except RecursionError:
        raise ValidationError("body", text[:40], "is nested too deeply") from None
    except json.JSONDecodeError as exc:
        raise ValidationError("body", text[:80], f"is not valid JSON ({exc.msg} at character {exc.pos + 1})") \
            from None
    if bad:
        raise ValidationError(_where(body, bad[0]) or "body", bad[0].token, bad[0].problem)
    return body


def _where(body, target) -> str | None:
    """The dotted path of ``target`` in ``body`` (breadth first, without recursion)."""
    todo = deque([(body, "")])
    while todo:
        value, path = todo.popleft()
        if value is target:
            return path or None
        items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
        todo.extend((v, f"{path}.{k}" if path else str(k)) for k, v in items)
    return None


def field_names(names) -> str:
    """Field names a client chose, as one log line may show them: escaped (a newline cannot forge a line) and
    truncated, at most SHOWN_NAMES of them."""
    names = list(names)
    shown = ", ".join(repr(str(name)[:64]) for name in names[:SHOWN_NAMES])
    return shown + (f" and {len(names) - SHOWN_NAMES} more" if len(names) > SHOWN_NAMES else "")


def detail_422(exc: ValidationError) -> dict:
    """FastAPI's validation-error shape, naming the field and the value (always valid JSON)."""
    value = exc.value
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError, RecursionError):
        value = repr(value)
    if isinstance(value, str) and len(value) > 200:
        value = value[:197] + "..."
    return {"detail": [{"type": "value_error", "loc": ["body", *exc.field.split(".")], "msg": str(exc),
                        "input": value}]}


def public_name(model) -> str:
    """A model's name as clients see it: a local folder by its last part, never the server's path."""
    model = str(model)
    return (PurePath(model).name or model) if model.startswith(("/", "~", ".")) else model


def error_body(error: str, detail: str) -> dict:
    """AUTOMATIC1111's error shape (modules/api/api.py handle_exception)."""
    return {"error": error, "detail": detail, "body": "", "errors": detail}


def png_base64(result) -> str:
    """A ResultEvent's image as a base64 PNG carrying its `parameters` chunk."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", result.parameters)
    buffer = io.BytesIO()
    result.image.save(buffer, format="PNG", pnginfo=info)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def preview_base64(image) -> str | None:
    if image is None:
        return None
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _planned_steps(results: list, job: Txt2Img) -> int:
    """The steps the pictures were made with, as their infotext says (the CPU steps policy may have applied)."""
    for r in results:
        steps = parse_parameters(r.parameters).get("Steps")
        if str(steps).isdigit():
            return int(steps)
    return job.request.requested_steps


def info_json(job: Txt2Img, results: list, model: str) -> str:
    """The response's `info`: a JSON string in AUTOMATIC1111's shape; its fields agree with the PNG infotext."""
    req = job.request
    sampler, scheduler = a1111_names(req) if req.scheduler is not Scheduler.AUTO else a1111_names(
        dataclasses.replace(req, scheduler=req.sampler))
    seeds = [r.seed for r in results] or job.all_seeds
    n = len(seeds)
    extra = {"sdxl_ui quality": req.quality.value, "sdxl_ui steps run": [r.steps_run for r in results]}
    if job.reasons:
        extra["sdxl_ui ignored"] = dict(job.reasons)
    if job.notes:
        extra["sdxl_ui sampler"] = list(job.notes)
    info = {
        "prompt": req.prompt, "all_prompts": [req.prompt] * n, "negative_prompt": req.negative_prompt,
        "all_negative_prompts": [req.negative_prompt] * n, "seed": seeds[0], "all_seeds": seeds,
        "subseed": seeds[0], "all_subseeds": seeds, "subseed_strength": 0, "width": req.width,
        "height": req.height, "sampler_name": sampler, "scheduler": scheduler, "cfg_scale": req.guidance_scale,
        "steps": _planned_steps(results, job), "batch_size": job.batch_size, "restore_faces": False,
        "face_restoration_model": None, "sd_model_name": model, "sd_model_hash": None, "sd_vae_name": None,
        "sd_vae_hash": None, "seed_resize_from_w": -1, "seed_resize_from_h": -1, "denoising_strength": None,
        "extra_generation_params": extra, "index_of_first_image": 0, "infotexts": [r.parameters for r in results],
        "styles": list(job.echo.get("styles") or []), "job_timestamp": "", "clip_skip": req.clip_skip + 1,
        "is_using_inpainting_conditioning": False, "version": "sdxl_ui",
    }
    return json.dumps(info, ensure_ascii=False)


def txt2img_response(job: Txt2Img, results: list, model: str) -> dict:
    images = [png_base64(r) for r in results] if job.send_images else []
    return {"images": images, "parameters": job.echo, "info": info_json(job, results, model)}


def quality_presets() -> dict:
    """The presets an `sdxl_ui.quality` selects (GET /options shows them)."""
    names = {q: a1111_names(GenerationRequest(prompt="x", scheduler=p.scheduler)) for q, p in PRESETS.items()}
    return {q.value: {"steps": p.steps, "cfg_scale": p.guidance, "sampler_name": names[q][0],
                      "scheduler": names[q][1]} for q, p in PRESETS.items()}


def decode_picture(field_name: str, value: Any):
    """A base64 picture (optionally a ``data:image/…;base64,`` URL) as a lazily opened PIL image, or a
    ValidationError naming the field."""
    import binascii
    import io

    from PIL import Image, UnidentifiedImageError

    if not isinstance(value, str) or not value.strip():
        raise ValidationError(field_name, type(value).__name__, "must be a base64 picture")
    text = value.split(",", 1)[1] if value.startswith("data:") else value
    try:
        raw = base64.b64decode(text, validate=True)
        return Image.open(io.BytesIO(raw))
    except (binascii.Error, ValueError):
        raise ValidationError(field_name, value[:40], "is not base64") from None
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError):
        raise ValidationError(field_name, value[:40], "is not a picture (PNG, JPEG or WebP)") from None
