"""Guidance only inside an interval of the schedule (sdxl_ui/optimizations/guidance_interval.py), on the tiny random
model (exactness, batch layout for 1-4 images, counts, with the feature cache) and on the trained demo model
(picture quality, judged by the scene reader)."""
from __future__ import annotations

import contextlib
import math

import pytest

torch = pytest.importorskip("torch")

from sdxl_ui.optimizations import feature_cache as fc  # noqa: E402
from sdxl_ui.optimizations.guidance_interval import GuidanceInterval, evaluations, guided_steps  # noqa: E402

STEPS = 10
GUIDANCE = 5.0
CALL = dict(prompt="a red circle on a blue background", width=64, height=64, output_type="latent")


@pytest.fixture(autouse=True)
def _clean(tiny):
    yield
    for pipe in tiny.values():
        fc.disable(pipe)
        pipe._interrupt = False


def _is_refiner(pipe) -> bool:
    from diffusers import StableDiffusionXLImg2ImgPipeline

    return isinstance(pipe, StableDiffusionXLImg2ImgPipeline)


def _noise(rows: int, seed: int = 0):
    return torch.randn(rows, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


def _run(pipe, images: int = 1, latents=None, guidance_scale: float = GUIDANCE, **extra):
    """Latents out. The base starts from explicit noise; the refiner (an img2img pipeline whose time ids carry the
    aesthetic score, 6 conditional vs 2.5 unconditional) from explicit latents at 0.5 (no noise added)."""
    latents = _noise(images) if latents is None else latents
    with torch.no_grad():
        if _is_refiner(pipe):
            return pipe(image=latents.clone(), denoising_start=0.5, num_images_per_prompt=images,
                        num_inference_steps=STEPS, guidance_scale=guidance_scale, **CALL, **extra).images
        return pipe(latents=latents.clone(), num_images_per_prompt=images, num_inference_steps=STEPS,
                    guidance_scale=guidance_scale, **CALL, **extra).images


@contextlib.contextmanager
def _rows_seen(unet):
    """The batch size of every UNet call (registered after the interval's hooks: it sees what the UNet gets)."""
    rows = []
    handle = unet.register_forward_pre_hook(
        lambda module, args, kwargs: rows.append((args[0] if args else kwargs["sample"]).shape[0]), with_kwargs=True)
    try:
        yield rows
    finally:
        handle.remove()


@contextlib.contextmanager
def _reference(unet, schedule):
    """Plain CFG, but on unguided steps the unconditional half of the UNet's output is replaced by the conditional
    half, so the pipeline's uncond + g·(cond − uncond) is cond: the full 2N-row batch, no halving of anything."""
    calls = []

    def hook(module, args, kwargs, output):
        step = len(calls)
        calls.append(step)
        if schedule[step]:
            return None
        out = output[0]
        half = out.shape[0] // 2
        return (torch.cat([out[half:], out[half:]]),)

    handle = unet.register_forward_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


# ---------------------------------------------------------------------- exactness

@pytest.mark.parametrize("which", ["base", "refiner"])
@pytest.mark.parametrize("images", [1, 4])
@pytest.mark.parametrize("attach", [False, True])
def test_the_whole_schedule_is_plain_cfg_bit_exact(tiny, which, images, attach):
    pipe = tiny[which]
    plain = _run(pipe, images)
    interval = GuidanceInterval(0.0, 1.0)
    with interval.attached(pipe) if attach else contextlib.nullcontext():
        out = _run(pipe, images, callback_on_step_end=interval)
    n = pipe.num_timesteps
    assert torch.equal(out, plain)
    assert interval.stats() == {"cfg": True, "steps": n, "guided_steps": n, "unguided_steps": 0, "images": images,
                                "evaluations": 2 * images * n, "evaluations_saved": 0, "fraction_saved": 0.0}


INTERVALS = [(0.0, 0.6), (0.3, 1.0), (0.2, 0.7), (0.5, 0.5)]  # tail, head, both, nothing guided


@pytest.mark.parametrize("which", ["base", "refiner"])
@pytest.mark.parametrize("start,stop", INTERVALS)
def test_unguided_steps_run_only_the_conditional_rows_for_1_to_4_images(tiny, which, start, stop):
    pipe = tiny[which]
    for images in (1, 2, 4):
        plain = _run(pipe, images)
        n = pipe.num_timesteps
        schedule = guided_steps(n, start, stop)
        with _reference(pipe.unet, schedule):
            expected = _run(pipe, images)
        interval = GuidanceInterval(start, stop)
        with interval.attached(pipe), _rows_seen(pipe.unet) as rows:
            out = _run(pipe, images, callback_on_step_end=interval)
        assert rows == [2 * images if guided else images for guided in schedule]
        # The same predictions from half the rows: equal up to CPU kernels blocking 2N rows unlike N (~1e-5).
        torch.testing.assert_close(out, expected, atol=2e-4, rtol=0)
        assert not torch.allclose(expected, plain, atol=1e-2)  # dropping guidance does change the picture
        evaluated, saved = evaluations(n, images, start, stop)
        stats = interval.stats()
        assert stats["evaluations"] == evaluated == sum(rows) and stats["evaluations_saved"] == saved > 0
        assert interval.evaluations_saved == saved
        assert stats["unguided_steps"] == n - sum(schedule) and stats["images"] == images
        assert pipe.guidance_scale == GUIDANCE  # the pipeline's own setting is back after the run


@pytest.mark.parametrize("which", ["base", "refiner"])
def test_one_image_matches_diffusers_cutoff_callback_which_breaks_with_two(tiny, which):
    from diffusers.callbacks import SDXLCFGCutoffCallback

    pipe = tiny[which]
    _run(pipe)
    cut = math.ceil(0.6 * pipe.num_timesteps)  # first unguided step
    ours = _run(pipe, callback_on_step_end=GuidanceInterval(0.0, 0.6))
    theirs = _run(pipe, callback_on_step_end=SDXLCFGCutoffCallback(cutoff_step_ratio=None,
                                                                    cutoff_step_index=cut - 1))
    assert torch.equal(ours, theirs)
    # Why ours: diffusers 0.42 keeps the last row ([-1:]), one row for N images.
    with pytest.raises(RuntimeError):
        _run(pipe, 2, callback_on_step_end=SDXLCFGCutoffCallback(cutoff_step_ratio=None, cutoff_step_index=cut - 1))


@pytest.mark.parametrize("which", ["base", "refiner"])
def test_with_the_feature_cache_each_image_is_the_image_of_its_own_call(tiny, which):
    """Head and tail dropped, feature cache at interval 3: the cache recomputes when the batch doubles (head →
    guided) and keeps the conditional half when it halves (guided → tail); image i of an N-image call is what a
    1-image call from the same start gives."""
    pipe = tiny[which]
    starts = _noise(4, seed=5)
    cache = fc.enable(pipe, interval=3)

    def run(images, latents):
        fc.reset(pipe)
        interval = GuidanceInterval(0.2, 0.7)
        with interval.attached(pipe):
            return _run(pipe, images, latents=latents, callback_on_step_end=interval)

    alone = [run(1, starts[i:i + 1]) for i in range(4)]
    if which == "base":  # head 0-1 (N rows), guided 2-6 (2N), tail 7-9 (N)
        assert cache.run.trace == "FCRCCFCCFC"
    for images in (2, 3, 4):
        out = run(images, starts[:images])
        for i in range(images):
            torch.testing.assert_close(out[i:i + 1], alone[i], atol=2e-4, rtol=0)
    if which == "base":
        fc.enable(pipe, interval=3, on_half_batch="recompute")
        run(2, starts[:2])
        assert cache.run.trace == "FCRCCFCRCC"


# ---------------------------------------------------------------------- use in a pipeline

def test_chains_another_callback_and_reuses_across_calls(tiny):
    from diffusers.callbacks import PipelineCallback

    pipe = tiny["base"]
    seen = []

    class Progress(PipelineCallback):
        tensor_inputs = ["latents"]

        def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
            seen.append((step_index, callback_kwargs["latents"].shape[0], callback_kwargs["prompt_embeds"].shape[0]))
            return callback_kwargs

    interval = GuidanceInterval(0.0, 0.7, then=Progress())
    assert interval.tensor_inputs == ["latents", "prompt_embeds", "add_text_embeds", "add_time_ids"]
    other = type("Other", (), {"tensor_inputs": ["add_time_ids", "negative_add_time_ids"]})()
    assert GuidanceInterval(then=other).tensor_inputs[-1] == "negative_add_time_ids"  # what `then` asks for too
    with interval.attached(pipe):
        first = _run(pipe, 2, callback_on_step_end=interval)
        second = _run(pipe, 2, callback_on_step_end=interval)  # a finished run: the next call starts a new one
    assert torch.equal(first, second) and interval.stats()["steps"] == STEPS
    assert [s[0] for s in seen] == list(range(STEPS)) * 2
    assert [s[2] for s in seen[:STEPS]] == [4] * 6 + [2] * 4  # halved at the end of step 6, then 2 rows

    # A plain function (what the service passes today) works too.
    calls = []
    interval = GuidanceInterval(0.0, 0.5, then=lambda p, i, t, kw: calls.append(i) or kw)
    _run(pipe, callback_on_step_end=interval)
    assert calls == list(range(STEPS)) and interval.stats()["unguided_steps"] == 5


def test_a_head_needs_attach_and_no_cfg_saves_nothing(tiny):
    pipe = tiny["base"]
    with pytest.raises(RuntimeError, match="attach"):
        _run(pipe, callback_on_step_end=GuidanceInterval(0.3, 1.0))
    plain = _run(pipe, 2, guidance_scale=1.0)
    interval = GuidanceInterval(0.3, 0.6)
    with interval.attached(pipe):
        assert torch.equal(_run(pipe, 2, guidance_scale=1.0, callback_on_step_end=interval), plain)
    assert interval.stats()["cfg"] is False and interval.stats()["evaluations"] == 2 * STEPS
    assert interval.evaluations_saved == 0


def test_bad_intervals_are_refused():
    for start, stop in ((-0.1, 1.0), (0.0, 1.5), (True, 1.0), ("0", 1.0)):
        with pytest.raises(ValueError):
            GuidanceInterval(start, stop)
    assert guided_steps(10, 0.0, 0.7) == [True] * 7 + [False] * 3
    assert guided_steps(20, 0.1, 0.8) == [False] * 2 + [True] * 14 + [False] * 4
    assert evaluations(20, 3, 0.0, 0.6) == (3 * (20 + 12), 3 * 8)

# Picture quality on the trained demo model: tests/test_less_work.py judges the presets through the service.
