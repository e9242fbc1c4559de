"""The user's own super-resolution models — ESRGAN, Real-ESRGAN, SwinIR, HAT, … ``.pth`` / ``.safetensors`` files in
the upscaler folder — loaded by spandrel (the loader ComfyUI and chaiNNer use: it reads the architecture and its
sizes from the weights, and unpickles ``.pth`` files with a restricted unpickler) and run tile by tile, so that a
large picture fits in memory.

spandrel declares torchvision as a dependency, and this project must never install it (a torchvision built for
another torch breaks transformers' imports). Two of spandrel's ~40 architectures use it: LaMa (inpainting,
``rotate``) and RestoreFormer (face restoration, ``normalize``); none of the super-resolution ones does. spandrel
is therefore installed without its dependencies (``requirements-nodeps.txt``) and imported with those three names
standing in for torchvision during the import only: calling them raises, and ``torchvision`` is gone from
``sys.modules`` again once spandrel is in (transformers asks ``importlib.util.find_spec("torchvision")``).
"""
from __future__ import annotations

import enum
import re
import sys
import threading
import types
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

from .failures import ValidationError

MODEL_SUFFIXES = (".pth", ".safetensors", ".pt", ".ckpt")
TILE, OVERLAP = 256, 16  # input pixels per tile and shared between neighbours (blended across)
MAX_PASSES = 3  # A1111 (modules/upscaler.py): the model runs up to 3 times to reach the target size
_STUBBED = ("torchvision", "torchvision.transforms", "torchvision.transforms.functional")
_import_lock = threading.Lock()
_loaded: dict = {}  # (path, mtime, size, device) -> spandrel descriptor: the last model used, kept loaded
_loaded_lock = threading.Lock()


def model_files(folder: Path | None) -> list[Path]:
    """The model files directly in ``folder`` (sorted by name; hidden files and other suffixes left out)."""
    if folder is None or not Path(folder).is_dir():
        return []
    return sorted((p for p in Path(folder).iterdir()
                   if p.suffix.lower() in MODEL_SUFFIXES and not p.name.startswith(".") and p.is_file()),
                  key=lambda p: p.name.lower())


def scale_in_name(path: Path) -> int | None:
    """The scale a model's file name states (``4x-UltraSharp``, ``RealESRGAN_x4plus``, ``2x_…``), else None."""
    found = re.search(r"(?:^|[^a-z0-9])(?:(\d)x|x(\d))(?:[^a-z0-9]|plus|$)", path.stem.lower())
    return int(found.group(1) or found.group(2)) if found else None


class _MissingTorchvision(enum.Enum):
    NEAREST = "nearest"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"


def _needs_torchvision(*args, **kwargs):
    raise RuntimeError("this spandrel architecture (LaMa, RestoreFormer) needs torchvision, which sdxl_ui does not "
                       "install; super-resolution models do not need it")


@contextmanager
def _torchvision_names():
    """``torchvision.transforms.functional``'s three names that spandrel imports, for the import only."""
    if any(name in sys.modules for name in _STUBBED):  # a real torchvision (or another stand-in) is there
        yield
        return
    functional = types.ModuleType("torchvision.transforms.functional")
    functional.InterpolationMode = _MissingTorchvision
    functional.rotate = functional.normalize = _needs_torchvision
    modules = {"torchvision": types.ModuleType("torchvision"),
               "torchvision.transforms": types.ModuleType("torchvision.transforms"),
               "torchvision.transforms.functional": functional}
    modules["torchvision"].transforms = modules["torchvision.transforms"]
    modules["torchvision.transforms"].functional = functional
    sys.modules.update(modules)
    try:
        yield
    finally:
        for name in _STUBBED:
            if sys.modules.get(name) is modules[name]:
                del sys.modules[name]


def spandrel():
    """The spandrel module, imported once (see the module's doc)."""
    with _import_lock:
        if "spandrel" not in sys.modules:
            try:
                with _torchvision_names():
                    import spandrel as module  # noqa: F401
            except ImportError as exc:
                raise RuntimeError(f"the user's upscaler models need spandrel ({exc}): pip install --no-deps -r "
                                   "requirements-nodeps.txt") from exc
        return sys.modules["spandrel"]


def load(path: Path, device: str = "cpu", field: str = "upscaler"):
    """The model in ``path`` as a spandrel ``ImageModelDescriptor`` in eval mode on ``device`` (the last one used
    stays loaded). A file that is not a super-resolution model spandrel knows is a ValidationError naming it."""
    path = Path(path)
    stat = path.stat()
    key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size, device)
    with _loaded_lock:
        if key in _loaded:
            return _loaded[key]
    module = spandrel()
    try:
        model = module.ModelLoader(device=device).load_from_file(str(path))
    except module.UnsupportedModelError:
        raise ValidationError(field, path.stem, "is not a model architecture spandrel knows (ESRGAN, Real-ESRGAN, "
                                                "SwinIR, HAT, DAT, …)") from None
    except Exception as exc:  # noqa: BLE001 - a damaged or foreign file: named, with spandrel's reason
        raise ValidationError(field, path.stem, f"could not be read as a model: {type(exc).__name__}: "
                                                f"{str(exc)[:200]}") from None
    if not isinstance(model, module.ImageModelDescriptor) or model.purpose != "SR" or model.scale < 2:
        raise ValidationError(field, path.stem, f"is a {model.architecture.name} model for "
                                                f"{getattr(model, 'purpose', 'another task')} at scale "
                                                f"{getattr(model, 'scale', '?')}, not an upscaler")
    model.eval()
    if device.startswith("cuda") and model.supports_half:
        model.half()
    with _loaded_lock:
        _loaded.clear()
        _loaded[key] = model
    return model


def positions(length: int, tile: int, overlap: int) -> list[int]:
    """Where the tiles start along a side of ``length``: every ``tile - overlap`` pixels, the last one flush with
    the end; one tile when the side fits."""
    if length <= tile:
        return [0]
    stride = max(1, tile - overlap)
    return list(range(0, length - tile, stride)) + [length - tile]


def _ramp(length: int, scaled_overlap: int, start: bool, end: bool):
    """Blend weights along one side of a tile: rising over the overlap where a neighbour comes before, falling where
    one comes after, 1 elsewhere (a picture's own edges are not blended)."""
    import torch

    weights = torch.ones(length)
    ramp = torch.arange(1, scaled_overlap + 1, dtype=torch.float32) / (scaled_overlap + 1)
    span = min(scaled_overlap, length)
    if start and span:
        weights[:span] = torch.minimum(weights[:span], ramp[:span])
    if end and span:
        weights[-span:] = torch.minimum(weights[-span:], ramp[:span].flip(0))
    return weights


def tiled(model: Callable, image, scale: int, tile: int = TILE, overlap: int = OVERLAP,
          on_tile: Callable[[int, int], None] | None = None):
    """``model`` (a (1, 3, h, w) → (1, 3, h·scale, w·scale) function) over ``image`` tile by tile, neighbours
    overlapping by ``overlap`` input pixels and blended linearly across it. One tile covering the picture is the
    model on the whole picture. ``on_tile(done, total)`` after each tile (it may raise to stop)."""
    import torch

    _, channels, height, width = image.shape
    tops, lefts = positions(height, tile, overlap), positions(width, tile, overlap)
    out = torch.zeros((1, channels, height * scale, width * scale), dtype=torch.float32)
    weight = torch.zeros((1, 1, height * scale, width * scale), dtype=torch.float32)
    total, done = len(tops) * len(lefts), 0
    for i, top in enumerate(tops):
        for j, left in enumerate(lefts):
            piece = image[:, :, top:top + tile, left:left + tile]
            with torch.inference_mode():
                result = model(piece).float().cpu()
            h, w = result.shape[-2:]
            wy = _ramp(h, overlap * scale, i > 0, i < len(tops) - 1)
            wx = _ramp(w, overlap * scale, j > 0, j < len(lefts) - 1)
            mask = (wy[:, None] * wx[None, :])[None, None]
            y, x = top * scale, left * scale
            out[:, :, y:y + h, x:x + w] += result * mask
            weight[:, :, y:y + h, x:x + w] += mask
            done += 1
            if on_tile is not None:
                on_tile(done, total)
    return out / weight.clamp_min(1e-8)


def upscale_once(picture, path: Path, device: str = "cpu", tile: int = TILE, on_tile=None, field: str = "upscaler"):
    """``picture`` (PIL, RGB) through the model in ``path`` once: the model's scale times its size."""
    import numpy as np
    import torch
    from PIL import Image

    model = load(path, device, field)
    pixels = np.asarray(picture.convert("RGB"), dtype=np.float32) / 255.0
    image = torch.from_numpy(pixels).permute(2, 0, 1)[None].to(device=model.device, dtype=model.dtype)
    result = tiled(model, image, model.scale, tile, OVERLAP, on_tile)
    array = (result[0].clamp(0, 1).permute(1, 2, 0).numpy() * 255.0).round().astype(np.uint8)
    return Image.fromarray(array)


def upscale_to(picture, path: Path, size: tuple[int, int], device: str = "cpu", tile: int = TILE, on_tile=None,
               field: str = "upscaler"):
    """``picture`` at ``size`` = (width, height) as A1111 does it: the model run until the picture reaches the size
    (at most ``MAX_PASSES`` times), then a Lanczos resize to the exact size."""
    from PIL import Image

    picture = picture.convert("RGB")
    for _ in range(MAX_PASSES):
        if picture.width >= size[0] and picture.height >= size[1]:
            break
        picture = upscale_once(picture, path, device, tile, on_tile, field)
    return picture if picture.size == tuple(size) else picture.resize(tuple(size), Image.LANCZOS)
