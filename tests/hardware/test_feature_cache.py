"""DeepCache-style feature caching (sdxl_ui/optimizations/feature_cache.py), on the tiny random model (exactness,
shapes, step counting) and on the trained demo model (picture quality, judged by the scene reader)."""
from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from sdxl_ui.optimizations import feature_cache as fc  # noqa: E402

STEPS = 10
CALL = dict(prompt="a red circle on a blue background", width=64, height=64, guidance_scale=5.0,
            output_type="latent")


@pytest.fixture(autouse=True)
def _clean(tiny):
    yield
    for pipe in tiny.values():  # a failing test must not leave a cache on the shared pipelines
        fc.disable(pipe)


def _noise(rows: int, seed: int = 0):
    return torch.randn(rows, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


def _run(pipe, images: int = 1, steps: int = STEPS, latents=None, **extra):
    """Latents out. The base starts from explicit noise, the refiner from explicit latents at 0.5 (no noise is
    added with denoising_start), so row i of an N-image call has the same start as a 1-image call on row i."""
    latents = _noise(images) if latents is None else latents
    with torch.no_grad():
        if not _is_refiner(pipe):
            return pipe(latents=latents.clone(), num_images_per_prompt=images, num_inference_steps=steps,
                        **CALL, **extra).images
        return pipe(image=latents.clone(), denoising_start=0.5, num_images_per_prompt=images,
                    num_inference_steps=steps, **CALL, **extra).images


def _is_refiner(pipe) -> bool:
    from diffusers import StableDiffusionXLImg2ImgPipeline

    return isinstance(pipe, StableDiffusionXLImg2ImgPipeline)


def _unet_inputs(unet, rows: int, seed: int, side: int = 8):
    """Random UNet inputs like a tiny pipeline's: pooled text 32 wide, 6 (base) or 5 (refiner) time ids."""
    g = torch.Generator().manual_seed(seed)
    time_ids = (unet.config.projection_class_embeddings_input_dim - 32) // unet.config.addition_time_embed_dim
    return dict(sample=torch.randn(rows, 4, side, side, generator=g), timestep=torch.tensor(601.0),
                encoder_hidden_states=torch.randn(rows, 7, unet.config.cross_attention_dim, generator=g),
                added_cond_kwargs={"text_embeds": torch.randn(rows, 32, generator=g),
                                   "time_ids": torch.randn(rows, time_ids, generator=g) * 100})


def _with_deep_feature(unet, branch: int, inputs: dict, feature):
    """Reference for a cached step, from the untouched UNet: its own forward on ``inputs`` with the input of
    up_blocks[L - branch] replaced by ``feature`` (what DeepCache computes, the slow way)."""
    block = unet.up_blocks[len(unet.up_blocks) - branch]

    def swap(module, args, kwargs):
        return args, {**kwargs, "hidden_states": feature}

    handle = block.register_forward_pre_hook(swap, with_kwargs=True)
    try:
        with torch.no_grad():
            return unet(**inputs).sample
    finally:
        handle.remove()


def _deep_feature(unet, branch: int, inputs: dict):
    block = unet.up_blocks[len(unet.up_blocks) - branch]
    kept = {}

    def keep(module, args, kwargs):
        kept["f"] = kwargs["hidden_states"].clone()

    handle = block.register_forward_pre_hook(keep, with_kwargs=True)
    try:
        with torch.no_grad():
            out = unet(**inputs).sample
    finally:
        handle.remove()
    return kept["f"], out


# ---------------------------------------------------------------------- the shallow branch, exactly

CASES = [(which, branch, side, rows) for which, top in (("base", 2), ("refiner", 3)) for branch in range(1, top + 1)
         for side, rows in ((8, 2), (6, 8))]  # 6: a latent side the UNet's downsampling does not divide


@pytest.mark.parametrize("which,branch,side,rows", CASES)
def test_cached_step_is_the_full_forward_with_the_kept_deep_feature(tiny, which, branch, side, rows):
    unet = tiny[which].unet
    first, second = _unet_inputs(unet, rows, 1, side), _unet_inputs(unet, rows, 2, side)
    feature, full_first = _deep_feature(unet, branch, first)
    expected = _with_deep_feature(unet, branch, second, feature)
    with torch.no_grad():
        plain_second = unet(**second).sample
    cache = fc.enable(unet, interval=3, branch=branch)
    with torch.no_grad():
        out_first = unet(**first).sample
        out_second = unet(**second, return_dict=False)[0]
        again = unet(**second).sample  # 2nd cached call: the kept feature must not have been modified
    assert cache.run.trace == "FCC"
    assert torch.equal(out_first, full_first)  # a full step is the UNet's own forward
    assert torch.equal(out_second, expected)   # a cached step: shallow branch on new inputs + kept deep feature
    assert torch.equal(again, expected)
    assert not torch.allclose(out_second, plain_second, atol=1e-3)  # ...and it really reused the old feature


def test_half_batch_keeps_the_conditional_rows_or_recomputes(tiny):
    """Guidance dropped mid-run: the kept [uncond × N, cond × N] feature serves the N conditional rows."""
    unet, n = tiny["base"].unet, 3
    full = _unet_inputs(unet, 2 * n, 1)
    cond = {k: (v if k == "timestep" else
                {kk: vv[n:] for kk, vv in v.items()} if isinstance(v, dict) else v[n:])
            for k, v in _unet_inputs(unet, 2 * n, 2).items()}
    feature, plain_full = _deep_feature(unet, 1, full)
    expected = _with_deep_feature(unet, 1, cond, feature[n:])
    with torch.no_grad():
        plain = unet(**cond).sample
        cache = fc.enable(unet, interval=4, branch=1)
        unet(**full)
        assert torch.equal(unet(**cond).sample, expected)
        assert cache.run.trace == "FC"
        fc.enable(unet, interval=4, branch=1, on_half_batch="recompute")
        unet(**full)
        assert torch.equal(unet(**cond).sample, plain)
        assert cache.run.trace == "FR"
        # More rows than were kept (the guidance interval's head ends): always a full step.
        fc.enable(unet, interval=4, branch=1)
        unet(**cond)
        assert torch.equal(unet(**full).sample, plain_full)
        assert cache.state()["forced_full_steps"] == 1 and cache.run.trace == "FR"


# ---------------------------------------------------------------------- whole pipelines

@pytest.mark.parametrize("which", ["base", "refiner"])
@pytest.mark.parametrize("images", [1, 3])
def test_interval_1_is_bit_exact(tiny, which, images):
    pipe = tiny[which]
    plain = _run(pipe, images)
    with fc.cached(pipe, interval=1) as cache:
        out = _run(pipe, images)
        state = cache.state()
    assert torch.equal(out, plain)
    assert state["exact"] and state["full_steps"] == state["calls"] > 0 and state["cached_steps"] == 0


@pytest.mark.parametrize("which", ["base", "refiner"])
def test_interval_3_runs_the_scheduled_full_steps_and_reports_them(tiny, which):
    pipe = tiny[which]
    plain = _run(pipe)
    cache = fc.enable(pipe, interval=3, branch=1)
    out = _run(pipe)
    calls = cache.run.calls
    assert calls == pipe.num_timesteps == (STEPS if which == "base" else STEPS // 2)  # the refiner starts half way
    assert cache.run.trace == ("FCC" * calls)[:calls]
    state = fc.state(pipe)  # read back from the live pipeline, as a report row will
    assert state["enabled"] and state["interval"] == 3 and state["branch"] == 1 and not state["exact"]
    assert state["full_steps"] == math.ceil(calls / 3) and state["cached_steps"] == calls - math.ceil(calls / 3)
    assert torch.isfinite(out).all() and not torch.equal(out, plain)
    fc.disable(pipe)
    assert fc.state(pipe) == {"enabled": False}


def test_karras_schedule_with_repeated_timesteps_counts_calls_not_timesteps(tiny):
    from diffusers import DPMSolverMultistepScheduler

    pipe = tiny["base"]
    scheduler = pipe.scheduler
    # The app's DPM++ 2M Karras: at 45 steps two steps share timestep 1.
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(scheduler.config, algorithm_type="dpmsolver++",
                                                             solver_order=2, use_karras_sigmas=True)
    try:
        probe = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
        probe.set_timesteps(45)
        timesteps = probe.timesteps.tolist()
        assert len(set(timesteps)) < len(timesteps), "the schedule must repeat a timestep for this test"
        cache = fc.enable(pipe, interval=3)
        out = _run(pipe, steps=45)
        assert cache.run.trace == "FCC" * 15
        assert cache.state()["full_steps"] == 15 and cache.state()["cached_steps"] == 30
        assert torch.isfinite(out).all()
    finally:
        pipe.scheduler = scheduler


@pytest.mark.parametrize("which", ["base", "refiner"])
def test_each_image_of_a_call_is_the_image_of_its_own_call(tiny, which):
    """1-4 images per call (CFG batch 2-8): image i is what a 1-image call from the same start gives."""
    pipe = tiny[which]
    fc.enable(pipe, interval=3)
    starts = _noise(4, seed=5)
    alone = []
    for i in range(4):
        fc.reset(pipe)
        alone.append(_run(pipe, 1, latents=starts[i:i + 1]))
    for images in (2, 3, 4):
        fc.reset(pipe)
        out = _run(pipe, images, latents=starts[:images])
        for i in range(images):
            # Not bit-exact: CPU kernels block a batch of 2 differently from one of 8 (~1e-5 here); a row mix-up
            # is O(1).
            torch.testing.assert_close(out[i:i + 1], alone[i], atol=2e-4, rtol=0)


def test_reset_starts_a_new_run_and_keeps_the_last_runs_counts(tiny):
    pipe = tiny["base"]
    cache = fc.enable(pipe, interval=3)
    first = _run(pipe)
    stale = _run(pipe)  # no reset: the same run goes on, its first call reuses the last call's deep feature
    assert cache.run.trace == "FCCFCCFCCF" + "CCFCCFCCFC"
    fc.reset(pipe)
    again = _run(pipe)
    assert torch.equal(again, first) and not torch.equal(stale, first)
    assert cache.run.trace == "FCCFCCFCCF" and cache.state()["full_steps"] == 4
    assert cache.previous_run.calls == 2 * STEPS and cache.state()["previous_run"]["full_steps"] == 7
    with fc.cached(pipe, interval=3):  # the context manager starts a run too
        assert torch.equal(_run(pipe), first)
    # ...and put back the settings it found.
    assert fc.get(pipe) is cache and cache.interval == 3 and cache.enabled


def test_disable_restores_the_original_forward_exactly(tiny):
    pipe = tiny["base"]
    unet = pipe.unet
    plain = _run(pipe)
    fc.enable(pipe, interval=2, branch=2)
    fc.enable(pipe, interval=3, branch=1)  # reconfiguring moves the capture hook, it does not stack
    assert sum(len(block._forward_pre_hooks) for block in unet.up_blocks) == 1
    assert fc.disable(pipe)
    assert "forward" not in unet.__dict__ and fc.get(pipe) is None
    assert unet.forward.__func__ is type(unet).forward
    assert all(not block._forward_pre_hooks for block in unet.up_blocks)
    assert torch.equal(_run(pipe), plain)
    assert not fc.disable(pipe)

    # An instance-level forward (what accelerate's offload hooks install) is kept under the cache and put back.
    calls = []

    def wrapper(*args, **kwargs):
        calls.append(1)
        return type(unet).forward(unet, *args, **kwargs)

    unet.forward = wrapper
    try:
        fc.enable(pipe, interval=2)
        _run(pipe)
        assert len(calls) == STEPS // 2  # full steps go through it; cached steps run the blocks directly
        fc.disable(pipe)
        assert unet.__dict__["forward"] is wrapper
    finally:
        del unet.forward


def test_bad_settings_are_refused(tiny):
    unet = tiny["base"].unet
    for kwargs in ({"interval": 0}, {"interval": 2.0}, {"branch": 0}, {"branch": 3}, {"on_half_batch": "mix"}):
        with pytest.raises(ValueError):
            fc.enable(unet, **{"interval": 3, **kwargs})
        assert "forward" not in unet.__dict__
    with pytest.raises(TypeError):
        fc.enable(torch.nn.Linear(2, 2))

# Picture quality on the trained demo model: tests/test_less_work.py judges the presets through the service.
