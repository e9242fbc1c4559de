"""The Gradio page. Layout and handlers only: typed events from the service become component updates.

No torch here (the service object is passed in). Per-user state lives in gr.State or is keyed by the session
(the running job's cancel token), never in module globals.

Every handler here can be called over HTTP by anyone who can reach the page (the browser calls them that way;
api_visibility only hides them from the API page), so each one checks its own input and, where it changes what
every user gets, who is asking (access.py).
"""
from __future__ import annotations

import functools
import inspect
import logging
import secrets
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import gradio as gr

from ..schema import (
    MAX_IMAGES,
    MAX_STEPS,
    PRESETS,
    Decoder,
    ErrorEvent,
    ErrorKind,
    GenerationRequest,
    LogEvent,
    ProgressEvent,
    Quality,
    ResultEvent,
    Schedule,
    Scheduler,
    ServiceState,
    Toggle,
    ValidationError,
)
from ..samplers import SAMPLERS, SCHEDULES
from ..jobs import CancelToken, HourlyLimit, capabilities_of
from ..optimizations.registry import SWITCHES
from .access import Access
from .loras import lora_panel, wire_loras
from .pictures import TAB_PICTURES, TAB_TEXT, hires_fix, hires_panel, picture_fields, pictures_tab, read_editor, \
    wire_send
from .render import log_html, progress_html, status_html

log = logging.getLogger("sdxl_ui")

# SDXL's trained aspect-ratio buckets at its native 1024²; other models get them scaled to their own native side.
SDXL_BUCKETS = [(1024, 1024), (1152, 896), (896, 1152), (1216, 832), (832, 1216), (1344, 768), (768, 1344)]


def _aspect_sizes(native: int) -> list[str]:
    """SDXL's aspect ratios at the model's native size (the demo model's 128: 128×128, 144×112, …)."""
    def scale(side):
        return max(64, round(side * native / 1024 / 8) * 8)

    return list(dict.fromkeys(f"{scale(w)}×{scale(h)}" for w, h in SDXL_BUCKETS))


CUSTOM = "Custom"
QUALITY_LABELS = {"High quality": Quality.HIGH, "Fast": Quality.FAST}
FEW_STEP_LABEL = "Few-step"  # the start of the model's own label, e.g. "Few-step (4 steps)" (few_step.offers)
CONCURRENCY_ID = "device"  # one generation at a time per device (per worker replica), whatever the session


@dataclass
class UIConfig:
    queue_size: int = 16
    share_message: str | None = None  # shown in the status panel (share link, or why there is none)
    max_jobs_per_user: int = 0  # 0 = unlimited queued+running jobs per session
    access: Access = field(default_factory=Access)  # who is the operator (may switch the model for everyone)
    limit: HourlyLimit | None = None  # shared with the A1111 API (--api): one count per user (None: its own)


@dataclass
class _Runs:
    """Cancel tokens of running jobs, keyed by session hash (not module state: one per UI instance)."""
    tokens: dict = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self, session: str) -> CancelToken:
        token = CancelToken()
        with self.lock:
            self.tokens[session] = token
        return token

    def finish(self, session: str, token: CancelToken) -> None:
        with self.lock:
            if self.tokens.get(session) is token:
                del self.tokens[session]

    def cancel(self, session: str) -> bool:
        with self.lock:
            token = self.tokens.get(session)
        if token is not None:
            token.cancel()
        return token is not None


def _user_key(request) -> str:
    if request is None:
        return "local"
    return getattr(request, "username", None) or (request.client.host if request.client else "unknown")


def _size_choices(native: int) -> list[str]:
    """The model's native size first, then SDXL's aspect ratios at that size, then Custom."""
    return [f"Native ({native}×{native})"] + [s for s in _aspect_sizes(native) if s != f"{native}×{native}"] + [
        CUSTOM]


def _size(preset, width, height, native: int) -> tuple:
    if preset == CUSTOM:
        return width, height
    if isinstance(preset, str) and preset.startswith("Native"):
        return native, native
    sizes = _aspect_sizes(native)
    if preset not in sizes:  # an API client can send anything, None included
        raise ValidationError("size", preset, f"must be one of Native, {', '.join(sizes)}, {CUSTOM}")
    w, h = preset.split("×")
    return int(w), int(h)


def _demo_offered(status: dict) -> bool:
    """The state in which the page shows "continue with the demo model": the model failed to load (a model that
    is itself a stand-in, with a note, is never replaced)."""
    return status.get("state") == ServiceState.ERROR and status.get("note") is None


def _serve_copy(path: str, cache_dir: str) -> str:
    """A copy of a saved PNG for this session only, in an unguessable folder of gradio's cache. The outputs folder
    itself is never served: its names (counter-seed) can be guessed, and the PNGs carry their prompts."""
    folder = Path(cache_dir) / f"sdxl-{secrets.token_hex(16)}"
    folder.mkdir(parents=True)
    target = folder / Path(path).name
    shutil.copyfile(path, target)
    return str(target)


def _public_text(text: str, settings) -> str:
    """What the page may show of a log or status line: the server's own paths (outputs folder, a local model
    folder) are replaced by short names, so the page does not reveal the server's file layout."""
    outputs = Path(settings.outputs)
    replacements = {str(outputs.resolve()): "outputs", str(outputs.absolute()): "outputs"}
    model = str(settings.model)
    if model.startswith(("/", "~", ".")):
        replacements[str(Path(model).expanduser().resolve())] = Path(model).name or model
        replacements[model] = Path(model).name or model
    # The LoRA folder and the LoRA files on this machine: by their names (a hub id stays as it is).
    local = [str(settings.lora_dir)] + [spec.source for spec in getattr(settings, "loras", ())]
    for path in (Path(p).expanduser() for p in local if p.startswith(("/", "~", ".")) or Path(p).exists()):
        for long in {str(path), str(path.absolute()), str(path.resolve())}:
            replacements[long] = path.name or long
    for long, short in sorted(replacements.items(), key=lambda kv: -len(kv[0])):
        if long and long not in (".", "/"):
            text = text.replace(long, short)
    return text


def _status_renderer(service, config: UIConfig):
    """The status panel's HTML now (the server's own paths replaced by short names)."""
    def status_update():
        status = service.status()
        for key in ("model", "message"):
            if isinstance(status.get(key), str):
                status[key] = _public_text(status[key], service.settings)
        for replica in status.get("replicas") or []:  # several workers (Ray backend): each one's own message
            if isinstance(replica.get("message"), str):
                replica["message"] = _public_text(replica["message"], service.settings)
        status["rows"] = [{**row, "detail": _public_text(str(row.get("detail", "")), service.settings)}
                          for row in status.get("rows") or []]
        status["share"] = config.share_message
        return status_html(status)

    return status_update


def _offers(service) -> dict:
    """What the model offers beyond the presets: its Few-step quality label and a tiny decoder (few_step.offers)."""
    return service.offers() if capabilities_of(service).offers else {"few_step": None, "tiny_decoder": False}


def _quality_choices(offers: dict) -> list[str]:
    """The Quality radio's labels: the presets', and the model's Few-step (e.g. "Few-step (4 steps)") if it has one."""
    return [*QUALITY_LABELS, *([offers["few_step"]] if offers["few_step"] else [])]


def quality_of(label):
    """The Quality a radio label (or a value, from the API) names; None for anything else."""
    if isinstance(label, Quality):
        return label
    if not isinstance(label, str):
        return None
    if label.startswith(FEW_STEP_LABEL):
        return Quality.FEW_STEP
    return QUALITY_LABELS.get(label) or next((q for q in Quality if q.value == label), None)


def _quality_defaults(service, quality) -> tuple[int, float]:
    """(steps, guidance) for a quality: the model profile's (e.g. Turbo: 4 / 1 steps, guidance 0), else the preset's
    (a backend without profiles)."""
    if capabilities_of(service).quality_defaults:
        return service.quality_defaults(quality)
    return PRESETS[quality].steps, PRESETS[quality].guidance


def _advanced(service, native: int, offers: dict) -> dict:
    """The Advanced accordion's components."""
    sizes = _size_choices(native)
    with gr.Accordion("Advanced", open=False):
        preset_steps, preset_guidance = _quality_defaults(service, Quality.HIGH)  # a few-step profile's own
        steps = gr.Slider(1, MAX_STEPS, value=preset_steps, step=1, label="Steps", elem_id="steps")
        steps_note = gr.Markdown(service.steps_note(preset_steps), elem_id="steps-note")
        guidance = gr.Slider(0, 30, value=preset_guidance, step=0.5, label="Guidance (CFG)")
        with gr.Row():
            seed = gr.Number(label="Seed (blank = random)", value=None, precision=0, elem_id="seed")
            images = gr.Slider(1, MAX_IMAGES, value=1, step=1, label="Images per run", elem_id="images")
        size = gr.Dropdown(sizes, value=sizes[0], label="Size")
        with gr.Row(visible=False) as custom_row:
            width = gr.Number(label="Width", value=native, precision=0)
            height = gr.Number(label="Height", value=native, precision=0)
        with gr.Row():  # AUTOMATIC1111's samplers and schedule types, by their names (sdxl_ui/samplers.py)
            scheduler = gr.Dropdown([("auto", Scheduler.AUTO.value)] + [(s.name, s.key.value) for s in SAMPLERS],
                                    value=Scheduler.AUTO.value, elem_id="scheduler",
                                    label="Sampler (auto: Euler for High quality, DPM++ 2M Karras for Fast)")
            schedule = gr.Dropdown([(s.label, s.key.value) for s in SCHEDULES], value=Schedule.AUTOMATIC.value,
                                   elem_id="schedule", label="Schedule type (automatic: the sampler's own)")
        with gr.Row():  # one switch per unit that offers one (optimizations/registry.py)
            switches = [gr.Dropdown([t.value for t in Toggle], value=Toggle.AUTO.value,
                                    elem_id=s.name.replace("_", "-"), label=s.label) for s in SWITCHES]
        server = "tiny decoder" if service.settings.decoder == "tiny" else "full VAE"
        decoder = gr.Radio([(f"Server's ({server})", Decoder.AUTO.value), ("Full VAE", Decoder.FULL.value),
                            ("Tiny decoder (faster, softer detail)", Decoder.TINY.value)],
                           value=Decoder.AUTO.value, label="Final decode", elem_id="decoder",
                           visible=offers["tiny_decoder"])
        loras = lora_panel(service)
    return dict(steps=steps, steps_note=steps_note, guidance=guidance, seed=seed, images=images, size=size,
                custom_row=custom_row, width=width, height=height, scheduler=scheduler, schedule=schedule,
                switches=switches, decoder=decoder, **loras)


def _layout(service, status_update) -> SimpleNamespace:
    """The page's components (inside the Blocks context), by name: the prompt, the quality and Generate at the top
    with the picture beside them (the live preview is drawn in the same pane, as A1111 and Fooocus do), the status
    as one line with the optimization report folded beneath it."""
    gr.Markdown("## sdxl_ui — Stable Diffusion XL on the hardware you have")
    status_panel = gr.HTML(status_update(), elem_id="status-panel")
    demo_button = gr.Button("Continue with the demo model (offline: simple shapes and colours — a stand-in for "
                            "SDXL weights)", visible=False, elem_id="use-demo")
    status_timer = gr.Timer(2.0, active=True)
    offers = _offers(service)  # read once for the page: the model's Few-step quality, a tiny decoder
    with gr.Row():
        with gr.Column(scale=3):
            prompt = gr.Textbox(label="Prompt", lines=3, placeholder="a red fox in the snow, golden hour",
                                elem_id="prompt")
            negative = gr.Textbox(label="Negative prompt", lines=1, elem_id="negative")
            quality = gr.Radio(_quality_choices(offers), value="High quality", label="Quality",
                               elem_id="quality")
            with gr.Tabs(selected=TAB_TEXT) as tabs:
                with gr.Tab("Text to image", id=TAB_TEXT):
                    generate_btn = gr.Button("Generate", variant="primary", elem_id="generate")
                    hires = hires_panel(service.settings.upscaler_dir)
                with gr.Tab("Image to image", id=TAB_PICTURES):
                    pictures = pictures_tab()
            with gr.Row():
                progress = gr.HTML(progress_html(0, "idle"), elem_id="progress")
                stop_btn = gr.Button("Stop", variant="stop", elem_id="stop", scale=0, min_width=90)
            advanced = _advanced(service, service.native_size(), offers)
            log_pane = gr.HTML(log_html([]), label="Log", show_label=True, container=True, autoscroll=True,
                               elem_id="log")
        with gr.Column(scale=2):
            output = gr.Image(label="Image", type="filepath", format="png", interactive=False, elem_id="output",
                              height=448)
            with gr.Row():
                used_seed = gr.Number(label="Used seed", interactive=False, precision=0, elem_id="used-seed")
                reuse = gr.Button("Reuse seed")
            send_btn = gr.Button("Send to image to image", elem_id="send-to-pictures")
            gallery = gr.Gallery(label="This session's images", columns=6, height=160, object_fit="contain",
                                 fit_columns=False, allow_preview=True, elem_id="gallery")  # thumbnails
    history = gr.State([])
    return SimpleNamespace(
        status_panel=status_panel, demo_button=demo_button, status_timer=status_timer, prompt=prompt,
        negative=negative, quality=quality, generate_btn=generate_btn, stop_btn=stop_btn, progress=progress,
        log_pane=log_pane, output=output, used_seed=used_seed, reuse=reuse, gallery=gallery,
        history=history, tabs=tabs, send_btn=send_btn, **advanced, **hires, **pictures)


def _wire_form(page, service) -> None:
    """Small helpers of the form. preprocess=False: gradio's own checks of a value raise (and print a traceback)
    before the handler runs; these handlers take any value and ignore what they cannot use."""
    def on_quality(label):
        quality_choice = quality_of(label)
        if quality_choice is None:
            return gr.update(), gr.update(), gr.update()
        steps, guidance = _quality_defaults(service, quality_choice)
        return gr.update(value=steps), gr.update(value=guidance), service.steps_note(steps)

    def on_steps(n):
        try:
            return service.steps_note(GenerationRequest(prompt="-", steps=n).requested_steps)
        except ValidationError:
            return ""

    page.quality.change(on_quality, page.quality, [page.steps, page.guidance, page.steps_note], queue=False,
                        api_visibility="private", preprocess=False)
    page.steps.change(on_steps, page.steps, page.steps_note, queue=False, api_visibility="private",
                      preprocess=False)
    page.size.change(lambda p: gr.update(visible=p == CUSTOM), page.size, page.custom_row, queue=False,
                     api_visibility="private", preprocess=False)
    page.reuse.click(None, page.used_seed, page.seed, js="(s) => s", queue=False)  # in the browser only


def _wire_status(demo, page, service, config: UIConfig, status_update) -> None:
    """The status panel's refresh, and the operator's "continue with the demo model"."""
    def refresh_status():
        status = service.status()
        busy = status.get("state") in (ServiceState.LOADING, ServiceState.NOT_LOADED)
        return status_update(), gr.update(visible=_demo_offered(status)), gr.Timer(active=busy)

    outputs = [page.status_panel, page.demo_button, page.status_timer]
    page.status_timer.tick(refresh_status, None, outputs, queue=False, api_visibility="private")
    demo.load(refresh_status, None, outputs, queue=False, api_visibility="private")

    def use_demo_model(request: gr.Request):
        # Changes the model for every user: only in the state its button is shown for (the model failed to
        # load), and only for the operator. A direct HTTP call is refused like a click would be.
        who = config.access.describe(request)
        if not _demo_offered(service.status()):
            log.warning("refused 'continue with the demo model' from %s: the model is not in a failed state", who)
            raise gr.Error("The demo model is offered only while the configured model cannot be loaded.",
                           print_exception=False)
        if not config.access.is_operator(request):
            log.warning("refused 'continue with the demo model' from %s: not the operator", who)
            raise gr.Error("Only the operator of this app may switch the model (docs/security.md).",
                           print_exception=False)
        log.info("%s switched to the demo model", who)
        service.reconfigure(service.settings.with_(model="demo", refiner="auto", loras=(), profile="auto"))
        service.preload_in_background()
        choices, offers = _size_choices(service.native_size()), _offers(service)  # the demo's Few-step, decoder
        return status_update(), gr.update(visible=False), gr.Timer(active=True), gr.update(
            choices=choices, value=choices[0]), gr.update(choices=_quality_choices(offers), value="High quality"), \
            gr.update(visible=offers["tiny_decoder"])

    page.demo_button.click(use_demo_model, None, [*outputs, page.size, page.quality, page.decoder], queue=False,
                           api_visibility="private")


def _request_fields(quality_label, n_steps, cfg, seed_value, n_images, sched, schedule, decoder,
                    techniques) -> dict:
    """The fields both tabs' requests share (Quality and Advanced; the size is text to image's own)."""
    quality_value = quality_of(quality_label) or quality_label  # anything else: refused by the request, by name
    return dict(quality=quality_value, steps=n_steps, guidance=cfg, seed=seed_value, images=n_images,
                scheduler=sched, schedule=schedule or Schedule.AUTOMATIC.value, decoder=decoder or "auto",
                techniques={k: v for k, v in (techniques or {}).items() if v is not None})


def _job_runner(demo, page, service, config: UIConfig, runs: _Runs, limit: HourlyLimit, status_update):
    """The body of a Generate run (either tab's): build the request (``build()``: a ValidationError is one line in
    the log), rate-limit, then turn the service's events into page updates."""
    def run_job(lines, build, session_history, request):
        session = request.session_hash if request is not None else "api"
        try:
            req = build()
        except ValidationError as exc:
            log.info("refused a request from %s: %s", config.access.describe(request), exc)  # one line
            lines.append(f"❌ {exc}")
            yield {page.log_pane: log_html(lines), page.progress: progress_html(0, "not started: fix the input")}
            return
        refused = limit.check(_user_key(request), time.monotonic())
        if refused:
            lines.append(f"❌ {refused}")
            yield {page.log_pane: log_html(lines), page.progress: progress_html(0, "not started: rate limit")}
            return
        token = runs.start(session)
        paths = list(session_history or [])
        shown: dict = {}
        try:
            for event in service.generate(req, cancel=token):
                match event:
                    case LogEvent():
                        lines.append(_public_text(event.message, service.settings))
                        yield {page.log_pane: log_html(lines)}
                    case ProgressEvent():
                        lines.append(event.line())
                        update = {page.log_pane: log_html(lines),
                                  page.progress: progress_html(event.fraction, event.line())}
                        if event.preview is not None:  # drawn in the image pane until the picture comes
                            update[page.output] = event.preview
                        yield update
                    case ResultEvent():
                        shown = _shown_result(demo, page, event, paths)
                        yield {**shown, page.log_pane: log_html(lines)}
                    case ErrorEvent():
                        message = _public_text(event.message, service.settings)
                        lines.append(f"⏹ {message}" if event.kind is ErrorKind.CANCELLED else f"❌ {message}")
                        yield {page.log_pane: log_html(lines), page.progress: progress_html(0, message)}
                        return
            # The last update repeats the results, so an API client (which keeps the last one) gets them.
            yield {**shown, page.progress: progress_html(1.0, "done"), page.log_pane: log_html(lines),
                   page.status_panel: status_update()}
        finally:
            runs.finish(session, token)

    return run_job


def _shown_result(demo, page, event: ResultEvent, paths: list) -> dict:
    """The page updates for one finished image (served to this session only, from a copy; ``paths`` grows)."""
    served = None
    if event.path:
        try:
            served = _serve_copy(event.path, demo.GRADIO_CACHE)
            paths.append(served)
        except OSError as exc:  # the image is still shown, from memory
            log.warning("page: could not copy %s for serving (%s)", event.path, exc)
    return {page.output: served or event.image, page.used_seed: event.seed, page.gallery: list(paths),
            page.history: list(paths)}


def _with_switches(handler):
    """The Generate handler as gradio calls it: one positional value per per-request switch (the units' own, in
    the registry's order) where ``handler`` takes them together as ``techniques``. The signature is built from the
    registry, so a new switch is a new dropdown and a new argument without editing the page."""
    fixed = [p for p in inspect.signature(handler).parameters.values() if p.name != "techniques"]
    at = [p.name for p in fixed].index("session_history")
    switches = [inspect.Parameter(s.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=Toggle.AUTO.value)
                for s in SWITCHES]
    signature = inspect.Signature([*fixed[:at], *switches, *fixed[at:]])

    @functools.wraps(handler)
    def wrapper(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        values = dict(bound.arguments)
        techniques = {s.name: values.pop(s.name) for s in SWITCHES}
        yield from handler(**values, techniques=techniques)

    wrapper.__signature__ = signature  # gradio reads the parameters (and the gr.Request one) from here
    del wrapper.__wrapped__
    return wrapper


def _started(page, run_job, build, session_history, request):
    """A Generate run as the page shows it from its first moment; a bug is one line, never a traceback."""
    lines = ["⏳ Request received"]
    yield {page.log_pane: log_html(lines), page.progress: progress_html(0, "starting…")}
    try:
        yield from run_job(lines, build, session_history, request)
    except Exception as exc:  # noqa: BLE001 - a bug here must not show a traceback in the page
        log.exception("page: the Generate handler failed")
        lines.append(f"❌ internal error ({type(exc).__name__}); the server's log has the details")
        yield {page.log_pane: log_html(lines), page.progress: progress_html(0, "failed")}


def _results(page) -> list:
    return [page.log_pane, page.progress, page.output, page.used_seed, page.gallery, page.history,
            page.status_panel]


def _wire_generate(page, service, run_job) -> None:
    """Text to image's Generate (with its hires fix): the one public endpoint, ``generate``."""
    @_with_switches
    def generate(prompt_text, negative_text, quality_label, n_steps, cfg, seed_value, n_images, size_label,
                 w, h, sched, schedule=Schedule.AUTOMATIC.value, hires_on=False, hires_scale=2.0,
                 hires_upscaler="Latent", hires_steps=0, hires_strength=0.7, decoder="auto", techniques=None,
                 session_history=None, request: gr.Request = None):
        def build():
            wd, ht = _size(size_label, w, h, service.native_size())
            hires = hires_fix(hires_on, hires_scale, hires_upscaler, hires_steps, hires_strength,
                              service.settings.upscaler_dir)
            return GenerationRequest.from_raw(
                prompt=prompt_text, negative_prompt=negative_text, width=wd, height=ht, hires=hires,
                **_request_fields(quality_label, n_steps, cfg, seed_value, n_images, sched, schedule, decoder,
                                 techniques))

        yield from _started(page, run_job, build, session_history, request)

    page.generate_btn.click(
        generate,
        [page.prompt, page.negative, page.quality, page.steps, page.guidance, page.seed, page.images, page.size,
         page.width, page.height, page.scheduler, page.schedule, page.hires_on, page.hires_scale,
         page.hires_upscaler, page.hires_steps, page.hires_strength, page.decoder, *page.switches, page.history],
        _results(page),
        # One job per device: 1 for the in-process service, the number of replicas for the Ray backend.
        api_name="generate", concurrency_id=CONCURRENCY_ID, concurrency_limit=service.concurrency,
        show_progress="minimal",
        show_progress_on=[page.output],
        # The request's own validation names the field and the value in the log pane; gradio's component
        # checks would instead raise a bare error and print a traceback in the server log for each bad value.
        preprocess=False,
    )


def _wire_picture_generate(page, service, run_job) -> None:
    """Image to image's Generate: the editor's picture (and its strokes: inpainting; or outpainting), the shared
    prompts, Quality and Advanced (not its size: the picture's own). The page's own (api_visibility private: the
    /sdapi/v1 img2img is the API's way in)."""
    @_with_switches
    def generate_picture(prompt_text, negative_text, quality_label, n_steps, cfg, seed_value, n_images, sched,
                         schedule, editor_value, strength, mask_blur, content, area, padding, invert, outpaint,
                         outpaint_pixels, decoder="auto", techniques=None, session_history=None,
                         request: gr.Request = None):
        def build():
            pictures = picture_fields(read_editor(page.editor, editor_value), strength, mask_blur, content, area,
                                      padding, invert, outpaint, outpaint_pixels)
            return GenerationRequest.from_raw(
                prompt=prompt_text, negative_prompt=negative_text, **pictures,
                **_request_fields(quality_label, n_steps, cfg, seed_value, n_images, sched, schedule, decoder,
                                 techniques))

        yield from _started(page, run_job, build, session_history, request)

    page.generate_picture_btn.click(
        generate_picture,
        [page.prompt, page.negative, page.quality, page.steps, page.guidance, page.seed, page.images,
         page.scheduler, page.schedule, page.editor, page.strength, page.mask_blur, page.content, page.area,
         page.padding, page.invert, page.outpaint, page.outpaint_pixels, page.decoder, *page.switches,
         page.history],
        _results(page), api_name="generate_picture", api_visibility="private", concurrency_id=CONCURRENCY_ID,
        concurrency_limit=service.concurrency, show_progress="minimal", show_progress_on=[page.output],
        preprocess=False)


def _wire_jobs(demo, page, service, config: UIConfig, status_update) -> None:
    """Generate (both tabs), Stop, Send to image to image, and a closed tab (which cancels that session's job)."""
    runs = _Runs()
    limit = config.limit or HourlyLimit(config.max_jobs_per_user)
    run_job = _job_runner(demo, page, service, config, runs, limit, status_update)
    _wire_generate(page, service, run_job)
    _wire_picture_generate(page, service, run_job)
    wire_send(page)

    def stop(request: gr.Request):
        runs.cancel(request.session_hash if request is not None else "api")

    # Stop sets the job's cancel token (the run ends within one step and logs "cancelled at step k/N");
    # it must not wait in the device queue behind the job it stops, hence queue=False.
    page.stop_btn.click(stop, None, None, queue=False, api_visibility="private")

    def on_unload(request: gr.Request):
        runs.cancel(request.session_hash)

    # A closed tab cancels that session's job (gradio also stops consuming its generator). Only the session's
    # own client can close its heartbeat (guard.py).
    demo.unload(on_unload)


def build_ui(service, config: UIConfig | None = None) -> gr.Blocks:
    config = config or UIConfig()
    status_update = _status_renderer(service, config)
    with gr.Blocks(title="sdxl_ui") as demo:
        page = _layout(service, status_update)
        _wire_form(page, service)
        _wire_status(demo, page, service, config, status_update)
        wire_loras(page, service, config.access, status_update)
        _wire_jobs(demo, page, service, config, status_update)
    demo.queue(max_size=config.queue_size, api_open=False, default_concurrency_limit=1)
    return demo
