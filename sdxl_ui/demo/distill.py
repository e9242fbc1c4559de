"""`python -m sdxl_ui train-demo --distill lcm|decoder`: few-step and tiny-decoder models distilled from the demo.

``lcm``: an LCM-LoRA for the demo UNet by latent consistency distillation (Luo et al. 2023, "Latent Consistency
Models" and "LCM-LoRA"; the recipe of diffusers' ``train_lcm_distill_lora_sdxl.py``, written here for the demo's
v-prediction, zero-terminal-SNR schedule):
- the **teacher** is the demo UNet itself with classifier-free guidance (w = guidance − 1 drawn from the quality
  presets' guidance 6 … 8; the unconditional branch gets zeros, as the pipeline sends for an empty negative prompt);
- a **skipping ODE solver**: one DDIM step of the teacher from t_{n+k} to t_n on the 50-step skipping schedule
  (k = 20; the timesteps LCMScheduler samples from);
- the **student** is the UNet with a LoRA on the layers diffusers' script targets; its consistency function
  f(x, t) = c_skip(t)·x + c_out(t)·x̂₀ with LCMScheduler's boundary scalings, so f(x, 0) = x;
- the **target** f(x_{t_n}, t_n) comes from an **EMA** copy of the student (decay 0.95, LCM's), without gradient;
- **Huber** loss, c = 0.001.
The student is judged on 16 prompts with LCMScheduler at 4 steps, guidance 1, as the app runs it. The file is an
ordinary diffusers LoRA (``unet.…lora.down/up.weight``, fp16, metadata naming it an LCM-LoRA): it loads through
``--lora`` like any hub LoRA and is detected as ``lcm``.

``decoder``: an ``AutoencoderTiny`` (TAESD's architecture, narrower) distilled from the demo VAE: the decoder
learns the VAE decoder's picture of each latent (the pixel loss weighted to the shape as in the VAE's training), the
encoder the VAE's scaled latent mean. Like TAESDXL it works on the pipeline's latents directly (scaling factor 1).
"""
from __future__ import annotations

import copy
import json
import logging
import time
from pathlib import Path

import numpy as np

from . import scenes as S
from .train import TIME_IDS, Progress, adherence, encode_text, fraction, lr_at, to_tensor

log = logging.getLogger(__name__)

LCM_FILE = "pytorch_lora_weights.safetensors"
SKIP = 20  # k: 1000 train timesteps / LCMScheduler's original_inference_steps (50)
GUIDANCE = (6.0, 8.0)  # the teacher's classifier-free guidance (the Fast and High-quality presets')
HUBER_C = 0.001
LCM_LR = 3e-4
DECODER_SCENES = 4096
CHECK_EVERY = 0.125  # of the budget: the student is judged (16 prompts, 4 steps) and the best one is kept
EMA_DECAY = 0.95
TIMESTEP_SCALING, SIGMA_DATA = 10.0, 0.5  # LCMScheduler's boundary-condition constants
# The layers diffusers' train_lcm_distill_lora_sdxl.py puts the LoRA on.
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj"]
LCM_METADATA = {"sdxl_ui_profile": "lcm", "format": "diffusers LoRA (unet)",
                "description": "LCM-LoRA for the sdxl_ui demo model, by latent consistency distillation"}
TINY_DECODER = dict(encoder_block_out_channels=(16, 16, 16, 16), decoder_block_out_channels=(32, 32, 32, 32),
                    num_encoder_blocks=(1, 2, 2, 2), num_decoder_blocks=(2, 2, 2, 1), latent_channels=4,
                    scaling_factor=1.0, force_upcast=False)


def load_demo(source: str | Path):
    """The demo pipeline in fp32 (its files are fp16), on CPU, everything frozen."""
    import torch
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(str(source), torch_dtype=torch.float32)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        getattr(pipe, name).eval().requires_grad_(False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def encode_scenes(vae, rng, n: int):
    """n training scenes and their latents as the pipeline sees them (VAE posterior mean × scaling factor)."""
    import torch

    scenes, latents = [], []
    with torch.no_grad():
        for i in range(0, n, 64):
            chunk = [S.sample_scene(rng) for _ in range(min(64, n - i))]
            latents.append(vae.encode(to_tensor(np.stack([S.render(s, rng)[0] for s in chunk]))).latent_dist.mean)
            scenes.extend(chunk)
    return scenes, torch.cat(latents) * vae.config.scaling_factor


def boundary(t, torch):
    """LCMScheduler.get_scalings_for_boundary_condition_discrete for a batch of timesteps: (c_skip, c_out)."""
    scaled = t.float() * TIMESTEP_SCALING
    c_skip = SIGMA_DATA ** 2 / (scaled ** 2 + SIGMA_DATA ** 2)
    c_out = scaled / (scaled ** 2 + SIGMA_DATA ** 2) ** 0.5
    return c_skip.view(-1, 1, 1, 1), c_out.view(-1, 1, 1, 1)


def x0_and_eps(v, x, a):
    """v-prediction → (x̂₀, ε̂) at cumulative alpha ``a``."""
    return a.sqrt() * x - (1 - a).sqrt() * v, a.sqrt() * v + (1 - a).sqrt() * x


def add_lora(unet, rank: int):
    from peft import LoraConfig

    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=LORA_TARGETS))
    return unet


def lora_state(unet) -> dict:
    """The student's LoRA in diffusers' file layout (``unet.<layer>.lora.down/up.weight``), fp16."""
    import torch
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    return {f"unet.{k}": v.detach().to(torch.float16).contiguous() for k, v in state.items()}


class LcmStep:
    """One latent-consistency-distillation step: the teacher's guided DDIM step, the EMA target, the Huber loss."""

    def __init__(self, teacher, student, target, alphas_cumprod, batch: int, gen):
        import torch

        self.torch, self.teacher, self.student, self.target = torch, teacher, student, target
        self.ac, self.gen, self.batch = alphas_cumprod, gen, batch
        self.time_ids = torch.tensor([TIME_IDS], dtype=torch.float32).repeat(batch, 1)
        self.params = [p for p in student.parameters() if p.requires_grad]
        self.target_params = [p for n, p in target.named_parameters() if "lora" in n]

    def loss(self, clean, embeds, pooled):
        torch = self.torch
        n = clean.shape[0]
        index = torch.randint(0, 1000 // SKIP, (n,), generator=self.gen)
        start = (index + 1) * SKIP - 1
        prev = (start - SKIP).clamp(min=0)
        a_start, a_prev = self.ac[start].view(-1, 1, 1, 1), self.ac[prev].view(-1, 1, 1, 1)
        noise = torch.randn(clean.shape, generator=self.gen)
        noisy = a_start.sqrt() * clean + (1 - a_start).sqrt() * noise
        cond = {"text_embeds": pooled, "time_ids": self.time_ids[:n]}
        c_skip_s, c_out_s = boundary(start, torch)
        v = self.student(noisy, start, embeds, added_cond_kwargs=cond).sample
        prediction = c_skip_s * noisy + c_out_s * x0_and_eps(v, noisy, a_start)[0]
        with torch.no_grad():
            w = torch.empty(n).uniform_(GUIDANCE[0] - 1, GUIDANCE[1] - 1, generator=self.gen).view(-1, 1, 1, 1)
            both = {"text_embeds": torch.cat([pooled, torch.zeros_like(pooled)]),
                    "time_ids": self.time_ids[:n].repeat(2, 1)}
            v2 = self.teacher(noisy.repeat(2, 1, 1, 1), start.repeat(2), torch.cat([embeds, torch.zeros_like(embeds)]),
                              added_cond_kwargs=both).sample
            x0_c, eps_c = x0_and_eps(v2[:n], noisy, a_start)
            x0_u, eps_u = x0_and_eps(v2[n:], noisy, a_start)
            x0, eps = x0_c + w * (x0_c - x0_u), eps_c + w * (eps_c - eps_u)
            x_prev = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
            c_skip, c_out = boundary(prev, torch)
            v_t = self.target(x_prev, prev, embeds, added_cond_kwargs=cond).sample
            target = c_skip * x_prev + c_out * x0_and_eps(v_t, x_prev, a_prev)[0]
        return (torch.sqrt((prediction - target) ** 2 + HUBER_C ** 2) - HUBER_C).mean()

    def update_target(self) -> None:
        with self.torch.no_grad():
            live = [p for n, p in self.student.named_parameters() if "lora" in n]
            for p_live, p_target in zip(live, self.target_params):
                p_target.lerp_(p_live.detach(), 1 - EMA_DECAY)


def lcm_pipeline(pipe, unet):
    """The demo pipeline with ``unet`` and LCMScheduler (what ``--lora`` of an LCM-LoRA runs)."""
    from diffusers import LCMScheduler, StableDiffusionXLPipeline

    components = dict(pipe.components, unet=unet, scheduler=LCMScheduler.from_config(pipe.scheduler.config))
    lcm = StableDiffusionXLPipeline(**components)
    lcm.set_progress_bar_config(disable=True)
    return lcm


def distill_lcm(source, out: Path, seconds: float, seed: int, smoke: bool, rank: int, batch: int) -> dict:
    import torch

    pipe, rng = load_demo(source), np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    scenes, latents = encode_scenes(pipe.vae, rng, 64 if smoke else 8192)
    student = add_lora(copy.deepcopy(pipe.unet), rank)
    student.train()
    target = copy.deepcopy(student).eval().requires_grad_(False)
    alphas = _alphas_cumprod(pipe.scheduler)
    step_fn = LcmStep(pipe.unet, student, target, alphas, batch, gen)
    opt = torch.optim.AdamW(step_fn.params, lr=LCM_LR, betas=(0.9, 0.99), weight_decay=0.0)
    check_scenes = S.eval_scenes(16, seed=99)  # not the eval-demo prompt set (seed 1234)
    progress, step, checks, next_check = Progress("lcm", seconds, 2 if smoke else None), 0, [], CHECK_EVERY
    best = Best()
    while not progress.done(step):
        for group in opt.param_groups:
            group["lr"] = lr_at(LCM_LR, fraction(progress, step))
        idx = rng.integers(len(scenes), size=batch)
        with torch.no_grad():
            embeds, pooled = encode_text(pipe.tokenizer, pipe.text_encoder, pipe.text_encoder_2,
                                         [S.caption(scenes[i], rng) for i in idx])
        loss = step_fn.loss(latents[torch.from_numpy(idx)], embeds, pooled)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(step_fn.params, 1.0)
        opt.step()
        step_fn.update_target()
        step += 1
        progress.update(step, float(loss.detach()))
        if not smoke and fraction(progress, step) >= next_check:
            next_check += CHECK_EVERY
            checks.append(_lcm_check(pipe, student, check_scenes, step, out, best))
    progress.close()
    report = {"steps": step, "seconds": round(progress.elapsed(), 1), "loss": round(progress.loss or 0, 5),
              "rank": rank, "batch": batch, "lr": LCM_LR, "checks": checks}
    if not smoke:
        checks.append(_lcm_check(pipe, student, check_scenes, step, out, best))
        student = best.student
        report["kept_step"] = best.step
        student.eval()
        report["final_check_16"] = {n: adherence(lcm_pipeline(pipe, student), check_scenes, steps=n, guidance=1.0)
                                    for n in (2, 4, 8)}
        log.info("LCM final check (16 prompts, guidance 1): %s", report["final_check_16"])
    return report | {"lora": student}


class Best:
    """The best student so far by its check (early stopping on the 16 check prompts: the consistency loss does not
    say when the pictures stop improving)."""

    def __init__(self):
        self.score, self.step, self.student = -1, 0, None


def _lcm_check(pipe, student, scenes, step: int, out: Path, best: Best) -> dict:
    """Adherence of the student at 4 steps; a better one than any before is kept and written (the run can be cut
    any time after its first check)."""
    student.eval()
    right = adherence(lcm_pipeline(pipe, student), scenes, steps=4, guidance=1.0)
    student.train()
    score = sum(int(v.split("/")[0]) for v in right.values())
    kept = score >= best.score
    if kept:
        best.score, best.step, best.student = score, step, copy.deepcopy(student).eval()
        save_lora(student, out, {"step": step})
    log.info("LCM step %d, 4 steps guidance 1: %s%s", step, right, " (best so far: kept and written)" if kept else "")
    return {"step": step, "kept": kept, **right}


def save_lora(student, out: Path, extra: dict) -> int:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    path = out / LCM_FILE
    save_file(lora_state(student), str(path), metadata={**LCM_METADATA, **{k: str(v) for k, v in extra.items()}})
    return path.stat().st_size


def _alphas_cumprod(scheduler):
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(scheduler.config).alphas_cumprod


# ---------------------------------------------------------------- the tiny decoder

def distill_decoder(source, out: Path, seconds: float, seed: int, smoke: bool, batch: int) -> dict:
    import torch
    from diffusers import AutoencoderTiny

    pipe, rng = load_demo(source), np.random.default_rng(seed)
    vae = pipe.vae
    torch.manual_seed(seed)
    tiny = AutoencoderTiny(**TINY_DECODER)
    opt = torch.optim.AdamW(tiny.parameters(), lr=1e-3, betas=(0.9, 0.99), weight_decay=0.0)
    start = time.perf_counter()
    data = decoder_dataset(vae, rng, 8 if smoke else DECODER_SCENES)
    log.info("the VAE's pictures of %d latents in %.0f s", len(data[0]), time.perf_counter() - start)
    progress, step, checks, next_check = Progress("decoder", seconds, 2 if smoke else None), 0, [], 0.25
    tiny.train()
    while not progress.done(step):
        for group in opt.param_groups:
            group["lr"] = lr_at(1e-3, fraction(progress, step))
        idx = torch.from_numpy(rng.integers(len(data[0]), size=batch))
        x, z, z_in, target, weight = (t[idx].float() for t in data)
        err = tiny.decoder(z_in) - target
        loss = ((err.abs() + err.pow(2)) * weight).sum() / (weight.sum() * 3)
        loss = loss + (tiny.encoder(x) - z).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        progress.update(step, float(loss.detach()))
        if not smoke and fraction(progress, step) >= next_check:
            next_check += 0.25
            checks.append({"step": step, **decoder_check(vae, tiny)})
            log.info("decoder step %d: %s", step, checks[-1])
    progress.close()
    tiny.eval()
    report = {"steps": step, "seconds": round(progress.elapsed(), 1), "loss": round(progress.loss or 0, 5),
              "checks": checks, "final_check_48": decoder_check(vae, tiny, 4 if smoke else 48)}
    log.info("decoder done: %s", report["final_check_48"])
    copy.deepcopy(tiny).to(torch.float16).save_pretrained(out, safe_serialization=True)
    report["parameters"] = sum(p.numel() for p in tiny.parameters())
    return report


def decoder_dataset(vae, rng, n: int) -> tuple:
    """The VAE's own pictures to learn from, computed once: n scenes (pixel weights as in the VAE's training), their
    pipeline latents, the latents the decoder gets (half of them a little off the data's, as a few-step sample can
    be) and the VAE's decode of those; fp16 to keep it small."""
    import torch

    from .train import vae_batch

    parts: list[list] = [[], [], [], [], []]
    scale = vae.config.scaling_factor
    with torch.no_grad():
        for i in range(0, n, 64):
            x, weight = vae_batch(rng, min(64, n - i), S.SIZE)
            z = vae.encode(x).latent_dist.mean * scale
            z_in = z + 0.1 * torch.randn(z.shape) * (torch.rand(z.shape[0], 1, 1, 1) < 0.5)
            target = vae.decode(z_in / scale).sample.clamp(-1, 1)
            for part, t in zip(parts, (x, z, z_in, target, weight)):
                part.append(t.half())
    return tuple(torch.cat(p) for p in parts)


def decoder_check(vae, tiny, n: int = 48, seed: int = 4321) -> dict:
    """Of n scenes encoded by the VAE: how many the reader reads right decoded by the VAE and by the tiny decoder
    (all attributes right), and the tiny decoder's PSNR against the VAE's picture."""
    import torch

    from .evaluate import psnr

    rng = np.random.default_rng(seed)
    scenes = S.eval_scenes(n, seed=seed)
    with torch.no_grad():
        z = vae.encode(to_tensor(np.stack([S.render(s, rng)[0] for s in scenes]))).latent_dist.mean
        full = vae.decode(z).sample
        small = tiny.decode(z * vae.config.scaling_factor).sample

    def pictures(t):
        return ((t.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()

    full_p, small_p = pictures(full), pictures(small)
    read = {"full": 0, "tiny": 0}
    for scene, a, b in zip(scenes, full_p, small_p):
        read["full"] += int(all(S.read_scene(a).matches(scene).values()))
        read["tiny"] += int(all(S.read_scene(b).matches(scene).values()))
    return {"all_right_full": f"{read['full']}/{n}", "all_right_tiny": f"{read['tiny']}/{n}",
            "psnr_tiny_vs_full_db": round(float(np.mean([psnr(a, b) for a, b in zip(full_p, small_p)])), 2)}


# ---------------------------------------------------------------- the command

def distill(kind: str, source, out, minutes: float, seed: int = 0, smoke: bool = False, threads: int = 0,
            rank: int = 24) -> dict:
    """Run one distillation within about ``minutes`` and write its folder; returns the report (also written as
    ``training.json`` in ``out``). ``smoke``: two steps on a tiny dataset, same code path (seconds; for CI)."""
    import torch

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if threads:
        torch.set_num_threads(threads)
    torch.set_flush_denormal(True)  # tiny optimizer states must not fall into slow denormal arithmetic on a CPU
    torch.manual_seed(seed)
    start = time.perf_counter()
    report: dict = {"distill": kind, "from": str(source), "seed": seed, "minutes": minutes, "smoke": smoke,
                    "threads": torch.get_num_threads()}
    if kind == "lcm":
        result = distill_lcm(source, out, minutes * 60, seed, smoke, rank, batch=4 if smoke else 32)
        student = result.pop("lora")
        report["lcm"] = result
        save_lora(student, out, {"steps": result["steps"], "seconds": result["seconds"]})
    else:
        report["decoder"] = distill_decoder(source, out, minutes * 60, seed, smoke, batch=4 if smoke else 32)
    report["bytes"] = sum(p.stat().st_size for p in out.iterdir() if p.is_file() and p.suffix == ".safetensors")
    report["total_s"] = round(time.perf_counter() - start, 1)
    (out / "training.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    log.info("wrote %s (%.2f MB) in %.1f min", out, report["bytes"] / 1e6, report["total_s"] / 60)
    return report
