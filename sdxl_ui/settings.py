"""Application settings from command-line flags and ``SDXL_UI_*`` environment variables.

Closed choices are Enums with ``auto`` (style rule 3). Nothing here touches hardware.
"""
from __future__ import annotations

import enum
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Mapping

from .profiles import AUTO as PROFILE_AUTO
from .profiles import NAMES as PROFILE_NAMES
from .schema import Toggle, ValidationError, parse_choice  # noqa: F401 - Toggle is re-exported

DEFAULT_MODEL = "stabilityai/stable-diffusion-xl-base-1.0"
DEFAULT_REFINER = "stabilityai/stable-diffusion-xl-refiner-1.0"
TINY = "tiny"
DEMO = "demo"
DECODERS = ("full", "tiny")  # --decoder: the final image's decoder
# The trained demo model shipped with the project (train-demo writes it; an ordinary diffusers folder).
DEMO_MODEL_DIR = Path(__file__).resolve().parent.parent / "assets" / "demo-model"


def cache_root(env=None) -> Path:
    """Where sdxl_ui keeps what it measured or built once per machine (the operation speeds, torch.compile's
    compiled graphs): $SDXL_UI_CACHE_DIR, else $XDG_CACHE_HOME/sdxl_ui, else ~/.cache/sdxl_ui."""
    env = os.environ if env is None else env
    return Path(env.get("SDXL_UI_CACHE_DIR") or Path(env.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sdxl_ui")


class DeviceChoice(str, enum.Enum):
    AUTO = "auto"
    CUDA = "cuda"
    MPS = "mps"
    CPU = "cpu"


class Precision(str, enum.Enum):
    AUTO = "auto"
    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"
    INT8 = "int8"  # CPU only, opt-in: the UNet's linear layers and convolutions in int8, the rest in the best exact dtype


class AttentionChoice(str, enum.Enum):
    AUTO = "auto"
    SDPA = "sdpa"
    XFORMERS = "xformers"
    SLICED = "sliced"


class OffloadChoice(str, enum.Enum):
    AUTO = "auto"
    NONE = "none"
    MODEL = "model"
    SEQUENTIAL = "sequential"


@dataclass(frozen=True)
class LoraSpec:
    """One ``--lora SOURCE[@WEIGHT]``: a .safetensors file, a folder, or a hub id with an optional ``:FILE``."""

    source: str
    weight: float = 1.0

    @property
    def name(self) -> str:
        """The LoRA's name (A1111's: the file's stem), also its diffusers adapter name's base."""
        tail = self.source.rstrip("/\\").replace("\\", "/").rsplit("/", 1)[-1]
        tail = tail.rsplit(":", 1)[-1] if ":" in tail else tail
        return re.sub(r"\.safetensors$", "", tail, flags=re.I) or "lora"

    def __str__(self) -> str:
        return f"{self.source}@{self.weight:g}"


def parse_lora(value) -> LoraSpec:
    """``SOURCE[@WEIGHT]`` (a LoraSpec passes through); the weight is a number from -10 to 10."""
    if isinstance(value, LoraSpec):
        return value
    text = str(value).strip()
    source, weight = text, 1.0
    head, sep, tail = text.rpartition("@")
    if sep:
        try:
            weight, source = float(tail), head.strip()
        except ValueError:
            if not re.search(r"[./\\:]", tail):  # not a path's own '@' (my@style.safetensors) either
                raise ValidationError("lora", value, "must be SOURCE or SOURCE@WEIGHT with a number as WEIGHT") \
                    from None
    if not source:
        raise ValidationError("lora", value, "names no file, folder or hub id")
    if not -10.0 <= weight <= 10.0 or weight != weight:
        raise ValidationError("lora", value, "weight must be from -10 to 10")
    return LoraSpec(source, weight)


PRECISION_DTYPES = {Precision.FP32: "float32", Precision.FP16: "float16", Precision.BF16: "bfloat16"}


@dataclass(frozen=True)
class AppSettings:
    model: str = DEFAULT_MODEL
    refiner: str = "auto"  # "auto" = the default refiner for the default model; tiny's and demo's own for those
    use_refiner: Toggle = Toggle.AUTO  # "on" forces the two-stage path (e.g. to test it on CPU)
    device: DeviceChoice = DeviceChoice.AUTO
    precision: Precision = Precision.AUTO
    attention: AttentionChoice = AttentionChoice.AUTO
    offload: OffloadChoice = OffloadChoice.AUTO
    vae_tiling: Toggle = Toggle.AUTO
    threads: int = 0  # 0 = physical cores
    outputs: Path = Path("outputs")
    local_files_only: bool = False
    single_file_config: str | None = None  # diffusers config (folder or hub id) for a single .safetensors
    compile: bool = False  # torch.compile the UNet: faster steps after a long first-call warm-up (servers)
    profile: str = PROFILE_AUTO  # the model family (profiles.py); auto = detected from the model's files
    loras: tuple = ()  # LoraSpec per --lora SOURCE[@WEIGHT], in order (the base UNet and text encoders)
    lora_dir: Path = Path("loras")  # the page's Advanced lists its .safetensors files (the operator applies them)
    decoder: str = "full"  # the final image's decoder: the full VAE, or the tiny decoder (AutoencoderTiny)
    tiny_decoder: str = "auto"  # its source: auto = a tiny-decoder/ folder beside the model, else TAESDXL
    upscaler_dir: Path | None = None  # the user's super-resolution models (ESRGAN, …) for the hires fix and extras

    def __post_init__(self):
        object.__setattr__(self, "use_refiner", parse_choice(Toggle, "use_refiner", self.use_refiner))
        object.__setattr__(self, "device", parse_choice(DeviceChoice, "device", self.device))
        object.__setattr__(self, "precision", parse_choice(Precision, "precision", self.precision))
        object.__setattr__(self, "attention", parse_choice(AttentionChoice, "attention", self.attention))
        object.__setattr__(self, "offload", parse_choice(OffloadChoice, "offload", self.offload))
        object.__setattr__(self, "vae_tiling", parse_choice(Toggle, "vae_tiling", self.vae_tiling))
        object.__setattr__(self, "outputs", Path(self.outputs))
        object.__setattr__(self, "lora_dir", Path(self.lora_dir))
        if self.upscaler_dir is not None:
            object.__setattr__(self, "upscaler_dir", Path(self.upscaler_dir))
        profile = str(self.profile).strip().lower()
        if profile not in (PROFILE_AUTO, *PROFILE_NAMES):
            raise ValidationError("profile", self.profile, f"must be one of auto, {', '.join(PROFILE_NAMES)}")
        object.__setattr__(self, "profile", profile)
        loras = [self.loras] if isinstance(self.loras, (str, LoraSpec)) else list(self.loras or ())
        object.__setattr__(self, "loras", tuple(parse_lora(v) for v in loras))
        decoder = str(self.decoder).strip().lower()
        if decoder not in DECODERS:
            raise ValidationError("decoder", self.decoder, f"must be one of {', '.join(DECODERS)}")
        object.__setattr__(self, "decoder", decoder)
        if not str(self.tiny_decoder).strip():
            raise ValidationError("tiny_decoder", self.tiny_decoder, "must be auto, a folder or a hub id")
        if not str(self.model).strip():
            raise ValidationError("model", self.model, "must not be empty")
        if isinstance(self.threads, bool) or not isinstance(self.threads, int) or self.threads < 0:
            raise ValidationError("threads", self.threads, "must be 0 (auto) or a positive whole number")

    @property
    def is_tiny(self) -> bool:
        return self.model == TINY

    @property
    def is_demo(self) -> bool:
        return str(self.model).strip().lower() == DEMO

    @property
    def refiner_source(self) -> str | None:
        """The refiner to load when the plan wants one, or None when there is none to load."""
        if self.refiner.strip().lower() == "none":
            return None
        if self.refiner != "auto":
            return self.refiner
        if self.is_tiny:
            return TINY
        if self.is_demo:
            return str(DEMO_MODEL_DIR / "refiner")
        if self.model == DEFAULT_MODEL:
            return DEFAULT_REFINER
        return None  # a custom base has no known matching refiner; --refiner names one

    def with_(self, **changes) -> "AppSettings":
        return replace(self, **changes)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides) -> "AppSettings":
        """Defaults < SDXL_UI_* environment < explicit overrides (flags). None overrides are ignored."""
        env = os.environ if env is None else env
        values: dict = {}
        for name in cls.__dataclass_fields__:
            key = f"SDXL_UI_{name.upper()}"
            if key in env and env[key] != "":
                values[name] = env[key]
        if "threads" in values:
            try:
                values["threads"] = int(values["threads"])
            except ValueError:
                raise ValidationError("SDXL_UI_THREADS", values["threads"], "must be a whole number") from None
        if env.get("SDXL_UI_LORA"):  # several: separated by commas
            values["loras"] = tuple(v for v in env["SDXL_UI_LORA"].split(",") if v.strip())
        for flag in ("local_files_only", "compile"):
            if flag in values:
                values[flag] = values[flag].lower() in ("1", "true", "yes")
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)
