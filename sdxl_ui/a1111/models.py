"""The pydantic models of ``/sdapi/v1``: AUTOMATIC1111's requests and responses (v1.10's ``modules/api/models.py``
and the defaults of ``modules/processing.py``), by its field names, types and defaults, with sdxl_ui's limits and
extension where it has them. No torch.

The responses pass through their model (``response_model`` on every route: FastAPI validates and serialises the
answer, and ``/openapi.json`` describes it). Each model declares its fields in the order the routes write them and is
serialised with ``exclude_unset`` (no default is ever added to an answer) and ``extra="allow"``.

The request bodies are *described* by these models (``/openapi.json``, ``/docs``) but read by the adapter
(``adapter.parse_txt2img``), which refuses a wrong field with its one-line ``field: problem (got value)`` message and
tolerates the fields real clients send beside A1111's (SillyTavern's ``url``, nulls for defaults): a request is never
refused by these models.
"""
from __future__ import annotations

import json
from typing import Any, Literal, Optional

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from ..schema import MAX_IMAGES, MAX_SEED, MAX_SIDE, MAX_STEPS, MIN_SIDE, Quality, Toggle
from .adapter import MAX_ITER


class Open(BaseModel):
    """A1111's answers may carry more than its models say (extensions add fields): every model allows extras."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())


# ---------------------------------------------------------------- requests

QualityName = Literal[tuple(q.value for q in Quality)]  # type: ignore[valid-type]
ToggleName = Literal[tuple(t.value for t in Toggle)]  # type: ignore[valid-type]


class SdxlUiExtension(BaseModel):
    """sdxl_ui's own txt2img field (docs/api.md)."""

    model_config = ConfigDict(extra="forbid")
    quality: Optional[QualityName] = Field(None, description="a quality preset: its steps, guidance and sampler "
                                                              "replace the request's (also override_settings."
                                                              "sdxl_ui_quality)")
    techniques: dict[str, ToggleName] = Field(default_factory=dict, description="technique switches by name "
                                                                                "(GET /options: sdxl_ui_techniques)")


class Txt2ImgRequest(Open):
    """AUTOMATIC1111's StableDiffusionTxt2ImgProcessingAPI. A field sdxl_ui cannot honour is named in the answer's
    ``info`` (``sdxl_ui ignored``) with what the client gets instead; fields A1111 does not know are ignored."""

    model_config = ConfigDict(title="StableDiffusionProcessingTxt2Img")
    prompt: Optional[str] = ""
    negative_prompt: Optional[str] = ""
    styles: Optional[list[str]] = Field(None, description="names from the server's --styles file")
    seed: Optional[int] = Field(-1, ge=-1, le=MAX_SEED, description="-1: a random seed")
    subseed: Optional[int] = -1
    subseed_strength: Optional[float] = 0
    seed_resize_from_h: Optional[int] = -1
    seed_resize_from_w: Optional[int] = -1
    sampler_name: Optional[str] = Field(None, description="GET /samplers (names or aliases); none: the quality "
                                                          "preset's (Euler)")
    scheduler: Optional[str] = Field(None, description="the schedule type, GET /schedulers")
    batch_size: Optional[int] = Field(1, ge=1, le=MAX_IMAGES)
    n_iter: Optional[int] = Field(1, ge=1, le=MAX_ITER)
    steps: Optional[int] = Field(50, ge=1, le=MAX_STEPS, description="named steps are run as asked (the operator "
                                                                     "may apply the CPU steps policy: "
                                                                     "--api-steps-policy)")
    cfg_scale: Optional[float] = 7.0
    distilled_cfg_scale: Optional[float] = Field(3.5, description="Forge's; ignored")
    width: Optional[int] = Field(None, ge=MIN_SIDE, le=MAX_SIDE, description="rounded down to a multiple of 8; "
                                                                             "none: the model's native size "
                                                                             "(A1111: 512)")
    height: Optional[int] = Field(None, ge=MIN_SIDE, le=MAX_SIDE, description="as width")
    restore_faces: Optional[bool] = None
    tiling: Optional[bool] = Field(None, description="seamless tiling (the tiling technique)")
    do_not_save_samples: Optional[bool] = False
    do_not_save_grid: Optional[bool] = False
    eta: Optional[float] = None
    denoising_strength: Optional[float] = 0.75
    s_min_uncond: Optional[float] = None
    s_churn: Optional[float] = None
    s_tmax: Optional[float] = None
    s_tmin: Optional[float] = None
    s_noise: Optional[float] = None
    override_settings: Optional[dict[str, Any]] = Field(None, description="read: CLIP_stop_at_last_layers, "
                                                                          "sd_model_checkpoint (the loaded one "
                                                                          "only), sdxl_ui_quality")
    override_settings_restore_afterwards: Optional[bool] = True
    refiner_checkpoint: Optional[str] = None
    refiner_switch_at: Optional[float] = None
    disable_extra_networks: Optional[bool] = False
    firstpass_image: Optional[str] = None
    comments: Optional[dict[str, Any]] = None
    enable_hr: Optional[bool] = Field(False, description="the hires fix: the picture upscaled by hr_scale (or to "
                                                         "hr_resize_x × hr_resize_y) with hr_upscaler, then redrawn "
                                                         "at denoising_strength")
    firstphase_width: Optional[int] = 0
    firstphase_height: Optional[int] = 0
    hr_scale: Optional[float] = 2.0
    hr_upscaler: Optional[str] = Field(None, description="a name of GET /latent-upscale-modes or /upscalers "
                                                         "(default Latent)")
    hr_second_pass_steps: Optional[int] = 0
    hr_resize_x: Optional[int] = 0
    hr_resize_y: Optional[int] = 0
    hr_checkpoint_name: Optional[str] = None
    hr_additional_modules: Optional[list[str]] = Field(None, description="Forge's; ignored")
    hr_sampler_name: Optional[str] = None
    hr_scheduler: Optional[str] = None
    hr_prompt: Optional[str] = ""
    hr_negative_prompt: Optional[str] = ""
    hr_cfg: Optional[float] = Field(1.0, description="Forge's; ignored")
    hr_distilled_cfg: Optional[float] = Field(3.5, description="Forge's; ignored")
    force_task_id: Optional[str] = None
    sampler_index: Optional[str] = Field("Euler", description="the sampler, when sampler_name is not given")
    script_name: Optional[str] = Field(None, description="a name is refused: no scripts here")
    script_args: Optional[list] = []
    send_images: Optional[bool] = True
    save_images: Optional[bool] = Field(False, description="false: the pictures are not kept on the server")
    alwayson_scripts: Optional[dict[str, Any]] = {}
    infotext: Optional[str] = None
    sdxl_ui: Optional[SdxlUiExtension] = None


class PNGInfoRequest(Open):
    image: str = Field(title="Image", description="The base64 encoded PNG image (a data: URL too)")


class OptionsRequest(Open):
    """POST /options: only ``sd_model_checkpoint`` is read (the operator switches the model: GET /sd-models lists
    them); the other settings are ignored, so GET /options may be posted back whole."""

    sd_model_checkpoint: Optional[str] = None


class Img2ImgRequest(Txt2ImgRequest):
    """AUTOMATIC1111's StableDiffusionImg2ImgProcessingAPI: txt2img's fields, the picture to start from and, with
    ``mask``, inpainting with A1111's options; ``resize_mode`` 0 (just resize) is what runs."""

    model_config = ConfigDict(title="StableDiffusionProcessingImg2Img")
    init_images: Optional[list[str]] = Field(None, description="one picture, base64 (PNG, JPEG or WebP; a data: "
                                                               "URL too)")
    denoising_strength: Optional[float] = Field(0.75, gt=0, le=1, description="how much of the picture is "
                                                                             "redrawn")
    resize_mode: Optional[int] = Field(0, description="0: just resize (the only mode here)")
    mask: Optional[str] = Field(None, description="inpainting: base64, the picture's size; white = redraw")
    mask_blur: Optional[int] = Field(4, ge=0, le=64, description="the mask's edge blurred by this many pixels")
    inpainting_fill: Optional[int] = Field(0, ge=0, le=3, description="masked content: 0 fill, 1 original, "
                                                                      "2 latent noise, 3 latent nothing")
    inpaint_full_res: Optional[bool] = Field(False, description="true: only the masked region (with "
                                                                "inpaint_full_res_padding) is drawn at the size asked")
    inpaint_full_res_padding: Optional[int] = Field(0, ge=0, le=256, description="pixels around the mask")
    inpainting_mask_invert: Optional[int] = Field(0, ge=0, le=1, description="1: redraw what the mask keeps")


class ExtrasBaseRequest(Open):
    """AUTOMATIC1111's ExtrasBaseRequest: upscaling only (face restoration is not in sdxl_ui: a visibility above 0
    is named in ``html_info`` as ignored). ``upscaler_1`` "None" leaves the picture as it is, as in A1111."""

    resize_mode: Optional[int] = Field(0, ge=0, le=1, description="0: by upscaling_resize, 1: to "
                                                                  "upscaling_resize_w × upscaling_resize_h")
    show_extras_results: Optional[bool] = Field(True, description="false: no picture in the answer")
    gfpgan_visibility: Optional[float] = Field(0, description="ignored above 0 (no face restoration here)")
    codeformer_visibility: Optional[float] = Field(0, description="ignored above 0 (no face restoration here)")
    codeformer_weight: Optional[float] = Field(0, description="ignored")
    upscaling_resize: Optional[float] = Field(2, ge=1, le=8, description="times the size (resize_mode 0)")
    upscaling_resize_w: Optional[int] = Field(512, ge=64, le=8192, description="the width (resize_mode 1)")
    upscaling_resize_h: Optional[int] = Field(512, ge=64, le=8192, description="the height (resize_mode 1)")
    upscaling_crop: Optional[bool] = Field(True, description="resize_mode 1: crop the centre to the size")
    upscaler_1: Optional[str] = Field("None", description="GET /upscalers: a built-in or a model file's name")
    upscaler_2: Optional[str] = Field("None", description="blended over upscaler_1's picture at its visibility")
    extras_upscaler_2_visibility: Optional[float] = Field(0, ge=0, le=1, description="upscaler_2's share")
    upscale_first: Optional[bool] = Field(False, description="ignored (nothing else runs)")


class ExtrasSingleImageRequest(ExtrasBaseRequest):
    image: str = Field("", description="the picture, base64 (PNG, JPEG or WebP; a data: URL too)")


class FileData(Open):
    data: str = Field(description="base64 picture")
    name: str = Field(description="its file name")


class ExtrasBatchImagesRequest(ExtrasBaseRequest):
    imageList: list[FileData] = Field(description="the pictures (at most 16)")


REQUESTS = {"txt2img": Txt2ImgRequest, "img2img": Img2ImgRequest, "png-info": PNGInfoRequest,
            "options": OptionsRequest, "extra-single-image": ExtrasSingleImageRequest,
            "extra-batch-images": ExtrasBatchImagesRequest}


# ---------------------------------------------------------------- responses

class TextToImageResponse(Open):
    images: Optional[list[str]] = Field(None, title="Image", description="The generated images in base64 format "
                                                                         "(PNG, with their parameters chunk)")
    parameters: dict = Field(description="The request's A1111 fields, as run")
    info: str = Field(description="A JSON string: A1111's processing info (seeds, infotexts, …)")


class ExtrasSingleImageResponse(Open):
    html_info: str = Field(description="what the upscale did (HTML, as A1111's)")
    image: Optional[str] = Field(None, description="the upscaled picture, base64 PNG")


class ExtrasBatchImagesResponse(Open):
    html_info: str = Field(description="what the upscale did (HTML, as A1111's)")
    images: list[str] = Field(description="the upscaled pictures, base64 PNG, in the order sent")


class ProgressResponse(Open):
    progress: float = Field(title="Progress", description="The progress with a range of 0 to 1")
    eta_relative: float = Field(title="ETA in secs")
    state: dict = Field(title="State", description="The current state snapshot")
    current_image: Optional[str] = Field(None, title="Current image", description="The preview in base64 format")
    textinfo: Optional[str] = Field(None, title="Info text")


class PNGInfoResponse(Open):
    info: str = Field(title="Image info", description="The parameters text of the image")
    items: dict = Field(title="Items", description="The image's other text fields")
    parameters: dict = Field(title="Parameters", description="The parameters text, parsed")


class SDModelItem(Open):
    title: str
    model_name: str
    hash: Optional[str]
    sha256: Optional[str]
    filename: str
    config: Optional[str]


class SamplerItem(Open):
    name: str
    aliases: list[str]
    options: dict[str, Any]


class SchedulerItem(Open):
    name: str
    label: str
    aliases: Optional[list[str]]
    default_rho: Optional[float]
    need_inner_model: Optional[bool]


class ScriptsList(Open):
    txt2img: Optional[list] = None
    img2img: Optional[list] = None


class Options(Open):
    """The settings sdxl_ui has (A1111's are many more; a client reads the ones it knows)."""

    sd_model_checkpoint: Optional[str] = None
    sd_checkpoint_hash: Optional[str] = None
    samples_format: Optional[str] = None
    samples_save: Optional[bool] = None
    live_previews_enable: Optional[bool] = None
    sdxl_ui_quality_presets: Optional[dict[str, dict[str, Any]]] = Field(None, description="the presets "
                                                                                           "sdxl_ui.quality selects")
    sdxl_ui_techniques: Optional[list[str]] = Field(None, description="the switches sdxl_ui.techniques names")


class MemoryResponse(Open):
    ram: dict = Field(title="RAM", description="System memory stats")
    cuda: dict = Field(title="CUDA", description="not reported by sdxl_ui (an error entry)")


class EmbeddingsResponse(Open):
    loaded: dict[str, Any] = Field(title="Loaded", description="none in sdxl_ui")
    skipped: dict[str, Any] = Field(title="Skipped", description="none in sdxl_ui")


class PromptStyleItem(Open):
    name: str
    prompt: Optional[str]
    negative_prompt: Optional[str]


class LoraItem(Open):
    name: str
    alias: str
    path: str = Field(description="the file's name inside the server's LoRA folder (never the server's path)")
    metadata: dict = Field(description="the safetensors header's __metadata__")


class Flags(Open):
    """The app's flags under A1111's argparse names; a password is "***", a folder or file its name only."""

    api: Optional[bool] = None
    nowebui: Optional[bool] = None
    api_auth: Optional[str] = None
    ckpt: Optional[str] = None
    ckpt_dir: Optional[str] = None
    lora_dir: Optional[str] = None
    port: Optional[int] = None
    use_cpu: Optional[list[str]] = None
    xformers: Optional[bool] = None
    medvram: Optional[bool] = None
    lowvram: Optional[bool] = None
    no_half: Optional[bool] = None
    listen: Optional[bool] = None
    server_name: Optional[str] = None
    share: Optional[bool] = None
    gradio_auth: Optional[str] = None
    styles_file: Optional[list[str]] = None


class UpscalerItem(Open):
    name: str
    model_name: Optional[str]
    model_path: Optional[str]
    model_url: Optional[str]
    scale: Optional[float]


class LatentUpscalerModeItem(Open):
    name: str


class SDVaeItem(Open):
    model_name: str
    filename: str


class SDModuleItem(Open):
    model_name: str
    filename: str


class FaceRestorerItem(Open):
    name: str
    cmd_dir: Optional[str]


class HypernetworkItem(Open):
    name: str
    path: Optional[str]


class RealesrganItem(Open):
    name: str
    path: Optional[str]
    scale: Optional[int]


EMPTY_LIST_ITEMS = {"upscalers": UpscalerItem, "latent-upscale-modes": LatentUpscalerModeItem, "sd-vae": SDVaeItem,
                    "sd-modules": SDModuleItem, "face-restorers": FaceRestorerItem,
                    "hypernetworks": HypernetworkItem, "realesrgan-models": RealesrganItem}


class Nothing(Open):
    """``{}``: what A1111 answers to interrupt and skip."""


# ---------------------------------------------------------------- errors (documented; written by the routes)

class Detail(BaseModel):
    detail: str = Field(description="what is wrong, in one line (401 login, 403, 413, 429 login throttle)")


class ValidationItem(BaseModel):
    type: str
    loc: list[str] = Field(description='["body", the A1111 field, …]')
    msg: str = Field(description="field: problem (got value)")
    input: Any = None


class ValidationDetail(BaseModel):
    """422: FastAPI's shape, naming the field and the value."""

    detail: list[ValidationItem]


class ErrorResponse(BaseModel):
    """A1111's error shape (modules/api/api.py handle_exception): 403, 429 job limit, 500, 501, 503 queue full."""

    error: str
    detail: str
    body: str
    errors: str


# ---------------------------------------------------------------- how the routes use them

class A1111JSON(JSONResponse):
    """The routes' answers after their ``response_model``: JSON as ``reply`` writes it (\\u escapes, so a text that is
    not valid Unicode, say a lone surrogate a client sent, is still sent). A JSONResponse, so that the OpenAPI
    schema names the answer's model."""

    def render(self, content) -> bytes:
        return json.dumps(content).encode("ascii")


ERRORS = {401: (Detail, "no credentials, or a wrong login (WWW-Authenticate: Basic)"),
          403: (ErrorResponse, "only the operator may do this"), 413: (Detail, "a body over the limit"),
          422: (ValidationDetail, "a field refused: `field: problem (got value)`"),
          429: (Detail, "too many failed logins from this address (or the job limit: A1111's error shape)"),
          500: (ErrorResponse, "the run failed (out of memory, …)"),
          503: (ErrorResponse, "the queue is full or the app is stopping (Retry-After)")}


def errors(*codes: int) -> dict:
    """The documented error answers of a route (OpenAPI ``responses``)."""
    return {code: {"model": ERRORS[code][0], "description": ERRORS[code][1]} for code in codes}


def body_of(name: str) -> dict:
    """The OpenAPI request body of a route whose body the adapter reads itself (``models.REQUESTS``; the schema is
    added to the components by ``openapi.schema``): described, never validated by pydantic."""
    title = REQUESTS[name].model_config.get("title") or REQUESTS[name].__name__
    return {"requestBody": {"required": False, "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{title}"}}}}}


def answers(model, *codes: int) -> dict:
    """``route(...)`` arguments: the answer's model (validated and serialised, no default added) and its errors."""
    return {"response_model": model, "response_model_exclude_unset": True, "responses": errors(*codes)}
