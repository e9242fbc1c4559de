"""The demo model's architecture: SDXL's components (two CLIP text encoders, a ``text_time`` UNet, an 8×
AutoencoderKL, a refiner UNet with aesthetic-score ids) at a width that trains on two CPU cores, and a
CLIPTokenizer whose vocabulary is built in code from the scene words (no download).
"""
from __future__ import annotations

from ..assembly import build_modules, byte_level_vocab, clip_tokenizer
from .scenes import SIZE, WORDS

MAX_TOKENS = 32  # captions are < 20 words; SDXL's 77 would only make cross-attention slower
TEXT_WIDTH_1, TEXT_WIDTH_2, POOLED = 64, 64, 64
TIME_EMBED = 16


def build_vocab(words=WORDS) -> tuple[dict[str, int], list[str]]:
    """(vocab, merges) for a CLIP byte-level BPE in which every scene word is one token.

    Unknown words still tokenize (into characters), so any prompt is accepted. The merges are found by
    tokenizing each word with the merges so far and merging its first two pieces until it is one piece: BPE
    applies merges by rank, so a merge added for one word can split another; repeating until nothing changes
    settles that.
    """
    vocab = byte_level_vocab()
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}

    def bpe(word: str) -> list[str]:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            pairs = [(ranks.get((a, b), 1 << 30), i) for i, (a, b) in enumerate(zip(pieces, pieces[1:]))]
            rank, i = min(pairs)
            if rank == 1 << 30:
                break
            pieces[i:i + 2] = [pieces[i] + pieces[i + 1]]
        return pieces

    changed = True
    while changed:
        changed = False
        for word in words:
            pieces = bpe(word)
            if len(pieces) > 1:
                pair = (pieces[0], pieces[1])
                ranks[pair] = len(merges)
                merges.append(pair)
                vocab.setdefault(pair[0] + pair[1], len(vocab))
                changed = True
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return vocab, [f"{a} {b}" for a, b in merges]


def build_tokenizer(directory=None):
    """A real CLIPTokenizer (saved as vocab.json + merges.txt, loaded by the pipeline like SDXL's)."""
    vocab, merges = build_vocab()
    return clip_tokenizer(vocab, merges, max_length=MAX_TOKENS, directory=directory)


def component_configs(tokenizer) -> dict[str, dict]:
    """The demo model's component configs, in the order they are built (the order fixes the initial weights)."""
    common = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                  max_position_embeddings=MAX_TOKENS, layer_norm_eps=1e-5, hidden_act="gelu", num_attention_heads=4,
                  num_hidden_layers=3)
    return dict(
        # SDXL: encoder 1 = CLIP ViT-L text, encoder 2 = OpenCLIP bigG text with projection (pooled -> time embedding).
        te1=dict(hidden_size=TEXT_WIDTH_1, intermediate_size=2 * TEXT_WIDTH_1, projection_dim=TEXT_WIDTH_1, **common),
        te2=dict(hidden_size=TEXT_WIDTH_2, intermediate_size=2 * TEXT_WIDTH_2, projection_dim=POOLED, **common),
        # SDXL base's block layout (no attention at the full latent resolution), text_time conditioning.
        unet=dict(
            sample_size=SIZE // 8, in_channels=4, out_channels=4, layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(32, 64, 128), attention_head_dim=(2, 4, 8), transformer_layers_per_block=(1, 1, 1),
            cross_attention_dim=TEXT_WIDTH_1 + TEXT_WIDTH_2, use_linear_projection=True, norm_num_groups=16,
            addition_embed_type="text_time", addition_time_embed_dim=TIME_EMBED,
            projection_class_embeddings_input_dim=6 * TIME_EMBED + POOLED,  # (orig size, crop, target) ids + pooled
        ),
        vae=dict(
            in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=16,
            block_out_channels=(32, 64, 64, 64), down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, sample_size=SIZE, scaling_factor=1.0, force_upcast=True,
        ),
        # SDXL refiner layout: text encoder 2 only, aesthetic-score conditioning (5 ids instead of 6).
        refiner_unet=dict(
            sample_size=SIZE // 8, in_channels=4, out_channels=4, layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(32, 64, 64), attention_head_dim=(2, 4, 4), cross_attention_dim=TEXT_WIDTH_2,
            use_linear_projection=True, norm_num_groups=16, addition_embed_type="text_time",
            addition_time_embed_dim=TIME_EMBED, projection_class_embeddings_input_dim=5 * TIME_EMBED + POOLED,
        ),
    )


def build_components(torch, tokenizer):
    """Untrained modules with the demo model's configuration (te1, te2, unet, vae, refiner_unet)."""
    return build_modules(component_configs(tokenizer))


def scheduler_config() -> dict:
    """SDXL's scaled-linear betas rescaled to zero terminal SNR, sampled with trailing spacing, v-prediction.

    SDXL's own schedule (leading spacing, terminal SNR 0.005) let two trial runs learn colour, shape and background
    but read *where* to draw from the starting noise: at t≈950 a training latent still shows its shape's
    position through the noise, so the model learns to follow the noise there, and at sampling time the noise is
    random — 4 to 7 of 16 prompts placed right, with ε- or v-prediction alike. With zero terminal SNR the first
    step sees noise only, in training as in sampling, and the layout has to come from the prompt (Lin et al.
    2024, "Common Diffusion Noise Schedules and Sample Steps Are Flawed"; their recipe: rescaled betas, trailing
    timesteps, v-prediction — every scheduler the page offers supports it).
    """
    return dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                steps_offset=1, timestep_spacing="trailing", prediction_type="v_prediction",
                rescale_betas_zero_snr=True, clip_sample=False, set_alpha_to_one=False)  # as SDXL's (DDIM)
