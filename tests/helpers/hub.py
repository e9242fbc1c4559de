"""An offline Hugging Face cache made from local files, laid out as huggingface_hub itself lays one out
(huggingface_hub/file_download.py): ``HF_HOME/hub/models--ORG--NAME/`` with ``blobs/<sha256>`` (the file's
content), ``snapshots/<commit>/<path>`` (a relative symlink to its blob) and ``refs/main`` (the commit). A file the
hub is known to lack would sit under ``.no_exist/<commit>/<path>`` (``_CACHED_NO_EXIST``); none is written here.

``HF_HOME`` / ``HF_HUB_CACHE`` are read when huggingface_hub is imported: give them to a subprocess's environment.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

BASE_ID = "stabilityai/stable-diffusion-xl-base-1.0"
REFINER_ID = "stabilityai/stable-diffusion-xl-refiner-1.0"
LCM_LORA_ID = "latent-consistency/lcm-lora-sdxl"


def repo_folder(hf_home: Path, repo_id: str) -> Path:
    """``HF_HOME/hub/models--ORG--NAME`` (huggingface_hub's ``repo_folder_name``)."""
    return Path(hf_home) / "hub" / ("models--" + repo_id.replace("/", "--"))


def commit_of(repo_id: str) -> str:
    """A fixed 40-hex commit per repo (the cache only needs refs/main and the snapshot folder to agree)."""
    return hashlib.sha1(repo_id.encode()).hexdigest()


def snapshot(hf_home: Path, repo_id: str) -> Path:
    return repo_folder(hf_home, repo_id) / "snapshots" / commit_of(repo_id)


def add_file(hf_home: Path, repo_id: str, path_in_repo: str, data: bytes) -> Path:
    """One file in the repo's snapshot: its blob, the snapshot's symlink to it and refs/main."""
    repo = repo_folder(hf_home, repo_id)
    blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(data)
    link = snapshot(hf_home, repo_id) / path_in_repo
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit_of(repo_id))  # no newline, as huggingface_hub writes it
    return link


def fp16_file(path: Path) -> bytes:
    """A .safetensors file's tensors in float16, as the ``fp16`` variant files of the SDXL repos hold them."""
    from safetensors.torch import load_file, save

    return save({k: (v.half() if v.is_floating_point() else v).contiguous()
                 for k, v in load_file(str(path)).items()})


def variant_name(path_in_repo: str, variant: str) -> str:
    """``unet/diffusion_pytorch_model.safetensors`` -> ``unet/diffusion_pytorch_model.fp16.safetensors``."""
    stem, dot, suffix = path_in_repo.rpartition(".")
    return f"{stem}.{variant}.{suffix}"


def add_diffusers_folder(hf_home: Path, repo_id: str, folder: Path, variants=("fp16",), plain=False,
                         skip=("refiner", "training.json")) -> Path:
    """A diffusers folder as the repo ``repo_id``: every config as it is, each weights file under the variant file
    names given (fp16: converted to float16) and, with ``plain``, under its plain name too. ``skip``: top-level
    entries that are not part of the repo (the demo's refiner/ subfolder is a repo of its own). The snapshot."""
    folder = Path(folder)
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if not path.is_file() or rel.split("/")[0] in skip:
            continue
        if not rel.endswith(".safetensors"):
            add_file(hf_home, repo_id, rel, path.read_bytes())
            continue
        for variant in variants:
            add_file(hf_home, repo_id, variant_name(rel, variant), fp16_file(path) if variant == "fp16"
                     else path.read_bytes())
        if plain:
            add_file(hf_home, repo_id, rel, path.read_bytes())
    return snapshot(hf_home, repo_id)


def hub_env(hf_home: Path) -> dict:
    """The environment of a process that sees only this cache, offline."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE")
           and not k.startswith("SDXL_UI_")}
    return {**env, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}
