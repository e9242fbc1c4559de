"""The Gradio page. Layout and handlers only: typed events from the service become component updates.

No torch here (the service object is passed in). Per-user state lives in gr.State or is keyed by the session
(the running job's cancel token), never in module globals.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import gradio as gr

from ..schema import (
    MAX_IMAGES,
    MAX_STEPS,
    PRESETS,
    ErrorEvent,
    GenerationRequest,
    LogEvent,
    ProgressEvent,
    Quality,
    ResultEvent,
    Scheduler,
    ValidationError,
)
from ..service import CancelToken
from .render import log_html, progress_html, status_html

SDXL_SIZES = ["1024×1024", "1152×896", "896×1152", "1216×832", "832×1216", "1344×768", "768×1344"]
CUSTOM = "Custom"
QUALITY_LABELS = {"High quality": Quality.HIGH, "Fast": Quality.FAST}
CONCURRENCY_ID = "device"  # one generation at a time on the device, whatever the session


@dataclass
class UIConfig:
    queue_size: int = 16
    share_message: str | None = None  # shown in the status panel (share link, or why there is none)
    max_jobs_per_user: int = 0  # 0 = unlimited queued+running jobs per session


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


@dataclass
class _RateLimit:
    """--max-jobs-per-user: jobs started per user (login name, else client address) in a sliding hour."""
    per_hour: int
    started: dict = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def check(self, user: str, now: float) -> str | None:
        if self.per_hour <= 0:
            return None
        with self.lock:
            recent = [t for t in self.started.get(user, []) if now - t < 3600]
            if len(recent) >= self.per_hour:
                wait_min = max(1, int((3600 - (now - recent[0])) / 60))
                self.started[user] = recent
                return (f"max_jobs_per_user: {self.per_hour} jobs per hour reached for this user; "
                        f"try again in about {wait_min} min")
            self.started[user] = recent + [now]
        return None


def _user_key(request) -> str:
    if request is None:
        return "local"
    return getattr(request, "username", None) or (request.client.host if request.client else "unknown")


def _size_choices(native: int) -> list[str]:
    """The model's native size first, then SDXL's native aspect ratios, then Custom."""
    return [f"Native ({native}×{native})"] + [s for s in SDXL_SIZES if s != f"{native}×{native}"] + [CUSTOM]


def _size(preset: str, width, height, native: int) -> tuple:
    if preset == CUSTOM:
        return width, height
    if preset.startswith("Native"):
        return native, native
    w, h = preset.split(" ")[0].split("×")
    return int(w), int(h)


def build_ui(service, config: UIConfig | None = None) -> gr.Blocks:
    config = config or UIConfig()
    runs = _Runs()
    limit = _RateLimit(config.max_jobs_per_user)
    native = service.native_size()
    sizes = _size_choices(native)

    def status_update():
        status = service.status()
        status["share"] = config.share_message
        return status_html(status)

    with gr.Blocks(title="sdxl_ui") as demo:
        gr.Markdown("## sdxl_ui — Stable Diffusion XL on the hardware you have")
        status_panel = gr.HTML(status_update(), elem_id="status-panel")
        demo_button = gr.Button("Continue with the demo model (offline, random weights)", visible=False,
                                elem_id="use-demo")
        status_timer = gr.Timer(2.0, active=True)
        with gr.Row():
            with gr.Column(scale=3):
                prompt = gr.Textbox(label="Prompt", lines=3, placeholder="a red fox in the snow, golden hour",
                                    elem_id="prompt")
                negative = gr.Textbox(label="Negative prompt", lines=1, elem_id="negative")
                quality = gr.Radio(list(QUALITY_LABELS), value="High quality", label="Quality", elem_id="quality")
                with gr.Accordion("Advanced", open=False):
                    preset = PRESETS[Quality.HIGH]
                    steps = gr.Slider(1, MAX_STEPS, value=preset.steps, step=1, label="Steps", elem_id="steps")
                    steps_note = gr.Markdown(service.steps_note(preset.steps), elem_id="steps-note")
                    guidance = gr.Slider(0, 30, value=preset.guidance, step=0.5, label="Guidance (CFG)")
                    with gr.Row():
                        seed = gr.Number(label="Seed (blank = random)", value=None, precision=0, elem_id="seed")
                        images = gr.Slider(1, MAX_IMAGES, value=1, step=1, label="Images per run", elem_id="images")
                    size = gr.Dropdown(sizes, value=sizes[0], label="Size")
                    with gr.Row(visible=False) as custom_row:
                        width = gr.Number(label="Width", value=native, precision=0)
                        height = gr.Number(label="Height", value=native, precision=0)
                    scheduler = gr.Dropdown([s.value for s in Scheduler], value=Scheduler.AUTO.value,
                                            label="Scheduler (auto: Euler for High quality, DPM++ 2M Karras for Fast)")
                with gr.Row():
                    generate_btn = gr.Button("Generate", variant="primary", elem_id="generate")
                    stop_btn = gr.Button("Stop", variant="stop", elem_id="stop")
                progress = gr.HTML(progress_html(0, "idle"), elem_id="progress")
                log_pane = gr.HTML(log_html([]), label="Log", show_label=True, container=True, autoscroll=True,
                                   elem_id="log")
            with gr.Column(scale=2):
                preview = gr.Image(label="Preview", type="pil", interactive=False, elem_id="preview", height=256)
                output = gr.Image(label="Image", type="filepath", format="png", interactive=False,
                                  elem_id="output")
                with gr.Row():
                    used_seed = gr.Number(label="Used seed", interactive=False, precision=0, elem_id="used-seed")
                    reuse = gr.Button("Reuse seed")
                gallery = gr.Gallery(label="This session's images", columns=4, height=200, elem_id="gallery")
        history = gr.State([])

        def on_quality(label):
            p = PRESETS[QUALITY_LABELS[label]]
            return gr.update(value=p.steps), gr.update(value=p.guidance), service.steps_note(p.steps)

        quality.change(on_quality, quality, [steps, guidance, steps_note], queue=False, api_visibility="private")
        steps.change(lambda n: service.steps_note(n), steps, steps_note, queue=False, api_visibility="private")
        size.change(lambda p: gr.update(visible=p == CUSTOM), size, custom_row, queue=False,
                    api_visibility="private")
        reuse.click(lambda s: s, used_seed, seed, queue=False, api_visibility="private")

        def refresh_status():
            status = service.status()
            failed = status.get("state") == "error" and status.get("note") is None
            busy = status.get("state") in ("loading…", "not loaded")
            return status_update(), gr.update(visible=failed), gr.Timer(active=busy)

        status_timer.tick(refresh_status, None, [status_panel, demo_button, status_timer], queue=False,
                          api_visibility="private")
        demo.load(refresh_status, None, [status_panel, demo_button, status_timer], queue=False,
                  api_visibility="private")

        def use_demo_model():
            service.reconfigure(service.settings.with_(model="tiny", refiner="auto"))
            service.preload_in_background()
            choices = _size_choices(service.native_size())
            return status_update(), gr.update(visible=False), gr.Timer(active=True), gr.update(
                choices=choices, value=choices[0])

        demo_button.click(use_demo_model, None, [status_panel, demo_button, status_timer, size], queue=False,
                          api_visibility="private")

        def generate(prompt_text, negative_text, quality_label, n_steps, cfg, seed_value, n_images, size_label,
                     w, h, sched, session_history, request: gr.Request):
            session = request.session_hash if request is not None else "api"
            lines = ["⏳ Request received"]
            yield {log_pane: log_html(lines), progress: progress_html(0, "starting…"), preview: None}
            try:
                wd, ht = _size(size_label, w, h, service.native_size())
                req = GenerationRequest.from_raw(
                    prompt=prompt_text, negative_prompt=negative_text,
                    quality=QUALITY_LABELS.get(quality_label, quality_label), steps=n_steps, guidance=cfg,
                    seed=seed_value, images=n_images, width=wd, height=ht, scheduler=sched)
            except ValidationError as exc:
                lines.append(f"❌ {exc}")
                yield {log_pane: log_html(lines), progress: progress_html(0, "not started: fix the input")}
                return
            refused = limit.check(_user_key(request), time.monotonic())
            if refused:
                lines.append(f"❌ {refused}")
                yield {log_pane: log_html(lines), progress: progress_html(0, "not started: rate limit")}
                return
            token = runs.start(session)
            paths = list(session_history or [])
            shown: dict = {}
            try:
                for event in service.generate(req, cancel=token):
                    if isinstance(event, LogEvent):
                        lines.append(event.message)
                        yield {log_pane: log_html(lines)}
                    elif isinstance(event, ProgressEvent):
                        lines.append(event.line())
                        update = {log_pane: log_html(lines), progress: progress_html(event.fraction, event.line())}
                        if event.preview is not None:
                            update[preview] = event.preview
                        yield update
                    elif isinstance(event, ResultEvent):
                        if event.path:
                            paths.append(event.path)
                        shown = {output: event.path or event.image, used_seed: event.seed, gallery: list(paths),
                                 history: list(paths)}
                        yield {**shown, log_pane: log_html(lines)}
                    elif isinstance(event, ErrorEvent):
                        lines.append(f"❌ {event.message}" if event.kind != "cancelled" else f"⏹ {event.message}")
                        yield {log_pane: log_html(lines), progress: progress_html(0, event.message)}
                        return
                # The last update repeats the results, so an API client (which keeps the last one) gets them.
                yield {**shown, progress: progress_html(1.0, "done"), log_pane: log_html(lines),
                       status_panel: status_update()}
            finally:
                runs.finish(session, token)

        generate_btn.click(
            generate,
            [prompt, negative, quality, steps, guidance, seed, images, size, width, height, scheduler, history],
            [log_pane, progress, preview, output, used_seed, gallery, history, status_panel],
            api_name="generate", concurrency_id=CONCURRENCY_ID, concurrency_limit=1, show_progress="minimal",
            show_progress_on=[output],
        )

        def stop(request: gr.Request):
            runs.cancel(request.session_hash if request is not None else "api")

        # Stop sets the job's cancel token (the run ends within one step and logs "cancelled at step k/N");
        # it must not wait in the device queue behind the job it stops, hence queue=False.
        stop_btn.click(stop, None, None, queue=False, api_visibility="private")

        def on_unload(request: gr.Request):
            runs.cancel(request.session_hash)

        # A closed tab cancels that session's job (gradio also stops consuming its generator).
        demo.unload(on_unload)
    demo.queue(max_size=config.queue_size, api_open=False, default_concurrency_limit=1)
    return demo

