"""The listing endpoints of ``/sdapi/v1`` that AUTOMATIC1111's clients call on connecting (Open WebUI, SillyTavern,
webuiapi; docs/api.md), each in A1111 v1.10.1's shape with a truthful list: empty where
sdxl_ui has no such thing (VAEs, embeddings, …), the hires fix's upscalers for ``/upscalers`` and
``/latent-upscale-modes``, the LoRA folder's files for ``/loras``, the ``--styles``
file for ``/prompt-styles``, the flags the app runs with for ``/cmd-flags``. The refresh endpoints answer ``null``,
as A1111 does. No path of the server is ever shown (a folder by its name, a LoRA by its name in the folder).
"""
from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from fastapi import Request

from ..adapters import metadata
from .adapter import public_name
from .models import EMPTY_LIST_ITEMS, EmbeddingsResponse, Flags, LoraItem, PromptStyleItem, answers
from .styles import style_list

log = logging.getLogger("sdxl_ui")

MAX_LORAS = 200  # the page's LoRA panel lists as many (ui/loras.py)
# A1111's list endpoints that sdxl_ui answers with nothing in them: it has no such models.
EMPTY_LISTS = ("sd-vae", "sd-modules", "face-restorers", "hypernetworks", "realesrgan-models")
REFRESHED = ("refresh-checkpoints", "refresh-loras", "refresh-vae", "refresh-embeddings")
SERVED = ("upscalers", "latent-upscale-modes", *EMPTY_LISTS, "embeddings", "prompt-styles", "cmd-flags", "loras", *REFRESHED)


def lora_files(folder) -> list[Path]:
    """The folder's .safetensors files, sorted by name (at most MAX_LORAS); [] when there is no such folder."""
    try:
        files = [p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() == ".safetensors"]
    except OSError:
        return []
    return sorted(files, key=lambda p: p.name)[:MAX_LORAS]


def lora_list(folder) -> list[dict]:
    """GET /loras in A1111's shape (extensions-builtin/Lora): name, alias, the path inside the folder, and the
    safetensors header's ``__metadata__`` (the header alone is read, never the tensors)."""
    out = []
    for file in lora_files(folder):
        meta = metadata(file)
        out.append({"name": file.stem, "alias": meta.get("ss_output_name") or file.stem, "path": file.name,
                    "metadata": meta})
    return out


def cmd_flags(api, request: Request) -> dict:
    """GET /cmd-flags: the app's flags under the names of A1111's argparse ``dest``s. Passwords are "***", folders
    their names only."""
    settings, config = api.backend.settings, api.config
    server = request.scope.get("server") or (None, None)
    choice = lambda value: getattr(value, "value", value)  # noqa: E731 - an enum setting's string
    flags = {"api": True, "nowebui": False, "api_auth": "***" if config.logins else None,
             "ckpt": public_name(settings.model), "ckpt_dir": None, "lora_dir": Path(settings.lora_dir).name or ".",
             "port": server[1], "use_cpu": ["all"] if choice(settings.device) == "cpu" else [],
             "xformers": choice(settings.attention) == "xformers", "medvram": choice(settings.offload) == "model",
             "lowvram": choice(settings.offload) == "sequential", "no_half": choice(settings.precision) == "fp32"}
    flags.update(config.flags)
    return flags


def add_catalog(router, api, caller_of) -> None:
    def empty(path: str):
        async def listing():
            return []

        listing.__name__ = path.replace("-", "_")
        router.add_api_route(f"/{path}", listing, methods=["GET"], **answers(list[EMPTY_LIST_ITEMS[path]]))

    for path in EMPTY_LISTS:
        empty(path)

    @router.get("/upscalers", **answers(list[EMPTY_LIST_ITEMS["upscalers"]]))
    async def upscalers():
        """The hires fix's pixel upscalers, in A1111's shape (its latent ones: /latent-upscale-modes)."""
        from ..upscalers import available

        # A model file by its name only: the server's folders are not the client's business.
        return [{"name": u.name, "model_name": u.name if u.path else None, "model_path": u.path.name if u.path
                 else None, "model_url": None, "scale": u.scale}
                for u in await asyncio.to_thread(available, api.backend.settings.upscaler_dir)]

    @router.get("/latent-upscale-modes", **answers(list[EMPTY_LIST_ITEMS["latent-upscale-modes"]]))
    async def latent_upscale_modes():
        from ..upscalers import LATENT_MODES

        return [{"name": name} for name in LATENT_MODES]

    @router.get("/embeddings", **answers(EmbeddingsResponse))
    async def embeddings():
        return {"loaded": {}, "skipped": {}}

    @router.get("/prompt-styles", **answers(list[PromptStyleItem]))
    async def prompt_styles():
        return style_list(api.config.styles)

    @router.get("/cmd-flags", **answers(Flags))
    async def flags(request: Request):
        return cmd_flags(api, request)

    @router.get("/loras", **answers(list[LoraItem]))
    async def loras():  # a LoRA's metadata that is not valid Unicode is still sent (models.A1111JSON: \\u escapes)
        return await asyncio.to_thread(lora_list, api.backend.settings.lora_dir)

    def refresh(path: str):
        async def refreshed(caller: str = caller_of):
            if path == "refresh-loras":
                count = len(await asyncio.to_thread(lora_files, api.backend.settings.lora_dir))
                log.info("api: %s rescanned the LoRA folder: %d file(s)", caller, count)
            return None  # A1111: null (nothing else here is cached: every list is read when asked)

        refreshed.__name__ = path.replace("-", "_")
        router.add_api_route(f"/{path}", refreshed, methods=["POST"], **answers(None))

    for path in REFRESHED:
        refresh(path)
