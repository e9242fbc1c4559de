"""`python -m sdxl_ui train-demo`: train the demo model from scratch on the scene world, on CPU.

Stages, each judged before the next (figures go to the log):
1. VAE on 64×64 crops of 128×128 scenes (fully convolutional, so crops cost a quarter of a full image). L1 + MSE
   weighted so the shape's pixels count as much as the background's (an unweighted loss is dominated by the
   background and learns the small shapes' colours last), tiny KL. Judged by reading back reconstructions of
   48 scenes with the scene reader.
2. A fixed set of scenes encoded once (posterior means); the latent scaling factor is 1 / their std, as SD's was.
3. Base UNet + both text encoders, jointly: v-prediction on SDXL's noise schedule, with the clean-latent
   error weighted min(SNR + 1, γ + 1), γ = 5 (full weight on the high-noise steps that place the shape; see
   ``_loss``), offset noise (0.1: flat images otherwise leak their mean colour through SDXL's non-zero terminal
   SNR, and the model would read the background from the noise instead of the prompt), 12 % caption dropout
   (half as zeros — what the pipeline sends for an empty negative prompt — and half as the encoded empty
   string), EMA weights. Judged with the pipeline itself on 16 prompts.
4. Refiner UNet (text encoder 2 only, aesthetic-score ids) on the low-noise fifth of the schedule, like SDXL's.

The result is an ordinary diffusers folder (model_index.json + safetensors, fp16 weights) with the refiner in
``refiner/``. Stage checkpoints in ``DIR/.train/`` let ``--resume`` skip finished stages.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import sys
import time
from pathlib import Path

import numpy as np

from ..assembly import assemble
from . import architecture as arch
from . import scenes as S

log = logging.getLogger(__name__)

SHARES = {"vae": 0.22, "base": 0.62, "refiner": 0.10}  # of --minutes; the rest: encoding, checks, saving
OFFSET_NOISE = 0.1
MIN_SNR_GAMMA = 5.0
DROPOUT = 0.12
REFINER_T_MAX = 200  # SDXL's refiner: the last 20 % of the 1000 training timesteps
TIME_IDS = (S.SIZE, S.SIZE, 0, 0, S.SIZE, S.SIZE)  # original size, crop top-left, target size


class Progress:
    """One status line per stage: step, elapsed / budget, loss (running mean), ETA; a new line every 30 s when
    stderr is not a terminal."""

    def __init__(self, stage: str, seconds: float, max_steps: int | None):
        self.stage, self.seconds, self.max_steps = stage, seconds, max_steps
        self.start = time.perf_counter()
        self.loss = None
        self.last_line = 0.0
        self.tty = sys.stderr.isatty()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def done(self, step: int) -> bool:
        if self.max_steps is not None:
            return step >= self.max_steps
        return self.elapsed() >= self.seconds

    def update(self, step: int, loss: float) -> None:
        self.loss = loss if self.loss is None else 0.98 * self.loss + 0.02 * loss
        now = self.elapsed()
        if self.max_steps is not None:
            frac = step / max(1, self.max_steps)
        else:
            frac = min(1.0, now / max(1e-9, self.seconds))
        eta = now / frac - now if frac > 0 else float("nan")
        bar = "#" * int(20 * frac) + "-" * (20 - int(20 * frac))
        line = (f"[{self.stage:7s}] |{bar}| step {step:5d}  {_mmss(now)} elapsed  loss {self.loss:.4f}  "
                f"ETA {_mmss(eta)}  ({now / max(1, step):.2f} s/step)")
        if self.tty:
            sys.stderr.write("\r" + line)
            sys.stderr.flush()
        elif now - self.last_line >= 30 or step == 1:
            sys.stderr.write(line + "\n")
            sys.stderr.flush()
            self.last_line = now

    def close(self) -> None:
        if self.tty:
            sys.stderr.write("\n")


def _mmss(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "--:--"
    return f"{int(seconds) // 60:02d}:{int(seconds) % 60:02d}"


def lr_at(base: float, frac: float, warm: float = 0.03) -> float:
    """Linear warm-up, then cosine decay to 10 % over the stage's budget (time or steps)."""
    if frac < warm:
        return base * max(0.05, frac / warm)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, (frac - warm) / (1 - warm)))))


def fraction(progress: Progress, step: int) -> float:
    if progress.max_steps is not None:
        return step / max(1, progress.max_steps)
    return progress.elapsed() / max(1e-9, progress.seconds)


class EMA:
    def __init__(self, modules: list, decay: float = 0.999):
        self.modules = modules
        self.shadow = [copy.deepcopy(m).eval().requires_grad_(False) for m in modules]
        self.decay, self.updates = decay, 0

    def update(self) -> None:
        import torch

        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        with torch.no_grad():
            for live, shadow in zip(self.modules, self.shadow):
                for p_live, p_shadow in zip(live.parameters(), shadow.parameters()):
                    p_shadow.lerp_(p_live.detach(), 1 - decay)


# ---------------------------------------------------------------- data

def to_tensor(images: np.ndarray):
    import torch

    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def vae_batch(rng: np.random.Generator, batch: int, crop: int):
    """Crops around the shape (3 of 4) or anywhere (1 of 4), with each pixel's loss weight."""
    images, weights = [], []
    for _ in range(batch):
        scene = S.sample_scene(rng)
        image, mask = S.render(scene, rng)
        if crop < S.SIZE:
            if rng.random() < 0.75:
                ys, xs = np.nonzero(mask)
                cy, cx = int(ys.mean()), int(xs.mean())
                y0 = int(np.clip(cy - crop // 2 + rng.integers(-crop // 4, crop // 4 + 1), 0, S.SIZE - crop))
                x0 = int(np.clip(cx - crop // 2 + rng.integers(-crop // 4, crop // 4 + 1), 0, S.SIZE - crop))
            else:
                y0, x0 = (int(v) for v in rng.integers(0, S.SIZE - crop + 1, size=2))
            image, mask = image[y0:y0 + crop, x0:x0 + crop], mask[y0:y0 + crop, x0:x0 + crop]
        shape_px = max(1, int(mask.sum()))
        ratio = min(20.0, (mask.size - shape_px) / shape_px)
        weights.append(1.0 + mask * ratio)
        images.append(image)
    import torch

    return to_tensor(np.stack(images)), torch.from_numpy(np.stack(weights)).float()[:, None]


def _reconstruction_check(vae, n: int = 48, seed: int = 4321) -> dict[str, int]:
    """How many of n scenes the reader still reads right after encode → decode."""
    import torch

    rng = np.random.default_rng(seed)
    scenes = S.eval_scenes(n, seed=seed)
    images = np.stack([S.render(s, rng)[0] for s in scenes])
    with torch.no_grad():
        recon = []
        for i in range(0, n, 16):
            x = to_tensor(images[i:i + 16])
            recon.append(vae.decode(vae.encode(x).latent_dist.mean).sample)
        recon = torch.cat(recon)
    pictures = ((recon.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    right = {a: 0 for a in S.ATTRIBUTES}
    for scene, picture in zip(scenes, pictures):
        for attr, ok in S.read_scene(picture).matches(scene).items():
            right[attr] += int(ok)
    return right


def train_vae(vae, rng, seconds: float, max_steps: int | None, batch: int = 32, crop: int = 64) -> dict:
    import torch

    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, betas=(0.9, 0.99), weight_decay=0.0)
    progress, step, checks = Progress("vae", seconds, max_steps), 0, []
    next_check = 0.25
    vae.train()
    while not progress.done(step):
        for group in opt.param_groups:
            group["lr"] = lr_at(1e-3, fraction(progress, step))
        x, w = vae_batch(rng, batch, crop)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            posterior = vae.encode(x).latent_dist
            recon = vae.decode(posterior.sample()).sample.float()
        err = recon - x
        loss = ((err.abs() + err.pow(2)) * w).sum() / (w.sum() * 3) + 1e-6 * posterior.kl().float().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        step += 1
        progress.update(step, float(loss))
        if max_steps is None and fraction(progress, step) >= next_check:
            next_check += 0.25
            vae.eval()
            right = _reconstruction_check(vae)
            vae.train()
            checks.append({"step": step, **right})
            log.info("VAE step %d: reconstructions read right of 48: %s", step, right)
    progress.close()
    vae.eval()
    right = _reconstruction_check(vae)
    log.info("VAE done, %d steps in %.0f s: reconstructions read right of 48: %s", step, progress.elapsed(), right)
    return {"steps": step, "seconds": round(progress.elapsed(), 1), "reconstruction_of_48": right,
            "checks": checks}


def encode_dataset(vae, rng, n: int):
    """n training scenes (never a held-out pair), their posterior means, and the latent scaling factor."""
    import torch

    scenes, latents = [], []
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(0, n, 64):
            chunk = [S.sample_scene(rng) for _ in range(min(64, n - i))]
            x = to_tensor(np.stack([S.render(s, rng)[0] for s in chunk]))
            with torch.autocast("cpu", dtype=torch.bfloat16):
                mean = vae.encode(x).latent_dist.mean
            latents.append(mean.float())
            scenes.extend(chunk)
    latents = torch.cat(latents)
    scale = float(1.0 / latents.std())
    log.info("encoded %d scenes in %.0f s; latent std %.3f -> scaling_factor %.4f", n,
             time.perf_counter() - start, 1 / scale, scale)
    return scenes, latents * scale, scale


def encode_text(tokenizer, te1, te2, captions):
    """What StableDiffusionXLPipeline.encode_prompt computes: both encoders' penultimate hidden states,
    concatenated, and text encoder 2's projected pooled output."""
    import torch

    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    h1 = te1(ids, output_hidden_states=True).hidden_states[-2]
    out2 = te2(ids, output_hidden_states=True)
    return torch.cat([h1, out2.hidden_states[-2]], dim=-1), out2.text_embeds


def _noised(latents, alphas_cumprod, t, rng_torch):
    import torch

    noise = torch.randn(latents.shape, generator=rng_torch)
    noise = noise + OFFSET_NOISE * torch.randn(latents.shape[0], latents.shape[1], 1, 1, generator=rng_torch)
    ab = alphas_cumprod[t].view(-1, 1, 1, 1)
    return ab.sqrt() * latents + (1 - ab).sqrt() * noise, noise, ab.view(-1)


def _loss(pred, latents, noise, ab):
    """v-prediction loss, per-sample weight min(SNR + 1, γ + 1) / (SNR + 1).

    In terms of the clean-latent error the weight is min(SNR + 1, γ + 1): at least 1 everywhere, so the
    high-noise steps — where the layout (where the shape goes) is decided from the prompt alone — keep full
    weight, and the low-noise steps are capped as Min-SNR does (Hang et al. 2023). With ε-prediction (weight SNR
    on that error, ~0.005 at the first sampling step) the first run learned colours, shapes and backgrounds but
    took the position from the noise: 4 of 24 prompts placed right.
    """
    a = ab.view(-1, 1, 1, 1)
    target = a.sqrt() * noise - (1 - a).sqrt() * latents
    snr = ab / (1 - ab)
    weight = (snr + 1).clamp(max=MIN_SNR_GAMMA + 1) / (snr + 1)
    return (weight * (pred - target).pow(2).mean(dim=(1, 2, 3))).mean()


def _captions(scenes, rng, indices):
    """Fresh captions each time; DROPOUT of them dropped: 'zeros' or '' (the two unconditional inputs)."""
    captions, zero = [], []
    for i in indices:
        r = rng.random()
        if r < DROPOUT / 2:
            captions.append(""), zero.append(True)
        elif r < DROPOUT:
            captions.append(""), zero.append(False)
        else:
            captions.append(S.caption(scenes[i], rng)), zero.append(False)
    return captions, zero


def train_base(tokenizer, te1, te2, unet, scenes, latents, alphas_cumprod, rng, seconds, max_steps, batch=64,
               check=None) -> tuple[dict, EMA]:
    import torch

    modules = [te1, te2, unet]
    params = [p for m in modules for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.99), weight_decay=0.01)
    ema = EMA(modules)
    gen = torch.Generator().manual_seed(int(rng.integers(1 << 31)))
    time_ids = torch.tensor([TIME_IDS], dtype=torch.float32).repeat(batch, 1)
    progress, step, checks, next_check = Progress("base", seconds, max_steps), 0, [], 0.34
    for m in modules:
        m.train()
    while not progress.done(step):
        for group in opt.param_groups:
            group["lr"] = lr_at(1e-3, fraction(progress, step))
        idx = rng.integers(len(scenes), size=batch)
        captions, zero = _captions(scenes, rng, idx)
        embeds, pooled = encode_text(tokenizer, te1, te2, captions)
        keep = torch.tensor([0.0 if z else 1.0 for z in zero])
        embeds, pooled = embeds * keep.view(-1, 1, 1), pooled * keep.view(-1, 1)
        t = torch.randint(0, 1000, (batch,), generator=gen)
        clean = latents[torch.from_numpy(idx)]
        noisy, noise, ab = _noised(clean, alphas_cumprod, t, gen)
        pred = unet(noisy, t, embeds, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        loss = _loss(pred, clean, noise, ab)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema.update()
        step += 1
        progress.update(step, float(loss))
        if check is not None and max_steps is None and fraction(progress, step) >= next_check:
            next_check += 0.33
            result = check(ema.shadow)
            checks.append({"step": step, **result})
            log.info("base step %d (EMA weights): %s", step, result)
    progress.close()
    log.info("base done: %d steps in %.0f s, loss %.4f", step, progress.elapsed(), progress.loss or float("nan"))
    return {"steps": step, "seconds": round(progress.elapsed(), 1), "loss": round(progress.loss or 0, 5),
            "checks": checks}, ema


def train_refiner(tokenizer, te2, refiner_unet, scenes, latents, alphas_cumprod, rng, seconds, max_steps,
                  batch=64) -> tuple[dict, EMA]:
    import torch

    opt = torch.optim.AdamW(refiner_unet.parameters(), lr=1e-3, betas=(0.9, 0.99), weight_decay=0.01)
    ema = EMA([refiner_unet])
    gen = torch.Generator().manual_seed(int(rng.integers(1 << 31)))
    progress, step = Progress("refiner", seconds, max_steps), 0
    refiner_unet.train()
    te2.eval()
    while not progress.done(step):
        for group in opt.param_groups:
            group["lr"] = lr_at(1e-3, fraction(progress, step))
        idx = rng.integers(len(scenes), size=batch)
        captions, _ = _captions(scenes, rng, idx)
        with torch.no_grad():
            ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                            truncation=True, return_tensors="pt").input_ids
            out = te2(ids, output_hidden_states=True)
        # The refiner pipeline conditions on aesthetic score 6 and its negative branch on 2.5.
        score = torch.tensor([2.5 if c == "" else 6.0 for c in captions]).view(-1, 1)
        time_ids = torch.cat([torch.tensor([[S.SIZE, S.SIZE, 0, 0]], dtype=torch.float32).repeat(batch, 1), score], 1)
        t = torch.randint(0, REFINER_T_MAX, (batch,), generator=gen)
        clean = latents[torch.from_numpy(idx)]
        noisy, noise, ab = _noised(clean, alphas_cumprod, t, gen)
        pred = refiner_unet(noisy, t, out.hidden_states[-2],
                            added_cond_kwargs={"text_embeds": out.text_embeds, "time_ids": time_ids}).sample
        loss = _loss(pred, clean, noise, ab)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(refiner_unet.parameters(), 1.0)
        opt.step()
        ema.update()
        step += 1
        progress.update(step, float(loss))
    progress.close()
    log.info("refiner done: %d steps in %.0f s, loss %.4f", step, progress.elapsed(), progress.loss or float("nan"))
    return {"steps": step, "seconds": round(progress.elapsed(), 1), "loss": round(progress.loss or 0, 5)}, ema


# ---------------------------------------------------------------- pipelines

def make_pipelines(tokenizer, te1, te2, unet, vae, refiner_unet=None):
    from diffusers import EulerDiscreteScheduler

    config = arch.scheduler_config()
    ddim_only = {k: config.pop(k) for k in ("clip_sample", "set_alpha_to_one")}
    scheduler = EulerDiscreteScheduler(**config)
    scheduler.register_to_config(**ddim_only)  # kept in the saved config for DDIM (the service's samplers)
    modules = dict(te1=te1, te2=te2, unet=unet, vae=vae, refiner_unet=refiner_unet)
    return assemble(modules, tokenizer, scheduler)


def adherence(base, scenes, seed: int = 0, steps: int = 20, guidance: float = 7.0, batch: int = 16) -> dict:
    """Generate each scene's canonical prompt and read the picture back: right answers per attribute."""
    import torch

    right = {a: 0 for a in S.ATTRIBUTES}
    for i in range(0, len(scenes), batch):
        chunk = scenes[i:i + batch]
        generators = [torch.Generator().manual_seed(seed + i + k) for k in range(len(chunk))]
        with torch.no_grad():
            images = base(prompt=[S.prompt_for(s) for s in chunk], num_inference_steps=steps,
                          guidance_scale=guidance, generator=generators, width=S.SIZE, height=S.SIZE).images
        for scene, image in zip(chunk, images):
            for attr, ok in S.read_scene(image).matches(scene).items():
                right[attr] += int(ok)
    return {a: f"{v}/{len(scenes)}" for a, v in right.items()}


def save(out: Path, tokenizer, te1, te2, unet, vae, refiner_unet, dtype: str = "float16") -> int:
    """Write the diffusers folders (base in ``out``, refiner in ``out/refiner``); returns their bytes."""
    import torch

    half = getattr(torch, dtype)
    copies = [copy.deepcopy(m).to(half) for m in (te1, te2, unet, vae)]
    refiner_copy = copy.deepcopy(refiner_unet).to(half) if refiner_unet is not None else None
    base, refiner = make_pipelines(tokenizer, *copies, refiner_unet=refiner_copy)
    base.save_pretrained(out, safe_serialization=True)
    if refiner is not None:
        refiner.save_pretrained(out / "refiner", safe_serialization=True)
    return sum(p.stat().st_size for p in out.rglob("*") if p.is_file() and ".train" not in p.parts)


def _vae_stage(vae, ckpt: Path, rng, budget: float, resume: bool, smoke: bool):
    """(report, rng) of the VAE stage: trained and checkpointed, or with ``resume`` read back from ``ckpt``."""
    import torch

    if resume and ckpt.is_file():
        saved = torch.load(ckpt, weights_only=False)
        vae.load_state_dict(saved["state"])
        log.info("resumed the VAE from %s", ckpt)
        return saved["report"], saved["rng"]
    report = train_vae(vae, rng, SHARES["vae"] * budget, 3 if smoke else None, batch=4 if smoke else 32)
    torch.save({"state": vae.state_dict(), "report": report, "rng": rng}, ckpt)
    return report, rng


def alphas_cumprod_of_demo():
    """The training noise schedule's cumulative alphas (the demo model's scheduler config, as DDPM reads it)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(**{k: v for k, v in arch.scheduler_config().items()
                            if k not in ("timestep_spacing", "steps_offset", "set_alpha_to_one")}).alphas_cumprod


def train(out: str | Path, minutes: float = 75.0, seed: int = 0, resume: bool = False, smoke: bool = False,
          threads: int = 0) -> dict:
    """Train all stages within about ``minutes`` on CPU and write the folder. ``smoke``: a few steps of each
    stage on a tiny dataset (seconds; for CI), same code path."""
    import torch

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state_dir = out / ".train"
    state_dir.mkdir(exist_ok=True)
    if threads:
        torch.set_num_threads(threads)
    start = time.perf_counter()
    budget = minutes * 60
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    tokenizer = arch.build_tokenizer()
    c = arch.build_components(torch, tokenizer)
    report: dict = {"seed": seed, "minutes": minutes, "smoke": smoke, "threads": torch.get_num_threads()}

    report["vae"], rng = _vae_stage(c["vae"], state_dir / "vae.pt", rng, budget, resume, smoke)
    vae = c["vae"].eval().requires_grad_(False)

    scenes, latents, scale = encode_dataset(vae, rng, 64 if smoke else 12288)
    vae.register_to_config(scaling_factor=round(scale, 5))
    report["scaling_factor"] = round(scale, 5)
    alphas_cumprod = alphas_cumprod_of_demo()

    check_scenes = S.eval_scenes(16, seed=99)

    def check(shadow):
        te1_e, te2_e, unet_e = shadow
        base, _ = make_pipelines(tokenizer, te1_e, te2_e, unet_e, vae)
        return adherence(base, check_scenes)

    base_ckpt = state_dir / "base.pt"
    if resume and base_ckpt.is_file():
        saved = torch.load(base_ckpt, weights_only=False)
        for key in ("te1", "te2", "unet"):
            c[key].load_state_dict(saved[key])
        report["base"] = saved["report"]
        rng = saved["rng"]
        log.info("resumed the base from %s", base_ckpt)
    else:
        remaining = budget - (time.perf_counter() - start)
        base_s = min(SHARES["base"] * budget, remaining - (SHARES["refiner"] + 0.03) * budget)
        report["base"], ema = train_base(tokenizer, c["te1"], c["te2"], c["unet"], scenes, latents, alphas_cumprod,
                                         rng, base_s, 2 if smoke else None, batch=4 if smoke else 64,
                                         check=None if smoke else check)
        for key, module in zip(("te1", "te2", "unet"), ema.shadow):
            c[key] = module
        torch.save({"te1": c["te1"].state_dict(), "te2": c["te2"].state_dict(), "unet": c["unet"].state_dict(),
                    "report": report["base"], "rng": rng}, base_ckpt)
    te1, te2, unet = (c[k].eval().requires_grad_(False) for k in ("te1", "te2", "unet"))

    remaining = budget - (time.perf_counter() - start)
    refiner_s = max(30.0, min(SHARES["refiner"] * budget, remaining - 60))
    report["refiner"], ema = train_refiner(tokenizer, te2, c["refiner_unet"], scenes, latents, alphas_cumprod, rng,
                                           refiner_s, 2 if smoke else None, batch=4 if smoke else 64)
    refiner_unet = ema.shadow[0]

    if not smoke:
        base, _ = make_pipelines(tokenizer, te1, te2, unet, vae)
        report["final_check_16"] = adherence(base, check_scenes)
        log.info("final check (16 prompts, Euler 20 steps, guidance 7): %s", report["final_check_16"])
    report["bytes"] = save(out, tokenizer, te1, te2, unet, vae, refiner_unet)
    report["total_s"] = round(time.perf_counter() - start, 1)
    report["parameters"] = {k: sum(p.numel() for p in m.parameters())
                            for k, m in (("text_encoder", te1), ("text_encoder_2", te2), ("unet", unet),
                                         ("vae", vae), ("refiner_unet", refiner_unet))}
    (out / "training.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    log.info("wrote %s (%.1f MB) in %.1f min", out, report["bytes"] / 1e6, report["total_s"] / 60)
    return report
