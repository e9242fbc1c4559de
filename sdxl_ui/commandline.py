"""What the command-line tools share: exit codes, how a failure is reported (`fail`), the model and device flags
(also read by app.py) and the settings they make, and the console logging.

Exit codes: 0 success; 2 bad input, one line naming the field and the value; 1 a runtime failure (see `cli`).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .optimizations.registry import SWITCHES
from .schema import ErrorKind, ValidationError
from .settings import AppSettings, AttentionChoice, DeviceChoice, OffloadChoice, Precision, Toggle

EXIT_OK, EXIT_FAIL, EXIT_BAD_INPUT = 0, 1, 2


def add_settings_args(parser: argparse.ArgumentParser) -> None:
    """Flags shared by the CLI and app.py. Every default is None so SDXL_UI_* environment values apply."""
    g = parser.add_argument_group("model and device (also SDXL_UI_* environment variables)")
    g.add_argument("--model", help="hub id, local diffusers folder, .safetensors file, or 'tiny' (offline demo); "
                                   "default stabilityai/stable-diffusion-xl-base-1.0 or $SDXL_UI_MODEL")
    g.add_argument("--refiner", help="refiner hub id/folder/file, 'none', or 'auto' (default)")
    g.add_argument("--use-refiner", choices=[c.value for c in Toggle], help="auto: on for high quality on GPU")
    g.add_argument("--device", choices=[c.value for c in DeviceChoice])
    g.add_argument("--precision", choices=[c.value for c in Precision])
    g.add_argument("--attention", choices=[c.value for c in AttentionChoice])
    g.add_argument("--offload", choices=[c.value for c in OffloadChoice])
    g.add_argument("--vae-tiling", choices=[c.value for c in Toggle])
    g.add_argument("--threads", type=int, help="CPU threads (default: physical cores)")
    g.add_argument("--outputs", help="folder for generated images (default ./outputs)")
    g.add_argument("--local-files-only", action="store_true", default=None,
                   help="never contact the hub (like HF_HUB_OFFLINE=1)")
    g.add_argument("--single-file-config", help="local diffusers SDXL folder giving the config for a .safetensors")
    g.add_argument("--profile", help="model family: auto (detected from the model's and the LoRAs' files; default), "
                                     "sdxl, turbo, lightning-1/2/4/8, lcm, hyper-1/2/4/8, tcd (docs/models.md: Few-step models "
                                     "and LoRAs); or $SDXL_UI_PROFILE")
    g.add_argument("--lora", action="append", default=None, metavar="SOURCE[@WEIGHT]",
                   help="a LoRA: .safetensors file, folder, or hub id[:FILE], weight default 1; repeatable; or "
                        "$SDXL_UI_LORA (comma-separated)")
    g.add_argument("--lora-dir", help="folder of LoRA .safetensors files the page lists for the operator "
                                      "(default ./loras)")
    g.add_argument("--upscaler-dir", help="folder of your super-resolution models (ESRGAN, Real-ESRGAN, SwinIR, … "
                                          ".pth/.safetensors) for the hires fix and upscaling, named by file name")
    g.add_argument("--decoder", choices=["full", "tiny"],
                   help="the final image's decoder: full (the VAE; default) or tiny (AutoencoderTiny: much faster, a "
                        "slightly different picture); or $SDXL_UI_DECODER")
    g.add_argument("--tiny-decoder", metavar="SOURCE",
                   help="the tiny decoder (folder or hub id): auto (default) = a tiny-decoder/ folder beside the "
                        "model, else madebyollin/taesdxl; it draws the live previews when present")
    g.add_argument("--compile", action="store_true", default=None,
                   help="torch.compile the UNet (minutes of warm-up, faster steps after; for long-running servers)")


def add_technique_args(parser: argparse.ArgumentParser) -> None:
    """Per-request switches of the techniques that do less work per image (auto = the quality preset's choice)."""
    for switch in SWITCHES:  # one flag per unit that offers a switch (optimizations/registry.py)
        parser.add_argument("--" + switch.name.replace("_", "-"), default="auto", choices=[c.value for c in Toggle],
                            help=switch.help)


def settings_from_args(args) -> AppSettings:
    names = ["model", "refiner", "use_refiner", "device", "precision", "attention", "offload", "vae_tiling",
             "threads", "outputs", "local_files_only", "single_file_config", "compile", "profile",
             "lora_dir", "decoder", "tiny_decoder", "upscaler_dir"]
    values = {n: getattr(args, n, None) for n in names}
    values["loras"] = tuple(args.lora) if getattr(args, "lora", None) else None
    return check_paths(AppSettings.from_env(**values))


def check_paths(settings: AppSettings) -> AppSettings:
    """The settings' local paths that cannot work, refused at start-up (ValidationError naming the setting): a
    --tiny-decoder folder that does not exist or is a file (never looked up on the hub), a --lora-dir that is a
    file."""
    from .optimizations.registry import check_settings

    check_settings(settings)  # each unit's own (the tiny decoder's source)
    if settings.lora_dir.exists() and not settings.lora_dir.is_dir():
        raise ValidationError("lora_dir", str(settings.lora_dir), "is a file, not a folder")
    if settings.upscaler_dir is not None and not settings.upscaler_dir.is_dir():
        raise ValidationError("upscaler_dir", str(settings.upscaler_dir), "is not a folder" if
                              settings.upscaler_dir.exists() else "does not exist")
    return settings


def fail(message: str, code: int, as_json: bool, kind: ErrorKind) -> int:
    """Report a failure (one JSON object on stdout with --json, ``kind`` as its string, else one line on stderr);
    returns ``code``."""
    if as_json:
        print(json.dumps({"ok": False, "error": message, "kind": kind}, ensure_ascii=False))
    else:
        print(f"error: {message}", file=sys.stderr)
    return code


def plan_error_code(exc) -> int:
    """A PlanError names its field: a --device/--attention this machine cannot honour is bad input (2); too little
    memory for the model is a runtime failure of this machine (1)."""
    return EXIT_FAIL if str(exc).startswith("memory:") else EXIT_BAD_INPUT


def setup_logging(level: int) -> None:
    """Console logging for the CLI and app.py (never at import)."""
    import os

    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr)
    # xformers warns at import that its CUDA kernels cannot load on a CPU build; our report states the xformers
    # status itself (not applicable on CPU / kernels do not run), so its import-time warning is only noise.
    logging.getLogger("xformers").setLevel(logging.ERROR)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # gradio's own health checks, one line each
    # transformers warns that image processors fall back to PIL without torchvision (we never install it).
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def read_picture(field: str, path: str):
    """The picture in the file at ``path`` (opened lazily: its size is known before it is decoded), or a
    ValidationError naming ``field``: no such file, a folder, not a picture."""
    from PIL import Image, UnidentifiedImageError

    where = Path(path).expanduser()
    if not where.is_file():
        raise ValidationError(field, path, "is not a file" if where.exists() else "no such file")
    try:
        return Image.open(where)
    except (UnidentifiedImageError, OSError) as exc:
        raise ValidationError(field, path, f"cannot be read as a picture ({type(exc).__name__})") from None


def add_picture_args(parser: argparse.ArgumentParser) -> None:
    """generate's inpainting, outpainting and hires fix flags (A1111's options, by its names where it has them)."""
    group = parser.add_argument_group("inpaint, outpaint and hires fix")
    group.add_argument("--mask", help="inpaint: a mask the size of --init-image (white = redraw, black = keep)")
    group.add_argument("--mask-blur", default="4", help="inpaint: blur the mask's edge by this many pixels (0-64)")
    group.add_argument("--masked-content", default="original",
                       help="inpaint: what the masked area starts from: fill | original | 'latent noise' | "
                            "'latent nothing' (outpaint: fill unless chosen)")
    group.add_argument("--inpaint-area", choices=["whole", "masked"], default="whole",
                       help="inpaint: draw the whole picture, or only the masked region (with --padding) at the "
                            "output's size and paste it back")
    group.add_argument("--padding", default="32", help="inpaint --inpaint-area masked: pixels around the mask")
    group.add_argument("--invert-mask", action="store_true", help="inpaint: redraw what the mask keeps")
    group.add_argument("--outpaint", default="", help="outpaint: extend --init-image left,right,up,down (any of them)")
    group.add_argument("--outpaint-pixels", default="128", help="outpaint: by this many pixels (a multiple of 8)")
    group.add_argument("--hires", metavar="SCALE",
                       help="hires fix: text to image, upscaled SCALE times (e.g. 2), then redrawn at that size")
    group.add_argument("--hires-upscaler", default="Latent",
                       help="hires fix: Latent (and its variants), Lanczos, Nearest, or a model in --upscaler-dir")
    group.add_argument("--hires-steps", default="0", help="hires fix: the second pass's steps (0: the first's)")
    group.add_argument("--hires-strength", default="0.7", help="hires fix: the second pass's denoising strength")


def picture_fields(args) -> dict:
    """The request fields of generate's picture flags (each bad value a ValidationError naming its field)."""
    from .edits import HiresFix, InpaintOptions

    fields = {}
    if args.mask:
        fields["mask"] = read_picture("mask", args.mask)
    fields["inpaint"] = InpaintOptions(blur=args.mask_blur, content=args.masked_content,
                                       only_masked=args.inpaint_area == "masked", padding=args.padding,
                                       invert=args.invert_mask)
    if args.outpaint:
        fields.update(outpaint=args.outpaint, outpaint_pixels=args.outpaint_pixels)
    if args.hires:
        fields["hires"] = HiresFix(scale=args.hires, upscaler=args.hires_upscaler, steps=args.hires_steps,
                                   strength=args.hires_strength)
    return fields
