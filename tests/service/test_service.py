import threading

import numpy as np
from tests.helpers import load_probe, run

from sdxl_ui.metadata import parse_parameters, read_parameters
from sdxl_ui.schema import ErrorKind, GenerationRequest
from sdxl_ui.service import CancelToken, GenerationService
from sdxl_ui.settings import AppSettings


def pixels(result):
    return np.asarray(result.image)


def test_same_seed_gives_identical_pixels_and_different_seed_does_not(tiny_service):
    req = GenerationRequest(prompt="a red fox", steps=10, seed=7)
    a = run(tiny_service, req)["results"][0]
    b = run(tiny_service, req)["results"][0]
    c = run(tiny_service, GenerationRequest(prompt="a red fox", steps=10, seed=8))["results"][0]
    assert a.seed == b.seed == 7
    assert np.array_equal(pixels(a), pixels(b))
    assert not np.array_equal(pixels(a), pixels(c))
    assert pixels(a).shape == (256, 256, 3)  # tiny's native size, real 8x VAE factor


def test_cpu_high_quality_runs_35_of_50_steps_and_reports_everything(tiny_service):
    out = run(tiny_service, GenerationRequest(prompt="a red fox", seed=1))
    result = out["results"][0]
    assert (result.steps_requested, result.steps_run) == (50, 35)
    assert result.device == "cpu" and result.refiner is False
    assert [p.step for p in out["progress"]] == list(range(1, 36))
    assert all(p.total == 35 for p in out["progress"])
    assert any(p.preview is not None for p in out["progress"])
    assert "Mode: HIGH QUALITY (base steps=35, guidance=8)" in "\n".join(out["logs"])
    assert any(line.startswith("Refinement: DISABLED (CPU mode)") for line in out["logs"])
    assert any(line.startswith("✅ Image saved to") for line in out["logs"])
    assert result.timings.generate_s > 0 and result.timings.total_s >= result.timings.generate_s


def test_random_seed_is_reported_and_written(tiny_service):
    result = run(tiny_service, GenerationRequest(prompt="a red fox", steps=2))["results"][0]
    assert 0 <= result.seed < 2**32
    assert parse_parameters(read_parameters(result.path))["Seed"] == str(result.seed)


def test_png_parameters_chunk_and_names_that_never_overwrite(tiny_service):
    req = GenerationRequest(prompt="a <b>red</b> fox", negative_prompt="blur", steps=2, seed=3)
    first = run(tiny_service, req)["results"][0]
    second = run(tiny_service, req)["results"][0]
    assert first.path != second.path
    params = parse_parameters(read_parameters(first.path))
    assert params["prompt"] == "a <b>red</b> fox" and params["negative_prompt"] == "blur"
    assert params["Seed"] == "3" and params["Steps"] == "1"  # 2 requested × 0.7 on CPU
    assert params["Model"] == "tiny"
    assert "random weights" in params["Note"]


def test_images_per_run_each_get_their_own_seed(tiny_service):
    out = run(tiny_service, GenerationRequest(prompt="a red fox", steps=2, seed=10, images=3))
    assert [r.seed for r in out["results"]] == [10, 11, 12]
    single = run(tiny_service, GenerationRequest(prompt="a red fox", steps=2, seed=11))["results"][0]
    assert np.array_equal(pixels(out["results"][1]), pixels(single))
    assert out["progress"][-1].step == out["progress"][-1].total == 3  # 3 images × (2 × 0.7 → 1 step)


def test_explicit_output_path_is_honoured(tiny_service, tmp_path):
    target = tmp_path / "mine.png"
    result = run(tiny_service, GenerationRequest(prompt="a fox", steps=2, seed=1), output_path=target)["results"][0]
    assert result.path == str(target) and target.is_file()


def test_consumer_going_away_cancels_the_run(tiny_service):
    """generate()'s `finally` cancels the run when its consumer leaves (a closed tab): the token is set at once and
    the worker stops within a step, far before the 4 × 105 steps it was asked for."""
    unet = tiny_service.models.base.unet
    calls = []
    hook = unet.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        cancel = CancelToken()
        gen = tiny_service.generate(GenerationRequest(prompt="a fox", steps=150, seed=1, images=4), cancel=cancel)
        for event in gen:
            if hasattr(event, "step") and event.step == 2:
                break
        gen.close()  # like a closed browser tab
        assert cancel.cancelled, "closing the event stream did not cancel the run"
        done = threading.Event()

        def follow_up():
            run(tiny_service, GenerationRequest(prompt="a fox", steps=2, seed=1))
            done.set()

        threading.Thread(target=follow_up, daemon=True).start()
        assert done.wait(60), "the device was not freed after the consumer left"
    finally:
        hook.remove()
    # 2 steps seen, at most one more in flight, then the follow-up's single step; never the 420 asked for.
    assert len(calls) <= 6, f"the abandoned run kept going: {len(calls)} UNet calls"


def test_every_event_of_a_job_carries_its_id(tiny_service):
    """Issue 20: the job id travels in the events (the replica too, from a Ray worker; "" in process)."""
    ids = []
    for _ in range(2):
        events = list(tiny_service.generate(GenerationRequest(prompt="a fox", steps=2, seed=1)))
        assert len(events) > 3 and all(e.replica == "" for e in events)
        ids.append({e.job_id for e in events})
    assert all(len(one) == 1 and "" not in one for one in ids) and ids[0] != ids[1]
    given = list(tiny_service.generate(GenerationRequest(prompt="a fox", steps=2, seed=1), job_id="mine"))
    assert {e.job_id for e in given} == {"mine"}


def test_refiner_two_stage_path_when_forced_on(tmp_path):
    service = GenerationService(AppSettings(model="tiny", use_refiner="on", outputs=tmp_path, device="cpu"))
    out = run(service, GenerationRequest(prompt="a red fox", steps=10, seed=5))
    assert not out["errors"], out["errors"]
    result = out["results"][0]
    assert result.refiner is True
    stages = [p.stage for p in out["progress"]]
    assert stages[0] == "Stage 1/2" and stages[-1] == "Stage 2/2"
    # 10 × 0.7 = 7 steps; timesteps 853, 711, 569, 427, 285 (≥ 200, base) | 143, 1 (refiner after t=200)
    assert stages.count("Stage 1/2") == 5 and stages.count("Stage 2/2") == 2
    assert out["progress"][-1].step == out["progress"][-1].total == 7
    assert result.steps_run == len(stages)
    assert any(line.startswith("Refinement: ENABLED") for line in out["logs"])
    assert result.report.get("Refinement").status.value == "active"
    assert service.models.refiner.text_encoder_2 is service.models.base.text_encoder_2
    assert service.models.refiner.vae is service.models.base.vae
    assert "Refiner: yes" in result.parameters


def test_missing_model_gives_one_clear_message(tmp_path):
    # A recorded probe with room for SDXL: on a host short of RAM the memory preflight would (rightly) speak first.
    service = GenerationService(AppSettings(model="stabilityai/stable-diffusion-xl-base-1.0", outputs=tmp_path),
                                probe=load_probe("cpu_epyc_avx512_bf16"))
    out = run(service, GenerationRequest(prompt="a fox"))
    assert not out["results"]
    (error,) = out["errors"]
    assert error.kind is ErrorKind.MODEL
    for must in ("stabilityai/stable-diffusion-xl-base-1.0", "download", "--model /path", "--model demo"):
        assert must in error.message
    assert "Traceback" not in error.message


def test_a_long_prompt_is_read_in_chunks_and_what_is_cut_is_reported(tiny_service):
    import re

    out = run(tiny_service, GenerationRequest(prompt="fox " * 100, steps=1, seed=1))  # 300 tokens of tiny's
    assert out["results"]
    assert "prompt: 300 tokens, in 4 chunks of 75 (the encoders' window is 77)" in out["logs"]
    cut = run(tiny_service, GenerationRequest(prompt="fox " * 700, steps=1, seed=1))
    assert any(re.match(r"⚠ prompt: 2100 tokens; 8 chunks of 75 read, the rest cut", line) for line in cut["logs"])


def test_sampler_options_do_not_leak_between_requests(tiny_service):
    run(tiny_service, GenerationRequest(prompt="a fox", quality="fast", steps=2, seed=1))
    assert tiny_service.models.base.scheduler.config.use_karras_sigmas is True
    run(tiny_service, GenerationRequest(prompt="a fox", steps=2, seed=1))  # high quality: plain Euler
    scheduler = tiny_service.models.base.scheduler
    assert type(scheduler).__name__ == "EulerDiscreteScheduler" and not scheduler.config.use_karras_sigmas
