"""Shared fixtures (the tiny random-weight model, built offline in about a second) and the suite's hooks: the markers
(slow, ray, browser) and the reliability summary line. Helpers that tests import live in tests/helpers."""
from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import pytest

from tests.helpers import RELIABILITY

# Tests never touch the network: hub lookups fail fast instead of waiting on timeouts.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
logging.getLogger("xformers").setLevel(logging.ERROR)


@pytest.fixture(scope="session")
def tiny_service(tmp_path_factory):
    """One loaded tiny model for the whole session, on the CPU (pinned: its steps policy, 50 → 35, is what these
    tests check, on a GPU host too), with this machine's real probe."""
    from sdxl_ui.service import GenerationService
    from sdxl_ui.settings import AppSettings

    outputs = tmp_path_factory.mktemp("outputs")
    service = GenerationService(AppSettings(model="tiny", outputs=outputs, device="cpu"))
    service.ensure_loaded()
    return service


@pytest.fixture(scope="module")
def tiny():
    """The tiny base and refiner pipelines, built once per test module, for tests that work on the pipelines."""
    from sdxl_ui.models import build_tiny

    base, refiner = build_tiny()
    return {"base": base, "refiner": refiner}


@pytest.fixture(autouse=True)
def _no_model_load_left_running():
    """After each test, wait for the model loads it left running in the background (the page's "continue with the
    demo model" loads in a thread named "preload" and returns; test_security.py and test_ui_app.py press it).
    Loading switches process-wide state for its duration (accelerate's meta-device patch of
    torch.nn.Module.register_parameter, diffusers' torch.set_default_dtype): two loads that overlap restore it in the
    wrong order and leave it switched for the rest of the session, so later tests build their modules on the meta
    device, in bf16 (seen once, in a fast-part run: 42 failures and 3 errors after the security tests)."""
    yield
    for thread in threading.enumerate():
        if thread.name == "preload" and thread is not threading.current_thread():
            thread.join(300)


def pytest_terminal_summary(terminalreporter):
    r = RELIABILITY
    if r["bad_inputs"] or r["faults"] or r["jobs"]:
        terminalreporter.write_line(
            f"reliability: {len(r['bad_inputs'])} bad inputs, {len(r['faults'])} faults, "
            f"{r['jobs']} jobs under load, {r['lost']} lost")
        terminalreporter.write_line(f"reliability faults survived: {', '.join(sorted(r['faults']))}")


# ---------------------------------------------------------------- markers

TESTS = Path(__file__).resolve().parent

# What each marker means (`python -m pytest tests -m "not slow and not ray and not browser"` is the fast part;
# `-m dtype` is what .ci/run repeats under the plan dtype the host does not take by itself).
MARKERS = {
    "slow": "takes more than about 5 s on the 2-core dev machine: starts app.py or a generating CLI subprocess, "
            "loads or trains the demo model, runs selftest or the benchmark, or runs the tiny pipelines for many "
            "steps and images",
    "ray": "starts Ray instances or clusters (pip install -r requirements-serve.txt)",
    "browser": "drives Debian's Chromium through Playwright (apt-get install -y chromium)",
    "dtype": "depends on the plan's dtype on this CPU (precision, LoRA fusing, the memory preflight, the bench): "
             ".ci/run runs these again under SDXL_UI_CPU_DTYPE=fp32 (or =bf16 on an fp32-plan host)",
}

# Which tests carry them. Marked here rather than in the test files, so that a test file holds its tests only.
# An entry is a file ("folder/test_x.py": all its tests), a test ("folder/test_x.py::test_name": every
# parametrization of it) or a fixture ("fixture:name": every test that uses it, directly or through another).
MARKED = {
    "slow": [
        "fixture:app",  # app.py in a subprocess (test_app, test_security, test_load, test_security_defaults)
        "fixture:demo_app",  # app.py with the demo model (test_screenshot)
        "frontends/test_a1111_webuiapi.py",  # app.py --api --model demo, driven by webuiapi
        "frontends/test_a1111_clients.py",  # app.py --api --model demo, the real clients' call sequences replayed
        "frontends/test_a1111_serving.py",  # app.py --api --model tiny under load, and its flags
        "frontends/test_app.py::test_share_without_auth_prints_generated_credentials_and_keeps_serving_offline",
        "frontends/test_security.py::test_the_app_throttles_logins_when_it_has_them",
        "frontends/test_load.py::test_bounded_queue_rejects_overflow_clearly",
        "frontends/test_security_defaults.py::test_max_jobs_per_user",
        "frontends/test_faults.py::test_sigterm_during_a_cli_save_finishes_that_png_and_stops",
        "frontends/test_faults.py::test_sigterm_during_a_save_in_the_app_finishes_the_png_takes_no_new_job_and_exits",
        "frontends/test_cli.py::test_generate_json_acceptance_run_is_reproducible",
        "frontends/test_cli.py::test_a_device_this_machine_lacks_is_bad_input_in_cli_and_app",
        "frontends/test_bad_input.py::test_relative_output_path_is_relative_to_the_current_folder_in_api_and_cli",
        "planning/test_less_work.py::test_presets_keep_the_demo_models_adherence_within_3_points_of_exact",
        "planning/test_units_contract.py::test_live_rows_equal_the_expected_rows_for_every_variant",
        "planning/test_units_contract.py::test_turning_each_technique_off_restores_the_pipeline_bit_for_bit",
        "planning/test_units_contract.py::test_applying_twice_is_applying_once",
        "tools/test_demo_model.py",
        "frontends/test_lora_flags.py::test_cli_refuses_a_lora_for_another_architecture_with_exit_2",  # loads tiny
        "frontends/test_security_round3.py",  # each test launches app.py (issue 21's attacks)
        "frontends/test_security_round4.py",  # app.py --api with and without a login (issue 27's findings)
        "tools/test_demo_train.py",
        "tools/test_demo_distill.py",  # smoke distillations, then the demo model generating with each
        "tools/test_demo_few_step.py",  # the shipped LCM-LoRA and tiny decoder, pictures judged
        "pipeline/test_tiny_decoder.py",  # tiny-model generations with a tiny decoder, and the CLI
        "pipeline/test_hub_cache.py",  # the demo model as an offline hub cache: a generating CLI subprocess each
        "planning/test_picture.py::test_a_tiled_demo_picture_wraps_at_its_edges",  # the demo model, 8 pictures
        "pipeline/test_samplers_run.py",  # 21 samplers × 12 schedule types on the tiny pipeline (~2 min)
        "pipeline/test_long_prompts.py",  # the demo model: 8 pictures at 20 steps
        "pipeline/test_prompt_weighting.py",  # the demo model: ~80 pictures at 20 steps
        "pipeline/test_image_to_image.py",  # the demo model: image to image, and the CLI
        "tools/test_selftest.py::test_selftest_on_cpu_passes_every_cpu_configuration",
        "tools/test_bench.py::test_bench_runs_end_to_end_with_the_high_quality_path",
        # The tiny pipelines, many steps or images (5-60 s each on the loaded dev machine, 2026-11-28):
        "frontends/test_api.py::test_seed_api_returns_true_writes_the_file_and_logs_seed_style_lines",
        "service/test_service_state.py::test_status_panel_reports_the_live_state_against_the_plan_that_made_it",
        "planning/test_optimize.py::test_vae_tiling_tiles_a_1024_image",
        "hardware/test_int8.py::test_quantized_bf16_unet_runs_in_bf16",
        "hardware/test_feature_cache.py::test_cached_step_is_the_full_forward_with_the_kept_deep_feature",
        "hardware/test_feature_cache.py::test_half_batch_keeps_the_conditional_rows_or_recomputes",
        "hardware/test_feature_cache.py::test_interval_1_is_bit_exact",
        "hardware/test_feature_cache.py::test_interval_3_runs_the_scheduled_full_steps_and_reports_them",
        "hardware/test_feature_cache.py::test_karras_schedule_with_repeated_timesteps_counts_calls_not_timesteps",
        "hardware/test_feature_cache.py::test_each_image_of_a_call_is_the_image_of_its_own_call",
        "hardware/test_feature_cache.py::test_disable_restores_the_original_forward_exactly",
        "hardware/test_guidance_interval.py::test_the_whole_schedule_is_plain_cfg_bit_exact",
        "hardware/test_guidance_interval.py::test_unguided_steps_run_only_the_conditional_rows_for_1_to_4_images",
        "hardware/test_guidance_interval.py::test_one_image_matches_diffusers_cutoff_callback_which_breaks_with_two",
        "hardware/test_guidance_interval.py::test_with_the_feature_cache_each_image_is_the_image_of_its_own_call",
        "hardware/test_guidance_interval.py::test_chains_another_callback_and_reuses_across_calls",
        "hardware/test_guidance_interval.py::test_a_head_needs_attach_and_no_cfg_saves_nothing",
    ],
    "ray": [
        "backends/test_ray_serve.py",  # a Ray instance with two replicas (the file marks itself too)
        "backends/test_ray_app.py",  # the app's own Ray instance, a `ray start --head` cluster (the file too)
    ],
    "browser": [
        "fixture:browser",  # Chromium (test_app, test_screenshot)
    ],
    "dtype": [  # what reads the plan's dtype on this host (the recorded probes' tests do not)
        "frontends/test_cli.py::test_doctor_json_on_this_machine",
        "pipeline/test_loras.py",
        "pipeline/test_weights.py",
        "tools/test_bench.py::test_bench_runs_end_to_end_with_the_high_quality_path",
        "tools/test_demo_train.py::test_smoke_training_writes_a_loadable_sdxl_folder",
        "tools/test_demo_few_step.py::test_taking_the_lcm_lora_off_gives_the_base_weights_bit_for_bit_and_its_pictures",
        "hardware/test_int8.py",
        "hardware/test_device.py",
    ],
}


def pytest_configure(config):
    for name, meaning in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {meaning}")


def _stale(entry: str) -> bool:
    """An entry that names nothing (a test renamed or moved): it would leave a slow test in the fast part."""
    if entry.startswith("fixture:"):
        needle = f"def {entry.removeprefix('fixture:')}("
        return not any(needle in path.read_text() for path in TESTS.rglob("*.py"))
    file, _, name = entry.partition("::")
    path = TESTS / file
    return not path.is_file() or bool(name) and f"def {name}(" not in path.read_text()


@pytest.hookimpl(tryfirst=True)  # before -m deselects by them
def pytest_collection_modifyitems(config, items):
    stale = [entry for entries in MARKED.values() for entry in entries if _stale(entry)]
    if stale:
        raise pytest.UsageError(f"tests/conftest.py MARKED names what does not exist: {', '.join(stale)}")
    for item in items:
        file = item.path.relative_to(TESTS).as_posix()
        test = f"{file}::{getattr(item, 'originalname', item.name)}"
        for marker, entries in MARKED.items():
            if any(entry in (file, test) or entry.startswith("fixture:") and entry[8:] in item.fixturenames
                   for entry in entries):
                item.add_marker(marker)
