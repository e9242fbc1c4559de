import threading

import numpy as np
from conftest import run

from sdxl_ui.metadata import parse_parameters, read_parameters
from sdxl_ui.schema import GenerationRequest
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
    assert params["Seed"] == "3" and params["Steps"] == "1"  # 2 requested × 0.7 on CPU and params["Model"] == "tiny"
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


def test_cancel_stops_within_one_step(tiny_service):
    cancel = CancelToken()
    seen = []
    for event in tiny_service.generate(GenerationRequest(prompt="a fox", steps=100, seed=1), cancel=cancel):
        if hasattr(event, "step"):
            seen.append(event.step)
            if event.step == 3:
                cancel.cancel()
        last = event
    # The worker may already be inside step 4 when Stop is pressed: that step finishes, no further one starts.
    assert seen[-1] in (3, 4)
    assert last.kind == "cancelled" and last.message == f"cancelled at step {seen[-1]}/70"
    # The device is free again: the next request runs normally.
    assert run(tiny_service, GenerationRequest(prompt="a fox", steps=2, seed=1))["results"]


def test_consumer_going_away_cancels_the_run(tiny_service):
    gen = tiny_service.generate(GenerationRequest(prompt="a fox", steps=140, seed=1))
    for event in gen:
        if hasattr(event, "step") and event.step == 2:
            break
    gen.close()  # like a closed browser tab
    done = threading.Event()

    def follow_up():
        run(tiny_service, GenerationRequest(prompt="a fox", steps=2, seed=1))
        done.set()

    threading.Thread(target=follow_up, daemon=True).start()
    assert done.wait(30), "the device was not freed after the consumer left"


def test_refiner_two_stage_path_when_forced_on(tmp_path):
    service = GenerationService(AppSettings(model="tiny", use_refiner="on", outputs=tmp_path))
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
    assert service._models.refiner.text_encoder_2 is service._models.base.text_encoder_2
    assert service._models.refiner.vae is service._models.base.vae
    assert "Refiner: yes" in result.parameters


def test_missing_model_gives_one_clear_message(tmp_path):
    service = GenerationService(AppSettings(model="stabilityai/stable-diffusion-xl-base-1.0", outputs=tmp_path))
    out = run(service, GenerationRequest(prompt="a fox"))
    assert not out["results"]
    (error,) = out["errors"]
    assert error.kind == "model"
    for must in ("stabilityai/stable-diffusion-xl-base-1.0", "download", "--model /path", "--model tiny"):
        assert must in error.message
    assert "Traceback" not in error.message


def test_failed_save_still_returns_the_image(tiny_service, monkeypatch):
    import sdxl_ui.service as service_module

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(service_module, "save_png", disk_full)
    out = run(tiny_service, GenerationRequest(prompt="a fox", steps=2, seed=1))
    result = out["results"][0]
    assert result.image is not None and result.path is None
    assert "No space left on device" in result.save_error
    assert any("NOT saved" in line for line in out["logs"])


def test_long_prompt_truncation_is_reported(tiny_service):
    out = run(tiny_service, GenerationRequest(prompt="fox " * 200, steps=1, seed=1))
    assert out["results"]
    assert any("tokens dropped" in line and line.startswith("⚠ prompt") for line in out["logs"])


def test_sampler_options_do_not_leak_between_requests(tiny_service):
    run(tiny_service, GenerationRequest(prompt="a fox", quality="fast", steps=2, seed=1))
    assert tiny_service._models.base.scheduler.config.use_karras_sigmas is True
    run(tiny_service, GenerationRequest(prompt="a fox", steps=2, seed=1))  # high quality: plain Euler
    scheduler = tiny_service._models.base.scheduler
    assert type(scheduler).__name__ == "EulerDiscreteScheduler" and not scheduler.config.use_karras_sigmas
