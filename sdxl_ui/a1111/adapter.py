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
from typing import Any

from ..schema import MAX_IMAGES, MAX_SEED, PRESETS, GenerationRequest, Quality, Scheduler, Toggle, ValidationError, parse_choice

MAX_ITER = 8  # n_iter: sequential batches of one request (each up to MAX_IMAGES images)

# AUTOMATIC1111's sampler names (and k-diffusion aliases) → ours. "DPM++ 2M Karras" is the pre-1.9 combined name.
_SAMPLERS = {
    "euler": Scheduler.EULER, "k_euler": Scheduler.EULER,
    "euler a": Scheduler.EULER_A, "k_euler_a": Scheduler.EULER_A,
    "dpm++ 2m": Scheduler.DPMPP_2M, "k_dpmpp_2m": Scheduler.DPMPP_2M,
    "dpm++ 2m karras": Scheduler.DPMPP_2M_KARRAS, "k_dpmpp_2m_ka": Scheduler.DPMPP_2M_KARRAS,
    "ddim": Scheduler.DDIM, "unipc": Scheduler.UNIPC,
}
SAMPLERS = [  # GET /samplers, in AUTOMATIC1111's shape
    {"name": "DPM++ 2M", "aliases": ["k_dpmpp_2m"], "options": {"scheduler": "karras"}},
    {"name": "Euler a", "aliases": ["k_euler_a", "k_euler_ancestral"], "options": {"uses_ensd": "True"}},
    {"name": "Euler", "aliases": ["k_euler"], "options": {}},
    {"name": "DDIM", "aliases": ["ddim"], "options": {}},
    {"name": "UniPC", "aliases": ["unipc"], "options": {}},
]
SCHEDULERS = [  # GET /schedulers: the ones that map (Karras only with DPM++ 2M)
    {"name": "automatic", "label": "Automatic", "aliases": None, "default_rho": -1, "need_inner_model": False},
    {"name": "uniform", "label": "Uniform", "aliases": None, "default_rho": -1, "need_inner_model": False},
    {"name": "karras", "label": "Karras", "aliases": None, "default_rho": 7.0, "need_inner_model": False},
]
# Ours → (AUTOMATIC1111 sampler, scheduler label), for `info`.
A1111_NAMES = {
    Scheduler.EULER: ("Euler", "Automatic"), Scheduler.EULER_A: ("Euler a", "Automatic"),
    Scheduler.DPMPP_2M: ("DPM++ 2M", "Uniform"), Scheduler.DPMPP_2M_KARRAS: ("DPM++ 2M", "Karras"),
    Scheduler.DDIM: ("DDIM", "Automatic"), Scheduler.UNIPC: ("UniPC", "Automatic"),
}
# The request fields this adapter reads; anything else a client sends (eta, s_churn, restore_faces, …) is ignored.
MAPPED = frozenset({
    "prompt", "negative_prompt", "steps", "cfg_scale", "width", "height", "seed", "sampler_name", "sampler_index",
    "scheduler", "batch_size", "n_iter", "send_images", "save_images", "override_settings",
    "override_settings_restore_afterwards", "sdxl_ui", "enable_hr", "alwayson_scripts", "script_name",
    "script_args"})
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


def map_sampler(sampler_name: Any, scheduler: Any) -> Scheduler:
    """AUTOMATIC1111's sampler + scheduler → ours; an unknown or unsupported one is refused by name."""
    sched = "automatic" if scheduler is None or (isinstance(scheduler, str) and not scheduler.strip()) else scheduler
    if not isinstance(sched, str):
        raise ValidationError("scheduler", scheduler, "must be text")
    sched = sched.strip().lower()
    if sched not in {s["name"] for s in SCHEDULERS}:
        raise ValidationError("scheduler", scheduler, "unknown scheduler; supported: Automatic, Uniform, Karras "
                                                      "(Karras with DPM++ 2M only)")
    if sampler_name is None or (isinstance(sampler_name, str) and not sampler_name.strip()):
        if sched != "automatic":
            raise ValidationError("scheduler", scheduler, "needs a sampler_name")
        return Scheduler.AUTO  # the quality preset's choice
    ours = _SAMPLERS.get(sampler_name.strip().lower()) if isinstance(sampler_name, str) else None
    if ours is None:
        names = ", ".join(s["name"] for s in SAMPLERS)
        raise ValidationError("sampler_name", sampler_name, f"unknown sampler; supported: {names}")
    if ours is Scheduler.DPMPP_2M:
        return Scheduler.DPMPP_2M if sched == "uniform" else Scheduler.DPMPP_2M_KARRAS  # Automatic = Karras
    if sched == "karras" and ours is not Scheduler.DPMPP_2M_KARRAS or sched == "uniform" and ours is \
            Scheduler.DPMPP_2M_KARRAS:
        raise ValidationError("scheduler", scheduler, f"is not supported with sampler {sampler_name!r} "
                                                      "(Karras: DPM++ 2M only)")
    return ours


@dataclass(frozen=True)
class Txt2Img:
    """One valid txt2img job: ``n_iter`` requests of ``batch_size`` images, seeds seed, seed+1, …"""

    request: GenerationRequest  # the first iteration's (its seed is the job's first seed)
    n_iter: int = 1
    send_images: bool = True
    save_images: bool = False
    ignored: tuple[str, ...] = ()  # request fields that were ignored (logged in one line)
    echo: dict = field(default_factory=dict)  # the `parameters` of the response

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


def _flag(name: str, value: Any, default: bool) -> bool:
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
    if body.get("enable_hr"):
        raise ValidationError("enable_hr", body["enable_hr"], "hires fix is not supported by sdxl_ui")
    if body.get("alwayson_scripts"):
        raise ValidationError("alwayson_scripts", sorted(body["alwayson_scripts"]) if isinstance(
            body["alwayson_scripts"], dict) else body["alwayson_scripts"], "scripts are not supported by sdxl_ui")
    if body.get("script_name"):
        raise ValidationError("script_name", body["script_name"], "scripts are not supported by sdxl_ui")
    overrides = body.get("override_settings") or {}
    if not isinstance(overrides, dict):
        raise ValidationError("override_settings", overrides, "must be an object")
    wanted = overrides.get("sd_model_checkpoint")
    if wanted not in (None, "", model):
        raise ValidationError("override_settings.sd_model_checkpoint", wanted,
                              f"switching the model per request is not supported (loaded: {model!r}; the operator "
                              "switches it with POST /sdapi/v1/options)")


def parse_txt2img(body: Any, native: int, model: str, switches=()) -> Txt2Img:
    """Validate an AUTOMATIC1111 txt2img body completely (nothing reaches the device before this passes)."""
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
    fields = dict(prompt=body.get("prompt", ""), negative_prompt=body.get("negative_prompt") or "", seed=seed,
                  images=batch, techniques=techniques,
                  width=native if body.get("width") is None else body["width"],
                  height=native if body.get("height") is None else body["height"])
    if quality is not None:  # the preset's steps, guidance and sampler (clients send their own defaults always)
        fields.update(quality=quality)
    else:
        fields.update(steps=body.get("steps", 50) if body.get("steps") is not None else 50,
                      guidance=body.get("cfg_scale", 7.0) if body.get("cfg_scale") is not None else 7.0,
                      scheduler=map_sampler(body.get("sampler_name") or body.get("sampler_index"),
                                            body.get("scheduler")))
    for name in ("steps", "width", "height"):
        if name in fields and (isinstance(fields[name], bool) or not isinstance(fields[name], (int, float))):
            raise ValidationError(name, fields[name], "must be a whole number")
    try:
        request = GenerationRequest(**fields)
    except ValidationError as exc:
        raise ValidationError(_FIELD_NAMES.get(exc.field, exc.field), exc.value, exc.problem) from None
    echo = {k: v for k, v in body.items() if k in A1111_FIELDS}
    echo.update(steps=request.requested_steps, cfg_scale=request.guidance_scale, width=request.width,
                height=request.height, batch_size=batch, n_iter=n_iter, seed=body.get("seed", -1))
    ignored = tuple(sorted(k for k in body if k not in MAPPED))
    return Txt2Img(request, n_iter, _flag("send_images", body.get("send_images"), True),
                   _flag("save_images", body.get("save_images"), False), ignored, echo)


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


def info_json(job: Txt2Img, results: list, model: str) -> str:
    """The response's `info`: a JSON string in AUTOMATIC1111's shape."""
    req = job.request
    sampler, scheduler = A1111_NAMES[req.sampler]
    seeds = [r.seed for r in results] or job.all_seeds
    n = len(seeds)
    info = {
        "prompt": req.prompt, "all_prompts": [req.prompt] * n, "negative_prompt": req.negative_prompt,
        "all_negative_prompts": [req.negative_prompt] * n, "seed": seeds[0], "all_seeds": seeds,
        "subseed": seeds[0], "all_subseeds": seeds, "subseed_strength": 0, "width": req.width,
        "height": req.height, "sampler_name": sampler, "scheduler": scheduler, "cfg_scale": req.guidance_scale,
        "steps": req.requested_steps, "batch_size": job.batch_size, "restore_faces": False,
        "face_restoration_model": None, "sd_model_name": model, "sd_model_hash": None, "sd_vae_name": None,
        "sd_vae_hash": None, "seed_resize_from_w": -1, "seed_resize_from_h": -1, "denoising_strength": None,
        "extra_generation_params": {"sdxl_ui quality": req.quality.value,
                                    "sdxl_ui steps run": [r.steps_run for r in results]},
        "index_of_first_image": 0, "infotexts": [r.parameters for r in results], "styles": [],
        "job_timestamp": "", "clip_skip": 1, "is_using_inpainting_conditioning": False, "version": "sdxl_ui",
    }
    return json.dumps(info, ensure_ascii=False)


def txt2img_response(job: Txt2Img, results: list, model: str) -> dict:
    images = [png_base64(r) for r in results] if job.send_images else []
    return {"images": images, "parameters": job.echo, "info": info_json(job, results, model)}


def quality_presets() -> dict:
    """The presets an `sdxl_ui.quality` selects (GET /options shows them)."""
    return {q.value: {"steps": p.steps, "cfg_scale": p.guidance, "sampler_name": A1111_NAMES[p.scheduler][0],
                      "scheduler": A1111_NAMES[p.scheduler][1]} for q, p in PRESETS.items()}
