"""The tiny decoder: diffusers' ``AutoencoderTiny`` (TAESD's architecture; TAESDXL's weights for SDXL,
``madebyollin/taesdxl``) beside the pipeline's full VAE.

It decodes the pipeline's latents directly (its config's scaling factor is 1.0) with a small conv net: a fraction of
the full VAE's decode time, a slightly different picture. It draws the live previews whenever one is present (a
real decode instead of the linear latent→RGB approximation), and the final image only when ``--decoder tiny`` asks
(it changes the picture; the report's row says so).

Where it comes from (``locate``): ``--tiny-decoder SOURCE`` (a folder or a hub id), else a ``tiny-decoder/`` folder
beside the model (the demo model ships one, distilled from its VAE), else ``madebyollin/taesdxl`` — taken from the
Hugging Face cache only, unless the final image needs it (``--decoder tiny``): previews never download.
The loaded decoder is a run hook (``hooks.py``) installed on the pipelines under ``NAME`` (what the report reads
back): it decodes the final image (``decode``, only with ``final``), names itself for the PNG (``decoder_name``),
draws the previews (``preview``) and gives tiling its convolutions (``modules``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from . import hooks

HUB_ID = "madebyollin/taesdxl"
HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")  # org/name (models.HUB_ID's rule)
FOLDER = "tiny-decoder"  # beside a model folder
NAME = "tiny decoder"  # its run hook's name on a pipeline


class TinyDecoderError(RuntimeError):
    """The tiny decoder the settings ask for cannot be loaded; the message names the source and the reason."""


@dataclass(frozen=True)
class Attached:
    """The loaded tiny decoder as a run hook on a pipeline."""

    decoder: object  # AutoencoderTiny
    source: str
    final: bool  # also decodes the final image (--decoder tiny)

    def decode(self, pipe, latents):
        return decode(self.decoder, latents) if self.final else None

    def decoder_name(self, pipe) -> str | None:
        return f"tiny decoder {label(self.source)}" if self.final else None

    def preview(self, pipe, latents):
        return preview(pipe, latents)

    def modules(self, pipe) -> list:
        return [self.decoder]


def locate(setting: str, model_location: str | None) -> tuple[str | None, str]:
    """(source, where from) of the tiny decoder, or (None, why not): ``setting`` is ``--tiny-decoder`` ("auto":
    a ``tiny-decoder/`` folder beside a model folder, else TAESDXL's hub id)."""
    if setting and setting != "auto":
        return setting, "set by --tiny-decoder"
    if model_location:
        beside = Path(model_location) / FOLDER
        if (beside / "config.json").is_file():
            return str(beside), "shipped beside the model"
    return HUB_ID, "TAESDXL (madebyollin/taesdxl)"


def is_path(source: str) -> bool:
    """A source that names a place on this machine (never asked of the hub): it exists, or it looks like a path
    (./x, ../x, /x, ~/x, a backslash, more than org/name), or it is no hub id at all."""
    return Path(source).expanduser().exists() or source.startswith((".", "/", "~")) or "\\" in source \
        or not HUB_NAME.match(source)


def check_source(setting: str) -> str | None:
    """What is wrong with ``--tiny-decoder SOURCE`` (the problem, to be named with the flag), or None; no network:
    a folder must exist and hold a diffusers config.json, anything path-like that does not is refused."""
    if setting == "auto":
        return None
    path = Path(setting).expanduser()
    if path.is_dir():
        return None if (path / "config.json").is_file() else "is a folder without a config.json (not a diffusers " \
                                                              "AutoencoderTiny folder)"
    if path.exists():
        return "is a file, not a folder"
    if is_path(setting):
        return "no such folder (a hub id is org/name)"
    return None  # a hub id: fetched (or found in the cache) when the model loads


def load(source: str, dtype, device: str, local_files_only: bool):
    """An AutoencoderTiny from a folder or a hub id (cache only with ``local_files_only``), or TinyDecoderError.
    A path-like source is only ever read from disk."""
    import torch
    from diffusers import AutoencoderTiny

    if is_path(source):
        problem = check_source(source)
        if problem:
            raise TinyDecoderError(f"tiny_decoder: {source!r} {problem}")
        local_files_only = True
    try:
        decoder = AutoencoderTiny.from_pretrained(source, torch_dtype=dtype, local_files_only=local_files_only)
    except Exception as exc:  # noqa: BLE001 - missing folder, not in the cache, corrupt file, offline
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise TinyDecoderError(f"tiny_decoder: {source!r} cannot be loaded as an AutoencoderTiny ({first})") from None
    if not isinstance(decoder, AutoencoderTiny):
        raise TinyDecoderError(f"tiny_decoder: {source!r} is a {type(decoder).__name__}, not an AutoencoderTiny")
    return decoder.to(device).eval().requires_grad_(False).to(torch.float32 if dtype is None else dtype)


def label(source: str) -> str:
    """What the page, the log and the PNG call it: a folder by its name (never a server path), a hub id as it is."""
    path = Path(source)
    return path.name if path.is_absolute() or path.exists() else source


def attach(pipe, attached: Attached | None) -> None:
    hooks.install(pipe, NAME, attached)


def attached(pipe) -> Attached | None:
    return hooks.get(pipe, NAME)


def decode(decoder, latents):
    """The pipeline's latents → images in -1…1 (as the VAE's ``decode(...).sample``)."""
    import torch

    with torch.inference_mode():
        z = latents.to(device=decoder.device, dtype=decoder.dtype) / decoder.config.scaling_factor
        return decoder.decode(z, return_dict=False)[0].float()


def preview(pipe, latents, max_side: int = 512):
    """A live preview of the first image's latents by the attached tiny decoder (PIL), or None when none is."""
    found = attached(pipe)
    if found is None:
        return None
    from PIL import Image

    image = decode(found.decoder, latents[:1])[0]
    rgb = ((image.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    picture = Image.fromarray(rgb, "RGB")
    if max(picture.size) > max_side:
        scale = max_side / max(picture.size)
        picture = picture.resize((round(picture.width * scale), round(picture.height * scale)), Image.BILINEAR)
    return picture
