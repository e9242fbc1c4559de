"""The one base + refiner assembly: modules built from their configs (`build_modules`), put together as SDXL's
two pipelines (`assemble`: the refiner shares text encoder 2, the VAE, the tokenizer and the scheduler with the
base, as the service loads SDXL's), and the tokenizer whose vocabulary is made in code (`clip_tokenizer`).

Used for the three architectures built rather than loaded: ``tiny`` (models.build_tiny), the full SDXL 1.0
architecture with random weights (`build_full`, for bench and selftest) and the demo model (demo/).
torch, diffusers and transformers are imported inside the functions: importing this module is free.
"""
from __future__ import annotations

# SDXL 1.0 base, from the published configs (stabilityai/stable-diffusion-xl-base-1.0).
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, norm_num_groups=32,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280), transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
    addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
)
# SDXL 1.0 refiner UNet (stabilityai/stable-diffusion-xl-refiner-1.0): text encoder 2 only, aesthetic score.
SDXL_REFINER_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, norm_num_groups=32,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(384, 768, 1536, 1536), transformer_layers_per_block=4, attention_head_dim=(6, 12, 24, 24),
    cross_attention_dim=1280, use_linear_projection=True, addition_embed_type="text_time",
    addition_time_embed_dim=256, projection_class_embeddings_input_dim=2560,
)
SDXL_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
    block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, sample_size=1024, scaling_factor=0.13025, force_upcast=True,
)
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
              num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
CLIP_BIGG = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                 num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)
SDXL_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                      timestep_spacing="leading")


# ---------------------------------------------------------------- tokenizer

def byte_level_alphabet() -> list[str]:
    """GPT-2/CLIP's reversible byte -> printable character map (every byte gets a visible character)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for byte in range(256):
        if byte in printable:
            chars.append(chr(byte))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def byte_level_vocab() -> dict[str, int]:
    """Every byte's character, inside a word and at its end (``</w>``): 512 entries, no merges yet."""
    chars = byte_level_alphabet()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": i + len(chars) for i, c in enumerate(chars)})
    return vocab


def clip_tokenizer(vocab: dict[str, int] | None = None, merges: list[str] | None = None, max_length: int = 77,
                   directory=None):
    """A real CLIPTokenizer whose vocabulary is generated in code (no download).

    Without ``merges``: ``vocab`` (default: the byte-level one, token ids < 514, valid for any CLIP embedding)
    and no merges, built in memory. With ``merges`` (BPE merge lines, "a b"): written as vocab.json + merges.txt
    and read back, as a saved tokenizer is loaded. The start and end tokens are added when ``vocab`` lacks them;
    ``directory``: also save the tokenizer there.
    """
    import json
    import tempfile
    from pathlib import Path

    from transformers import CLIPTokenizer

    vocab = dict(byte_level_vocab() if vocab is None else vocab)
    vocab.setdefault("<|startoftext|>", len(vocab))
    vocab.setdefault("<|endoftext|>", len(vocab))
    if merges is None:
        tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)
        if directory is not None:
            tokenizer.save_pretrained(directory)
        return tokenizer
    with tempfile.TemporaryDirectory() as tmp:
        vocab_file, merges_file = Path(tmp) / "vocab.json", Path(tmp) / "merges.txt"
        vocab_file.write_text(json.dumps(vocab), encoding="utf-8")
        merges_file.write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
        tokenizer = CLIPTokenizer(str(vocab_file), str(merges_file), model_max_length=max_length,
                                  pad_token="<|endoftext|>")
        if directory is not None:
            tokenizer.save_pretrained(directory)
    return tokenizer


# ---------------------------------------------------------------- modules and pipelines

def build_modules(configs: dict[str, dict]) -> dict:
    """Untrained modules from their configs, built in the order of ``configs`` (after a manual seed, that order
    fixes every weight). Keys: ``te1`` (CLIPTextModel), ``te2`` (CLIPTextModelWithProjection), both from
    CLIPTextConfig fields; ``unet`` and ``refiner_unet`` (UNet2DConditionModel); ``vae`` (AutoencoderKL)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    makers = {"te1": lambda c: CLIPTextModel(CLIPTextConfig(**c)),
              "te2": lambda c: CLIPTextModelWithProjection(CLIPTextConfig(**c)),
              "unet": lambda c: UNet2DConditionModel(**c), "refiner_unet": lambda c: UNet2DConditionModel(**c),
              "vae": lambda c: AutoencoderKL(**c)}
    return {name: makers[name](config) for name, config in configs.items()}


def assemble(modules: dict, tokenizer, scheduler, with_refiner: bool | None = None, progress_bar: bool = False):
    """(base, refiner) SDXL pipelines from ``modules`` (keys as in `build_modules`). The refiner (where
    ``with_refiner``, by default whenever there is a ``refiner_unet``) has text encoder 2 only and aesthetic-score
    conditioning, and shares text encoder 2, the VAE, the tokenizer and the scheduler with the base."""
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    base = StableDiffusionXLPipeline(
        vae=modules["vae"], text_encoder=modules["te1"], text_encoder_2=modules["te2"], tokenizer=tokenizer,
        tokenizer_2=tokenizer, unet=modules["unet"], scheduler=scheduler, force_zeros_for_empty_prompt=True,
        add_watermarker=False)
    refiner = None
    if with_refiner if with_refiner is not None else modules.get("refiner_unet") is not None:
        refiner = StableDiffusionXLImg2ImgPipeline(
            vae=modules["vae"], text_encoder=None, text_encoder_2=modules["te2"], tokenizer=None,
            tokenizer_2=tokenizer, unet=modules["refiner_unet"], scheduler=scheduler, requires_aesthetics_score=True,
            force_zeros_for_empty_prompt=False, add_watermarker=False)
    if not progress_bar:
        for pipe in (base, refiner):
            if pipe is not None:
                pipe.set_progress_bar_config(disable=True)
    return base, refiner


def build_full(torch, dtype, device, with_refiner: bool = False):
    """The SDXL 1.0 base (and refiner UNet) architecture with random weights (seed 0), built straight in ``dtype``
    on ``device`` (no fp32 copy ever exists; "meta" builds nothing). Modules in eval mode; progress bars on."""
    from diffusers import EulerDiscreteScheduler

    configs = {"unet": SDXL_UNET, "te1": CLIP_L, "te2": CLIP_BIGG, "vae": SDXL_VAE}
    if with_refiner:
        configs["refiner_unet"] = SDXL_REFINER_UNET
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build straight in the target dtype: no fp32 copy ever exists
    try:
        with torch.device(device):
            torch.manual_seed(0)
            modules = build_modules(configs)
    finally:
        torch.set_default_dtype(previous)
    for module in modules.values():
        module.eval()
    tokenizer = clip_tokenizer()  # byte-level stand-in: token ids < 514, valid for the 49408-entry embedding
    scheduler = EulerDiscreteScheduler(**SDXL_SCHEDULER)
    return assemble(modules, tokenizer, scheduler, progress_bar=True)
