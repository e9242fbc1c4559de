"""Upscalers for the hires fix and the upscale-only runs (A1111's extras): AUTOMATIC1111's built-ins — the latent
ones (``Latent`` and its variants: the latents interpolated) and the pixel ones (``Lanczos``, ``Nearest``;
``None``: a plain Lanczos resize) — and the user's own super-resolution models in the upscaler folder, named by
their file's stem (``sr_models``: spandrel, tiled). Found by name, any case (a built-in's name wins over a file's);
an unknown name is refused naming the field and listing what exists."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .schema import ValidationError

# A1111's latent upscale modes (modules/shared_items.py: latent_upscale_modes): interpolate mode, antialias.
LATENT_MODES: dict[str, tuple[str, bool]] = {
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}
PIXEL_UPSCALERS = ("None", "Lanczos", "Nearest")


@dataclass(frozen=True)
class Upscaler:
    name: str
    kind: str  # "latent" | "pixels" | "none" | "model"
    path: Path | None = None
    scale: int | None = None


def available(folder: Path | None) -> list[Upscaler]:
    """The pixel upscalers (A1111's ``/upscalers`` list; the latent modes are listed apart): the built-ins, then
    the model files in ``folder`` (their scale as their name states it, else None)."""
    from .sr_models import model_files, scale_in_name

    builtins = [Upscaler("None", "none"), Upscaler("Lanczos", "pixels"), Upscaler("Nearest", "pixels")]
    taken = {u.name.lower() for u in builtins} | {name.lower() for name in LATENT_MODES}
    models = []
    for path in model_files(folder):
        if path.stem.lower() not in taken:
            taken.add(path.stem.lower())
            models.append(Upscaler(path.stem, "model", path, scale_in_name(path)))
    return builtins + models


def find(name: str, folder: Path | None, field: str = "hr_upscaler") -> Upscaler:
    """The upscaler called ``name`` (A1111's names, any case), or a ValidationError naming ``field``."""
    known = [Upscaler(n, "latent") for n in LATENT_MODES] + available(folder)
    for upscaler in known:
        if isinstance(name, str) and upscaler.name.lower() == name.strip().lower():
            return upscaler
    raise ValidationError(field, name, f"must be one of: {', '.join(u.name for u in known)}")


def upscale_latents(latents, name: str, size: tuple[int, int]):
    """(1, 4, h, w) latents interpolated to ``size`` = (width, height) in latent pixels, by the mode's rule."""
    import torch

    mode, antialias = LATENT_MODES[find(name, None).name]
    width, height = size
    # In float32: torch's CPU kernels of some modes have no bfloat16 (antialiased bilinear, 2.13).
    return torch.nn.functional.interpolate(latents.float(), size=(height, width), mode=mode,
                                           antialias=antialias).to(latents.dtype)


def upscale_picture(picture, upscaler: Upscaler, size: tuple[int, int], device: str = "cpu", on_tile=None):
    """The picture at ``size`` = (width, height): Lanczos or Nearest (``None``: Lanczos), or the user's model (run
    tile by tile on ``device`` until the size is reached, then resized to it exactly)."""
    from PIL import Image

    if upscaler.kind == "model":
        from .sr_models import upscale_to

        return upscale_to(picture, upscaler.path, tuple(size), device, on_tile=on_tile)
    rule = Image.NEAREST if upscaler.name == "Nearest" else Image.LANCZOS
    return picture.convert("RGB").resize(size, rule)
