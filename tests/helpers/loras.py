"""Test LoRAs made here (no hub): peft LoRA layers with small seeded random weights on a UNet's attention
projections, saved by diffusers' own ``save_lora_weights``; and the bad ones (corrupt, SD 1.5 layout, another rank
layout, keys that match nothing)."""
from __future__ import annotations

import copy
from pathlib import Path

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def make_lora(unet, folder: Path, seed: int = 0, rank: int = 4, scale: float = 0.05,
              name: str = "pytorch_lora_weights.safetensors") -> Path:
    """A LoRA for ``unet``'s architecture (a copy gets the adapter; ``unet`` stays as it is)."""
    import torch
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    model = copy.deepcopy(unet)
    torch.manual_seed(seed)
    model.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=False, target_modules=TARGETS))
    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(model))
    state = {k: (v * scale if ".up." in k else v).contiguous() for k, v in state.items()}
    folder.mkdir(parents=True, exist_ok=True)
    StableDiffusionXLPipeline.save_lora_weights(str(folder), unet_lora_layers=state, safe_serialization=True,
                                                weight_name=name)
    return folder / name


def make_text_encoder_lora(pipe, folder: Path, seed: int = 3, rank: int = 4, scale: float = 0.5) -> Path:
    """A LoRA on the UNet and on text encoder 2's attention projections (q/k/v/out_proj)."""
    import torch
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed)
    unet, encoder = copy.deepcopy(pipe.unet), copy.deepcopy(pipe.text_encoder_2)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=False, target_modules=TARGETS))
    # peft itself (transformers' own add_adapter asks for peft >= 0.22, newer than the newest release here)
    encoder = inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=False,
                                                 target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]), encoder)

    def scaled(model):
        state = convert_state_dict_to_diffusers(get_peft_model_state_dict(model))
        return {k: (v * scale if ".up." in k or "lora_B" in k else v).contiguous() for k, v in state.items()}

    folder.mkdir(parents=True, exist_ok=True)
    StableDiffusionXLPipeline.save_lora_weights(str(folder), unet_lora_layers=scaled(unet),
                                                text_encoder_2_lora_layers=scaled(encoder), safe_serialization=True)
    return folder / "pytorch_lora_weights.safetensors"


def save(state: dict, path: Path, metadata: dict | None = None) -> Path:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata=metadata)
    return path


def bad_loras(folder: Path, good: Path) -> dict[str, Path]:
    """name -> file: each must be refused with the model unchanged."""
    import torch
    from safetensors.torch import load_file

    state = load_file(str(good))
    out = {}
    corrupt = folder / "corrupt.safetensors"
    corrupt.parent.mkdir(parents=True, exist_ok=True)
    corrupt.write_bytes(good.read_bytes()[:200] + b"\x00garbage" * 50)
    out["corrupt"] = corrupt
    # SD 1.5's layout: its first down block has attention (SDXL's has none), cross-attention 768 wide.
    out["sd15"] = save({
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora.down.weight": torch.randn(4, 768),
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora.up.weight": torch.randn(320, 4),
    }, folder / "sd15_layout.safetensors")
    # The right layers, but the two matrices of a pair disagree on the rank.
    key = next(k for k in state if k.endswith("lora.down.weight"))
    ranked = dict(state)
    down = state[key]
    ranked[key] = torch.randn(down.shape[0] * 2, down.shape[1])
    out["rank"] = save(ranked, folder / "other_rank.safetensors")
    out["nothing"] = save({"unet.no_such_block.proj.lora.down.weight": torch.randn(4, 8),
                           "unet.no_such_block.proj.lora.up.weight": torch.randn(8, 4)},
                          folder / "matches_nothing.safetensors")
    # The right layers and shapes, but weights that turn every picture black: NaN, infinity, beyond fp16's range.
    up = next(k for k in state if k.endswith("lora.up.weight"))
    for name, value in (("nan", float("nan")), ("inf", float("inf")), ("fp16", 1e5)):
        broken = state[up].clone()
        broken[0, 0] = value
        out[name] = save({**state, up: broken}, folder / f"{name}_weights.safetensors")
    return out


def to_kohya(good: Path, path: Path, alpha: float) -> Path:
    """The same LoRA in kohya's (AUTOMATIC1111's) key layout, with an ``alpha`` per layer (scale alpha / rank)."""
    import torch
    from safetensors.torch import load_file

    out = {}
    for key, value in load_file(str(good)).items():
        module, _, kind = key.partition(".lora.")
        name = "lora_unet_" + module.removeprefix("unet.").replace(".", "_")
        out[f"{name}.lora_{'down' if kind.startswith('down') else 'up'}.weight"] = value
        out[f"{name}.alpha"] = torch.tensor(float(alpha))
    return save(out, path)
