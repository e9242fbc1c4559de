"""LoRA adapters on the loaded base pipeline, and the evidence a model's files give of its family.

A set of LoRAs is applied all or nothing: every file is found, read and checked against the base pipeline's own
layers first (names, shapes, ranks), and only then loaded with diffusers' loader (``load_lora_weights`` with one
adapter name each, ``set_adapters`` with their weights), fused into the weights (``fuse_lora``) and the LoRA layers
removed (``unload_lora_weights``): the denoising runs plain layers, as fast as without a LoRA, and int8 and the
feature cache see an ordinary UNet. Before fusing, the weights of every layer a LoRA touches are kept; removing or
changing the set puts them back exactly (an unfuse by subtraction is not bit-exact), so a base image after a LoRA
is bit-identical to one before it. A failure leaves the pipeline as it was and names the file and the reason.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .models import HUB_ID, ModelLoadError, ModelSource
from .optimizations import hooks
from .profiles import PROFILES, detect
from .settings import LoraSpec

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
FUSED, ORIGINALS = "loras", "lora originals"  # their state in the pipeline's registry (``hooks.state``)
LORA_KEY = re.compile(r"^(unet|text_encoder|text_encoder_2)\.(.+?)\."
                      r"(?:lora(?:_linear_layer)?\.(down|up)|lora_(A|B))(?:\.default(?:_0)?)?\.weight$")
# diffusers' older attention-processor layout (what its converters make of a kohya file): ...attn1.processor.to_q_lora.
LEGACY_KEY = re.compile(r"\.(?:processor\.)?(to_q|to_k|to_v|to_out)_lora\.(down|up)\.")
LEGACY_LAYERS = {"unet": {"to_out": "to_out.0"},
                 "text": {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}}
PICKLES = (".ckpt", ".pt", ".pth", ".bin")
DIFFUSERS_LORA_FILE = "pytorch_lora_weights.safetensors"


class LoraError(ModelLoadError):
    """A LoRA cannot be applied; the message names the file and the reason. The pipeline is unchanged."""


@dataclass(frozen=True)
class FusedLora:
    """One LoRA in the weights: what the report, the status panel and the PNG ``parameters`` say of it."""

    name: str
    weight: float
    hash: str  # AUTOMATIC1111's: the first 12 hex digits of the SHA-256 of the tensors (the file after its header)
    path: str
    spec: LoraSpec


# ---------------------------------------------------------------- finding and reading the file

def resolve(spec: LoraSpec, local_files_only: bool = False) -> Path:
    """The LoRA's .safetensors file: the file, the diffusers file in a folder, or a hub download (cached)."""
    source = spec.source
    path = Path(source).expanduser()
    if source.lower().endswith(PICKLES):
        raise LoraError(f"lora: {source!r} is a pickle file; only .safetensors LoRAs are loaded (pickles can run "
                        "code)")
    if path.is_file():
        return path.resolve()
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        preferred = [f for f in files if f.name == DIFFUSERS_LORA_FILE]
        if preferred or len(files) == 1:
            return (preferred or files)[0].resolve()
        raise LoraError(f"lora: folder {source!r} holds {len(files)} .safetensors files; name one (folder/FILE)")
    repo, _, filename = source.partition(":")
    if source.lower().endswith(".safetensors") and not HUB_ID.match(repo) or source.startswith((".", "/", "~")):
        raise LoraError(f"lora: file {source!r} does not exist")
    if not HUB_ID.match(repo):
        raise LoraError(f"lora: {source!r} is not a .safetensors file, a folder or a hub id (org/name[:FILE])")
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(repo, filename or DIFFUSERS_LORA_FILE, local_files_only=local_files_only))
    except Exception as exc:  # noqa: BLE001 - offline, no such repo or file
        raise LoraError(f"lora: {source!r} could not be had from the hub ({type(exc).__name__}: "
                        f"{str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''})") from None


def check_file(spec: LoraSpec, path: Path) -> None:
    """A readable safetensors file with tensors in it (cheap: the header only), or LoraError naming it."""
    try:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            count = len(list(f.keys()))
    except Exception as exc:  # noqa: BLE001 - truncated, not safetensors at all
        raise LoraError(f"lora: {spec.source!r} is not a readable .safetensors file ({type(exc).__name__}: "
                        f"{str(exc).strip().splitlines()[0][:160] if str(exc).strip() else 'no detail'})") from None
    if not count:
        raise LoraError(f"lora: {spec.source!r} holds no tensors")


def check_files(specs, local_files_only: bool = False) -> None:
    """The cheap checks, before any model loads: each local LoRA file exists and is readable (a hub id not in the
    local cache is fetched when the model loads, unless ``local_files_only``)."""
    for spec in specs:
        try:
            check_file(spec, resolve(spec, local_files_only=True))
        except LoraError:
            if not is_hub_id(spec.source) or local_files_only:
                raise


def is_hub_id(source: str) -> bool:
    """``org/name[:FILE]`` that is not an existing local path."""
    return bool(HUB_ID.match(source.partition(":")[0])) and not Path(source).expanduser().exists() \
        and not source.startswith((".", "/", "~"))


def file_hash(path: Path) -> str:
    """AUTOMATIC1111's LoRA hash (its ``addnet`` hash): SHA-256 of the file after the safetensors header, 12 digits."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        header = int.from_bytes(f.read(8), "little")
        f.seek(8 + header)
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:12]


def metadata(path: Path) -> dict[str, str]:
    """The safetensors header's ``__metadata__`` (names a trainer wrote, e.g. ss_output_name), or {}."""
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 0 < size < 100_000_000:
                return {}
            header = json.loads(f.read(size))
    except (OSError, ValueError):
        return {}
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return {str(k): str(v)[:500] for k, v in meta.items()} if isinstance(meta, dict) else {}


def _read(pipe, spec: LoraSpec, path: Path) -> dict:
    """The LoRA's state dict in diffusers' key layout (its own converters: kohya, A1111, peft), or LoraError."""
    try:
        state, _alphas = pipe.lora_state_dict(str(path))
    except Exception as exc:  # noqa: BLE001 - a corrupt file, a layout diffusers cannot convert
        raise LoraError(f"lora: {spec.source!r} cannot be read as a LoRA ({type(exc).__name__}: "
                        f"{str(exc).strip().splitlines()[0][:200] if str(exc).strip() else 'no detail'})") from None
    if not state:
        raise LoraError(f"lora: {spec.source!r} holds no LoRA weights")
    return dict(state)


def check(pipe, spec: LoraSpec, state: dict) -> None:
    """Every LoRA pair must name a layer of this pipeline, with its input/output sizes and one rank: a LoRA for
    SD 1.5 (other layer names, 768-wide cross-attention), another rank layout, or keys that match nothing are refused
    before anything is loaded."""
    pairs: dict[tuple[str, str], dict[str, Any]] = {}
    unknown = []
    for key, tensor in state.items():
        if key.endswith(".alpha"):
            continue
        found = LORA_KEY.match(_normalize(key))
        if not found:
            unknown.append(key)
            continue
        side = "down" if (found.group(3) or found.group(4)) in ("down", "A") else "up"
        pairs.setdefault((found.group(1), found.group(2)), {})[side] = tuple(tensor.shape)
    if unknown:
        raise LoraError(f"lora: {spec.source!r} has {len(unknown)} keys that are not LoRA weights this app reads "
                        f"(first: {unknown[0]!r})")
    _check_values(spec, state)
    missing = []
    for (component, name), shapes in pairs.items():
        module = _layer(pipe, component, name)
        if module is None:
            missing.append(f"{component}.{name}")
            continue
        _check_shapes(spec, f"{component}.{name}", module, shapes)
    if missing:
        what = "none of its layers" if len(missing) == len(pairs) else f"{len(missing)} of its {len(pairs)} layers"
        raise LoraError(f"lora: {spec.source!r} does not fit this model: {what} exist here (first: {missing[0]}); "
                        "is it a LoRA for another architecture (e.g. SD 1.5)?")


FP16_MAX = 65504.0  # the largest half-precision number: a LoRA weight beyond it is inf on a GPU in fp16


def _check_values(spec: LoraSpec, state: dict) -> None:
    """Every weight a finite number that half precision holds: a NaN or an infinity (or a weight that overflows
    fp16) fused into the model turns every later picture black, for every user."""
    import torch

    for key, tensor in state.items():
        if not torch.is_tensor(tensor) or not tensor.is_floating_point() or not tensor.numel():
            continue
        values = tensor.detach().float()
        if not bool(torch.isfinite(values).all()):
            raise LoraError(f"lora: {spec.source!r}: {key} holds NaN or infinite weights (a broken file); the "
                            "model is unchanged")
        largest = float(values.abs().max())
        if largest > FP16_MAX:
            raise LoraError(f"lora: {spec.source!r}: {key} holds a weight of {largest:.3g}, beyond half "
                            f"precision's {FP16_MAX:g} (a broken file); the model is unchanged")


def _check_fused(pipe) -> None:
    """After fusing: every layer the LoRAs changed still finite (their product can overflow fp16 where each factor
    did not). Raises RuntimeError, which apply_loras turns into a LoraError with the model restored."""
    import torch

    for module, _weight, _bias in hooks.state(pipe, ORIGINALS, ()):
        if not bool(torch.isfinite(module.weight).all()):
            raise RuntimeError(f"the fused weights of a {type(module).__name__} are NaN or infinite in "
                               f"{module.weight.dtype} (the LoRA's weights are too large for this precision)")


def _normalize(key: str) -> str:
    """A key of diffusers' older processor layout in today's (``...attn1.to_q.lora.down.weight``)."""
    names = LEGACY_LAYERS["unet" if key.startswith("unet.") else "text"]
    return LEGACY_KEY.sub(lambda m: f".{names.get(m.group(1), m.group(1))}.lora.{m.group(2)}.", key)


def _layer(pipe, component: str, name: str):
    model = getattr(pipe, component, None)
    if model is None:
        return None
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def _check_shapes(spec: LoraSpec, where: str, module, shapes: dict) -> None:
    down, up = shapes.get("down"), shapes.get("up")
    if down is None or up is None:
        raise LoraError(f"lora: {spec.source!r}: {where} has only one of its two LoRA matrices")
    size_in = getattr(module, "in_features", getattr(module, "in_channels", None))
    size_out = getattr(module, "out_features", getattr(module, "out_channels", None))
    if size_in is None or size_out is None:
        raise LoraError(f"lora: {spec.source!r}: {where} is a {type(module).__name__}, not a layer a LoRA applies to")
    if down[0] != up[1]:
        raise LoraError(f"lora: {spec.source!r}: {where} has rank {down[0]} in one matrix and {up[1]} in the "
                        "other (a different rank layout)")
    if down[1] != size_in or up[0] != size_out:
        raise LoraError(f"lora: {spec.source!r}: {where} maps {down[1]} → {up[0]}, this model's layer "
                        f"{size_in} → {size_out} (a LoRA for another architecture, e.g. SD 1.5?)")


# ---------------------------------------------------------------- applying a set, all or nothing

def prepare(pipe, specs, local_files_only: bool = False) -> list[tuple[FusedLora, dict]]:
    """Find, read and check every LoRA of the set; touches nothing. Raises LoraError naming the file."""
    out = []
    for spec in specs:
        path = resolve(spec, local_files_only)
        check_file(spec, path)
        state = _read(pipe, spec, path)
        check(pipe, spec, state)
        out.append((FusedLora(spec.name, spec.weight, file_hash(path), str(path), spec), state))
    return out


def fused(pipe) -> tuple[FusedLora, ...]:
    return tuple(hooks.state(pipe, FUSED, ()))


def apply_loras(pipe, specs, local_files_only: bool = False) -> tuple[FusedLora, ...]:
    """Make ``specs`` (in order, with their weights) the LoRAs fused into ``pipe``: nothing to do when they
    already are; otherwise the set is checked, the previous one removed exactly, the new one fused. On any failure
    the pipeline keeps the set it had (LoraError names the file and the reason)."""
    specs = tuple(specs)
    old = fused(pipe)
    if tuple(lora.spec for lora in old) == specs:
        return old
    prepared = prepare(pipe, specs, local_files_only)
    restore(pipe)
    try:
        _fuse(pipe, prepared)
    except Exception as exc:  # noqa: BLE001 - checked beforehand; whatever diffusers still refuses
        _discard(pipe)
        if old:
            _fuse(pipe, prepare(pipe, [lora.spec for lora in old], local_files_only))
        raise LoraError(f"lora: {specs[-1].source if specs else ''!r} could not be applied "
                        f"({type(exc).__name__}: {str(exc).strip()[:200]}); the model is unchanged") from None
    return fused(pipe)


def restore(pipe) -> None:
    """Remove the fused LoRAs: the kept original weights back into their layers, bit for bit."""
    import torch

    with torch.no_grad():
        for module, weight, bias in hooks.state(pipe, ORIGINALS, ()):
            module.weight.copy_(weight)
            if bias is not None:
                module.bias.copy_(bias)
    hooks.set_state(pipe, ORIGINALS, None)
    hooks.set_state(pipe, FUSED, None)


def _fuse(pipe, prepared) -> None:
    if not prepared:
        return
    import logging

    names = []
    quiet = logging.getLogger("diffusers.loaders.lora_base")  # "no LoRA keys for the text encoder": expected
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        for index, (lora, _state) in enumerate(prepared):
            name = f"{re.sub(r'[^A-Za-z0-9_]', '_', lora.name)}_{index}"
            # From the file, not the checked dict: diffusers reads a kohya file's alphas from it again.
            pipe.load_lora_weights(lora.path, adapter_name=name)
            names.append(name)
    finally:
        quiet.setLevel(level)
    pipe.set_adapters(names, adapter_weights=[lora.weight for lora, _ in prepared])
    hooks.set_state(pipe, ORIGINALS, _originals(pipe))
    components = [c for c in COMPONENTS if getattr(pipe, c, None) is not None]
    pipe.fuse_lora(components=components, lora_scale=1.0, adapter_names=names)
    pipe.unload_lora_weights()  # the LoRA layers go; the fused weights stay
    _check_fused(pipe)
    hooks.set_state(pipe, FUSED, tuple(lora for lora, _ in prepared))


def _originals(pipe) -> tuple:
    """(layer, weight, bias) copies of every layer a loaded LoRA wraps, taken before fusing."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    kept = []
    for component in COMPONENTS:
        model = getattr(pipe, component, None)
        for module in (model.modules() if model is not None else ()):
            if isinstance(module, BaseTunerLayer):
                base = module.get_base_layer()
                bias = getattr(base, "bias", None)
                kept.append((base, base.weight.detach().clone(), None if bias is None else bias.detach().clone()))
    return tuple(kept)


def _discard(pipe) -> None:
    """After a failed load: the LoRA layers out (weights unfused), the kept originals back."""
    try:
        pipe.unload_lora_weights()
    finally:
        restore(pipe)


# ---------------------------------------------------------------- the family, from the files

def profile_evidence(source: ModelSource, specs=()) -> tuple[str, str]:
    """(profile, why) from what the model's and the LoRAs' files say (``profiles.detect``): the LoRAs' names and
    safetensors metadata, the model's hub id or file name, and a folder's shipped scheduler config."""
    config = None
    if source.kind == "folder":
        try:
            config = json.loads((Path(source.location) / "scheduler" / "scheduler_config.json").read_text())
        except (OSError, ValueError):
            config = None
    loras = []
    for spec in specs:
        path = Path(spec.source).expanduser()
        if path.is_dir():  # a diffusers LoRA folder: its file's metadata
            path = path / DIFFUSERS_LORA_FILE
        texts: list[str] = []
        if path.is_file() and path.suffix.lower() == ".safetensors":
            texts = list(metadata(path).values())
        loras.append((spec.source, texts))
    # A hub id names the family; of a local folder or file, its own name does (not the folders above it).
    model = {"tiny": "tiny", "hub": source.location}.get(source.kind, Path(source.location).name)
    return detect(model, config, loras)


def few_step_lora(source: ModelSource) -> tuple[LoraSpec, str, str] | None:
    """(spec, family, folder name) of the few-step LoRA shipped beside a model folder (the demo's ``lcm-lora/``):
    a sub-folder that is not one of the pipeline's components, holding a LoRA file whose folder name, file name or
    metadata names a few-step family (``profiles.detect``); None for other sources or when there is none."""
    if source.kind != "folder":
        return None
    folder = Path(source.location)
    try:
        components = set(json.loads((folder / "model_index.json").read_text()))
        children = sorted(p for p in folder.iterdir() if p.is_dir() and p.name not in components)
    except (OSError, ValueError):
        return None
    for child in children:
        files = sorted(child.glob("*.safetensors"))
        preferred = [f for f in files if f.name == DIFFUSERS_LORA_FILE] or files[:1]
        if not preferred:
            continue
        texts = [child.name, preferred[0].name, *metadata(preferred[0]).values()]
        family, _ = detect("", None, [(child.name, texts)])
        if PROFILES[family].few_step:
            return LoraSpec(str(child)), family, child.name
    return None


# ---------------------------------------------------------------- a request's own LoRAs (<lora:NAME:WEIGHT>)

def folder_lora(lora_dir: Path, name: str) -> Path:
    """The LoRA a prompt names, from the LoRA folder only: ``NAME.safetensors`` there (a name may hold a subfolder,
    never ``..`` or an absolute path). Raises ValidationError naming the tag's name and the folder by its name."""
    from .schema import ValidationError

    folder = Path(lora_dir)
    relative = Path(name.replace("\\", "/"))
    candidate = folder / (name if name.lower().endswith(".safetensors") else f"{name}.safetensors")
    inside = not relative.is_absolute() and ".." not in relative.parts and ":" not in name and len(name) <= 200
    try:
        if inside and candidate.is_file() and candidate.resolve().is_relative_to(folder.resolve()):
            return candidate
    except (OSError, ValueError):  # a name the file system refuses (too long, unreadable folder): not found
        pass
    raise ValidationError("prompt", f"<lora:{name[:80]}>", f"no LoRA of that name in the LoRA folder "
                                                           f"{folder.name or str(folder)}/ (its .safetensors files)")


def request_loras(settings, request) -> tuple:
    """The LoRA set one request runs with: the server's own (``--lora``), then the prompt's ``<lora:…>`` ones."""
    own = tuple(settings.loras)
    asked = tuple(LoraSpec(str(folder_lora(settings.lora_dir, name)), weight) for name, weight in request.prompt_loras)
    return own + tuple(spec for spec in asked if spec.source not in {s.source for s in own})


def apply_request_loras(pipe, settings, request, plan, own: tuple) -> None:
    """Fuse the job's set (``settings``: the job's, with Few-step's LoRA when it asks) for its job (nothing to do
    while consecutive jobs ask for the same set; a job without tags puts the server's ``own`` set back, bit for
    bit). Weights that cannot be swapped in place (int8, --compile, sequential offload) take no per-job LoRA:
    refused by name (the prompt's tags, or Quality Few-step)."""
    from .schema import ValidationError

    specs = request_loras(settings, request)
    if tuple(lora.spec for lora in fused(pipe)) == specs:
        return
    if specs != tuple(own) and (plan.int8 or plan.compile or plan.offload == "sequential"):
        field, value = ("prompt", "<lora:…>") if request.prompt_loras else ("quality", request.quality.value)
        raise ValidationError(field, value, "per-request LoRAs need weights that can be swapped in place: not with "
                                            "int8, --compile or sequential offload")
    apply_loras(pipe, specs, settings.local_files_only)
