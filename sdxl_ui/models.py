"""Load the SDXL base (and refiner) from a hub id, a local diffusers folder or a single .safetensors file,
the shipped ``demo`` model (a trained diffusers folder in assets/demo-model, loaded like any local folder), or
build the offline ``tiny`` model: the full SDXL architecture at toy width, random weights (speed tests only).

Every failure becomes a ModelLoadError whose message says what was tried and the ways out.
"""
from __future__ import annotations

import json
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .assembly import assemble, build_modules, clip_tokenizer
from .failures import ModelLoadError  # noqa: F401 - re-exported: the loaders raise it, callers catch it here
from .schema import DEMO_MODEL_NOTE, DEMO_NOTE
from .settings import DEFAULT_MODEL, DEMO, DEMO_MODEL_DIR, TINY
from .weights import ModelSize, model_size

log = logging.getLogger(__name__)

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
TINY_SEED = 0
TINY_SIZE = 256


@dataclass(frozen=True)
class ModelSource:
    kind: str  # "tiny" | "hub" | "folder" | "single_file"
    location: str
    name: str = ""  # "demo" for the shipped demo model (a folder, loaded like any other)

    def size(self, refiner_source: str | None) -> ModelSize:
        """For the memory estimate: the parameters counted from the model's own files (and the refiner's UNet,
        ``settings.refiner_source``); SDXL 1.0's counts where there are no files to read."""
        return model_size(self.kind, self.location, refiner_source)

    @property
    def native_size(self) -> int:
        if self.kind == "tiny":
            return TINY_SIZE
        if self.kind == "folder":
            return folder_native_size(Path(self.location))
        return 1024

    @property
    def label(self) -> str:
        return self.name or ("tiny" if self.kind == "tiny" else self.location)

    @property
    def note(self) -> str | None:
        """What the page, the log, the JSON and the PNG say about a stand-in model."""
        return DEMO_NOTE if self.kind == "tiny" else DEMO_MODEL_NOTE if self.name == DEMO else None


def folder_native_size(path: Path, default: int = 1024) -> int:
    """A diffusers folder's native image side: the UNet's latent sample_size × the VAE's downscale factor
    (SDXL: 128 × 8 = 1024; the demo model: 16 × 8 = 128). ``default`` when the configs cannot be read."""
    try:
        unet = json.loads((path / "unet" / "config.json").read_text(encoding="utf-8"))
        vae = json.loads((path / "vae" / "config.json").read_text(encoding="utf-8"))
        side = int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)
    except (OSError, ValueError, KeyError, TypeError):
        return default
    return side if 64 <= side <= 2048 else default


@dataclass
class LoadedModels:
    base: Any  # StableDiffusionXLPipeline
    refiner: Any | None  # StableDiffusionXLImg2ImgPipeline sharing text_encoder_2 and the VAE
    source: ModelSource
    load_s: float
    scheduler_config: Any = None  # the model's own scheduler config: every sampler is derived from it

    def __post_init__(self):
        if self.scheduler_config is None:
            self.scheduler_config = self.base.scheduler.config

    @property
    def note(self) -> str | None:
        return self.source.note


def resolve_source(spec: str, field: str = "model") -> ModelSource:
    """Classify a --model / --refiner value, without loading anything."""
    spec = str(spec).strip()
    if spec.lower() == TINY:
        return ModelSource("tiny", TINY)
    if spec.lower() == DEMO:
        if not (DEMO_MODEL_DIR / "model_index.json").is_file():
            raise ModelLoadError(f"{field}: the demo model is missing from {str(DEMO_MODEL_DIR)!r} (a clone of the "
                                 "repository has it). Rebuild it with `python -m sdxl_ui train-demo --out "
                                 "assets/demo-model`, or use --model tiny (random weights) to try the app")
        return ModelSource("folder", str(DEMO_MODEL_DIR), name=DEMO)
    path = Path(spec).expanduser()
    if spec.lower().endswith((".safetensors", ".ckpt")):
        if not path.is_file():
            raise ModelLoadError(f"{field}: checkpoint file {spec!r} does not exist")
        if spec.lower().endswith(".ckpt"):
            raise ModelLoadError(f"{field}: {spec!r} is a pickle .ckpt; only .safetensors files are loaded "
                                 "(pickles can run code). Convert it to .safetensors first")
        return ModelSource("single_file", str(path.resolve()))
    if path.is_dir():
        return ModelSource("folder", str(path.resolve()))
    if path.exists():
        raise ModelLoadError(f"{field}: {spec!r} is a file but not a .safetensors checkpoint")
    if spec.startswith((".", "/", "~")) or os.sep in spec.replace("/", "", 1) or not HUB_ID.match(spec):
        raise ModelLoadError(
            f"{field}: {spec!r} is not 'demo', 'tiny', an existing diffusers folder, a .safetensors file, or a hub id "
            "like 'stabilityai/stable-diffusion-xl-base-1.0' (if it is a local path: it does not exist)"
        )
    return ModelSource("hub", spec)


def _ways_out(what: str) -> str:
    return (
        f"Ways out: (1) download it while online: `huggingface-cli download {what}` (or run once with network "
        "access, without HF_HUB_OFFLINE); (2) point at a local copy: --model /path/to/diffusers-folder or "
        "--model /path/to/model.safetensors; (3) try the app offline with the demo model: --model demo"
    )


# ---------------------------------------------------------------- tiny demo model

def _tiny_configs(tokenizer) -> dict[str, dict]:
    """The tiny architecture's component configs, in the order they are built (the order fixes the weights)."""
    vocab = len(tokenizer)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    common = dict(vocab_size=vocab, bos_token_id=bos, eos_token_id=eos, pad_token_id=eos, max_position_embeddings=77,
                  layer_norm_eps=1e-5, hidden_act="quick_gelu")
    return dict(
        # SDXL: encoder 1 = CLIP ViT-L text (768), encoder 2 = OpenCLIP bigG text with projection (1280 -> 1280).
        te1=dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2, projection_dim=32,
                 **common),
        te2=dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=2, projection_dim=32,
                 **common),
        # Same block layout as SDXL base (no attention at full latent res; text_time conditioning), toy widths.
        unet=dict(
            sample_size=TINY_SIZE // 8, in_channels=4, out_channels=4, layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(32, 64, 64), attention_head_dim=(2, 4, 4), transformer_layers_per_block=(1, 1, 2),
            cross_attention_dim=32 + 64, use_linear_projection=True, norm_num_groups=8,
            addition_embed_type="text_time", addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + 32,  # (orig size, crop, target size) x 8 + pooled text
        ),
        # Four levels like the real VAE, so the latent scale factor stays 8.
        vae=dict(
            in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
            block_out_channels=(16, 32, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, sample_size=TINY_SIZE, scaling_factor=0.13025, force_upcast=True,
        ),
        # SDXL refiner layout: text encoder 2 only, aesthetic-score conditioning (5 time ids instead of 6).
        refiner_unet=dict(
            sample_size=TINY_SIZE // 8, in_channels=4, out_channels=4, layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(32, 64, 64, 64), attention_head_dim=(2, 4, 4, 4), cross_attention_dim=64,
            use_linear_projection=True, norm_num_groups=8, addition_embed_type="text_time", addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=5 * 8 + 32,
        ),
    )


def build_tiny(with_refiner: bool = True, dtype: str = "float32"):
    """(base, refiner) tiny pipelines, identical on every call (fixed seed; built in about a second)."""
    import torch
    from diffusers import EulerDiscreteScheduler

    tokenizer = clip_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        modules = build_modules(_tiny_configs(tokenizer))  # the refiner UNet too: the same weights either way
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        steps_offset=1, timestep_spacing="leading", prediction_type="epsilon",
    )
    for module in modules.values():
        module.eval()
        # Plain nn.Module.to: diffusers' ModelMixin.to warns about fp32-only modules, and these have none.
        torch.nn.Module.to(module, dtype=_torch_dtype(dtype))
    return assemble(modules, tokenizer, scheduler, with_refiner=with_refiner)


# ---------------------------------------------------------------- real loading

def _torch_dtype(name: str):
    import torch

    return getattr(torch, name)


def _check_folder(path: Path, field: str) -> None:
    index = path / "model_index.json"
    if not index.is_file():
        raise ModelLoadError(f"{field}: folder {str(path)!r} is not a diffusers pipeline (no model_index.json). "
                             "Point at the folder that holds model_index.json, or at a single .safetensors file")
    try:
        class_name = json.loads(index.read_text(encoding="utf-8")).get("_class_name", "")
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{field}: {index} cannot be read ({exc})") from None
    if "StableDiffusionXL" not in class_name:
        raise ModelLoadError(f"{field}: folder {str(path)!r} holds a {class_name or 'unknown'} pipeline, "
                             "not Stable Diffusion XL")


def check_source(source: ModelSource, field: str = "model") -> None:
    """The cheap checks of a local model (a folder's model_index.json and pipeline class, a checkpoint's header),
    run before the memory preflight: a wrong --model is named as such, not reported as a shortage of RAM."""
    if source.kind == "folder":
        _check_folder(Path(source.location), field)
    elif source.kind == "single_file":
        _check_single_file(source.location, field)


def _load_kwargs(location: str, dtype: str, is_folder: bool) -> dict:
    kwargs: dict = {"dtype": _torch_dtype(dtype), "add_watermarker": False}  # diffusers 0.42: dtype, not torch_dtype
    if is_folder:
        files = [p.name for p in Path(location).rglob("*") if p.is_file()]
        kwargs["use_safetensors"] = True if any(f.endswith(".safetensors") for f in files) else None
        if dtype in ("float16", "bfloat16") and any(".fp16." in f for f in files):
            kwargs["variant"] = "fp16"
    else:
        kwargs["use_safetensors"] = True
        if dtype in ("float16", "bfloat16"):
            kwargs["variant"] = "fp16"  # the hub repos ship fp16 weights: half the download
    return kwargs


def _shorten(text: str, limit: int = 240) -> str:
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def _from_pretrained(cls, source: ModelSource, dtype: str, local_files_only: bool, field: str, **extra):
    is_folder = source.kind == "folder"
    kwargs = {**_load_kwargs(source.location, dtype, is_folder), **extra}
    if is_folder:
        return cls.from_pretrained(source.location, local_files_only=True, **kwargs)
    attempts = [True] if (local_files_only or _offline()) else [True, False]
    # Either file set will do, the preferred one first: a cache filled on a GPU (the fp16 files only) still loads
    # in fp32 (upcast), and one with only the plain files still loads in fp16/bf16.
    variants = [kwargs.get("variant"), None] if kwargs.get("variant") else [None, "fp16"]
    errors: dict[str, str] = {}
    for cached_only in attempts:
        errors = {}  # the last pass's, one per file set: each names the file it lacked
        for variant in variants:
            try:
                options = {**kwargs, "variant": variant}
                return cls.from_pretrained(source.location, local_files_only=cached_only, **options)
            except (OSError, ValueError) as exc:  # not cached / unreachable / no such variant
                text = str(exc).strip()
                errors[f"{variant} files" if variant else "plain files"] = _shorten(
                    text.splitlines()[0] if text else type(exc).__name__, 400)
    where = "the local Hugging Face cache" + ("" if len(attempts) == 1 else " and the hub (unreachable?)")
    gaps = _cache_gaps(source.location, variants[0]) or f"it is not in {where}, or a file of it is missing there"
    raise ModelLoadError(
        f"{field}: could not load {source.location!r}: {gaps}"
        f"{' (offline mode: HF_HUB_OFFLINE / --local-files-only)' if len(attempts) == 1 else ''}. "
        f"Last errors: {'; '.join(f'{k}: {v}' for k, v in errors.items())} {_ways_out(source.location)}"
    )


def _cache_gaps(repo_id: str, variant: str | None) -> str:
    """What the cached snapshot of ``repo_id`` lacks, by its model_index.json: each component folder without its
    config or weights, named by the file the preferred ``variant`` has (diffusers' own error names the file of the
    last variant it fell back to, or another folder). '' when nothing of it is cached or nothing is seen missing."""
    try:
        from huggingface_hub import try_to_load_from_cache

        index = try_to_load_from_cache(repo_id, "model_index.json")
        components = json.loads(Path(index).read_text(encoding="utf-8")) if isinstance(index, str) else {}
    except (OSError, ValueError):
        return ""
    snapshot, missing = Path(str(index)).parent, []
    for name, value in components.items():
        if name.startswith("_") or not isinstance(value, list) or len(value) != 2 or None in value:
            continue
        folder, cls = snapshot / name, str(value[1])
        if "Scheduler" in cls:
            needed = [] if (folder / "scheduler_config.json").is_file() else ["scheduler_config.json"]
        elif "Tokenizer" in cls:
            needed = [] if folder.is_dir() and any(folder.iterdir()) else ["its files"]
        elif "Model" in cls or cls.startswith("Autoencoder"):  # UNet2DConditionModel, CLIPTextModel, AutoencoderKL
            stem = "diffusion_pytorch_model" if value[0] == "diffusers" else "model"
            weights = f"{stem}.{variant}.safetensors" if variant else f"{stem}.safetensors"
            needed = [f for f, ok in (("config.json", (folder / "config.json").is_file()),
                                      (weights, folder.is_dir() and any(folder.glob(f"{stem}*.safetensors"))))
                      if not ok]
        else:
            needed = []
        missing += [f"{name}/{f}" for f in needed]
    if not missing:
        return ""
    return (f"the local Hugging Face cache holds it without {', '.join(missing)} (snapshot {str(snapshot)!r}; an "
            "interrupted download?)")


def _check_single_file(location: str, field: str) -> None:
    """Read only the .safetensors header: corrupt, truncated or non-SDXL files are refused before any loading."""
    try:
        from safetensors import safe_open

        with safe_open(location, framework="pt") as f:
            keys = list(f.keys())
            kind = _checkpoint_kind(f) if keys else None
    except Exception as exc:  # noqa: BLE001 - corrupt/truncated files raise various errors
        raise ModelLoadError(f"{field}: {location!r} is not a valid .safetensors file ({exc})") from None
    wanted = SINGLE_FILE_KINDS.get(field, SINGLE_FILE_KINDS["model"])
    if kind in wanted:
        return
    if not any(k.startswith(("model.diffusion_model.", "conditioner.")) for k in keys):
        raise ModelLoadError(f"{field}: {location!r} does not look like an SDXL checkpoint "
                             f"({len(keys)} tensors, none under model.diffusion_model.)")
    label = CHECKPOINT_LABELS.get(kind, kind or "unknown")
    hint = {("model", "xl_refiner"): ": pass it as --refiner, with an SDXL base as --model",
            ("refiner", "xl_base"): ": pass it as --model; the refiner is the second-stage SDXL model"}.get(
        (field, kind), "; sdxl_ui runs Stable Diffusion XL checkpoints only")
    raise ModelLoadError(f"{field}: {location!r} holds {label} weights (diffusers' checkpoint classifier: "
                         f"{kind!r}), not {' or '.join(CHECKPOINT_LABELS[k] for k in wanted)}{hint}")


# What each field accepts, in the names of diffusers' own classifier (single_file_utils.infer_diffusers_model_type).
# The old test (any key under model.diffusion_model.) also let Stable Diffusion 1.x/2.x checkpoints through.
SINGLE_FILE_KINDS = {"model": ("xl_base", "playground-v2-5"), "refiner": ("xl_refiner",)}
CHECKPOINT_LABELS = {
    "xl_base": "SDXL base", "playground-v2-5": "Playground v2.5 (SDXL architecture)", "xl_refiner": "SDXL refiner",
    "xl_inpaint": "SDXL inpainting", "v1": "Stable Diffusion 1.x", "v2": "Stable Diffusion 2.x",
    "inpainting": "Stable Diffusion 1.x inpainting", "inpainting_v2": "Stable Diffusion 2.x inpainting",
}


def _checkpoint_kind(f) -> str | None:
    """diffusers' classifier run on the header alone: key lookups, and shapes without reading any tensor data."""
    from collections.abc import Mapping

    import torch
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    class Header(Mapping):
        def __init__(self):
            self._keys = set(f.keys())

        def __getitem__(self, key):
            if key not in self._keys:
                raise KeyError(key)
            return type("Shape", (), {"shape": torch.Size(f.get_slice(key).get_shape())})()

        def __iter__(self):
            return iter(self._keys)

        def __len__(self):
            return len(self._keys)

    try:
        return infer_diffusers_model_type(Header())
    except Exception:  # noqa: BLE001 - a family whose test needs tensor values: not one of ours
        return None


def _from_single_file(cls, source: ModelSource, dtype: str, config: str | None, field: str,
                      local_files_only: bool = False, **extra):
    _check_single_file(source.location, field)
    try:
        return cls.from_single_file(source.location, torch_dtype=_torch_dtype(dtype), config=config,
                                    local_files_only=local_files_only or _offline(), **extra)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"{field}: could not build a pipeline from {source.location!r}: {str(exc).splitlines()[0][:300]}. "
            "diffusers needs the matching model config: run once online, or pass --single-file-config with a "
            f"local diffusers SDXL folder. {_ways_out(DEFAULT_MODEL)}"
        ) from None


def load_models(source: ModelSource, refiner_spec: str | None, dtype: str, vae_dtype: str, want_refiner: bool,
                local_files_only: bool = False, single_file_config: str | None = None) -> LoadedModels:
    """Load base (+ refiner sharing text_encoder_2 and the VAE) in ``dtype``; the VAE in ``vae_dtype``."""
    start = time.perf_counter()  # the first load also pays for importing diffusers/transformers: count it
    import torch
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    refiner = None
    try:
        if source.kind == "tiny":
            base, tiny_refiner = build_tiny(with_refiner=want_refiner, dtype=dtype)
            if refiner_spec == TINY:
                refiner = tiny_refiner
        elif source.kind == "single_file":
            base = _from_single_file(StableDiffusionXLPipeline, source, dtype, single_file_config, "model",
                                     local_files_only, add_watermarker=False)
        else:
            if source.kind == "folder":
                _check_folder(Path(source.location), "model")
            base = _from_pretrained(StableDiffusionXLPipeline, source, dtype, local_files_only, "model")
        if want_refiner and refiner is None and refiner_spec and refiner_spec != TINY:
            ref_source = resolve_source(refiner_spec, field="refiner")
            shared = dict(text_encoder_2=base.text_encoder_2, vae=base.vae)
            if ref_source.kind == "single_file":
                refiner = _from_single_file(StableDiffusionXLImg2ImgPipeline, ref_source, dtype,
                                            None, "refiner", local_files_only, add_watermarker=False, **shared)
            else:
                if ref_source.kind == "folder":
                    _check_folder(Path(ref_source.location), "refiner")
                refiner = _from_pretrained(StableDiffusionXLImg2ImgPipeline, ref_source, dtype, local_files_only,
                                           "refiner", **shared)
    except ModelLoadError:
        raise
    except (MemoryError, torch.OutOfMemoryError) as exc:
        raise ModelLoadError(f"model: out of memory while loading {source.label} ({exc}); close other programs, "
                             "or use --precision bf16/fp16 to halve the weights") from None
    except Exception as exc:  # noqa: BLE001 - e.g. a folder with missing/corrupt component files
        raise ModelLoadError(f"model: could not load {source.label!r}: {type(exc).__name__}: "
                             f"{str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}") from None
    if base.vae.dtype != _torch_dtype(vae_dtype):
        torch.nn.Module.to(base.vae, dtype=_torch_dtype(vae_dtype))  # the VAE has no fp32-only submodules
    for pipe in (base, refiner):
        if pipe is not None:
            pipe.set_progress_bar_config(disable=True)
    return LoadedModels(base=base, refiner=refiner, source=source, load_s=time.perf_counter() - start)
