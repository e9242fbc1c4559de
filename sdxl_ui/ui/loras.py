"""The page's LoRA panel (in Advanced): the .safetensors files of the LoRA folder (``--lora-dir``, default ./loras)
with a weight each; the operator applies them to the loaded model for everyone (``service.set_loras``: checked
first, all or nothing). Only names from the folder's own listing are accepted: a request never names a path."""
from __future__ import annotations

import logging
from pathlib import Path

import gradio as gr

from ..jobs import capabilities_of

log = logging.getLogger("sdxl_ui")
MAX_LISTED = 200


def listing(folder: Path) -> list[str]:
    """The folder's .safetensors file names, sorted (at most MAX_LISTED); [] when there is no such folder."""
    try:
        return sorted(p.name for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() == ".safetensors")[
            :MAX_LISTED]
    except OSError:
        return []


def rows(service) -> list[list]:
    """[name, weight] per file of the folder: the weight fused now, 0 for the others."""
    folder = Path(service.settings.lora_dir)
    applied = {Path(spec.source).name: spec.weight for spec in service.settings.loras
               if Path(spec.source).parent.resolve() == folder.resolve()}
    return [[name, applied.get(name, 0.0)] for name in listing(folder)]


def lora_panel(service) -> dict:
    """The panel's components (inside the Advanced accordion); hidden for a backend that cannot switch LoRAs."""
    offered = capabilities_of(service).loras
    with gr.Column(visible=offered and bool(listing(service.settings.lora_dir))):
        table = gr.Dataframe(value=rows(service) or [["", 0.0]], headers=["LoRA (folder " + (Path(
            service.settings.lora_dir).name or ".") + ")", "weight (0 = off)"], datatype=["str", "number"], type="array",
            col_count=(2, "fixed"), interactive=True, elem_id="loras")
        apply = gr.Button("Apply LoRAs (operator only: changes the model for everyone)", elem_id="apply-loras")
    return dict(lora_table=table, lora_apply=apply)


def wanted(service, table) -> list[str]:
    """``folder/NAME@WEIGHT`` per row with a non-zero weight; a name not in the folder's listing is refused."""
    folder = Path(service.settings.lora_dir)
    names = set(listing(folder))
    out = []
    for row in table or []:
        if not row or not str(row[0]).strip():
            continue
        name = str(row[0]).strip()
        if name not in names:
            raise gr.Error(f"{name[:100]!r} is not a file of the LoRA folder", print_exception=False)
        try:
            weight = float(row[1] if len(row) > 1 and row[1] not in (None, "") else 0.0)
        except (TypeError, ValueError):
            raise gr.Error(f"the weight of {name!r} must be a number", print_exception=False) from None
        if weight:
            out.append(f"{folder / name}@{weight:g}")
    return out


def wire_loras(page, service, access, status_update) -> None:
    def apply_loras(table, request: gr.Request):
        who = access.describe(request)
        if not access.is_operator(request):
            log.warning("refused 'apply LoRAs' from %s: not the operator", who)
            raise gr.Error("Only the operator of this app may change the LoRAs (docs/security.md).",
                           print_exception=False)
        specs = wanted(service, table)
        try:
            service.set_loras(specs)  # waits for a running job; checked before anything changes
        except (ValueError, RuntimeError) as exc:  # a LoraError or a bad weight: named, the model unchanged
            raise gr.Error(str(exc)[:300], print_exception=False) from None
        log.info("%s applied LoRAs: %s", who, ", ".join(specs) or "none")
        if not service.loaded:
            service.preload_in_background()
        return status_update(), rows(service) or [["", 0.0]]

    page.lora_apply.click(apply_loras, page.lora_table, [page.status_panel, page.lora_table],
                          api_visibility="private")
