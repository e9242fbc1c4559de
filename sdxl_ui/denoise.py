"""One image's denoising and decoding, shared by the service, the bench and the selftest: the sampler from the
model's own scheduler config, the base (then the refiner) pipeline call with whatever the plan installed on the
pipeline (feature cache, guidance interval), latent previews and the VAE decode."""
from __future__ import annotations

import contextlib

from .samplers import SIGMA_FLAGS, plan_sampler, schedule_sigmas
from .schema import Schedule, Scheduler

REFINER_SPLIT = 0.8  # base denoises to 80 %, the refiner does the last 20 % (SDXL's "ensemble of experts")
# SDXL latent -> RGB linear approximation (ComfyUI latent_formats.SDXL), for previews without a VAE decode.
LATENT_RGB = ((0.3651, 0.4232, 0.4341), (-0.2533, -0.0042, 0.1068), (0.1076, 0.1111, -0.0362),
              (-0.3165, -0.2492, -0.2188))
LATENT_RGB_BIAS = (0.1084, -0.0175, -0.0011)


def scheduler_for(sampler: Scheduler, config, schedule: Schedule = Schedule.AUTOMATIC):
    """The diffusers scheduler for a sampler and schedule type (``samplers.plan_sampler`` says which and how)."""
    import diffusers

    planned = plan_sampler(sampler, schedule)
    options = dict(planned.options)
    if any(k in options for k in SIGMA_FLAGS) or "timestep_spacing" in options:
        # A chosen schedule replaces the model's own sigma flags (diffusers refuses two of them at once).
        options = {**{k: False for k in SIGMA_FLAGS if config.get(k)}, **options}
    if options.get("use_karras_sigmas") and config.get("rescale_betas_zero_snr"):
        # A zero-terminal-SNR model (the demo model) has sigma_max = 4096: Karras spacing would spend most steps
        # above sigma 50, where the picture is still pure noise (14 steps: 9 of them). Its trailing timesteps
        # already start at pure noise, so plain DPM++ 2M is used (demo model, 8 Fast prompts: 21 → 29 of 32).
        options = {k: v for k, v in options.items() if k != "use_karras_sigmas"}
    cls = getattr(diffusers, planned.cls)
    if planned.custom is not None:
        cls = _computed_sigmas(cls, planned.custom)
    return cls.from_config(config, **options)


def _computed_sigmas(cls, kind: Schedule):
    """``cls`` whose set_timesteps(n) runs A1111's computed schedule ``kind`` (KL Optimal, Align Your Steps) through
    its own ``sigmas=`` argument; the class keeps its name (the report and the PNG name the diffusers class)."""
    def set_timesteps(self, num_inference_steps=None, device=None, **kwargs):
        if num_inference_steps is None or kwargs.get("sigmas") is not None or kwargs.get("timesteps") is not None:
            return cls.set_timesteps(self, num_inference_steps, device=device, **kwargs)
        sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5
        low, high = float(sigmas[0]), float(sigmas[-1])
        return cls.set_timesteps(self, device=device, sigmas=schedule_sigmas(kind, num_inference_steps, low, high))

    return type(cls.__name__, (cls,), {"set_timesteps": set_timesteps, "computed_schedule": kind.value,
                                       "__module__": cls.__module__})


def profile_scheduler(profile, sampler: Scheduler, config, own: bool, schedule: Schedule = Schedule.AUTOMATIC):
    """The scheduler a model profile runs: its own class (``own``: the request left the sampler on auto) or the
    request's sampler, either way with the profile's config overrides (e.g. Lightning's trailing timesteps)."""
    config = {**dict(config), **dict(profile.overrides)}
    if own and profile.scheduler:
        import diffusers

        return getattr(diffusers, profile.scheduler).from_config(config)
    return scheduler_for(sampler, config, schedule)


_scheduler_for = scheduler_for  # the old private name, for bench.py until its rewrite lands


def latent_preview(latents, pipe=None):
    """(1, 4, h, w) latents -> small PIL image: by a run hook that draws previews (``hooks.preview``) when one is
    installed on ``pipe``, else by SDXL's linear latent->RGB map (no decode)."""
    import torch
    from PIL import Image

    from .optimizations import hooks

    drawn = hooks.preview(pipe, latents) if pipe is not None else None
    if drawn is not None:
        return drawn

    lat = latents[0].detach().float().cpu()
    factors = torch.tensor(LATENT_RGB)
    rgb = torch.einsum("chw,cr->hwr", lat, factors) + torch.tensor(LATENT_RGB_BIAS)
    rgb = ((rgb.clamp(-1, 1) + 1) * 127.5).to(torch.uint8).numpy()
    image = Image.fromarray(rgb, "RGB")
    scale = max(1, min(8, 512 // max(image.size)))
    return image.resize((image.width * scale, image.height * scale), Image.BILINEAR)


def final_decoder(pipe) -> str | None:
    """What decodes the final image when it is not the model's own VAE (a run hook's ``decoder_name``; the PNG's
    ``VAE`` field), else None."""
    from .optimizations import hooks

    return hooks.decoder_name(pipe)


def decode_latents(pipe, latents):
    """VAE decode in the VAE's own dtype (fp32 beside an fp16 UNet), then to PIL.

    Unscaled as diffusers' SDXL pipeline does it: with the VAE's ``latents_mean``/``latents_std`` when its config
    has them (e.g. Playground v2.5), else by ``scaling_factor`` alone."""
    from diffusers.utils.torch_utils import get_module_execution_device

    from .optimizations import hooks

    decoded = hooks.decode(pipe, latents)  # a run hook's own decoder, when one decodes the final image
    if decoded is not None:
        return pipe.image_processor.postprocess(decoded, output_type="pil")[0]
    vae = pipe.vae
    config = vae.config
    latents = latents.to(device=get_module_execution_device(vae), dtype=vae.dtype)
    mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
    if mean is not None and std is not None:
        import torch

        shape = (1, latents.shape[1], 1, 1)
        mean = torch.tensor(mean).view(shape).to(latents.device, latents.dtype)
        std = torch.tensor(std).view(shape).to(latents.device, latents.dtype)
        latents = latents * std / config.scaling_factor + mean
    else:
        latents = latents / config.scaling_factor
    image = vae.decode(latents, return_dict=False)[0]
    if hasattr(pipe, "maybe_free_model_hooks"):
        pipe.maybe_free_model_hooks()
    return pipe.image_processor.postprocess(image.float(), output_type="pil")[0]


EMBEDDINGS = ("prompt_embeds", "pooled_prompt_embeds", "negative_prompt_embeds", "negative_pooled_prompt_embeds")


def run_stages(models, use_refiner: bool, width: int, height: int, common: dict, on_step=None,
               on_stage_end=None, refiner_text: dict | None = None):
    """The denoising of one image, as latents: the base alone, or the base to REFINER_SPLIT and then the refiner
    from there (SDXL's "ensemble of experts"). The service and the benchmark both run exactly this.

    ``common``: the pipeline arguments both stages share (prompt, steps, guidance, generator, output_type);
    ``on_step(stage)`` returns the diffusers step callback for stage 1 or 2; ``on_stage_end(stage)`` is called
    after each stage (the bench uses it to time the stages). ``refiner_text``: the prompts as text for the refiner
    (its one text encoder) when ``common`` holds the base's chunked embeddings (``long_prompts``)."""
    from .optimizations import hooks

    def callback(stage):
        return on_step(stage) if on_step else None

    # Each call first runs its hooks' ``before`` (e.g. the stage claims the modules base and refiner share).
    latents = hooks.call(models.base, callback(1), width=width, height=height,
                         denoising_end=REFINER_SPLIT if use_refiner else None, **common)
    if getattr(models.base, "interrupt", False):  # Stop during stage 1 (the callback set _interrupt): no stage 2
        return latents
    if on_stage_end:
        on_stage_end(1)
    if use_refiner:
        stage2 = {k: v for k, v in common.items() if k not in EMBEDDINGS}
        if len(stage2) < len(common):  # the base ran on chunked embeddings: the refiner reads the text itself
            stage2.update(refiner_text or {})
        latents = hooks.call(models.refiner, callback(2), image=latents, denoising_start=REFINER_SPLIT, **stage2)
        hooks.before(models.base)  # the decode that follows runs the base's VAE
        if on_stage_end and not getattr(models.refiner, "interrupt", False):
            on_stage_end(2)
    return latents


def image_to_image(models, picture, strength: float, common: dict, step_callback=None):
    """One image's latents from ``picture`` (PIL, the output's size): diffusers' StableDiffusionXLImg2ImgPipeline
    built over the loaded base's own modules (``over_base``: no weights loaded twice), carrying the base's run
    hooks and state, noised to ``strength`` and denoised with ``common``'s prompts, steps and guidance."""
    from diffusers import StableDiffusionXLImg2ImgPipeline

    from .optimizations import hooks

    pipe = over_base(StableDiffusionXLImg2ImgPipeline, models.base)
    with encode_in_vae_dtype(pipe.vae):
        return hooks.call(pipe, step_callback, image=picture, strength=strength, **common)


@contextlib.contextmanager
def encode_in_vae_dtype(vae):
    """The VAE encodes a picture in its own dtype when that dtype cannot overflow. diffusers' image-to-image and
    inpainting pipelines cast the VAE to fp32 for every encode when its config says ``force_upcast`` (the SDXL VAE
    overflows in fp16) — also a bf16 VAE, which has fp32's exponent range: an fp32 encode, and the whole VAE cast
    there and back, each time (the full VAE's 1024² encode on the Xeon with AMX: bf16 channels-last 4.9 s, fp32
    ~15 s). An fp16 VAE keeps the upcast."""
    import torch

    skip = bool(getattr(vae.config, "force_upcast", False)) and vae.dtype in (torch.bfloat16, torch.float32)
    if skip:
        vae.register_to_config(force_upcast=False)
    try:
        yield
    finally:
        if skip:
            vae.register_to_config(force_upcast=True)


def over_base(cls, base):
    """A diffusers SDXL pipeline of ``cls`` over ``base``'s own modules, with its run hooks and state shared.

    Not ``cls.from_pipe(base)``: diffusers 0.42's ``from_pipe`` ends with ``to(dtype=torch.float32)`` when no dtype
    is given, which casts the shared modules in place — the base itself became fp32 (a bf16 full SDXL: 7.1 → 14.2
    GB RSS, image to image at 256² 29.5 s against 5.2 s of text to image) — and with a dtype it would cast an fp32
    VAE beside a bf16 UNet. The constructor only registers the modules."""
    from .optimizations import hooks

    parts = {k: v for k, v in base.components.items() if k in ("vae", "text_encoder", "text_encoder_2", "tokenizer",
                                                                "tokenizer_2", "unet", "scheduler", "image_encoder",
                                                                "feature_extractor")}
    pipe = cls(**parts, force_zeros_for_empty_prompt=base.config.force_zeros_for_empty_prompt,
               add_watermarker=getattr(base, "watermark", None) is not None)
    pipe.set_progress_bar_config(disable=True)
    hooks.share(base, pipe)
    return pipe


def inpaint(models, picture, mask, strength: float, common: dict, content: str = "original", step_callback=None):
    """One image's latents from ``picture`` redrawn where ``mask`` (PIL "L", the output's size) is white:
    diffusers' StableDiffusionXLInpaintPipeline built over the loaded base's own modules (``over_base``; the
    base's run hooks and state shared). With the base's 4-channel UNet it keeps the picture's noised latents
    outside the mask at every step, as A1111 does. ``content``: A1111's masked content — ``latent noise`` or
    ``latent nothing`` put fresh noise or zeros in the masked latents before they are noised to ``strength``
    (``fill`` and ``original`` come in the picture itself)."""
    from diffusers import StableDiffusionXLInpaintPipeline

    pipe = over_base(StableDiffusionXLInpaintPipeline, models.base)
    with encode_in_vae_dtype(pipe.vae):
        return _inpaint(pipe, picture, mask, strength, common, content, step_callback)


def _inpaint(pipe, picture, mask, strength, common, content, step_callback):
    import torch

    from .optimizations import hooks

    width, height = picture.size
    image = picture
    if content in ("latent noise", "latent nothing"):
        pixels = pipe.image_processor.preprocess(picture, height=height, width=width).to(
            device=pipe._execution_device, dtype=pipe.vae.dtype)
        latents = pipe._encode_vae_image(pixels, generator=common.get("generator"))
        small = torch.nn.functional.interpolate(pipe.mask_processor.preprocess(mask, height=height, width=width),
                                                size=latents.shape[-2:], mode="bilinear").round().to(latents)
        fresh = torch.zeros_like(latents) if content == "latent nothing" else torch.randn(
            latents.shape, generator=common.get("generator"), dtype=torch.float32).to(latents)
        image = latents * (1 - small) + fresh * small  # A1111's init_latent * mask + noise * nmask
    unused = {}
    if pipe.unet.config.in_channels == 4:
        # The pipeline VAE-encodes the masked picture for a 9-channel inpainting UNet; the base's 4-channel UNet
        # never reads it (full SDXL at 1024²: that encode made inpainting 100 s against image to image's 45 s).
        unused["masked_image_latents"] = torch.zeros(1, 4, height // pipe.vae_scale_factor,
                                                     width // pipe.vae_scale_factor)
    return hooks.call(pipe, step_callback, image=image, mask_image=mask, strength=strength, width=width,
                      height=height, **unused, **common)
