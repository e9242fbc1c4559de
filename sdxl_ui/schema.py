"""Data shared by every layer: requests, events, plans, reports.

Imports neither torch nor gradio, so the UI, the CLI and the tests can use it cheaply.
Every validation error names the field and the value (style rule 4).
"""
from __future__ import annotations

import enum
import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

from .edits import HiresFix, InpaintOptions, check_pictures
from .failures import ValidationError  # noqa: F401 - its home is failures; every layer names it schema.ValidationError
from .prompts import PromptError, prompt_loras

MAX_SEED = 2**32 - 1
MIN_SIDE, MAX_SIDE = 64, 2048
MAX_CLIP_SKIP = 10  # SDXL's CLIP-L has 12 layers; its penultimate one is the default
MAX_STEPS = 150
MAX_GUIDANCE = 30.0
MAX_IMAGES = 4
MAX_PROMPT_CHARS = 10_000
DEMO_NOTE = "tiny test model — random weights, output is noise"
DEMO_MODEL_NOTE = "demo model — draws simple shapes and colours, a stand-in for SDXL weights"


class Quality(str, enum.Enum):
    HIGH = "high"
    FAST = "fast"
    # The model's few-step path for this job: the few-step LoRA beside the model (the demo's lcm-lora/) fused and its
    # family's schedule, the tiny decoder beside it for the final image (``few_step.few_step``); or, for a model that is
    # already few-step (Turbo, Lightning, --lora lcm-…), its own High-quality steps.
    FEW_STEP = "few_step"

    @property
    def high(self) -> bool:
        """Whether the plan is the exact one and a few-step family's first step count applies (High quality and
        Few-step; Fast takes the family's second and the presets' shortcuts)."""
        return self is not Quality.FAST


class Scheduler(str, enum.Enum):
    """Samplers offered to the user (AUTOMATIC1111's, in its order; how each runs: ``samplers.py``). ``auto`` = the
    quality preset's choice. ``dpmpp_2m_karras`` is the pre-1.9 combined name: DPM++ 2M with the Karras schedule."""

    AUTO = "auto"
    DPMPP_2M = "dpmpp_2m"
    DPMPP_SDE = "dpmpp_sde"
    DPMPP_2M_SDE = "dpmpp_2m_sde"
    DPMPP_2M_SDE_HEUN = "dpmpp_2m_sde_heun"
    DPMPP_2S_A = "dpmpp_2s_a"
    DPMPP_3M_SDE = "dpmpp_3m_sde"
    EULER_A = "euler_a"
    EULER = "euler"
    LMS = "lms"
    HEUN = "heun"
    DPM2 = "dpm2"
    DPM2_A = "dpm2_a"
    DPM_FAST = "dpm_fast"
    DPM_ADAPTIVE = "dpm_adaptive"
    RESTART = "restart"
    DDIM = "ddim"
    DDIM_CFGPP = "ddim_cfgpp"
    PLMS = "plms"
    UNIPC = "unipc"
    LCM = "lcm"
    DDPM = "ddpm"
    DPMPP_2M_KARRAS = "dpmpp_2m_karras"


class Schedule(str, enum.Enum):
    """AUTOMATIC1111's schedule types (``modules/sd_schedulers.py``, in its order). ``automatic`` = the sampler's own
    (Karras for DPM++ 2M, exponential for the DPM++ SDE family, else the model's spacing)."""

    AUTOMATIC = "automatic"
    UNIFORM = "uniform"
    KARRAS = "karras"
    EXPONENTIAL = "exponential"
    POLYEXPONENTIAL = "polyexponential"
    SGM_UNIFORM = "sgm_uniform"
    KL_OPTIMAL = "kl_optimal"
    ALIGN_YOUR_STEPS = "align_your_steps"
    SIMPLE = "simple"
    NORMAL = "normal"
    DDIM = "ddim"
    BETA = "beta"


class Decoder(str, enum.Enum):
    """The final image's decoder for one request: the server's (``--decoder``), the full VAE or the tiny decoder."""
    AUTO, FULL, TINY = "auto", "full", "tiny"


class Toggle(str, enum.Enum):
    AUTO = "auto"
    ON = "on"
    OFF = "off"


@dataclass(frozen=True)
class QualityPreset:
    steps: int
    guidance: float
    scheduler: Scheduler
    why: str


# High quality follows the seed (50 steps, guidance 8.0, refiner on GPU). Fast uses DPM++ 2M with
# Karras sigmas: a second-order multistep solver whose error falls quickly with step count, so 20 steps
# look close to 50 Euler steps (diffusers' scheduler docs; the usual "few steps" choice in A1111/ComfyUI).
# The techniques that do less work per image carry their own preset values (``optimizations/less_work.py``).
PRESETS: dict[Quality, QualityPreset] = {
    Quality.HIGH: QualityPreset(50, 8.0, Scheduler.EULER, "seed's high-quality preset"),
    Quality.FAST: QualityPreset(20, 6.0, Scheduler.DPMPP_2M_KARRAS, "DPM++ 2M Karras converges in few steps"),
    # What a few-step run falls back to when its family says nothing (its profile's own steps win: LCM 4, guidance 1).
    Quality.FEW_STEP: QualityPreset(4, 1.0, Scheduler.LCM, "the LCM-LoRA card's 4 steps, guidance 1"),
}


def parse_choice(cls, field_name: str, value: Any):
    """A closed choice from user input (case, spaces and few-step's hyphen forgiven), or an error listing them."""
    if isinstance(value, cls):
        return value
    text = str(value).strip().lower()
    try:
        return cls(text) if text in cls._value2member_map_ else cls(text.replace("-", "_"))
    except ValueError:
        choices = ", ".join(m.value for m in cls)
        raise ValidationError(field_name, value, f"must be one of {choices}") from None


def _int(field_name: str, value: Any) -> int:
    """Coerce user input (also strings from forms and the CLI) to int, or raise naming the field."""
    if isinstance(value, bool):
        raise ValidationError(field_name, value, "must be a whole number")
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if math.isfinite(value) and value.is_integer():
            return int(value)
        raise ValidationError(field_name, value, "must be a whole number")
    if isinstance(value, str):
        text = value.strip()
        try:
            return int(text)
        except ValueError:
            try:
                as_float = float(text)
            except ValueError:
                raise ValidationError(field_name, value, "must be a whole number") from None
            return _int(field_name, as_float)
    raise ValidationError(field_name, value, "must be a whole number")


def _float(field_name: str, value: Any) -> float:
    if isinstance(value, bool):
        raise ValidationError(field_name, value, "must be a number")
    try:
        number = float(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError):
        raise ValidationError(field_name, value, "must be a number") from None
    if not math.isfinite(number):
        raise ValidationError(field_name, value, "must be a finite number")
    return number


def _text(field_name: str, value: Any) -> str:
    """A prompt: text, at most MAX_PROMPT_CHARS, and valid Unicode. A lone surrogate (JSON "\\ud800", or bytes
    that are not UTF-8 on a command line, which Python decodes to surrogates) would otherwise fail deep inside the
    tokenizer or the PNG writer."""
    if not isinstance(value, str):
        raise ValidationError(field_name, value, "must be text")
    if len(value) > MAX_PROMPT_CHARS:
        raise ValidationError(field_name, value, f"is longer than {MAX_PROMPT_CHARS} characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValidationError(field_name, value, f"is not valid Unicode text (character {exc.start + 1} is an "
                                                 "unpaired surrogate: bytes that are not UTF-8?)") from None
    return value


# C0 and C1 control characters (carriage return included) and DEL; tab and line feed are whitespace and stay.
CONTROLS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def strip_controls(text: str) -> str:
    """Text without control characters (tab and line feed stay)."""
    return CONTROLS.sub("", text)


def _in_range(field_name: str, value, low, high):
    if not low <= value <= high:
        raise ValidationError(field_name, value, f"must be between {low} and {high}")
    return value


@dataclass(frozen=True)
class GenerationRequest:
    """One user request. Validated on construction; ``from_raw`` also coerces strings."""

    prompt: str
    negative_prompt: str = ""
    quality: Quality = Quality.HIGH
    steps: int | None = None  # None = the quality preset's steps
    guidance: float | None = None  # None = the quality preset's guidance
    width: int | None = None  # None = the model's native size (1024 for SDXL, 256 for the tiny demo)
    height: int | None = None
    seed: int | None = None  # None = random; the used seed is always reported
    scheduler: Scheduler = Scheduler.AUTO
    images: int = 1
    schedule: Schedule = Schedule.AUTOMATIC  # the schedule type (AUTOMATIC1111's "Schedule type")
    clip_skip: int = 0  # text-encoder layers skipped beyond SDXL's penultimate one (diffusers' clip_skip; A1111's N-1)
    decoder: Decoder = Decoder.AUTO  # the tiny decoder needs one loaded beside the model (checked when it runs)
    allow_empty_prompt: bool = False  # AUTOMATIC1111's API draws an empty prompt (an unconditioned picture)
    # Per-request technique switches by name (e.g. {"feature_cache": "off"}; auto = the quality preset's choice):
    # the names are the units' switches (``optimizations/registry.SWITCHES``), checked when the request is planned.
    techniques: Mapping[str, Toggle] = field(default_factory=dict)
    # Image to image: the picture to start from (a PIL image; None: text to image) and how much of it is redrawn
    # (A1111's denoising_strength: 0 keeps it, 1 redraws it all; about strength × steps steps run).
    init_image: Any = None
    strength: float = 0.75
    # Inpainting: a mask the picture's size (white = redraw, black = keep) and A1111's options; outpainting: the
    # directions the picture is extended in by ``outpaint_pixels`` (the new band inpainted); the hires fix (edits.py).
    mask: Any = None
    inpaint: InpaintOptions = field(default_factory=InpaintOptions)
    outpaint: tuple[str, ...] = ()
    outpaint_pixels: int = 128
    hires: HiresFix | None = None

    def __post_init__(self):
        prompt_as_given = self.prompt
        _text("prompt", self.prompt)
        # Control characters (NUL, escape sequences, …) are removed: they mean nothing to the text encoders and
        # must not reach the PNG metadata. Tabs and line feeds stay (whitespace, as typed).
        object.__setattr__(self, "prompt", strip_controls(self.prompt))
        if not self.prompt.strip() and not (self.allow_empty_prompt is True and not prompt_as_given.strip()):
            removed = " once control characters are removed" if prompt_as_given.strip() else ""
            raise ValidationError("prompt", prompt_as_given, f"must not be empty{removed}")
        self.prompt_loras  # noqa: B018 - a bad <lora:…> tag is refused with the request
        _text("negative_prompt", self.negative_prompt)
        object.__setattr__(self, "negative_prompt", strip_controls(self.negative_prompt))
        object.__setattr__(self, "quality", parse_choice(Quality, "quality", self.quality))
        object.__setattr__(self, "scheduler", parse_choice(Scheduler, "scheduler", self.scheduler))
        object.__setattr__(self, "schedule", parse_choice(Schedule, "schedule", self.schedule))
        object.__setattr__(self, "decoder", parse_choice(Decoder, "decoder", self.decoder))
        if not isinstance(self.techniques, Mapping):
            raise ValidationError("techniques", self.techniques, "must be a mapping of switch names to auto/on/off")
        object.__setattr__(self, "techniques", {str(k): parse_choice(Toggle, str(k), v if v is not None else "auto")
                                                for k, v in self.techniques.items()})
        if self.steps is not None:
            object.__setattr__(self, "steps", _in_range("steps", _int("steps", self.steps), 1, MAX_STEPS))
        if self.guidance is not None:
            guidance = _in_range("guidance", _float("guidance", self.guidance), 0.0, MAX_GUIDANCE)
            object.__setattr__(self, "guidance", guidance)
        for name in ("width", "height"):
            if getattr(self, name) is None:
                continue
            side = _in_range(name, _int(name, getattr(self, name)), MIN_SIDE, MAX_SIDE)
            if side % 8:
                raise ValidationError(name, side, "must be a multiple of 8")
            object.__setattr__(self, name, side)
        if self.seed is not None:
            object.__setattr__(self, "seed", _in_range("seed", _int("seed", self.seed), 0, MAX_SEED))
        clip_skip = _in_range("clip_skip", _int("clip_skip", self.clip_skip), 0, MAX_CLIP_SKIP)
        object.__setattr__(self, "clip_skip", clip_skip)
        object.__setattr__(self, "images", _in_range("images", _int("images", self.images), 1, MAX_IMAGES))
        strength = _float("strength", self.strength)
        if not 0.0 < strength <= 1.0:
            raise ValidationError("strength", self.strength, "must be above 0 and at most 1 (the share of the picture "
                                                             "redrawn)")
        object.__setattr__(self, "strength", strength)
        if not isinstance(self.inpaint, InpaintOptions):
            raise ValidationError("inpaint", self.inpaint, "must be InpaintOptions")
        directions, pixels = check_pictures(self.init_image, self.mask, self.outpaint, self.outpaint_pixels,
                                            self.hires, self.inpaint.invert)
        object.__setattr__(self, "outpaint", directions)
        object.__setattr__(self, "outpaint_pixels", pixels)

    @property
    def kind(self) -> str:
        """The kind of run: ``txt2img`` (``hires`` with a hires fix), ``img2img`` from ``init_image``, ``inpaint``
        with a mask or outpainting."""
        if self.init_image is None:
            return "hires" if self.hires is not None else "txt2img"
        return "inpaint" if self.mask is not None or self.outpaint else "img2img"

    @classmethod
    def from_raw(cls, **raw: Any) -> "GenerationRequest":
        """Build from loosely typed input (form fields, CLI strings). Blank optional fields mean default."""
        cleaned: dict[str, Any] = {}
        for key, value in raw.items():
            if key not in cls.__dataclass_fields__:
                raise ValidationError(key, value, "is not a known field")
            if key in ("steps", "guidance", "seed", "negative_prompt", "width", "height") and (
                value is None or (isinstance(value, str) and not value.strip())
            ):
                continue  # blank optional field: use the default
            cleaned[key] = value
        return cls(**cleaned)

    @property
    def preset(self) -> QualityPreset:
        return PRESETS[self.quality]

    @property
    def requested_steps(self) -> int:
        return self.steps if self.steps is not None else self.preset.steps

    @property
    def guidance_scale(self) -> float:
        return self.guidance if self.guidance is not None else self.preset.guidance

    @property
    def encoder_prompt(self) -> str:
        """The prompt the text encoders see: without its ``<lora:NAME:WEIGHT>`` tags (``prompts.py``)."""
        return prompt_loras(self.prompt)[0]

    @property
    def prompt_loras(self) -> tuple[tuple[str, float], ...]:
        """The LoRAs the prompt asks for, ``<lora:NAME:WEIGHT>``: (name, weight) each, for this request alone."""
        try:
            return prompt_loras(self.prompt)[1]
        except PromptError as exc:
            raise ValidationError("prompt", exc.value, exc.problem) from None

    @property
    def sampler(self) -> Scheduler:
        return self.preset.scheduler if self.scheduler is Scheduler.AUTO else self.scheduler


# ---------------------------------------------------------------- optimization report

class Status(str, enum.Enum):
    ACTIVE = "active"
    OFF = "off"
    UNAVAILABLE = "unavailable"
    NOT_APPLICABLE = "not_applicable"


@dataclass(frozen=True)
class OptimizationRow:
    name: str
    status: Status
    detail: str

    def to_dict(self) -> dict:
        return {"name": self.name, "status": self.status.value, "detail": self.detail}

    def log_line(self) -> str:
        mark = "✓" if self.status is Status.ACTIVE else "–"
        label = {
            Status.ACTIVE: "",
            Status.OFF: " off",
            Status.UNAVAILABLE: " unavailable",
            Status.NOT_APPLICABLE: " not applicable",
        }[self.status]
        return f"{mark} {self.name}{label}: {self.detail}"


@dataclass(frozen=True)
class OptimizationReport:
    rows: tuple[OptimizationRow, ...]
    source: str  # "pipeline" (read back from the live pipeline) or "plan" (doctor, before loading)

    def to_list(self) -> list[dict]:
        return [row.to_dict() for row in self.rows]

    def get(self, name: str) -> OptimizationRow:
        for row in self.rows:
            if row.name == name:
                return row
        raise KeyError(name)

    def log_lines(self) -> list[str]:
        return [row.log_line() for row in self.rows]


# ---------------------------------------------------------------- hardware probe

@dataclass(frozen=True)
class CudaInfo:
    available: bool = False
    version: str | None = None
    device_name: str | None = None
    capability: tuple[int, int] | None = None
    arch_list: tuple[str, ...] = ()
    kernel_ok: bool | None = None  # None = not tested (no CUDA device)
    kernel_error: str | None = None
    vram_total_gb: float | None = None
    vram_free_gb: float | None = None

    @property
    def sm(self) -> str | None:
        return f"sm_{self.capability[0]}{self.capability[1]}" if self.capability else None


@dataclass(frozen=True)
class MpsInfo:
    available: bool = False


@dataclass(frozen=True)
class CpuInfo:
    physical_cores: int = 1
    logical_cores: int = 1
    model_name: str = "unknown"
    flags: tuple[str, ...] = ()
    ram_total_gb: float = 0.0
    ram_available_gb: float = 0.0
    # Measured by the probe: GFLOP/s of a short square matmul per dtype ("fp32", "bf16", "fp16"; "int8" in GOP/s,
    # torch._int_mm) with torch's thread count at probe time. Empty in probes recorded before it was measured.
    gemm_gflops: Mapping[str, float] = field(default_factory=dict)
    gemm_note: str = ""  # how it was measured, e.g. "512² matmul, 2 threads, best of 3"
    # Measured once per machine and torch version (device.op_speeds, kept on disk): GFLOP/s per operation class at
    # the SDXL shapes ("linear", "conv", "attention", "vae conv") per dtype ("fp32", "bf16", "fp16"; a convolution
    # also "<dtype> cl" = channels-last memory layout; "int8" GOP/s for linear). Empty in older probes.
    op_speeds: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    op_note: str = ""  # how and when they were measured (and whether read from the cache)
    # The CPU's fastest exact dtype as named by SDXL_UI_CPU_DTYPE ("fp32", "bf16", "fp16"; "" = by measurement):
    # for an operator whose short measurement misleads, and for CI, which runs the suite under each plan dtype.
    forced_dtype: str = ""

    @property
    def has_fast_bf16(self) -> bool:
        return "avx512_bf16" in self.flags or "amx_bf16" in self.flags


@dataclass(frozen=True)
class XformersInfo:
    version: str | None = None  # None = not installed
    kernel_ok: bool | None = None  # None = not tested (no working CUDA device)
    kernel_error: str | None = None


@dataclass(frozen=True)
class HardwareProbe:
    torch_version: str
    cuda: CudaInfo = field(default_factory=CudaInfo)
    mps: MpsInfo = field(default_factory=MpsInfo)
    cpu: CpuInfo = field(default_factory=CpuInfo)
    xformers: XformersInfo = field(default_factory=XformersInfo)
    sdpa_backends: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # device -> backends that ran
    os: str = "unknown"

    def to_dict(self) -> dict:
        data = asdict(self)
        data["sdpa_backends"] = {k: list(v) for k, v in self.sdpa_backends.items()}
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "HardwareProbe":
        """Read a probe written by ``doctor --json`` (possibly on another machine, possibly older)."""
        if "probe" in data and "torch_version" not in data:
            data = data["probe"]  # a whole doctor JSON was given

        def part(kind, key):
            raw = dict(data.get(key) or {})
            known = {k: v for k, v in raw.items() if k in kind.__dataclass_fields__}
            for name, value in known.items():
                if isinstance(value, list):
                    known[name] = tuple(value)
            return kind(**known)

        if "torch_version" not in data:
            raise ValidationError("probe", "…", "has no torch_version: is this a `doctor --json` file?")
        return cls(
            torch_version=str(data["torch_version"]),
            cuda=part(CudaInfo, "cuda"),
            mps=part(MpsInfo, "mps"),
            cpu=part(CpuInfo, "cpu"),
            xformers=part(XformersInfo, "xformers"),
            sdpa_backends={k: tuple(v) for k, v in (data.get("sdpa_backends") or {}).items()},
            os=str(data.get("os", "unknown")),
        )


# ---------------------------------------------------------------- states and kinds
# Text enums (``enum.StrEnum``): each member is the string it replaces, so JSON, the A1111 responses, ``==`` with the
# old strings and f-strings read exactly as before; code compares members, never the display text.

class ServiceState(enum.StrEnum):
    """The model's state in a backend's ``status()["state"]``."""

    LOADED = "loaded"
    LOADING = "loading…"
    ERROR = "error"  # the model (or its plan) failed: the page offers the demo model
    NOT_LOADED = "not loaded"

    @property
    def label(self) -> str:
        """What the status panel shows."""
        return self.value


class ErrorKind(enum.StrEnum):
    """``ErrorEvent.kind`` (and the CLI's ``--json`` error ``kind``): what went wrong, for code."""

    VALIDATION = "validation"  # the request (or a flag) is wrong: exit code 2, HTTP 422
    MODEL = "model"  # the model cannot be loaded
    MEMORY = "memory"  # out of memory during the run
    CANCELLED = "cancelled"  # Stop, interrupt, a closed tab or a signal
    RUNTIME = "runtime"  # anything else that failed during the run
    BUSY = "busy"  # refused: the queue is full or the app is shutting down
    SETTINGS = "settings"  # the CLI's plan errors (a device or attention this machine cannot honour)
    DEVICE = "device"  # selftest: a --device this machine cannot honour


class LogLevel(enum.StrEnum):
    """``LogEvent.level``."""

    INFO = "info"
    WARNING = "warning"


# ---------------------------------------------------------------- events
# Every event carries the id of the generate call it belongs to (``job_id``, set by the service) and the Ray
# replica that ran it (``replica``, set by the worker; "" in process), as InvokeAI's queue events do: a front end
# or a test reads who ran what from these fields, never from the log text.

@dataclass(frozen=True)
class LogEvent:
    message: str
    level: LogLevel = LogLevel.INFO  # a plain string is taken as its member ("warning" → LogLevel.WARNING)
    job_id: str = ""
    replica: str = ""

    def __post_init__(self):
        object.__setattr__(self, "level", LogLevel(self.level))


@dataclass(frozen=True)
class ProgressEvent:
    step: int  # steps done so far in this run (all stages, all images)
    total: int
    elapsed_s: float
    eta_s: float | None
    s_per_step: float | None
    stage: str = ""
    preview: Any = None  # PIL.Image or None
    job_id: str = ""
    replica: str = ""

    @property
    def fraction(self) -> float:
        return self.step / self.total if self.total else 0.0

    def line(self) -> str:
        rate = f"{self.s_per_step:.2f} s/step" if self.s_per_step else "… s/step"
        eta = f"ETA {self.eta_s:.0f} s" if self.eta_s is not None else "ETA …"
        stage = f"{self.stage} · " if self.stage else ""
        return f"{stage}step {self.step}/{self.total} · {self.fraction * 100:.0f} % · {rate} · {eta}"


@dataclass(frozen=True)
class Timings:
    load_s: float
    generate_s: float
    total_s: float


@dataclass(frozen=True)
class ResultEvent:
    image: Any  # PIL.Image
    path: str | None  # None when saving failed (see save_error)
    seed: int
    index: int  # which image of the run (0-based)
    steps_requested: int
    steps_run: int
    refiner: bool
    timings: Timings
    report: OptimizationReport
    model: str
    device: str
    dtype: str
    parameters: str  # the PNG `parameters` text
    save_error: str | None = None
    job_id: str = ""
    replica: str = ""


@dataclass(frozen=True)
class ErrorEvent:
    """A run that failed. ``message`` is for the user (no traceback); ``kind`` for code."""

    message: str
    kind: ErrorKind  # a plain string is taken as its member ("busy" → ErrorKind.BUSY)
    job_id: str = ""
    replica: str = ""

    def __post_init__(self):
        object.__setattr__(self, "kind", ErrorKind(self.kind))


# The closed union a backend's ``generate`` yields: consumers ``match`` on these four (``jobs.collect`` gathers them).
Event = LogEvent | ProgressEvent | ResultEvent | ErrorEvent
