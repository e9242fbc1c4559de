"""Building the configurations' models and their inputs, and counting FLOPs (on a meta-device copy: no compute)."""
from __future__ import annotations

import time

from ..assembly import CLIP_BIGG, CLIP_L, SDXL_REFINER_UNET, SDXL_UNET, SDXL_VAE, build_full  # noqa: F401

EXPECTED_PARAMS = {"unet": 2_567_463_684, "text_encoder": 123_060_480, "text_encoder_2": 694_659_840,
                   "vae": 83_653_863}
EXPECTED_REFINER_UNET_PARAMS = 2_259_526_660
PROMPT = "a photograph of a red fox in the snow, golden hour, highly detailed"


def build_tiny_arch(torch, dtype, device, with_refiner=False):
    """The tiny architecture (models.build_tiny) in ``dtype`` on ``device``, with the signature of build_full."""
    from ..models import build_tiny

    base, refiner = build_tiny(with_refiner=with_refiner, dtype=str(dtype).replace("torch.", ""))
    return base.to(device), (refiner.to(device) if refiner is not None else None)


def param_counts(pipe, refiner=None) -> dict:
    """Parameters per component (and the refiner's UNet), to compare with the published counts."""
    params = {name: sum(p.numel() for p in getattr(pipe, name).parameters())
              for name in ("unet", "text_encoder", "text_encoder_2", "vae")}
    if refiner is not None:
        params["refiner_unet"] = sum(p.numel() for p in refiner.unet.parameters())
    return params


def unet_tflops(torch, unet_config: dict, res: int) -> float:
    """TFLOP of one guided step (batch 2) at res², counted on a meta-device copy."""
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config)
        x, inputs = unet_inputs(torch, unet.config, res, "meta", torch.float32)
    with FlopCounterMode(display=False) as counter:
        unet(x, **inputs)
    return counter.get_total_flops() / 1e12


def vae_decode_tflops(torch, vae_config: dict, res: int) -> float:
    """TFLOP of one VAE decode of a res² image, counted on a meta-device copy."""
    from diffusers import AutoencoderKL
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        vae = AutoencoderKL(**vae_config)
        z = torch.randn(1, 4, res // 8, res // 8)
    with FlopCounterMode(display=False) as counter:
        vae.decode(z)
    return counter.get_total_flops() / 1e12


def tiny_unet_config():
    """The tiny UNet's config, for counting its FLOPs."""
    from ..models import build_tiny

    base, _ = build_tiny(with_refiner=False)
    return {k: v for k, v in base.unet.config.items() if not k.startswith("_")}


def unet_inputs(torch, config, res, device, dtype):
    """(latents, keyword inputs) of one guided UNet call (batch 2) at res², from a fixed generator."""
    latent = res // 8
    gen = torch.Generator("cpu").manual_seed(0)
    x = torch.randn(2, 4, latent, latent, generator=gen).to(device, dtype)
    hidden = torch.randn(2, 77, config.cross_attention_dim, generator=gen).to(device, dtype)
    pooled_dim = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    text_embeds = torch.randn(2, pooled_dim, generator=gen).to(device, dtype)
    time_ids = torch.tensor([[res, res, 0, 0, res, res]] * 2, dtype=dtype, device=device)
    timestep = torch.tensor(999.0, device=device)
    return x, dict(timestep=timestep, encoder_hidden_states=hidden,
                   added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids})


def matmul_peak_gflops(torch, dtype, device, n: int = 4096, repeats: int = 5) -> float:
    """This device's n×n matmul speed in ``dtype`` (best of ``repeats`` after a warm-up): the peak to compare with."""
    a = torch.randn(n, n, dtype=torch.float32).to(device, dtype)
    b = torch.randn(n, n, dtype=torch.float32).to(device, dtype)
    best = float("inf")
    for _ in range(repeats + 1):
        sync(torch, device)
        t = time.perf_counter()
        a @ b
        sync(torch, device)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def sync(torch, device):
    """Wait for the GPU's queued work (a no-op elsewhere), so that a timer reads the work done."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
