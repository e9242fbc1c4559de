"""A model's size read from its own files, for the memory preflight: parameter counts from the safetensors headers
(the JSON index at the start of each file: names, dtypes, shapes), without loading a tensor.

Real SDXL-architecture models come in many sizes (SSD-1B, Vega, pruned and distilled checkpoints, the demo model),
so the estimate counts what is there instead of assuming SDXL 1.0. Where there is nothing to read (a hub id that is
not in the local cache), SDXL 1.0's published counts stand, and the plan's reason says which it used.
"""
from __future__ import annotations

import json
import re
import struct
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

from .optimizations.memory import SDXL_SIZE, TINY_SIZE, ModelSize

BASE_PARTS = ("unet", "text_encoder", "text_encoder_2", "vae")
HEADER_LIMIT = 100 * 1024**2  # a safetensors header longer than this is not one
SHARD = re.compile(r"-\d{5}-of-\d{5}(?=\.)")  # diffusion_pytorch_model-00001-of-00002.safetensors


def safetensors_params(path: Path) -> int:
    """The number of parameters in one .safetensors file, from its header alone (no tensor is read)."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path.name}: not a safetensors file ({len(head)} bytes)")
        (length,) = struct.unpack("<Q", head)
        if not 0 < length <= HEADER_LIMIT:
            raise ValueError(f"{path.name}: not a safetensors file (header length {length})")
        header = json.loads(f.read(length))
    if not isinstance(header, dict):
        raise ValueError(f"{path.name}: its header is not a JSON object")
    total = 0
    for name, entry in header.items():
        if name != "__metadata__":
            count = 1
            for dim in entry["shape"]:
                count *= int(dim)
            total += count
    return total


def folder_params(folder: Path) -> int:
    """Parameters of one component folder (``unet/``, ``vae/``, …). Variants (``.fp16``) hold the same weights in
    another dtype and shards are parts of one: the largest variant's shards, summed. 0 when it has no .safetensors
    (a .bin pickle is counted by its size as fp32, the dtype such files are saved in)."""
    variants: dict[str, int] = defaultdict(int)
    for file in sorted(folder.glob("*.safetensors")):
        variants[SHARD.sub("", file.name)] += safetensors_params(file)
    if not variants:
        variants = {file.name: file.stat().st_size // 4 for file in folder.glob("*.bin")}
    return max(variants.values(), default=0)


def diffusers_folder_size(folder: Path, refiner_folder: Path | None) -> ModelSize | None:
    """A diffusers folder's counted size (with its refiner's UNet), or None when its UNet has no weights to count."""
    parts = {name: folder_params(folder / name) for name in BASE_PARTS if (folder / name).is_dir()}
    if not parts.get("unet"):
        return None
    refiner = folder_params(refiner_folder / "unet") if refiner_folder and (refiner_folder / "unet").is_dir() else 0
    return ModelSize.counted(parts["unet"], parts.get("text_encoder", 0) + parts.get("text_encoder_2", 0),
                             parts.get("vae", 0), refiner, f"counted from the safetensors headers in {folder.name}/")


def _hub_folder(repo_id: str) -> Path | None:
    """The local hub cache's snapshot of ``repo_id``, or None (never the network)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        index = try_to_load_from_cache(repo_id, "model_index.json")
    except Exception:  # noqa: BLE001 - no cache, a malformed id: nothing to count
        return None
    return Path(index).parent if isinstance(index, str) else None


def _refiner_size(refiner_source: str | None) -> tuple[Path | None, int | None]:
    """(a refiner folder to count, or a known count) for ``settings.refiner_source``."""
    if not refiner_source:
        return None, 0
    if refiner_source == "tiny":
        return None, TINY_SIZE.refiner_params
    path = Path(refiner_source).expanduser()
    if path.is_dir():
        return path, None
    hub = _hub_folder(refiner_source) if "/" in refiner_source and not path.exists() else None
    return (hub, None) if hub else (None, SDXL_SIZE.refiner_params)


def model_size(kind: str, location: str, refiner_source: str | None) -> ModelSize:
    """The size of the model a ModelSource names (``kind``: tiny, folder, hub, single_file; anything else is a
    built architecture of SDXL's size), with the refiner ``refiner_source`` names (None: no refiner)."""
    if kind == "tiny":
        return TINY_SIZE
    refiner_folder, refiner_count = _refiner_size(refiner_source)
    try:
        if kind == "single_file":
            total = safetensors_params(Path(location))  # UNet, text encoders and VAE in one file
            width = min(1.0, (total / SDXL_SIZE.base_params) ** 0.5)
            refiner = folder_params(refiner_folder / "unet") if refiner_folder and (refiner_folder / "unet").is_dir() \
                else 0
            counted = ModelSize(total, refiner, SDXL_SIZE.vae_params, width, 1.0,
                                f"counted from {Path(location).name}'s safetensors header",
                                round(total * SDXL_SIZE.unet_params / SDXL_SIZE.base_params))
        else:
            folder = Path(location) if kind == "folder" else _hub_folder(location) if kind == "hub" else None
            counted = diffusers_folder_size(folder, refiner_folder) if folder else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError, struct.error):
        counted = None  # unreadable files: the loader will say what is wrong with them; the estimate assumes SDXL
    if counted is None:
        counted = SDXL_SIZE
    if refiner_count is not None:
        counted = replace(counted, refiner_params=refiner_count)
    return counted
